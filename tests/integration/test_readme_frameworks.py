"""The README's framework scripts (Hugging Face, Lightning, Accelerate) run as written and
write their JSON lines. The DeepSpeed script needs DeepSpeed's CPU shared-memory op built
(tens of seconds), so it is not run here; tests/integration/test_deepspeed_recorder.py runs
the same recorder on a real engine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNS = {
    "Hugging Face Trainer and TRL": "hf-sft",
    "Lightning": "lightning",
    "Accelerate": "accelerate",
}
# Train rows every 10 steps; the Accelerate loop runs 3 epochs of 16 steps, so its last values
# (steps 41-48) are exported at shutdown, at step 48.
TRAIN_STEPS = {
    "hf-sft": [10, 20, 30, 40],
    "lightning": [10, 20, 30, 40],
    "accelerate": [10, 20, 30, 40, 48],
}


def _framework_scripts() -> dict[str, str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## Frameworks") :]
    section = section[: section.index("\n## ", 1)]
    scripts = {}
    for part in section.split("\n### ")[1:]:
        title, _, body = part.partition("\n")
        block = re.search(r"```python\n(.*?)```", body, re.S)
        if block:
            scripts[title.strip()] = block.group(1)
    return scripts


def test_readme_has_one_runnable_section_per_framework():
    assert set(_framework_scripts()) == {*RUNS, "DeepSpeed"}


def test_readme_framework_scripts_run_and_export(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    pytest.importorskip("accelerate")
    scripts = _framework_scripts()
    paths = []
    for title in RUNS:
        path = (
            tmp_path / f"readme_{RUNS[title].replace('-', '_')}.py"
        )  # not accelerate.py: it would shadow the package
        path.write_text(scripts[title])
        paths.append(str(path))
    # One interpreter for the three (their imports dominate the time), each script fresh.
    runner = "import runpy, sys\nfor path in sys.argv[1:]:\n    runpy.run_path(path, run_name='__main__')\n"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "OTEL_TRAIN_OUTPUT_DIR", "OTEL_TRAIN_RUN"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", runner, *paths],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for run in RUNS.values():
        rows = [json.loads(line) for line in (tmp_path / "runs" / run / "rank0.jsonl").open()]
        assert [r["step"] for r in rows if "train/loss" in r["metrics"]] == TRAIN_STEPS[run], run

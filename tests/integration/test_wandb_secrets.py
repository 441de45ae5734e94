"""No secret from `config=` or the command line reaches any file a real W&B run writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb")

from otel_train.redaction import REDACTED
from tests.secrets_corpus import KEPT, SECRETS
from tests.wandb_records import find_run_file, read_finished_run

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ARGV_SECRETS = {
    "argv_process_api_key": "proc-argv-key-6b3f0e",
    "argv_process_hf": "hf_ProcArgvTok00x",
}


def every_file(root: Path) -> list[Path]:
    found = []
    for directory, _, names in os.walk(root, followlinks=False):
        for name in names:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                found.append(path)
    return found


def test_no_secret_reaches_any_file_of_an_offline_wandb_run(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "HOME": str(tmp_path / "home"),
    }
    command = [
        sys.executable, "-m", "tests.integration.wandb_secrets_worker", str(tmp_path / "runs"),
        "--api-key", ARGV_SECRETS["argv_process_api_key"],
        f"--hf-token={ARGV_SECRETS['argv_process_hf']}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=180)
    assert result.returncode == 0, result.stderr.decode()

    files = every_file(tmp_path)
    names = {path.name for path in files}
    assert {"rank0.jsonl", "rank0.wandb.json", "debug.log", "debug-internal.log"} <= names
    wandb_file = find_run_file(tmp_path)
    assert wandb_file in files
    for label, secret in {**SECRETS, **ARGV_SECRETS}.items():
        holders = [str(p.relative_to(tmp_path)) for p in files if secret.encode() in p.read_bytes()]
        assert not holders, f"{label} leaked into {holders}"
    output = result.stdout + result.stderr
    assert not any(secret.encode() in output for secret in SECRETS.values())

    # The grep can see what is there: kept values are in the run file, redacted ones marked.
    run = read_finished_run(wandb_file)
    assert b"Ada Lovelace" in wandb_file.read_bytes()
    assert run.config["author"] == KEPT["author"] and run.config["authors"] == KEPT["authors"]
    assert run.config["num_tokens"] == KEPT["num_tokens"]
    assert run.config["deploy"]["private_key"] == REDACTED
    assert run.config["launcher"] == ["train.py", "--api-key", REDACTED, "--lr", "3e-4"]
    assert run.config["service"] == {"api_key": REDACTED, "region": "eu"}

"""A W&B server that cannot be reached does not hold the process at exit.

wandb's own exit hook waits for its service without a timeout; with the server unreachable
that took ~50 s after `shutdown()` returned. A real process, a real wandb in online mode, a
closed port on 127.0.0.1 as the server, a fake API key (W&B cloud cannot exist here).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("wandb")

from exporters._wandb_exit import EXIT_GRACE_SECONDS, KILL_GRACE_SECONDS
from tests.wandb_records import find_run_file, read_finished_run

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BUDGET_MS = 3_000
FAKE_API_KEY = "0123456789abcdef" * 3  # 48 hex chars: well-formed, known to no server
# Interpreter start-up, imports and a loaded 2-core machine: generous, and far below the ~50 s
# the exit took without a bound.
MARGIN_SECONDS = 10.0


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("how", ["with-block", "atexit"])
def test_process_exits_within_the_budget_when_wandb_is_unreachable(
    tmp_path: Path, how: str
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "online",
        "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}",
        "WANDB_API_KEY": FAKE_API_KEY,
        "WANDB_DIR": str(tmp_path),
        "WANDB_DISABLE_GIT": "true",
        # As `otel-train demo` sets it. Silent, wandb.init skips its interactive login check
        # and sends the run to its service, which then retries the server until its timeouts.
        "WANDB_SILENT": "true",
        "HOME": str(tmp_path / "home"),
    }
    command = [sys.executable, "-m", "tests.integration.wandb_exit_worker"]
    started = time.time()
    result = subprocess.run(
        [*command, str(tmp_path / "runs"), how, str(BUDGET_MS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    ended = time.time()
    assert result.returncode == 0, result.stderr
    marker = "shutdown-returned" if how == "with-block" else "script-ended"
    (line,) = [text for text in result.stdout.splitlines() if text.startswith(marker)]
    exit_seconds = ended - float(line.split()[1])
    print(f"{how}: whole process {ended - started:.1f} s, exit after {marker} {exit_seconds:.1f} s")

    bound = EXIT_GRACE_SECONDS + KILL_GRACE_SECONDS + MARGIN_SECONDS
    if how == "atexit":
        bound += BUDGET_MS / 1000  # otel-train's own shutdown runs at exit too
    assert exit_seconds < bound, result.stderr
    assert "stopping wandb's service" in result.stderr
    # Every row still reached the JSON lines, final/* included.
    rows = [
        json.loads(x) for x in (tmp_path / "runs/unreachable/rank0.jsonl").read_text().splitlines()
    ]
    assert [row["step"] for row in rows if "train/loss" in row["metrics"]] == [
        10,
        20,
        30,
        40,
        50,
        60,
    ]
    assert rows[-1]["metrics"]["final/total_tokens"] == 60 * 64


def test_a_healthy_offline_run_exiting_without_shutdown_is_finished_not_stopped(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
    }
    result = subprocess.run(
        [sys.executable, "-m", "tests.integration.wandb_exit_worker", str(tmp_path / "runs"),
         "atexit", str(BUDGET_MS)],
        env=env, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "stopping wandb's service" not in result.stderr
    run = read_finished_run(find_run_file(tmp_path / "wandb"))
    assert run.history_steps == [10, 20, 30, 40, 50, 60]
    assert run.summary["final/total_tokens"] == 60 * 64

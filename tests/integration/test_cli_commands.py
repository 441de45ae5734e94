"""The README's main command and the run tools, end to end in real processes:
`otel-train demo` trains and writes JSON lines (and serves /metrics), `report` writes PNGs,
`compare` overlays two demo runs, `sync --to wandb` replays a run into W&B offline files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from otel_train.runs import read_run
from tests.wandb_records import find_run_file, read_finished_run

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def otel_train_cli(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "WANDB_MODE": "offline"}
    env.pop("OTEL_TRAIN_PROMETHEUS_PORT", None)
    return subprocess.run(
        [sys.executable, "-m", "otel_train.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Two short demo runs: one with every exporter, one JSON lines only, another seed."""
    work = tmp_path_factory.mktemp("cli")
    first = otel_train_cli(
        "demo", "--steps", "40", "--intervals", "train=5,perf=10", "--eval-every", "20",
        "--run", "demo-a", "--output-dir", "runs", cwd=work,
    )  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    second = otel_train_cli(
        "demo", "--steps", "30", "--exporters", "jsonl", "--seed", "1",
        "--run", "demo-b", "--output-dir", "runs", cwd=work,
    )  # fmt: skip
    assert second.returncode == 0, second.stdout + second.stderr
    return work / "runs" / "demo-a", work / "runs" / "demo-b", first.stdout


def test_demo_writes_json_lines_with_loss_throughput_mfu_and_eval(
    demo_runs: tuple[Path, Path, str],
) -> None:
    run_a, _, output = demo_runs
    record = read_run(run_a)
    assert record.run == "demo-a" and record.stage == "pretrain"
    assert record.series("train/loss")[0] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert record.series("perf/tokens_per_second")[0] == [10, 20, 30, 40]
    assert all(v > 0 for v in record.series("perf/tokens_per_second")[1])
    assert all(v > 0 for v in record.series("perf/mfu")[1])  # peak measured on this device
    assert record.series("eval/perplexity")[0] == [20, 40]
    assert record.last("final/total_steps") == 40.0
    losses = record.series("train/loss")[1]
    assert losses[-1] < losses[0]  # it really trains
    assert "Where everything went" in output and str(Path("runs") / "demo-a") in output


def test_demo_serves_prometheus_while_training(demo_runs: tuple[Path, Path, str]) -> None:
    pytest.importorskip("prometheus_client")
    output = demo_runs[2]
    assert "http://127.0.0.1:" in output and "/metrics (served" in output, output


def test_report_writes_summary_and_non_empty_pngs(demo_runs: tuple[Path, Path, str]) -> None:
    run_a = demo_runs[0]
    result = otel_train_cli("report", str(run_a), cwd=run_a.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("loss", "learning_rate", "throughput", "mfu"):
        png = (run_a / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000, name
    summary = json.loads((run_a / "summary.json").read_text())
    record = read_run(run_a)
    assert summary["final_loss"] == pytest.approx(record.last("final/train_loss"))
    assert summary["best_eval_perplexity"] == pytest.approx(
        min(record.series("eval/perplexity")[1])
    )
    assert summary["median_tokens_per_second"] > 0 and summary["step_time_p95"] > 0
    assert summary["gpu_memory_peak"] is None  # no GPU here: reported as n/a, not 0
    assert "best eval perplexity" in result.stdout and "n/a" in result.stdout


def test_compare_overlays_two_demo_runs(demo_runs: tuple[Path, Path, str], tmp_path: Path) -> None:
    run_a, run_b, _ = demo_runs
    out = tmp_path / "ab.png"
    result = otel_train_cli("compare", str(run_a), str(run_b), "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo-a" in result.stdout and "demo-b" in result.stdout
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 20_000


def test_sync_replays_the_run_into_wandb_with_the_same_keys_and_steps(
    demo_runs: tuple[Path, Path, str], tmp_path: Path
) -> None:
    pytest.importorskip("wandb")
    run_b = demo_runs[1]
    result = otel_train_cli(
        "sync", str(run_b), "--to", "wandb", "--mode", "offline", "--dir", str(tmp_path),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    wandb_run = read_finished_run(find_run_file(tmp_path))
    history: dict[int, dict[str, float]] = {}
    for step, row in zip(wandb_run.history_steps, wandb_run.history, strict=True):
        history.setdefault(step, {}).update({k: v for k, v in row.items() if k[0] != "_"})
    record = read_run(run_b)
    expected: dict[int, dict[str, float]] = {}
    for row in record.rows:
        history_part = {k: v for k, v in row.metrics.items() if not k.startswith("final/")}
        if set(history_part) - {"train/global_step"}:  # final/* alone makes no history row
            expected.setdefault(row.step, {}).update(history_part)
    assert sorted(history) == sorted(expected)
    for step, metrics in expected.items():
        assert set(history[step]) == set(metrics), step
        for key, value in metrics.items():
            assert history[step][key] == pytest.approx(value), (step, key)
    assert wandb_run.summary["final/total_steps"] == record.last("final/total_steps")


def test_report_of_a_folder_without_a_run_fails_with_a_clear_message(tmp_path: Path) -> None:
    result = otel_train_cli("report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "no JSON-lines run here" in result.stderr


def test_report_shows_a_diverged_run_as_diverged(tmp_path: Path) -> None:
    import otel_train

    with otel_train.setup(
        run="diverged", output_dir=tmp_path, exporters=("jsonl",), intervals={"train": 5}
    ) as tel:
        for step in range(1, 11):
            tel.record(loss=0.5 if step < 10 else float("nan"), tokens=8)
            tel.step(step)
    result = otel_train_cli("report", str(tel.context.run_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nan (diverged)" in result.stdout
    summary = json.loads((tel.context.run_dir / "summary.json").read_text())
    assert summary["final_loss"] is None  # JSON has no NaN; never the last good 0.5

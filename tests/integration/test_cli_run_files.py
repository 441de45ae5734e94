"""`otel-train report | compare | sync | demo` against what a run folder can really hold, in
real processes: a file that is not a run, an empty run, a missing rank, rows without steps,
crafted lines, planted symlinks, 200k backward step jumps and bad demo options. Reading
never destroys and never ends in a traceback."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

import otel_train
from exporters.jsonl import JsonLinesMetricExporter
from tests.unit.test_run_files import CRAFTED

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("loss.png", "learning_rate.png", "throughput.png", "mfu.png")


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "WANDB_MODE": "offline"}
    env.update(WANDB_SILENT="true", WANDB_DISABLE_GIT="true")
    return subprocess.run(
        [sys.executable, "-m", "otel_train.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train(output_dir: Path, run: str = "run-a", steps: int = 40) -> Path:
    with otel_train.setup(
        run=run,
        output_dir=output_dir,
        exporters=("jsonl",),
        intervals={"train": 5, "perf": 10},
        handle_signals=False,
        peak_flops=1e12,
        flops_per_token=1e6,
    ) as tel:
        for step in range(1, steps + 1):
            tel.training.record(loss=3.0 - step / 40, learning_rate=1e-3, tokens=512, samples=2)
            tel.step(step)
        tel.evaluate(loss=2.0)
        return tel.context.run_dir


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


# -- item 7 -----------------------------------------------------------------------------------
def test_report_of_a_non_run_file_refuses_in_one_line_and_touches_nothing(tmp_path: Path) -> None:
    run_dir = train(tmp_path)
    first = cli("report", str(run_dir), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (run_dir / "notes.txt").write_text("lr sweep, seed 3\n")
    before = snapshot(tmp_path)
    for name in ("summary.json", "loss.png", "notes.txt"):
        result = cli("report", str(run_dir / name), cwd=tmp_path)
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr
        assert "is not an otel-train JSON-lines run" in result.stderr
        no_traceback(result)
    assert snapshot(tmp_path) == before


# -- item 8 -----------------------------------------------------------------------------------
def test_report_of_an_empty_run_fails_and_writes_no_png(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "empty"
    run_dir.mkdir(parents=True)
    (run_dir / "rank0.jsonl").write_bytes(b"")
    result = cli("report", str(run_dir), cwd=tmp_path)
    assert result.returncode == 2 and "holds no rows" in result.stderr, result
    assert result.stderr.count("\n") == 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["rank0.jsonl"]


def test_compare_with_an_empty_run_fails_and_writes_no_png(tmp_path: Path) -> None:
    good = train(tmp_path / "runs")
    empty = tmp_path / "runs" / "empty"
    empty.mkdir()
    (empty / "rank0.jsonl").write_bytes(b"")
    result = cli("compare", str(good), str(empty), cwd=tmp_path)
    assert result.returncode == 2 and "holds no rows" in result.stderr, result
    assert not list(tmp_path.rglob("*.png"))


def test_report_of_a_rank_the_run_does_not_have_names_the_ranks_there(tmp_path: Path) -> None:
    run_dir = train(tmp_path)
    result = cli("report", str(run_dir), "--rank", "3", cwd=tmp_path)
    assert result.returncode == 2, result
    assert "no rank3.jsonl" in result.stderr and "rank0.jsonl" in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["rank0.jsonl"]


# -- item 11 ----------------------------------------------------------------------------------
def test_report_draws_a_plain_otel_pipeline_run_on_its_time_axis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`OTEL_METRICS_EXPORTER=jsonl` without setup(): rows have "step": null."""
    monkeypatch.setenv("OTEL_TRAIN_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("OTEL_SERVICE_NAME", "plain")
    reader = PeriodicExportingMetricReader(JsonLinesMetricExporter(), export_interval_millis=1e9)
    provider = MeterProvider(metric_readers=[reader])
    loss = provider.get_meter("app").create_gauge("train.loss")
    for value in (2.0, 1.5, 1.2):
        loss.set(value)
        provider.force_flush()
    provider.shutdown()
    result = cli("report", str(tmp_path / "plain"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert summary["final_loss"] == 1.2 and summary["steps"] is None  # no steps: not invented
    png = (tmp_path / "plain" / "loss.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


# -- item 16 ----------------------------------------------------------------------------------
def test_crafted_lines_never_make_report_compare_or_sync_traceback(tmp_path: Path) -> None:
    run_dir = train(tmp_path / "runs", run="$\\frac{a}{$ [/] [bold]")
    file = run_dir / "rank0.jsonl"
    extra = b'{"step":41,"time":1.0,"run":"x","rank":0,"metrics":{"train/$\\\\sqrt{$":1.0}}'
    file.write_bytes(b"\n".join(CRAFTED) + b"\n" + file.read_bytes() + extra + b"\n")
    other = train(tmp_path / "runs", run="other")
    report = cli("report", str(run_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    assert f"skipped {len(CRAFTED)} bad line(s)" in report.stdout
    assert report.stdout.count("warning") == 1
    compare = cli("compare", str(run_dir), str(other), cwd=tmp_path)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert (tmp_path / "runs" / "compare.png").read_bytes().startswith(PNG_MAGIC)
    for result in (report, compare):
        no_traceback(result)
    if importlib.util.find_spec("wandb") is not None:
        sync = cli("sync", str(run_dir), "--to", "wandb", "--mode", "offline", "--dir",
                   str(tmp_path / "w"), cwd=tmp_path)  # fmt: skip
        assert sync.returncode == 0, sync.stdout + sync.stderr
        no_traceback(sync)


# -- item 19 ----------------------------------------------------------------------------------
def test_report_and_compare_replace_planted_symlinks_leaving_targets_untouched(
    tmp_path: Path,
) -> None:
    run_dir = train(tmp_path / "runs")
    other = train(tmp_path / "runs", run="run-b")
    outside = tmp_path / "outside"
    outside.mkdir()
    targets = {}
    for name in ("summary.json", *PLOTS):
        targets[name] = outside / f"target-{name}"
        targets[name].write_text(f"keep {name}\n")
        (run_dir / name).symlink_to(targets[name])
    compare_target = outside / "target-compare.png"
    compare_target.write_text("keep compare\n")
    (tmp_path / "runs" / "compare.png").symlink_to(compare_target)
    assert cli("report", str(run_dir), cwd=tmp_path).returncode == 0
    assert cli("compare", str(run_dir), str(other), cwd=tmp_path).returncode == 0
    for name, target in targets.items():
        assert target.read_text() == f"keep {name}\n"
        assert not (run_dir / name).is_symlink() and (run_dir / name).stat().st_size > 50
    assert compare_target.read_text() == "keep compare\n"
    assert (tmp_path / "runs" / "compare.png").read_bytes().startswith(PNG_MAGIC)
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # no temp left


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    wandb = pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT":
                       "true", "WANDB_DISABLE_GIT": "true"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    wandb.teardown()
    yield
    wandb.teardown()


def test_wandb_run_id_is_not_written_through_a_planted_symlink(
    tmp_path: Path, wandb_offline: None
) -> None:
    target = tmp_path / "outside.txt"
    target.write_text("precious\n")
    run_dir = tmp_path / "runs" / "w"
    run_dir.mkdir(parents=True)
    (run_dir / "wandb_run_id").symlink_to(target)
    with otel_train.setup(
        run="w", output_dir=tmp_path / "runs", exporters=("wandb",), intervals={"train": 1},
        handle_signals=False, shutdown_timeout_millis=20_000,
    ) as tel:  # fmt: skip
        tel.training.record(loss=1.0)
        tel.step(1)
    assert target.read_text() == "precious\n"
    assert not (run_dir / "wandb_run_id").is_symlink()
    assert (run_dir / "wandb_run_id").read_text().strip()


# -- item 21 ----------------------------------------------------------------------------------
def test_report_reads_200k_backward_step_jumps_in_one_pass(tmp_path: Path) -> None:
    """200k steps up, then 200k restarts each one step earlier: the quadratic reader took
    ~7 minutes here (4x per doubling, see benchmarks/run_reading.py); one linear pass takes a
    few seconds. The deadline guards against that hang; it is not a timing claim."""
    run_dir = tmp_path / "jumps"
    run_dir.mkdir()
    steps = [*range(1, 200_001), *range(199_999, 1, -1)]
    with (run_dir / "rank0.jsonl").open("w") as handle:
        for step in steps:
            handle.write(
                f'{{"step":{step},"time":1.0,"run":"jumps","stage":"s","rank":0,'
                f'"metrics":{{"train/loss":{1 + 1 / step}}}}}\n'
            )
    result = cli("report", str(run_dir), "--no-plots", cwd=tmp_path, timeout=90)
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


# -- item 10 ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--intervals", "train=0"), "positive int"),
        (("--intervals", "trian=5"), "unknown group"),
        (("--exporters", "jsonl,bogus"), "unknown exporter"),
        (("--exporters", "jsonl,jsonl"), "twice"),
        (("--eval-every", "0"), "--eval-every"),
        (("--run", ".."), "cannot name the run's folder"),
    ],
)
def test_demo_rejects_a_bad_option_before_building_anything(
    tmp_path: Path, option: tuple[str, str], message: str
) -> None:
    result = cli("demo", "--steps", "5", "--output-dir", "out", *option, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stdout + result.stderr
    assert "measuring" not in result.stdout  # no model built, no peak measured
    assert not (tmp_path / "out").exists()


def test_demo_refuses_a_run_name_already_used_before_training(tmp_path: Path) -> None:
    run_dir = train(tmp_path / "out", run="demo-a")
    before = snapshot(run_dir)
    result = cli("demo", "--steps", "5", "--output-dir", "out", "--run", "demo-a", cwd=tmp_path)
    assert result.returncode == 2 and "already holds" in result.stderr, result
    assert "measuring" not in result.stdout
    assert snapshot(run_dir) == before

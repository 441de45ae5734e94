"""W&B exporter with real wandb in offline mode; the `.wandb` file is read back record by record."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
wandb = pytest.importorskip("wandb")

import otel_train  # noqa: E402
from exporters.wandb import RUN_ID_FILE, WandbMetricExporter  # noqa: E402
from tests.wandb_records import WandbRun, find_run_file, read_finished_run  # noqa: E402

pytestmark = pytest.mark.integration

TRAIN_KEYS = {
    "train/loss", "train/learning_rate", "train/grad_norm", "train/epoch", "train/global_step",
    "train/perplexity", "train/num_input_tokens_seen", "train/samples",
    "train/loss_max", "train/grad_norm_max", "train/nonfinite",
}  # fmt: skip
PERF_KEYS = {
    "perf/step_time", "perf/step_time_p50", "perf/step_time_p95", "perf/tokens_per_second",
    "perf/samples_per_second", "perf/steps_per_second", "perf/eta_minutes",
    "perf/flops_per_second", "perf/mfu", "perf/mfu_percent",
}  # fmt: skip


def health_keys(*exporters: str) -> set[str]:
    """Export health counters, exported with perf from 0 on (Prometheus practice)."""
    return {
        f"otel_train/export_{kind}/exporter_{name}"
        for kind in ("dropped", "failed")
        for name in exporters
    }


EVAL_KEYS = {"eval/loss", "eval/perplexity", "eval/best_perplexity"}
EPOCH_KEYS = {
    "epoch/number", "epoch/steps", "epoch/tokens", "epoch/samples", "epoch/duration",
    "epoch/tokens_per_second", "epoch/train_loss_mean",
}  # fmt: skip
FINAL_KEYS = {
    "final/total_steps", "final/total_tokens", "final/total_samples", "final/wall_time",
    "final/best_perplexity", "final/best_eval_loss", "final/train_loss",
}  # fmt: skip
BATCH, SEQ = 4, 16


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    wandb_dir = tmp_path / "wandb_files"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "otel-train-tests")
    # wandb reads WANDB_* once per process (its setup singleton): start each test afresh.
    wandb.teardown()
    yield wandb_dir
    wandb.teardown()


def train(
    tmp_path: Path,
    *,
    exporters: tuple[Any, ...],
    steps: int = 200,
    stage: str = "pretrain",
    run: str = "tiny",
    eval_every: int = 100,
    config: dict[str, Any] | None = None,
    start_step: int = 0,
    key_preset: str = "default",
    shutdown_timeout_millis: float = 20_000,
) -> otel_train.Telemetry:
    """A real tiny torch model trained for `steps` optimizer steps, instrumented."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(SEQ, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    params = sum(p.numel() for p in model.parameters())
    tel = otel_train.setup(
        run=run,
        stage=stage,
        output_dir=tmp_path / "runs",
        exporters=exporters,
        total_steps=start_step + steps,
        flops_per_token=6.0 * params,
        peak_flops=1e12,
        config=config,
        resume_step=start_step,
        key_preset=key_preset,
        shutdown_timeout_millis=shutdown_timeout_millis,
    )
    with tel:
        for step in range(start_step + 1, start_step + steps + 1):
            inputs = torch.randn(BATCH, SEQ)
            loss = torch.nn.functional.mse_loss(model(inputs), inputs.sum(1, keepdim=True))
            optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            tel.training.record(
                loss=loss.detach(),
                learning_rate=0.05,
                grad_norm=grad_norm,
                tokens=BATCH * SEQ,
                samples=BATCH,
                epoch=step / steps,
            )
            tel.step(step)
            if step % eval_every == 0:
                with torch.no_grad():
                    val = torch.randn(BATCH, SEQ)
                    tel.evaluate(loss=torch.nn.functional.mse_loss(model(val), val.sum(1, True)))
        tel.end_epoch(1)
    return tel


def jsonl_rows(tmp_path: Path, run: str = "tiny") -> list[dict[str, Any]]:
    lines = (tmp_path / "runs" / run / "rank0.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def user_keys(row: dict[str, Any]) -> set[str]:
    return {key for key in row if not key.startswith("_")}


def read_only_run(wandb_dir: Path) -> WandbRun:
    return read_finished_run(find_run_file(wandb_dir))


def test_offline_run_file_holds_sampled_rows_on_one_step_axis(
    tmp_path: Path, wandb_env: Path
) -> None:
    config = {
        "lr": 0.05,
        "wandb_api_key": "sk-live-123",
        "optim": {"hf_token": "hf_abc", "Password": "pw", "betas": [0.9, 0.95]},
        "num_tokens": 1024,
    }
    tel = train(tmp_path, exporters=("jsonl", "wandb"), config=config)
    assert tel.export_stats()["wandb"]["failed"] == 0
    run = read_only_run(wandb_env)

    # History: one row per sampled step (train every 10), perf every 20, eval/epoch merged.
    assert run.history_steps == list(range(10, 201, 10))
    for step, row in zip(run.history_steps, run.history, strict=True):
        expected = set(TRAIN_KEYS)
        if step % 20 == 0:
            expected |= PERF_KEYS | health_keys("jsonl", "wandb")
        if step % 100 == 0:
            expected |= EVAL_KEYS
        if step == 200:
            expected |= EPOCH_KEYS
        if step % 50 == 0:  # the gpu group: process / host metrics (setup(system_metrics=True))
            assert "process/memory_usage" in row, step
            expected |= {k for k in user_keys(row) if k.startswith(("process/", "system/"))}
        assert user_keys(row) == expected, step
        assert row["train/global_step"] == step
        assert row["_step"] == step
    assert all(b > a for a, b in zip(run.history_steps, run.history_steps[1:], strict=False))

    # The same values reach W&B and JSON lines (one naming rule).
    by_step: dict[int, dict[str, Any]] = {}
    for line in jsonl_rows(tmp_path):
        by_step.setdefault(line["step"], {}).update(line["metrics"])
    for step, row in zip(run.history_steps, run.history, strict=True):
        assert row["train/loss"] == pytest.approx(by_step[step]["train/loss"])
        assert row["train/num_input_tokens_seen"] == step * BATCH * SEQ

    # Config: present, secrets redacted at any depth, counting words kept.
    assert run.config["lr"] == 0.05
    assert run.config["wandb_api_key"] == "***REDACTED***"
    assert run.config["optim"]["hf_token"] == "***REDACTED***"
    assert run.config["optim"]["Password"] == "***REDACTED***"
    assert run.config["optim"]["betas"] == [0.9, 0.95]
    assert run.config["num_tokens"] == 1024
    assert "sk-live-123" not in json.dumps(run.config)

    # Summary: final/* from shutdown, min for losses, max for throughput; axis and grouping.
    assert FINAL_KEYS <= set(run.summary)
    assert run.summary["final/total_steps"] == 200
    assert run.summary["final/total_tokens"] == 200 * BATCH * SEQ
    assert not any(k.startswith("final/") for row in run.history for k in row)
    losses = [row["train/loss"] for row in run.history]
    assert run.summary["train/loss"]["min"] == pytest.approx(min(losses))
    throughput = [row["perf/tokens_per_second"] for row in run.history if "perf/mfu" in row]
    assert run.summary["perf/tokens_per_second"]["max"] == pytest.approx(max(throughput))
    step_metrics = {m.glob_name or m.name: m.step_metric for m in run.metrics}
    assert step_metrics["*"] == "train/global_step"
    assert run.job_type == "pretrain" and "pretrain" in run.tags


def test_pretrain_sft_and_dpo_runs_produce_the_same_keys(tmp_path: Path, wandb_env: Path) -> None:
    key_sets = {}
    for stage in ("pretrain", "sft", "dpo"):
        stage_dir = wandb_env / stage
        stage_dir.mkdir()
        exporter = WandbMetricExporter(dir=stage_dir)
        train(tmp_path / stage, exporters=(exporter,), steps=40, eval_every=40, stage=stage)
        run = read_only_run(stage_dir)
        assert run.job_type == stage and stage in run.tags
        key_sets[stage] = set().union(*(user_keys(row) for row in run.history))
        key_sets[stage] |= {k for k in run.summary if k.startswith("final/")}
    assert key_sets["pretrain"] == key_sets["sft"]
    health = health_keys("WandbMetricExporter")
    assert TRAIN_KEYS | PERF_KEYS | health | EVAL_KEYS | EPOCH_KEYS | FINAL_KEYS == key_sets["sft"]
    # A DPO loss is no token cross-entropy: the same keys, less every perplexity.
    assert key_sets["dpo"] == {k for k in key_sets["sft"] if "perplexity" not in k}


def test_legacy_preset_keys_reach_wandb_with_their_own_step_axis(
    tmp_path: Path, wandb_env: Path
) -> None:
    train(tmp_path, exporters=("wandb",), steps=20, eval_every=20, key_preset="legacy_training")
    run = read_only_run(wandb_env)
    keys = set().union(*(user_keys(row) for row in run.history))
    assert {"training/lr", "training/loss", "training/global_step"} <= keys
    assert "train/learning_rate" not in keys and "train/loss" not in keys
    step_metrics = {m.glob_name or m.name: m.step_metric for m in run.metrics}
    assert step_metrics["*"] == "training/global_step"
    assert run.summary["training/loss"]["min"] <= run.history[-1]["training/loss"]


def test_resumed_run_continues_the_same_wandb_run_and_axis(tmp_path: Path, wandb_env: Path) -> None:
    train(tmp_path, exporters=("wandb",), steps=50, eval_every=1000)
    run_id = (tmp_path / "runs" / "tiny" / RUN_ID_FILE).read_text().strip()
    train(tmp_path, exporters=("wandb",), steps=50, eval_every=1000, start_step=50)
    files = sorted(p for p in wandb_env.rglob("run-*.wandb") if "latest-run" not in p.parts)
    assert len(files) == 2
    first, second = (read_finished_run(path) for path in files)
    assert first.run_id == second.run_id == run_id
    assert first.history_steps == [10, 20, 30, 40, 50]
    assert second.history_steps == [60, 70, 80, 90, 100]
    assert second.summary["final/total_steps"] == 100


def _count_rows_with(tmp_path: Path, exporters: tuple[Any, ...]) -> list[int | None]:
    train(tmp_path, exporters=exporters, steps=60, eval_every=30, shutdown_timeout_millis=3_000)
    return [row["step"] for row in jsonl_rows(tmp_path)]


@pytest.fixture
def control_steps(tmp_path: Path, wandb_env: Path) -> list[int | None]:
    return _count_rows_with(tmp_path / "control", ("jsonl",))


def test_wandb_not_logged_in_costs_no_jsonl_rows(
    tmp_path: Path,
    wandb_env: Path,
    control_steps: list[int | None],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Real wandb, online mode, no API key anywhere: wandb.init raises UsageError.
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    exporter = WandbMetricExporter()
    with caplog.at_level(logging.ERROR, logger="otel_train.wandb"):
        steps = _count_rows_with(tmp_path, ("jsonl", exporter))
    assert steps == control_steps
    assert exporter.failure_reason is not None and "API key" in exporter.failure_reason
    starts = [r for r in caplog.records if "W&B could not start" in r.getMessage()]
    assert len(starts) == 1


def test_exceptions_from_wandb_log_cost_no_jsonl_rows(
    tmp_path: Path,
    wandb_env: Path,
    control_steps: list[int | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Fault injection on the real wandb Run class: every log() raises.
    def broken_log(self: Any, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("injected: network down")

    monkeypatch.setattr(wandb.Run, "log", broken_log)
    exporter = WandbMetricExporter()
    steps = _count_rows_with(tmp_path, ("jsonl", exporter))
    assert steps == control_steps
    assert exporter.failures > 0 and exporter.logged_rows == 0


def test_hanging_wandb_init_neither_blocks_training_nor_holds_shutdown(
    tmp_path: Path,
    wandb_env: Path,
    control_steps: list[int | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()

    def hanging_init(*args: Any, **kwargs: Any) -> Any:  # what init does with no network
        release.wait(60)
        raise TimeoutError("injected hang released")

    monkeypatch.setattr(wandb, "init", hanging_init)
    exporter = WandbMetricExporter(init_timeout_seconds=0.5)
    try:
        steps = _count_rows_with(tmp_path, ("jsonl", exporter))
        assert steps == control_steps  # jsonl got every row while the W&B thread was stuck
        # Our own bound around init (0.5 s + 1 s grace) gives up even though init never returns.
        deadline = time.monotonic() + 30
        while exporter.failure_reason is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exporter.failure_reason is not None
        assert "did not return within 1.5 s" in exporter.failure_reason
        assert exporter.run is None
    finally:
        release.set()


def test_init_timeout_reaches_wandb_settings(
    tmp_path: Path, wandb_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    real_init = wandb.init

    def spying_init(*args: Any, **kwargs: Any) -> Any:  # passes through to the real init
        seen.append(kwargs.get("settings"))
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", spying_init)
    exporter = WandbMetricExporter(init_timeout_seconds=42)
    train(tmp_path, exporters=(exporter,), steps=10, eval_every=1000)
    assert len(seen) == 1 and seen[0].init_timeout == 42
    assert read_only_run(wandb_env).history_steps == [10]


def test_nonfinite_loss_reaches_wandb_as_nan_not_the_last_good_value(
    tmp_path: Path, wandb_env: Path
) -> None:
    with otel_train.setup(run="nan", output_dir=tmp_path, exporters=("wandb",)) as tel:
        for step in range(1, 31):
            tel.training.record(loss=torch.tensor(float("nan") if step == 20 else 1.0 / step))
            tel.step(step)
    run = read_only_run(wandb_env)
    losses = dict(zip(run.history_steps, (row["train/loss"] for row in run.history), strict=True))
    # interval means: steps 1-10, then 21-30; the interval holding the NaN reads NaN
    assert losses[10] == pytest.approx(sum(1 / s for s in range(1, 11)) / 10)
    assert losses[30] == pytest.approx(sum(1 / s for s in range(21, 31)) / 10)
    assert math.isnan(losses[20])


def test_reader_reassembles_records_split_across_32k_blocks(wandb_env: Path) -> None:
    blob = "x" * 70_000  # one record spanning three blocks: FIRST, MIDDLE, LAST
    run = wandb.init(dir=wandb_env, config={"blob": blob})
    for step in range(1, 401):
        run.log({"train/loss": 1.0 / step}, step=step)
    run.finish()
    path = find_run_file(wandb_env)
    assert path.stat().st_size > 3 * 32768
    decoded = read_finished_run(path)
    assert decoded.config["blob"] == blob
    assert decoded.history_steps == list(range(1, 401))
    assert decoded.history[-1]["train/loss"] == pytest.approx(1 / 400)


def test_exporter_works_behind_a_plain_otel_reader(tmp_path: Path, wandb_env: Path) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    exporter = WandbMetricExporter(dir=wandb_env)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)
    provider = MeterProvider(metric_readers=[reader])
    gauge = provider.get_meter("plain").create_gauge("train.reward")
    for value in (1.0, 2.0, 3.0):
        gauge.set(value)
        reader.force_flush()
    provider.shutdown()
    run = read_only_run(wandb_env)
    # No global step in a plain pipeline: exports are numbered and that number is the axis.
    assert run.history_steps == [1, 2, 3]
    assert [row["train/reward"] for row in run.history] == [1.0, 2.0, 3.0]
    assert [row["train/global_step"] for row in run.history] == [1, 2, 3]


def test_use_active_run_logs_into_the_users_run_and_leaves_it_open(
    tmp_path: Path, wandb_env: Path
) -> None:
    user_run = wandb.init(dir=wandb_env, config={"from_user": 1})
    try:
        exporter = WandbMetricExporter(use_active_run=True)
        train(tmp_path, exporters=(exporter,), steps=20, eval_every=1000, config={"lr": 0.05})
        user_run.log({"user/after": 1.0}, step=25)  # still open: ours did not finish it
    finally:
        user_run.finish()
    run = read_only_run(wandb_env)
    assert run.history_steps == [10, 20, 25]
    assert run.config["from_user"] == 1 and run.config["lr"] == 0.05
    assert run.summary["final/total_steps"] == 20


def test_own_run_never_finishes_a_run_the_user_started(tmp_path: Path, wandb_env: Path) -> None:
    user_run = wandb.init(dir=wandb_env / "user")
    try:
        train(tmp_path, exporters=(WandbMetricExporter(dir=wandb_env / "ours"),), steps=10)
        user_run.log({"user/after": 1.0}, step=1)
    finally:
        user_run.finish()
    assert read_only_run(wandb_env / "user").history_steps == [1]
    assert read_only_run(wandb_env / "ours").history_steps == [10]


def test_rollback_with_resume_from_keeps_the_wandb_axis_monotonic(
    tmp_path: Path, wandb_env: Path
) -> None:
    exporter = WandbMetricExporter()
    with otel_train.setup(run="rb", output_dir=tmp_path, exporters=(exporter,)) as tel:
        for step in range(1, 31):
            tel.training.record(loss=1.0)
            tel.step(step)
        tel.resume_from(15)  # restored an older checkpoint in the same process
        for step in range(16, 41):
            tel.training.record(loss=2.0)
            tel.step(step)
    run = read_only_run(wandb_env)
    assert run.history_steps == [10, 20, 30, 40]
    assert exporter.dropped_backwards == 1  # step 20 again, behind 30: counted, not logged
    assert run.history[-1]["train/loss"] == 2.0

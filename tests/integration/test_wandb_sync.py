"""`otel-train sync --to wandb` replays a JSON-lines run into the same W&B run as the live one.

A real tiny torch run logs live to W&B offline and to JSON lines; the CLI, in its own process,
replays the JSON lines; both `.wandb` files are read back and compared record by record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
wandb = pytest.importorskip("wandb")

import otel_train  # noqa: E402
from exporters import WandbMetricExporter  # noqa: E402
from otel_train.runs import read_run  # noqa: E402
from tests.wandb_records import WandbRun, find_run_file, read_finished_run  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BATCH, SEQ = 4, 16


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "live-project")
    wandb.teardown()  # wandb reads WANDB_* once per process
    yield
    wandb.teardown()


def train_live(tmp_path: Path, exporters: tuple[Any, ...], **options: Any) -> Path:
    """A real tiny model, 60 steps, an eval every 30: returns the run directory."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(SEQ, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with otel_train.setup(
        run="replayed",
        stage="sft",
        output_dir=tmp_path / "runs",
        exporters=exporters,
        total_steps=60,
        flops_per_token=6.0 * sum(p.numel() for p in model.parameters()),
        peak_flops=1e12,
        **options,
    ) as tel:
        for step in range(1, 61):
            inputs = torch.randn(BATCH, SEQ)
            loss = torch.nn.functional.mse_loss(model(inputs), inputs.sum(1, keepdim=True))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            tel.training.record(
                loss=loss.detach(), learning_rate=0.05, tokens=BATCH * SEQ, samples=BATCH
            )
            tel.step(step)
            if step % 30 == 0:
                tel.evaluate(loss=loss.detach() * 1.1)
        tel.end_epoch(1)
    return tmp_path / "runs" / "replayed"


def sync_cli(run_dir: Path, wandb_dir: Path, *extra: str, **env_changes: str | None) -> Any:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    for key in [k for k, v in env_changes.items() if v is None]:
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "otel_train.cli", "sync", str(run_dir), "--to", "wandb",
         "--dir", str(wandb_dir), *extra],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def by_step(run: WandbRun) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    for step, row in zip(run.history_steps, run.history, strict=True):
        rows.setdefault(step, {}).update(row)
    return rows


def user_keys(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def metric_definitions(run: WandbRun) -> set[tuple[str, str, str]]:
    return {
        (m.glob_name or m.name, m.step_metric, str(m.summary).replace("\n", " "))
        for m in run.metrics
    }


def test_sync_replays_the_live_run_keys_steps_summary_config_and_identity(
    tmp_path: Path, wandb_env: None
) -> None:
    live_dir = tmp_path / "live"
    exporter = WandbMetricExporter(dir=live_dir, group="ablation-3", tags=["baseline"])
    config = {"lr": 0.05, "optimizer": {"name": "sgd", "hf_token": "hf_secretvalue0123456789ab"}}
    run_dir = train_live(tmp_path, ("jsonl", exporter), config=config)
    live = read_finished_run(find_run_file(live_dir))

    replay_dir = tmp_path / "replay"
    # Another WANDB_PROJECT at sync time: the replay still lands where the live run went.
    result = sync_cli(run_dir, replay_dir, "--mode", "offline", WANDB_PROJECT="elsewhere")
    assert result.returncode == 0, result.stdout + result.stderr
    replay = read_finished_run(find_run_file(replay_dir))

    # Identity: same project, name, job type, group, tags; a new run id.
    assert (replay.project, replay.name, replay.job_type, replay.group) == (
        "live-project", "replayed", "sft", "ablation-3",
    )  # fmt: skip
    assert (live.project, live.name, live.job_type, live.group) == (
        replay.project, replay.name, replay.job_type, replay.group,
    )  # fmt: skip
    assert replay.tags == live.tags == ["baseline", "sft"]
    assert replay.run_id != live.run_id

    # History: the same steps and, at each step, the same keys and values.
    live_rows, replay_rows = by_step(live), by_step(replay)
    assert sorted(replay_rows) == sorted(live_rows) == [10, 20, 30, 40, 50, 60]
    for step, row in live_rows.items():
        assert user_keys(replay_rows[step]).keys() == user_keys(row).keys(), step
        for key, value in user_keys(row).items():
            assert replay_rows[step][key] == pytest.approx(value), (step, key)
    assert not any(k.startswith("final/") for row in replay.history for k in row)

    # Original times: each replayed row carries its JSON-lines time, as the live row does.
    record = read_run(run_dir)
    last_time = {row.step: row.time for row in record.rows if not _summary_only(row.metrics)}
    for step, row in replay_rows.items():
        assert row["_timestamp"] == pytest.approx(last_time[step], abs=1e-3)
        assert live_rows[step]["_timestamp"] == pytest.approx(last_time[step], abs=1e-3)

    # Summary: final/* and the min/max summaries of the step-axis metrics, all equal.
    summary_keys = {k for k in live.summary if not k.startswith("_")}
    assert {k for k in replay.summary if not k.startswith("_")} == summary_keys
    assert {"final/total_steps", "final/total_tokens", "train/loss"} <= summary_keys
    for key in summary_keys:
        assert replay.summary[key] == pytest.approx(live.summary[key]), key
    assert replay.summary["train/loss"]["min"] == pytest.approx(
        min(row["train/loss"] for row in replay.history)
    )
    assert metric_definitions(replay) == metric_definitions(live)
    assert ("*", "train/global_step", "") in metric_definitions(replay)

    # Config: the run's own, redacted, nothing else.
    assert {k: v for k, v in replay.config.items() if k != "_wandb"} == {
        k: v for k, v in live.config.items() if k != "_wandb"
    }
    assert replay.config["optimizer"]["hf_token"] == "***REDACTED***"


def _summary_only(metrics: dict[str, float]) -> bool:
    return all(k.startswith("final/") or k == "train/global_step" for k in metrics)


def test_sync_of_a_legacy_keyed_run_keeps_its_own_step_axis(
    tmp_path: Path, wandb_env: None
) -> None:
    run_dir = train_live(
        tmp_path,
        ("jsonl", WandbMetricExporter(dir=tmp_path / "live")),
        key_preset="legacy_training",
    )
    result = sync_cli(run_dir, tmp_path / "replay", "--mode", "offline")
    assert result.returncode == 0, result.stdout + result.stderr
    replay = read_finished_run(find_run_file(tmp_path / "replay"))
    definitions = metric_definitions(replay)
    assert ("*", "training/global_step", "") in definitions
    assert metric_definitions(read_finished_run(find_run_file(tmp_path / "live"))) == definitions


def test_sync_of_a_jsonl_only_run_gets_the_live_exporters_defaults(
    tmp_path: Path, wandb_env: None
) -> None:
    run_dir = train_live(tmp_path, ("jsonl",))
    assert not (run_dir / "rank0.wandb.json").exists()
    result = sync_cli(run_dir, tmp_path / "replay", "--mode", "offline", "--project", "p2")
    assert result.returncode == 0, result.stdout + result.stderr
    replay = read_finished_run(find_run_file(tmp_path / "replay"))
    assert (replay.project, replay.name, replay.job_type, replay.tags) == (
        "p2", "replayed", "sft", ["sft"],
    )  # fmt: skip
    assert replay.summary["final/total_steps"] == 60
    assert not any(k.startswith("final/") for row in replay.history for k in row)
    assert ("*", "train/global_step", "") in metric_definitions(replay)


def test_sync_without_a_wandb_login_fails_in_one_line(tmp_path: Path, wandb_env: None) -> None:
    run_dir = train_live(tmp_path, ("jsonl",))
    result = sync_cli(
        run_dir, tmp_path / "replay",
        WANDB_MODE="online", WANDB_API_KEY=None, HOME=str(tmp_path / "home"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), WANDB_SILENT=None,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("otel-train:")]
    assert len(ours) == 1, result.stderr
    assert "No API key" in ours[0] and "wandb login" in ours[0]
    assert "WANDB_MODE=offline" in ours[0] and "--mode offline" in ours[0]
    assert len([line for line in result.stderr.splitlines() if line.strip()]) <= 2, result.stderr


def test_identity_file_holds_the_redacted_config_never_a_secret(
    tmp_path: Path, wandb_env: None
) -> None:
    exporter = WandbMetricExporter(dir=tmp_path / "live")
    run_dir = train_live(
        tmp_path, ("jsonl", exporter), config={"api_key": "sk-live-abcdefghijklmnop1"}
    )
    identity = json.loads((run_dir / "rank0.wandb.json").read_text())
    assert identity["config"] == {"api_key": "***REDACTED***"}
    assert identity["project"] == "live-project" and identity["axis"]["step"] == "train/global_step"

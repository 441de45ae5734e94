"""W&B exporter wiring that needs no wandb run: ranks, init options, a missing package."""

from __future__ import annotations

import logging
import struct
import sys
from pathlib import Path

import pytest
import wandb

import otel_train
from exporters.wandb import RUN_ID_FILE, WandbMetricExporter, create_for_run
from otel_train.naming import KeyNamer
from otel_train.run_context import RunContext
from tests.wandb_records import WandbFileError, iter_payloads


@pytest.fixture(autouse=True)
def _fresh_wandb_singleton():
    """wandb keeps process-wide settings (e.g. mode=disabled from a test here) in a singleton;
    reset it so later tests' offline runs are not silently disabled."""
    yield
    wandb.teardown()


def context(tmp_path: Path, *, rank: int = 0, world_size: int = 1, **extra: object) -> RunContext:
    return RunContext(
        run="gpt-sft",
        stage="sft",
        rank=rank,
        local_rank=rank,
        world_size=world_size,
        host="h",
        output_dir=tmp_path,
        namer=KeyNamer(),
        **extra,  # type: ignore[arg-type]
    )


def test_named_exporter_runs_on_rank_zero_only_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_TRAIN_WANDB_ALL_RANKS", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # wandb's own no-op mode: no files, no network
    assert create_for_run(context(tmp_path, rank=1, world_size=2)) is None
    exporter = create_for_run(context(tmp_path, rank=0, world_size=2))
    assert isinstance(exporter, WandbMetricExporter)
    exporter.shutdown(timeout_millis=5_000)


def test_all_ranks_mode_names_each_rank_and_groups_them_by_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRAIN_WANDB_ALL_RANKS", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    exporter = create_for_run(context(tmp_path, rank=1, world_size=2))
    assert exporter is not None
    options = exporter.init_options()
    assert options["name"] == "gpt-sft-rank1" and options["group"] == "gpt-sft"
    exporter.shutdown(timeout_millis=5_000)


def test_exporter_object_on_a_non_zero_rank_exports_nothing(tmp_path: Path) -> None:
    exporter = WandbMetricExporter(mode="offline")
    exporter.bind_run_context(context(tmp_path, rank=3, world_size=4))
    # An inactive exporter never imports or starts wandb: export() succeeds doing nothing.
    from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData

    assert exporter.export(MetricsData(resource_metrics=[])) == MetricExportResult.SUCCESS
    assert exporter.run is None and exporter.logged_rows == 0


def test_init_options_pass_through_and_stage_becomes_job_type_and_tag(tmp_path: Path) -> None:
    exporter = WandbMetricExporter(
        project="p",
        entity="team",
        group="ablation-7",
        tags=["baseline"],
        mode="offline",
        dir=tmp_path / "w",
        config={"extra_secret": "x", "warmup": 10},
    )
    exporter._adopt_context(context(tmp_path, config={"lr": 0.1, "api_key": "***REDACTED***"}))
    options = exporter.init_options()
    assert options["project"] == "p" and options["entity"] == "team"
    assert options["group"] == "ablation-7" and options["mode"] == "offline"
    assert options["dir"] == str(tmp_path / "w")
    assert options["name"] == "gpt-sft" and options["job_type"] == "sft"
    assert options["tags"] == ["baseline", "sft"]
    assert options["config"] == {
        "lr": 0.1,
        "api_key": "***REDACTED***",
        "extra_secret": "***REDACTED***",
        "warmup": 10,
    }
    assert "id" not in options and "resume" not in options


def test_resumed_run_reuses_the_remembered_wandb_run_id(tmp_path: Path) -> None:
    run_dir = tmp_path / "gpt-sft"
    run_dir.mkdir()
    (run_dir / RUN_ID_FILE).write_text("abc123\n")
    exporter = WandbMetricExporter()
    exporter._adopt_context(context(tmp_path, resume=True))
    options = exporter.init_options()
    assert options["id"] == "abc123" and options["resume"] == "allow"
    explicit = WandbMetricExporter(id="mine", resume="must")
    explicit._adopt_context(context(tmp_path, resume=True))
    assert explicit.init_options()["id"] == "mine"
    assert explicit.init_options()["resume"] == "must"


@pytest.mark.parametrize("timeout", [0, -1, True, "5"])
def test_bad_timeouts_are_rejected_with_the_option_named(timeout: object) -> None:
    with pytest.raises(otel_train.OtelTrainError, match="init_timeout_seconds"):
        WandbMetricExporter(init_timeout_seconds=timeout)  # type: ignore[arg-type]


def test_missing_wandb_package_is_reported_once_and_jsonl_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with caplog.at_level(logging.WARNING, logger="otel_train.exporter_loading"):
        tel = otel_train.setup(run="r", output_dir=tmp_path, exporters=("jsonl", "wandb"))
    with tel:
        for step in range(1, 21):
            tel.training.record(loss=1.0 / step)
            tel.step(step)
    assert [w.name for w in tel.reader.exporters] == ["jsonl"]
    lines = (tmp_path / "r" / "rank0.jsonl").read_text().splitlines()
    assert len(lines) >= 2
    warnings = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert len(warnings) == 1 and "otel-train[wandb]" in warnings[0]


def test_wandb_file_reader_rejects_a_bad_header_and_a_bad_checksum(tmp_path: Path) -> None:
    bad_header = tmp_path / "a.wandb"
    bad_header.write_bytes(b"LEVELDB" + b"\0" * 20)
    with pytest.raises(WandbFileError, match="header"):
        list(iter_payloads(bad_header))
    bad_crc = tmp_path / "b.wandb"
    header = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    bad_crc.write_bytes(header + struct.pack("<IHB", 1, 3, 1) + b"abc")
    with pytest.raises(WandbFileError, match="checksum"):
        list(iter_payloads(bad_crc))

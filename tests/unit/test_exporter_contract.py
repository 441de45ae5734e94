"""The exporter contract (`otel_train.exporter_contract`): what setup() calls on a user's
exporter, and that otel-train's own exporters satisfy the same declared Protocols."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)

import otel_train
from otel_train.exporter_contract import (
    ExporterFactory,
    RankServer,
    RunContextBindable,
    SupportsNonfiniteBoard,
)
from otel_train.exporter_loading import EXPORTER_MODULES


class RunAwareExporter(MetricExporter):
    """A user's exporter: implements `bind_run_context` and nothing of ours."""

    def __init__(self) -> None:
        super().__init__()
        self.contexts: list[otel_train.RunContext] = []
        self.exports = 0

    def bind_run_context(self, context: otel_train.RunContext) -> None:
        self.contexts.append(context)

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.exports += 1
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


class BoardReader(InMemoryMetricReader):
    """A user's pull reader that wants the non-finite board."""

    def __init__(self) -> None:
        super().__init__()
        self.boards: list[object] = []

    def attach_nonfinite_board(self, board: object) -> None:
        self.boards.append(board)


def test_a_user_exporter_implementing_the_contract_receives_the_run_context(tmp_path):
    exporter = RunAwareExporter()
    assert isinstance(exporter, RunContextBindable)
    with otel_train.setup(
        run="contract", stage="sft", output_dir=tmp_path, exporters=[exporter], gpu_metrics=False
    ) as tel:
        tel.record(loss=1.0)
        tel.step(1)
    [context] = exporter.contexts  # bound exactly once, before the first export
    assert (context.run, context.stage, context.rank) == ("contract", "sft", 0)
    assert context.output_dir == tmp_path and context.run_dir == tmp_path / "contract"
    assert exporter.exports >= 1


def test_a_user_pull_reader_gets_the_nonfinite_board(tmp_path):
    reader = BoardReader()
    assert isinstance(reader, SupportsNonfiniteBoard)
    with otel_train.setup(run="board", output_dir=tmp_path, exporters=[reader], gpu_metrics=False):
        pass
    assert len(reader.boards) == 1


def test_an_exporter_without_hooks_is_used_as_is(tmp_path):
    plain = InMemoryMetricReader()
    assert not isinstance(plain, RunContextBindable | SupportsNonfiniteBoard)
    with otel_train.setup(run="plain", output_dir=tmp_path, exporters=[plain], gpu_metrics=False):
        pass


@pytest.mark.parametrize("name", sorted(EXPORTER_MODULES))
def test_every_named_exporter_module_is_a_declared_factory(name):
    try:
        module = importlib.import_module(EXPORTER_MODULES[name])
    except ImportError as error:  # an optional extra not installed here
        pytest.skip(f"{name}: {error}")
    assert isinstance(module, ExporterFactory)


def test_our_exporter_classes_implement_the_declared_hooks():
    from exporters.jsonl import JsonLinesMetricExporter
    from exporters.otlp import OtlpExporter
    from exporters.prometheus import PrometheusExporter

    for cls in (JsonLinesMetricExporter, OtlpExporter, PrometheusExporter):
        assert issubclass(cls, RunContextBindable), cls
    assert issubclass(PrometheusExporter, RankServer)


def test_public_api_lists_what_users_need_and_no_function_shadows_a_module():
    import otel_train.peak_table

    assert "setup" in otel_train.__all__ and "testing" in otel_train.__all__
    assert not {"RowBuilder", "StepSampledReader", "MetricRow"} & set(otel_train.__all__)
    assert all(hasattr(otel_train, name) for name in otel_train.__all__)
    assert callable(otel_train.peak_flops) and otel_train.peak_table.lookup_peak_flops
    from otel_train import RowBuilder  # formerly exported: still importable

    assert RowBuilder.__module__ == "otel_train.rows"

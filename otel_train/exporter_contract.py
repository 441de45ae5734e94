"""What `setup()` asks of an exporter, declared: every hook is optional, checked with
`isinstance` against these runtime-checkable Protocols (structural: no base class needed).

- `RunContextBindable`: a `MetricExporter` / `MetricReader` passed to `setup(exporters=[...])`
  gets `bind_run_context(context)` once, before the first export (run name, rank, output dir).
- `SupportsNonfiniteBoard`: a pull `MetricReader` gets `attach_nonfinite_board(board)` so a
  scrape can show NaN where the last export held one.
- `RankServer`: an exporter serving a port per rank (`start(local_rank=)`); the Prometheus
  exporter calls it itself from `bind_run_context`, a plain OTel pipeline calls it by hand.
- `ExporterFactory`: the module behind an exporter name (`exporters/<name>.py`) exposes
  `create_for_run(context)`, returning a MetricExporter, a MetricReader, or None ("does not
  apply on this rank").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader

    from otel_train.nonfinite import NonFiniteBoard
    from otel_train.run_context import RunContext


@runtime_checkable
class RunContextBindable(Protocol):
    def bind_run_context(self, context: RunContext) -> None: ...


@runtime_checkable
class SupportsNonfiniteBoard(Protocol):
    def attach_nonfinite_board(self, board: NonFiniteBoard) -> None: ...


@runtime_checkable
class RankServer(Protocol):
    def start(self, *, local_rank: int = 0) -> bool: ...


@runtime_checkable
class ExporterFactory(Protocol):
    """A module (or any object) turning the run's context into its exporter."""

    def create_for_run(self, context: RunContext) -> MetricExporter | MetricReader | None: ...

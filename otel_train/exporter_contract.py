"""What `setup()` asks of an exporter, declared: every hook is optional, checked with
`isinstance` against these runtime-checkable Protocols (structural: no base class needed).

- `RunContextBindable`: a `MetricExporter` / `MetricReader` passed to `setup(exporters=[...])`
  gets `bind_run_context(context)` once, before the first export (run name, rank, output dir).
- `SupportsNonfiniteBoard`: a pull `MetricReader` gets `attach_nonfinite_board(board)` so a
  scrape can show NaN where the last export held one.
- `RankServer`: an exporter serving a port per rank (`start(local_rank=)`); the Prometheus
  exporter calls it itself from `bind_run_context`, a plain OTel pipeline calls it by hand.
- `InMemoryExport`: an exporter whose `export()` only updates in-memory state (no I/O, never
  waits on a backend; the Prometheus exporter) is called where the batch is made, on the
  finisher thread, instead of through a queue: a queued batch lives a few ms, long enough to
  be promoted by the garbage collector, whose full collections then walk the whole heap.
- `ReadsOnlySharedRows`: an exporter whose `export()` reads nothing of a step-sampled batch
  but its shared row (JSON lines, W&B). When every queued exporter does, the reader queues
  the row alone, and the batch's OTel objects die where they were made.
- `ExporterFactory`: the module behind an exporter name (`exporters/<name>.py`) exposes
  `create_for_run(context)`, returning a MetricExporter, a MetricReader, or None ("does not
  apply on this rank").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader

    from otel_train.naming import KeyNamer
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
class InMemoryExport(Protocol):
    export_is_in_memory: bool


@runtime_checkable
class ReadsOnlySharedRows(Protocol):
    def reads_only_shared_rows(self, namer: KeyNamer) -> bool:
        """True when `export()` of a `StepBatch` whose rows use `namer` reads only its row."""
        ...


@runtime_checkable
class ExporterFactory(Protocol):
    """A module (or any object) turning the run's context into its exporter."""

    def create_for_run(self, context: RunContext) -> MetricExporter | MetricReader | None: ...

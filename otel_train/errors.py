"""The one error family otel-train raises, so callers can catch it without catching everything."""

from __future__ import annotations


class OtelTrainError(ValueError):
    """Bad configuration or input; the message says what to change."""


class UnknownMetricError(OtelTrainError, TypeError):
    """A keyword that is not a standard instrument (also a TypeError, like Python's own)."""


class StepOrderError(OtelTrainError):
    """`step()` went backwards: the step axis of every backend must be monotonic."""


class ExporterClashError(OtelTrainError, ImportError):
    """The `exporters` package found is not ours (an unrelated package or a local folder)."""

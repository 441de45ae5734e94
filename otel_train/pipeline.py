"""The OTel half of `setup()`: exporter objects from specs, the MeterProvider around them.

Nothing here validates user options (configure.py does that first); what opens files or
binds ports starts here, and a failure half-way closes what was already opened.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from otel_train.errors import OtelTrainError
from otel_train.exporter_contract import RunContextBindable, SupportsNonfiniteBoard
from otel_train.exporter_loading import create_named_exporter
from otel_train.instruments import STEP_TIME_BUCKETS_SECONDS
from otel_train.reader import StepSampledReader
from otel_train.run_context import RunContext
from otel_train.sampling import SamplingView

_logger = logging.getLogger(__name__)

ExporterSpec = str | MetricExporter | MetricReader


@dataclass(slots=True)
class BuiltExporters:
    """Pull readers go on the provider as they are; push exporters behind our reader."""

    pull_readers: list[MetricReader] = field(default_factory=list)
    push_exporters: list[tuple[str, MetricExporter]] = field(default_factory=list)

    def close_quietly(self) -> None:
        """A setup that fails half-way must not leave a port bound or a W&B run starting."""
        items: list[MetricReader | MetricExporter] = [*self.pull_readers]
        items.extend(exporter for _, exporter in self.push_exporters)
        for item in items:
            try:
                item.shutdown(timeout_millis=1_000)
            except Exception as error:
                _logger.debug("otel-train: closing %r after a failed setup: %r", item, error)


def build_exporters(specs: Sequence[ExporterSpec], context: RunContext) -> BuiltExporters:
    built = BuiltExporters()
    try:
        for spec in specs:
            item = (
                create_named_exporter(spec, context)
                if isinstance(spec, str)
                else bind_run_context(spec, context)
            )
            name = spec if isinstance(spec, str) else type(spec).__name__
            if item is None:
                continue
            if isinstance(item, MetricReader):
                built.pull_readers.append(item)
            elif isinstance(item, MetricExporter):
                built.push_exporters.append((name, item))
            else:
                raise OtelTrainError(
                    f"exporter {name!r} is a {type(item).__name__}; expected an OTel "
                    "MetricExporter or MetricReader"
                )
    except BaseException:
        built.close_quietly()
        raise
    return built


def bind_run_context(exporter: object, context: RunContext) -> object:
    """Exporter objects may want the run's identity (e.g. W&B run name, JSONL path)."""
    if isinstance(exporter, RunContextBindable):
        exporter.bind_run_context(context)
    return exporter


def attach_nonfinite_boards(built: BuiltExporters, reader: StepSampledReader) -> None:
    for pull_reader in built.pull_readers:
        if isinstance(pull_reader, SupportsNonfiniteBoard):
            pull_reader.attach_nonfinite_board(reader.nonfinite)  # a scrape shows NaN


def build_provider(
    reader: StepSampledReader,
    built: BuiltExporters,
    context: RunContext,
    views: Sequence[SamplingView],
) -> MeterProvider:
    for name, exporter in built.push_exporters:
        reader.add_exporter(exporter, name=name)
    return MeterProvider(
        metric_readers=[reader, *built.pull_readers],
        resource=_resource(context),
        views=_otel_views(views),
        # Exemplars link measurements to traces; a training loop has none, and collecting the
        # reservoirs was ~40% of each sampled step's collect.
        exemplar_filter=AlwaysOffExemplarFilter(),
        shutdown_on_exit=False,  # we flush ourselves, bounded, at exit
    )


def _resource(context: RunContext) -> Resource:
    return Resource.create(
        {
            "service.name": "otel-train",
            "service.instance.id": f"{context.host}:{os.getpid()}",
            "run": context.run,
            "stage": context.stage,
            "rank": context.rank,
            "local_rank": context.local_rank,
            "world_size": context.world_size,
            "host.name": context.host,
        }
    )


def views_needing_sdk(views: Sequence[SamplingView]) -> Callable[[str], bool]:
    """Instruments a view re-aggregates or filters go through the SDK (it applies views);
    every other staged value is aggregated by otel-train's own streams."""
    changing = [v for v in views if v.aggregation is not None or v.attribute_keys is not None]
    return lambda name: any(view.matches(name) for view in changing)


def _otel_views(views: Sequence[SamplingView]) -> list[View]:
    otel_views = [v for v in (view.to_otel_view() for view in views) if v is not None]
    otel_views.append(
        View(
            instrument_name="perf.step_time",
            aggregation=ExplicitBucketHistogramAggregation(boundaries=STEP_TIME_BUCKETS_SECONDS),
        )
    )
    return otel_views

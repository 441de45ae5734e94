"""`setup()`: resolve every option once, build one MeterProvider, return a `Telemetry`.

Precedence: arguments > `OTEL_TRAIN_*` environment variables > defaults. Everything that can
be wrong is checked here, before the first step, with a message that says what to change.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

from otel_train.catalog import instrument_names
from otel_train.errors import OtelTrainError
from otel_train.exporter_loading import check_exporter_names, create_named_exporter
from otel_train.flop_counter import StepFlopCounter
from otel_train.gpu import register_gpu_metrics
from otel_train.instruments import STEP_TIME_BUCKETS_SECONDS
from otel_train.naming import KeyNamer, KeySpec
from otel_train.ranks import RankInfo, detect_ranks
from otel_train.reader import StepSampledReader
from otel_train.redaction import redact
from otel_train.reduction import CrossRankReducer
from otel_train.run_context import RunContext, output_dir_from
from otel_train.sampling import GroupIndex, SamplingView, parse_intervals, resolve_views
from otel_train.signals import install_signal_flush
from otel_train.system_metrics import (
    SystemMetricsOption,
    register_system_metrics,
    resolve_system_metrics_config,
)
from otel_train.telemetry import Telemetry
from otel_train.throughput import resolve_throughput_settings

_logger = logging.getLogger("otel_train.setup")

STANDARD_INSTRUMENTS = instrument_names()

ExporterSpec = str | MetricExporter | MetricReader

_live: weakref.WeakSet[Telemetry] = weakref.WeakSet()


def setup(
    *,
    run: str | None = None,
    stage: str = "train",
    output_dir: str | os.PathLike[str] | None = None,
    exporters: Sequence[ExporterSpec] | None = None,
    intervals: Mapping[str, int | None] | Sequence[SamplingView] | None = None,
    total_steps: int | None = None,
    config: Any = None,
    flops_per_token: float | None = None,
    peak_flops: float | str | None = None,
    model: Any = None,
    seq_len: int | None = None,
    deepspeed_config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    world_size: int | None = None,
    dtype: Any = None,
    measure_flops: bool | int = False,
    gpu_metrics: bool = True,
    system_metrics: SystemMetricsOption = True,
    key_overrides: Mapping[str, str | KeySpec | tuple[KeySpec, ...]] | None = None,
    key_preset: str = "default",
    resume: bool = False,
    resume_step: int = 0,
    ranks: RankInfo | None = None,
    clock: Callable[[], float] | None = None,
    max_queue_batches: int = 1024,
    shutdown_timeout_millis: float = 10_000,
    install_global: bool = False,
    reduce_across_ranks: bool = False,
    handle_signals: bool = True,
    max_attribute_sets: int = 200,
    perplexity: bool | None = None,
) -> Telemetry:
    """Build the telemetry of one process (rank). See the README for every option.

    `exporters` takes names ("jsonl", "prometheus", "wandb", "otlp") or OTel objects: a
    `MetricExporter` is driven by the step-sampled reader on its own thread, a `MetricReader`
    (e.g. a pull reader) is attached to the provider as is.

    `reduce_across_ranks=True`: at sampled steps one all_reduce (torch.distributed, when
    initialised) makes rank 0 export global values; every rank must then call `step()` with
    the same step numbers. `handle_signals`: flush on SIGTERM / SIGINT (main thread only).

    MFU: `model=` + `seq_len=` give FLOPs per token (or `flops_per_token=`); `peak_flops=`
    (FLOP/s of this rank's devices, or a device name) or `dtype=` gives the peak;
    `deepspeed_config=` / `batch_size=` / `micro_batch_size=` give the effective batch;
    `stage=` ("dpo", "ppo", "grpo", ...) picks the FLOPs rule (`otel_train.model_flops`).
    `measure_flops=True` counts one step's FLOPs with torch (an int N: every N steps, costly).

    `max_attribute_sets`: attribute sets one staged instrument may export (more fold into an
    `otel.metric.overflow` series, with one warning). `perplexity`: derive train/eval
    perplexity from the loss; default: only for cross-entropy stages (pretrain, sft, train).
    `install_global=True` makes `opentelemetry.metrics.get_meter()` record into this pipeline.
    `system_metrics`: process and host metrics (CPU, RSS, disk and network I/O) from
    opentelemetry-instrumentation-system-metrics with the gpu group; a mapping picks the
    metrics (that package's config format), False turns them off.
    """
    env = os.environ
    run_name = run or env.get("OTEL_TRAIN_RUN") or time.strftime("run-%Y%m%d-%H%M%S")
    _check_run_name(run_name)
    stage = stage or "train"
    rank_info = ranks or detect_ranks()
    directory = output_dir_from(output_dir, env)
    specs = _exporter_specs(exporters, env)
    _check_positive("max_queue_batches", max_queue_batches)
    _check_positive("max_attribute_sets", max_attribute_sets)
    if total_steps is not None:
        _check_positive("total_steps", total_steps)
    views = resolve_views(
        intervals if intervals is not None else _env_intervals(env), STANDARD_INSTRUMENTS
    )
    groups = GroupIndex(views)
    context = RunContext(
        run=run_name,
        stage=stage,
        rank=rank_info.rank,
        local_rank=rank_info.local_rank,
        world_size=rank_info.world_size,
        host=socket.gethostname(),
        output_dir=directory,
        config=redact(config) if config is not None else {},
        resume=resume or resume_step > 0,
        namer=KeyNamer(key_overrides, preset=key_preset),
        total_steps=total_steps,
        exports_global_values=reduce_across_ranks
        and rank_info.rank == 0
        and rank_info.world_size > 1,
    )
    # Everything that can reject the options runs before any exporter opens a file, binds
    # a port or starts W&B: a rejected setup leaves nothing running.
    throughput = resolve_throughput_settings(
        total_steps=total_steps,
        flops_per_token_value=flops_per_token,
        peak_flops_value=peak_flops,
        model=model,
        seq_len=seq_len,
        deepspeed_config=deepspeed_config,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        world_size=world_size if world_size is not None else rank_info.world_size,
        dtype=dtype,
        stage=stage,
    )
    if measure_flops and model is None:
        raise OtelTrainError("measure_flops=True needs model= (the module whose step is counted)")
    system_config = resolve_system_metrics_config(system_metrics, local_rank=context.local_rank)
    reader = StepSampledReader(groups, max_queue_batches=max_queue_batches)
    pull_readers: list[MetricReader] = []
    push_exporters: list[tuple[str, MetricExporter]] = []
    try:
        for spec in specs:
            built = (
                create_named_exporter(spec, context)
                if isinstance(spec, str)
                else _bind(spec, context)
            )
            name = spec if isinstance(spec, str) else type(spec).__name__
            if built is None:
                continue
            if isinstance(built, MetricReader):
                pull_readers.append(built)
            elif isinstance(built, MetricExporter):
                push_exporters.append((name, built))
            else:
                raise OtelTrainError(
                    f"exporter {name!r} is a {type(built).__name__}; expected an OTel "
                    "MetricExporter or MetricReader"
                )
    except BaseException:
        _close_quietly([*pull_readers, *(exporter for _, exporter in push_exporters)])
        raise
    for name, exporter in push_exporters:
        reader.add_exporter(exporter, name=name)
    provider = MeterProvider(
        metric_readers=[reader, *pull_readers],
        resource=_resource(context),
        views=_otel_views(views),
        # Exemplars link measurements to traces; a training loop has none, and collecting the
        # reservoirs was ~40% of each sampled step's collect.
        exemplar_filter=AlwaysOffExemplarFilter(),
        shutdown_on_exit=False,  # we flush ourselves, bounded, at exit
    )
    telemetry = Telemetry(
        provider=provider,
        reader=reader,
        groups=groups,
        context=context,
        throughput=throughput,
        clock=clock or time.perf_counter,
        shutdown_timeout_millis=shutdown_timeout_millis,
        resume_step=resume_step,
        reducer=CrossRankReducer(keep_on_this_rank=context.rank == 0)
        if reduce_across_ranks
        else None,
        max_attribute_sets=max_attribute_sets,
        perplexity=perplexity,
    )
    if gpu_metrics:
        # Energy per token pairs this rank's GPU energy with this rank's tokens; reduced
        # (global) tokens on rank 0 would divide by the wrong count.
        register_gpu_metrics(telemetry, joules_per_token=not reduce_across_ranks)
    if system_config is not None:
        register_system_metrics(telemetry, system_config)
    if measure_flops:
        every = None if measure_flops is True else int(measure_flops)
        # Kept alive by the model's hook and the gauge's callback; nothing else holds it.
        StepFlopCounter(telemetry, model, every_n_steps=every)
    if handle_signals:
        install_signal_flush(
            _flush_live_on_signal,
            timeout_millis=shutdown_timeout_millis,
            busy_here=_live_busy_on_this_thread,
        )
    for pull_reader in pull_readers:
        attach = getattr(pull_reader, "attach_nonfinite_board", None)
        if callable(attach):
            attach(reader.nonfinite)  # so a scrape shows NaN, not the last finite value
    if install_global:
        otel_metrics.set_meter_provider(telemetry.meter_provider)
    _live.add(telemetry)
    return telemetry


def _close_quietly(built: Sequence[MetricReader | MetricExporter]) -> None:
    """A setup that fails half-way must not leave a port bound or a W&B run starting."""
    for item in built:
        try:
            item.shutdown(timeout_millis=1_000)
        except Exception as error:
            _logger.debug("otel-train: closing %r after a failed setup: %r", item, error)


def _bind(exporter: Any, context: RunContext) -> Any:
    """Exporter objects may want the run's identity (e.g. W&B run name, JSONL path)."""
    bind = getattr(exporter, "bind_run_context", None)
    if callable(bind):
        bind(context)
    return exporter


def _exporter_specs(
    exporters: Sequence[ExporterSpec] | None, env: Mapping[str, str]
) -> list[ExporterSpec]:
    if exporters is None:
        from_env = env.get("OTEL_TRAIN_EXPORTERS", "jsonl")
        exporters = [name.strip() for name in from_env.split(",") if name.strip()]
    if isinstance(exporters, str):
        exporters = [exporters]
    specs = list(exporters)
    check_exporter_names([s for s in specs if isinstance(s, str)])
    names = [s for s in specs if isinstance(s, str)]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise OtelTrainError(f"exporter(s) {sorted(duplicated)} listed twice; list each once")
    return specs


def _env_intervals(env: Mapping[str, str]) -> dict[str, int] | None:
    """OTEL_TRAIN_INTERVALS="train=10,perf=20,gpu=50"."""
    raw = env.get("OTEL_TRAIN_INTERVALS")
    return parse_intervals(raw, source="OTEL_TRAIN_INTERVALS=") if raw else None


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise OtelTrainError(f"{name} must be a positive int, got {value!r}")


def _check_run_name(run: str) -> None:
    if not isinstance(run, str) or not run.strip():
        raise OtelTrainError("run must be a non-empty string naming the run, e.g. 'gpt-small-sft'")


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


def _otel_views(views: Sequence[SamplingView]) -> list[View]:
    otel_views = [v for v in (view.to_otel_view() for view in views) if v is not None]
    otel_views.append(
        View(
            instrument_name="perf.step_time",
            aggregation=ExplicitBucketHistogramAggregation(boundaries=STEP_TIME_BUCKETS_SECONDS),
        )
    )
    return otel_views


@atexit.register
def _shutdown_live_telemetry() -> None:
    for telemetry in list(_live):
        try:
            telemetry.shutdown()
        except Exception as error:  # never turn a clean exit into a traceback
            _logger.warning("otel-train: shutdown at exit failed: %r", error)


def _flush_live_on_signal(signum: int, budget_millis: float) -> None:
    """SIGTERM ends the process: export the tail and final/*. SIGINT becomes a
    KeyboardInterrupt the program may catch: only drain what is queued."""
    for telemetry in list(_live):
        if signum == signal.SIGTERM:
            telemetry.shutdown(timeout_millis=budget_millis)
        else:
            telemetry.flush(timeout_millis=budget_millis)


def _live_busy_on_this_thread() -> bool:
    return any(telemetry.busy_on_this_thread() for telemetry in list(_live))


def _disable_live_in_forked_child() -> None:
    # A DataLoader worker (fork) inherits every Telemetry and possibly locks held by the
    # parent's other threads: it must export nothing and must never wait on those locks.
    for telemetry in list(_live):
        telemetry._disable_in_forked_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disable_live_in_forked_child)

"""`setup()`: resolve every option once, build one MeterProvider, return a `Telemetry`.

Precedence: arguments > `OTEL_TRAIN_*` environment variables (`otel_train.env`) > defaults.
Everything that can be wrong is checked here, before the first step, with a message that
says what to change; `otel_train.pipeline` then builds the OTel objects.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics as otel_metrics

from otel_train import env as env_vars
from otel_train.catalog import instrument_names
from otel_train.errors import OtelTrainError
from otel_train.exporter_loading import check_exporter_names
from otel_train.flop_counter import StepFlopCounter
from otel_train.gpu import register_gpu_metrics
from otel_train.naming import KeyNamer, KeySpec
from otel_train.pipeline import (
    ExporterSpec,
    attach_nonfinite_boards,
    build_exporters,
    build_provider,
    views_needing_sdk,
)
from otel_train.process_hooks import shutdown_live_telemetry, track
from otel_train.ranks import RankInfo, detect_ranks
from otel_train.rates import ThroughputSettings
from otel_train.reader import StepSampledReader
from otel_train.redaction import redact
from otel_train.reduction import CrossRankReducer
from otel_train.run_context import RunContext, ValueScope, output_dir_from
from otel_train.sampling import GroupIndex, SamplingView, resolve_views
from otel_train.series import feed_reader
from otel_train.system_metrics import (
    SystemMetricsOption,
    register_system_metrics,
    resolve_system_metrics_config,
)
from otel_train.telemetry import Telemetry
from otel_train.throughput import resolve_throughput_settings
from otel_train.validation import check_positive_int

STANDARD_INSTRUMENTS = instrument_names()

# The exit hook's old home: exporters/_wandb_exit.py looks it up here by name.
_shutdown_live_telemetry = shutdown_live_telemetry

__all__ = ["STANDARD_INSTRUMENTS", "ExporterSpec", "setup"]


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
    # Everything that can reject the options runs before any exporter opens a file, binds
    # a port or starts W&B: a rejected setup leaves nothing running.
    rank_info = ranks or detect_ranks()
    context, specs, views = _resolve_run(
        run=run,
        stage=stage or "train",
        output_dir=output_dir,
        exporters=exporters,
        intervals=intervals,
        total_steps=total_steps,
        config=config,
        key_overrides=key_overrides,
        key_preset=key_preset,
        resume=resume or resume_step > 0,
        rank_info=rank_info,
        exports_global_values=reduce_across_ranks,
        max_queue_batches=max_queue_batches,
        max_attribute_sets=max_attribute_sets,
    )
    flops = ThroughputOptions(
        flops_per_token=flops_per_token,
        peak_flops=peak_flops,
        model=model,
        seq_len=seq_len,
        deepspeed_config=deepspeed_config,
        batch_size=batch_size,
        micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        world_size=world_size if world_size is not None else rank_info.world_size,
        dtype=dtype,
        measure_flops=measure_flops,
    )
    throughput = flops.resolve(context)
    system_config = resolve_system_metrics_config(system_metrics, local_rank=context.local_rank)
    groups = GroupIndex(views)
    reader = StepSampledReader(groups, max_queue_batches=max_queue_batches)
    built = build_exporters(specs, context)
    telemetry = Telemetry(
        provider=build_provider(reader, built, context, views),
        reader=reader,
        groups=groups,
        context=context,
        throughput=throughput,
        clock=clock or time.perf_counter,
        shutdown_timeout_millis=shutdown_timeout_millis,
        resume_step=resume_step,
        reducer=CrossRankReducer(
            keep_on_this_rank=context.rank == 0,
            scope=context.value_scope,
            expected_world_size=context.world_size,
        )
        if reduce_across_ranks
        else None,
        max_attribute_sets=max_attribute_sets,
        perplexity=perplexity,
        needs_sdk=views_needing_sdk(views),
    )
    reader.bind(
        resource=telemetry.streams.resource,
        namer=context.namer,
        values_are_global=context.values_are_global,
    )
    for pull_reader in built.pull_readers:  # they collect the SDK on their own: add our streams
        feed_reader(pull_reader, telemetry.streams)
    _register_metric_sources(telemetry, flops, system_config, reduce_across_ranks, gpu_metrics)
    track(telemetry, handle_signals=handle_signals, timeout_millis=shutdown_timeout_millis)
    attach_nonfinite_boards(built, reader)
    if install_global:
        otel_metrics.set_meter_provider(telemetry.meter_provider)
    return telemetry


def _resolve_run(
    *,
    run: str | None,
    stage: str,
    output_dir: str | os.PathLike[str] | None,
    exporters: Sequence[ExporterSpec] | None,
    intervals: Mapping[str, int | None] | Sequence[SamplingView] | None,
    total_steps: int | None,
    config: Any,
    key_overrides: Mapping[str, str | KeySpec | tuple[KeySpec, ...]] | None,
    key_preset: str,
    resume: bool,
    rank_info: RankInfo,
    exports_global_values: bool,
    max_queue_batches: int,
    max_attribute_sets: int,
) -> tuple[RunContext, list[ExporterSpec], list[SamplingView]]:
    """The run's identity, exporter specs and sampling views, in the order they were always
    checked (so the first wrong option is the one reported)."""
    run_name = run or env_vars.RUN.read() or time.strftime("run-%Y%m%d-%H%M%S")
    _check_run_name(run_name)
    directory = output_dir_from(output_dir, os.environ)
    specs = _exporter_specs(exporters)
    check_positive_int("max_queue_batches", max_queue_batches)
    check_positive_int("max_attribute_sets", max_attribute_sets)
    if total_steps is not None:
        check_positive_int("total_steps", total_steps)
    views = resolve_views(
        intervals if intervals is not None else env_vars.INTERVALS.read(), STANDARD_INSTRUMENTS
    )
    context = RunContext(
        run=run_name,
        stage=stage,
        rank=rank_info.rank,
        local_rank=rank_info.local_rank,
        world_size=rank_info.world_size,
        host=socket.gethostname(),
        output_dir=directory,
        config=redact(config) if config is not None else {},
        resume=resume,
        namer=KeyNamer(key_overrides, preset=key_preset),
        total_steps=total_steps,
        exports_global_values=exports_global_values
        and rank_info.rank == 0
        and rank_info.world_size > 1,
        value_scope=ValueScope() if exports_global_values else None,
    )
    return context, specs, views


@dataclass(frozen=True, slots=True, kw_only=True)
class ThroughputOptions:
    """setup()'s throughput / MFU arguments (`world_size` already defaulted to the job's)."""

    flops_per_token: float | None
    peak_flops: float | str | None
    model: Any
    seq_len: int | None
    deepspeed_config: Mapping[str, Any] | str | os.PathLike[str] | None
    batch_size: int | None
    micro_batch_size: int | None
    gradient_accumulation_steps: int | None
    world_size: int
    dtype: Any
    measure_flops: bool | int

    def resolve(self, context: RunContext) -> ThroughputSettings:
        settings = resolve_throughput_settings(
            total_steps=context.total_steps,
            flops_per_token_value=self.flops_per_token,
            peak_flops_value=self.peak_flops,
            model=self.model,
            seq_len=self.seq_len,
            deepspeed_config=self.deepspeed_config,
            batch_size=self.batch_size,
            micro_batch_size=self.micro_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            world_size=self.world_size,
            dtype=self.dtype,
            stage=context.stage,
        )
        if self.measure_flops and self.model is None:
            raise OtelTrainError(
                "measure_flops=True needs model= (the module whose step is counted)"
            )
        return settings


def _register_metric_sources(
    telemetry: Telemetry,
    flops: ThroughputOptions,
    system_config: Any,
    reduce_across_ranks: bool,
    gpu_metrics: bool,
) -> None:
    """Observable metrics that read the process, the GPUs, or count a step's FLOPs."""
    if gpu_metrics:
        # Energy per token pairs this rank's GPU energy with this rank's tokens; reduced
        # (global) tokens on rank 0 would divide by the wrong count.
        register_gpu_metrics(telemetry, joules_per_token=not reduce_across_ranks)
    if system_config is not None:
        register_system_metrics(telemetry, system_config)
    if flops.measure_flops:
        every = None if flops.measure_flops is True else int(flops.measure_flops)
        # Kept alive by the model's hook and the gauge's callback; nothing else holds it.
        StepFlopCounter(telemetry, flops.model, every_n_steps=every)


def _exporter_specs(exporters: Sequence[ExporterSpec] | None) -> list[ExporterSpec]:
    if exporters is None:
        from_env = env_vars.EXPORTERS.read()
        exporters = ["jsonl"] if from_env is None else from_env
    if isinstance(exporters, str):
        exporters = [exporters]
    specs = list(exporters)
    names = [s for s in specs if isinstance(s, str)]
    check_exporter_names(names)
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise OtelTrainError(f"exporter(s) {sorted(duplicated)} listed twice; list each once")
    return specs


def _check_run_name(run: str) -> None:
    if not isinstance(run, str) or not run.strip():
        raise OtelTrainError("run must be a non-empty string naming the run, e.g. 'gpt-small-sft'")

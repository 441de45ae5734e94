"""The standard instrument set every stage shares (pretrain, SFT, DPO, PPO), and `record()`.

Same names everywhere is the point: a DPO run and a pretrain run chart on the same panels.
`record()` is the hot path: it stores references and adds host numbers, nothing else.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.metrics import Counter, Histogram, Meter, _Gauge

from otel_train.errors import UnknownMetricError
from otel_train.staging import StagedCounter

# Step-time buckets, seconds: a 1-1.5-2-3-5-7.5 ladder from 1 ms to 60 s (p50/p95 from these
# interpolate within ~25%; the SDK default 0..10000 would put every step in one bucket).
STEP_TIME_BUCKETS_SECONDS: tuple[float, ...] = (
    *(
        round(mantissa * 10.0**exponent, 6)
        for exponent in range(-3, 1)
        for mantissa in (1.0, 1.5, 2.0, 3.0, 5.0, 7.5)
    ),
    *(10.0, 15.0, 20.0, 30.0, 45.0, 60.0),
)

RECORDABLE = ("loss", "learning_rate", "grad_norm", "tokens", "samples", "epoch")


class TrainingInstruments:
    """`tel.training`: the OTel instruments plus the staging `record()` writes into."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        gauge = meter.create_gauge
        self.tokens: Counter = meter.create_counter(
            "train.tokens", unit="{token}", description="Tokens consumed by training (cumulative)"
        )
        self.samples: Counter = meter.create_counter(
            "train.samples",
            unit="{sample}",
            description="Samples consumed by training (cumulative)",
        )
        self.nonfinite: Counter = meter.create_counter(
            "train.nonfinite", unit="{value}", description="Recorded values that were NaN or inf"
        )
        # Exported as 0 until the first NaN (Prometheus practice: a counter that does not
        # exist yet reads "No data", not "none so far").
        self.nonfinite.add(0)
        self.loss: _Gauge = gauge("train.loss", description="Training loss at the sampled step")
        self.learning_rate: _Gauge = gauge("train.learning_rate", description="Learning rate")
        self.grad_norm: _Gauge = gauge("train.grad_norm", description="Global gradient norm")
        self.epoch: _Gauge = gauge("train.epoch", description="Epoch (fractional where known)")
        self.global_step: _Gauge = gauge(
            "train.global_step", description="Optimizer step; the x-axis of every backend"
        )
        self.perplexity: _Gauge = gauge("train.perplexity", description="exp(training loss)")
        self.step_time: Histogram = meter.create_histogram(
            "perf.step_time", unit="s", description="Wall time between consecutive steps"
        )
        self.tokens_per_second: _Gauge = gauge(
            "perf.tokens_per_second",
            unit="{token}/s",
            description="Tokens per second, all of this rank's",
        )
        self.samples_per_second: _Gauge = gauge(
            "perf.samples_per_second", unit="{sample}/s", description="Samples per second"
        )
        self.steps_per_second: _Gauge = gauge(
            "perf.steps_per_second", unit="{step}/s", description="Optimizer steps per second"
        )
        self.eta: _Gauge = gauge("perf.eta", unit="s", description="Estimated time to total_steps")
        self.flops_per_second: _Gauge = gauge(
            "perf.flops_per_second", unit="{flop}/s", description="Achieved model FLOP/s"
        )
        self.mfu: _Gauge = gauge(
            "perf.mfu", unit="1", description="Model FLOPs utilisation (achieved / peak)"
        )
        # Staging: plain attributes, read at sampled steps.
        self.staged_gauges: dict[str, Any] = {
            "train.loss": None,
            "train.learning_rate": None,
            "train.grad_norm": None,
            "train.epoch": None,
        }
        self.staged_tokens = StagedCounter("train.tokens")
        self.staged_samples = StagedCounter("train.samples")
        self.enabled = True

    def gauge_for(self, instrument_name: str) -> _Gauge:
        return {
            "train.loss": self.loss,
            "train.learning_rate": self.learning_rate,
            "train.grad_norm": self.grad_norm,
            "train.epoch": self.epoch,
        }[instrument_name]

    def record(
        self,
        *,
        loss: Any = None,
        learning_rate: Any = None,
        grad_norm: Any = None,
        tokens: Any = None,
        samples: Any = None,
        epoch: Any = None,
        **unknown: Any,
    ) -> None:
        """Stage this step's values: numbers or 0-dim tensors on any device, never synced here.

        Gauges keep the last value recorded before a sampled step; `tokens` / `samples` are
        per-step amounts and accumulate (on their device when given as tensors).
        """
        if unknown:
            raise UnknownMetricError(
                f"record() got unknown metric(s) {sorted(unknown)}; "
                f"valid: {', '.join(RECORDABLE)}. "
                "For other values create an instrument on tel.meter (e.g. 'train.reward')."
            )
        if not self.enabled:
            return
        staged = self.staged_gauges
        if loss is not None:
            staged["train.loss"] = loss
        if learning_rate is not None:
            staged["train.learning_rate"] = learning_rate
        if grad_norm is not None:
            staged["train.grad_norm"] = grad_norm
        if epoch is not None:
            staged["train.epoch"] = epoch
        if tokens is not None:
            self.staged_tokens.add(tokens)
        if samples is not None:
            self.staged_samples.add(samples)

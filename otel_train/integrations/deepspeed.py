"""DeepSpeed onto the standard instruments: effective batch, learning rate, global grad norm,
loss scale and skipped (fp16 overflow) steps, read from what the engine already holds.

No extra syncs: the grad norm DeepSpeed caches may be a device tensor, and it is staged like
any recorded value (resolved on sampled steps only); the loss scale and skipped-step count
are host numbers, read by observable instruments when the train group is collected. Without
deepspeed installed, the recorder works from a DeepSpeed config (dict or JSON path) alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Observation

from otel_train.errors import OtelTrainError
from otel_train.throughput import DeepSpeedConfig, effective_batch_size, load_deepspeed_config

if TYPE_CHECKING:
    from otel_train.telemetry import Telemetry


class DeepSpeedRecorder:
    """Call `after_step(loss=...)` after every `engine.step()` (each micro-batch): the loss
    recorded is the mean over the optimizer step's micro-batches.

    With an engine, the step is `engine.global_steps` (it moves at accumulation boundaries, so
    `tel.step()` advances once per optimizer step). With only a config, pass `step=`: the
    optimizer steps finished so far, as `engine.global_steps` would count them.
    """

    def __init__(
        self,
        telemetry: Telemetry,
        engine: Any = None,
        *,
        deepspeed_config: DeepSpeedConfig | None = None,
        world_size: int | None = None,
    ) -> None:
        if engine is None and deepspeed_config is None:
            raise OtelTrainError("DeepSpeedRecorder needs engine= or deepspeed_config=")
        self.telemetry = telemetry
        self.engine = engine
        if engine is not None:
            self.effective_batch_size = int(engine.train_batch_size())
            self.micro_batch_size = int(engine.train_micro_batch_size_per_gpu())
            self.gradient_accumulation_steps = int(engine.gradient_accumulation_steps())
        else:
            assert deepspeed_config is not None
            config = load_deepspeed_config(deepspeed_config)
            world = world_size if world_size is not None else telemetry.context.world_size
            self.effective_batch_size = effective_batch_size(config, world_size=world)
            accumulation = config.get("gradient_accumulation_steps")
            self.gradient_accumulation_steps = accumulation if isinstance(accumulation, int) else 1
            self.micro_batch_size = self.effective_batch_size // (
                world * self.gradient_accumulation_steps
            )
        self._loss_sum: Any = None  # this optimizer step's micro-batch losses, on the device
        self._loss_count = 0
        self._last_seen_step = (
            int(engine.global_steps) if engine is not None else telemetry.last_step
        )
        meter, reader = telemetry.meter, telemetry.reader
        meter.create_observable_gauge(
            "train.loss_scale",
            callbacks=[reader.sampled_callback("train", self._observe_loss_scale)],
            description="fp16 dynamic loss scale (DeepSpeed)",
        )
        meter.create_observable_counter(
            "train.skipped_steps",
            callbacks=[reader.sampled_callback("train", self._observe_skipped_steps)],
            unit="{step}",
            description="Optimizer steps skipped on fp16 overflow (DeepSpeed)",
        )

    def after_step(self, *, loss: Any = None, tokens: Any = None, step: int | None = None) -> None:
        """Stage this micro-batch's values and advance the clock. Never syncs.

        The loss is summed on its device over the micro-batches of the optimizer step and
        recorded once, as their mean, when the step completes (gradient accumulation).
        """
        engine = self.engine
        if loss is not None:
            value = loss.detach().float() if hasattr(loss, "detach") else float(loss)
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._loss_count += 1
        record = self.telemetry.training.record
        record(tokens=tokens, samples=self.micro_batch_size)
        if engine is not None:
            step = int(engine.global_steps)
        if step is None:
            raise OtelTrainError("after_step(step=...) is required without a DeepSpeed engine")
        if step <= self._last_seen_step:
            return  # inside an accumulation window: nothing else to read yet
        self._last_seen_step = step
        if self._loss_count:
            record(loss=self._loss_sum / self._loss_count)
            self._loss_sum, self._loss_count = None, 0
        if engine is not None:
            learning_rates = engine.get_lr()
            if learning_rates:
                record(learning_rate=learning_rates[0])
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                record(grad_norm=grad_norm)
        if step > self.telemetry.last_step:
            self.telemetry.step(step)

    # -- observable instruments (collect time, host values only) -----------------------------
    def _observe_loss_scale(self, options: CallbackOptions) -> Iterable[Observation]:
        scale = _loss_scale(self.engine) if self.engine is not None else None
        return (Observation(float(scale)),) if isinstance(scale, (int, float)) else ()

    def _observe_skipped_steps(self, options: CallbackOptions) -> Iterable[Observation]:
        skipped = getattr(self.engine, "skipped_steps", None)
        return (Observation(int(skipped)),) if isinstance(skipped, int) else ()


def _loss_scale(engine: Any) -> Any:
    """Where DeepSpeed keeps the current loss scale (the engine's own lookup, public first)."""
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        return None
    config = getattr(optimizer, "loss_scale_config", None)
    if config is not None:
        return getattr(config, "cur_scale", None)
    return getattr(optimizer, "cur_scale", None)

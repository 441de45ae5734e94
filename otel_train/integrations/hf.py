"""`OtelTrainCallback`: the Hugging Face `Trainer`'s logs and state onto the standard instruments.

Same keys as a plain loop: `train/loss`, `train/learning_rate`, `train/grad_norm`,
`train/epoch`, `train/num_input_tokens_seen`, `train/samples`, `eval/*`. The Trainer calls
`on_step_end` before it logs that step, so on logging steps the callback moves the clock in
`on_log`, after the step's values are recorded. Values come from the Trainer's own logs
(it syncs the loss only on its logging steps); set `logging_steps` to the train interval.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        'otel_train.integrations.hf needs transformers: pip install "otel-train[hf]"'
    ) from error

if TYPE_CHECKING:
    from otel_train.telemetry import Telemetry

# Keys of the Trainer's eval metrics that describe the evaluation run, not the model.
_EVAL_BOOKKEEPING = frozenset(
    {"runtime", "samples_per_second", "steps_per_second", "epoch", "num_input_tokens_seen"}
)


class OtelTrainCallback(TrainerCallback):  # type: ignore[misc]
    """Pass in `Trainer(callbacks=[OtelTrainCallback(tel)])`. The caller owns `tel`'s life."""

    def __init__(self, telemetry: Telemetry, *, end_epochs: bool = True) -> None:
        self.telemetry = telemetry
        self.end_epochs = end_epochs
        self.effective_batch_size: int | None = None
        self._samples_per_step = 0
        self._world_size = 1
        self._tokens_seen = 0
        self._pending_step: int | None = None

    # -- Trainer events -----------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._world_size = max(int(getattr(args, "world_size", 1) or 1), 1)
        accumulation = int(args.gradient_accumulation_steps)
        self._samples_per_step = int(args.per_device_train_batch_size) * accumulation
        # Samples per optimizer step over all ranks, as DeepSpeed and the Trainer count it.
        self.effective_batch_size = self._samples_per_step * self._world_size
        self._tokens_seen = int(state.num_input_tokens_seen or 0)
        if state.global_step > self.telemetry.last_step:  # resumed from a checkpoint
            self.telemetry.resume_from(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tokens_now = int(state.num_input_tokens_seen or 0)
        new_tokens, self._tokens_seen = tokens_now - self._tokens_seen, tokens_now
        record = self.telemetry.training.record
        # num_input_tokens_seen is gathered over all ranks: this rank's share.
        if new_tokens > 0:
            record(tokens=new_tokens / self._world_size, samples=self._samples_per_step)
        else:
            record(samples=self._samples_per_step)
        if state.epoch is not None:
            record(epoch=float(state.epoch))
        if getattr(control, "should_log", False):
            self._pending_step = state.global_step  # its loss arrives in on_log
        else:
            self.telemetry.step(state.global_step)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        logs = logs or {}
        values = {
            name: logs[key]
            for key, name in (
                ("loss", "loss"),
                ("learning_rate", "learning_rate"),
                ("grad_norm", "grad_norm"),
                ("epoch", "epoch"),
            )
            if isinstance(logs.get(key), (int, float))
        }
        if values and not any(key.startswith("eval_") for key in logs):
            self.telemetry.training.record(**values)
        self._advance()

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._advance()
        metrics = metrics or {}
        extra = {}
        for key, value in metrics.items():
            name = key.removeprefix("eval_")
            if name != "loss" and name not in _EVAL_BOOKKEEPING and isinstance(value, (int, float)):
                extra[name] = value
        self.telemetry.evaluate(loss=metrics.get("eval_loss"), metrics=extra)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._advance()
        if self.end_epochs:
            self.telemetry.end_epoch(round(state.epoch) if state.epoch is not None else None)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._advance()
        self.telemetry.flush()

    def _advance(self) -> None:
        if self._pending_step is not None:
            step, self._pending_step = self._pending_step, None
            self.telemetry.step(step)

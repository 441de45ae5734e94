"""`OtelTrainCallback`: the Hugging Face `Trainer`'s (and TRL's) logs and state into otel-train.

Nothing the trainer logs is dropped: `loss`, `learning_rate`, `grad_norm`, `epoch` go onto
the standard instruments, the keys of the stage catalog onto their names (TRL's
`rewards/margins` -> `train/rewards_margin`), every other number under the naming rule
(`completions/max_length` -> `train/completions_max_length`), at train and eval alike. The
Trainer calls `on_step_end` before it logs that step, so on logging steps the clock moves in
`on_log`, after the step's values are recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        'otel_train.integrations.hf needs transformers: pip install "otel-train[hf]"'
    ) from error

from otel_train.catalog import CROSS_ENTROPY_STAGES
from otel_train.errors import OtelTrainError
from otel_train.integrations._common import StepDriver, train_interval, warn_once
from otel_train.integrations._keys import instrument_name, numeric_items

if TYPE_CHECKING:
    from otel_train.telemetry import Telemetry

_logger = logging.getLogger(__name__)

_STANDARD = {
    "loss": "loss",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "epoch": "epoch",
}
# The Trainer's own throughput bookkeeping in training logs (include_num_input_tokens_seen):
# tokens are counted from its state, rates and run time are perf/*.
_TRAIN_BOOKKEEPING = frozenset(
    {"num_input_tokens_seen", "train_runtime", "train_tokens_per_second"}
)
# Keys of eval metrics that describe the evaluation run or repeat a training counter.
_EVAL_BOOKKEEPING = frozenset(
    {
        "runtime",
        "samples_per_second",
        "steps_per_second",
        "epoch",
        "num_input_tokens_seen",
        "num_tokens",
    }
)
# The stage each trainer runs, from its arguments' class (TRL's configs).
_STAGE_OF_ARGS = {
    "SFTConfig": "sft",
    "DPOConfig": "dpo",
    "GRPOConfig": "grpo",
    "RLOOConfig": "rloo",
    "PPOConfig": "ppo",
}


class OtelTrainCallback(TrainerCallback):  # type: ignore[misc]
    """Pass in `Trainer(callbacks=[OtelTrainCallback(tel)])`. The caller owns `tel`'s life."""

    def __init__(self, telemetry: Telemetry, *, end_epochs: bool = True) -> None:
        self.telemetry = telemetry
        self.end_epochs = end_epochs
        self.effective_batch_size: int | None = None
        self._driver = StepDriver(telemetry)
        self._samples_per_step = 0
        self._world_size = 1
        self._tokens_seen = 0  # the Trainer's num_input_tokens_seen at the last step
        self._tokens_from_state = False
        self._trl_tokens = 0.0  # TRL's num_tokens at the last log
        self._completions_per_step: int | None = None
        self._last_log_step = 0
        self._warned: set[str] = set()

    # -- Trainer events -----------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._world_size = max(int(getattr(args, "world_size", 1) or 1), 1)
        accumulation = int(args.gradient_accumulation_steps)
        self._samples_per_step = int(args.per_device_train_batch_size) * accumulation
        # Samples per optimizer step over all ranks, as DeepSpeed and the Trainer count it.
        self.effective_batch_size = self._samples_per_step * self._world_size
        self._tokens_seen = int(state.num_input_tokens_seen or 0)
        self._last_log_step = int(state.global_step)
        self._completions_per_step = _completions_per_step(args)
        if state.global_step > self.telemetry.last_step:  # resumed from a checkpoint
            self.telemetry.resume_from(state.global_step)
        self._check_logging_steps(args, state)
        self._check_stage(args)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._driver.advance()
        tokens_now = int(state.num_input_tokens_seen or 0)
        new_tokens, self._tokens_seen = tokens_now - self._tokens_seen, tokens_now
        standard: dict[str, Any] = {"samples": self._samples_per_step}
        if state.epoch is not None:
            standard["epoch"] = float(state.epoch)  # fractional: 0.25 a quarter through
        if new_tokens > 0:
            self._tokens_from_state = True
            # num_input_tokens_seen is gathered over all ranks: this rank's share.
            standard["tokens"] = new_tokens / self._world_size
        self._record({}, standard)
        if getattr(control, "should_log", False):
            self._driver.defer(state.global_step)  # its values arrive in on_log
        else:
            self._driver.step(state.global_step)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        logs = logs or {}
        # Eval / predict logs carry `<prefix>_runtime` (their metrics arrive in on_evaluate);
        # the end-of-training summary carries `total_flos` (final/* holds the run's totals).
        evaluation = any(k.endswith("_runtime") and not k.startswith("train_") for k in logs)
        if not evaluation and "total_flos" not in logs:
            self._record_train_log(logs, state)
        self._driver.advance()

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._driver.advance()
        metrics = metrics or {}
        prefix = _metric_prefix(metrics)
        # Several eval datasets: `eval_<name>_loss`; their values keep the dataset's name.
        dataset = prefix.removeprefix("eval").strip("_")
        loss = None
        extra: dict[str, Any] = {}
        for key, value in numeric_items(metrics):
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            if name in _EVAL_BOOKKEEPING:
                continue
            if name == "loss" and not dataset:
                loss = value
                continue
            full = instrument_name(f"{dataset}/{name}" if dataset else name, "eval")
            extra[full.removeprefix("eval.")] = value
        try:
            self.telemetry.evaluate(loss=loss, metrics=extra)
        except OtelTrainError as error:
            warn_once(
                _logger,
                self._warned,
                "evaluate",
                "otel-train: eval metrics not recorded: %s",
                error,
            )

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._driver.advance()
        if self.end_epochs:
            # Fractional where training stopped mid-epoch (max_steps): 0.5, not round(0.5) = 0.
            self.telemetry.end_epoch(float(state.epoch) if state.epoch is not None else None)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._driver.advance()
        self.telemetry.flush()

    # -- mapping --------------------------------------------------------------------------
    def _record_train_log(self, logs: Mapping[str, Any], state: Any) -> None:
        standard: dict[str, Any] = {}
        values: dict[str, Any] = {}
        for key, value in numeric_items(logs):
            if key in _STANDARD:
                standard[_STANDARD[key]] = value
            elif key in _TRAIN_BOOKKEEPING:
                continue
            elif key == "num_tokens":
                self._record_trl_tokens(float(value), standard)
            else:
                values[instrument_name(key)] = value
        mean_length = logs.get("completions/mean_length")
        steps = int(state.global_step) - self._last_log_step
        if self._completions_per_step and isinstance(mean_length, float) and steps > 0:
            # TRL logs the mean over every completion of the window (all ranks); one
            # generation batch per optimizer step makes the count exact.
            generated = mean_length * self._completions_per_step * steps
            values["train.generation_tokens"] = generated / self._world_size
        self._last_log_step = int(state.global_step)
        self._record(values, standard)

    def _record_trl_tokens(self, num_tokens: float, standard: dict[str, Any]) -> None:
        """TRL's `num_tokens` (cumulative, all ranks) when the Trainer's own count is off."""
        new, self._trl_tokens = num_tokens - self._trl_tokens, num_tokens
        if not self._tokens_from_state and new > 0:
            standard["tokens"] = new / self._world_size

    def _record(self, values: Mapping[str, Any], standard: Mapping[str, Any]) -> None:
        try:
            self.telemetry.record(values, **standard)
        except OtelTrainError as error:  # e.g. a key whose name collides with another
            warn_once(
                _logger,
                self._warned,
                "record",
                "otel-train: trainer metrics not recorded: %s",
                error,
            )

    # -- checks, once at train begin --------------------------------------------------------
    def _check_logging_steps(self, args: Any, state: Any) -> None:
        every = train_interval(self.telemetry)
        strategy = str(getattr(args, "logging_strategy", "steps")).rsplit(".", 1)[-1].lower()
        logging_steps = int(getattr(state, "logging_steps", 0) or args.logging_steps)
        if every is None or (strategy == "steps" and logging_steps == every):
            return
        shown = f"logging_steps={logging_steps}" if strategy == "steps" else f"{strategy=}"
        _logger.warning(
            "otel-train: the Trainer logs with %s but otel-train samples the train group every "
            "%d steps. The Trainer's metrics exist only on its logging steps, so a sampled step "
            "shows the mean (the last value for other keys) of the logs since the previous "
            "sample, or nothing. Set TrainingArguments(logging_strategy='steps', "
            "logging_steps=%d) or setup(intervals={'train': %d}).",
            shown,
            every,
            every,
            logging_steps,
        )

    def _check_stage(self, args: Any) -> None:
        stage = _STAGE_OF_ARGS.get(type(args).__name__)
        telemetry = self.telemetry
        if stage is None or stage == telemetry.context.stage:
            return
        derives = stage not in CROSS_ENTROPY_STAGES and telemetry.perplexity
        if derives:
            # exp() of a DPO / GRPO loss is no perplexity: leave it out rather than show it.
            telemetry.perplexity = False
        both_cross_entropy = {stage, telemetry.context.stage} <= CROSS_ENTROPY_STAGES
        log = _logger.info if both_cross_entropy else _logger.warning  # only a label differs
        log(
            "otel-train: this trainer runs stage %r (%s) but setup(stage=%r)%s. Pass "
            "setup(stage=%r) so the run is labelled with the stage its metrics come from.",
            stage,
            type(args).__name__,
            telemetry.context.stage,
            "; perplexity is not derived from its loss" if derives else "",
            stage,
        )


def _metric_prefix(metrics: Mapping[str, Any]) -> str:
    """`eval_` (or `eval_<dataset>_`, or a custom metric_key_prefix) from `<prefix>_runtime`."""
    for key in metrics:
        if key.endswith("_runtime"):
            return key[: -len("runtime")]
    return "eval_"


def _completions_per_step(args: Any) -> int | None:
    """Completions TRL's GRPO/RLOO generate per optimizer step (all ranks), when exact."""
    batch = getattr(args, "generation_batch_size", None)
    steps_per_generation = getattr(args, "steps_per_generation", None)
    if not isinstance(batch, int) or not isinstance(steps_per_generation, int):
        return None
    every = steps_per_generation * int(getattr(args, "num_iterations", 1) or 1)
    accumulation = int(args.gradient_accumulation_steps)
    if every <= 0 or accumulation % every:
        _logger.info(
            "otel-train: one generation every %d micro-batches does not divide gradient "
            "accumulation (%d): train.generation_tokens is not derived from TRL's logs; "
            "record it yourself with tel.record({'train.generation_tokens': n}).",
            every,
            accumulation,
        )
        return None
    return batch * (accumulation // every)

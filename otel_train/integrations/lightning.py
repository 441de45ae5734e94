"""Lightning: `OtelTrainCallback` records the standard metrics from the Trainer's hooks, and its
`logger` (`Trainer(logger=callback.logger)`) sends `self.log(...)` values to the same run.

The loss Lightning hands to `on_train_batch_end` is divided by `accumulate_grad_batches`;
the callback records it undivided, every micro-batch, so `train/loss` is the true mean. The
grad norm is a device tensor computed before clipping (no sync). `setup()` runs in the
callback's `setup` hook, so every process (DDP rank) builds its own telemetry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        'otel_train.integrations.lightning needs lightning: pip install "otel-train[lightning]"'
    ) from error

from otel_train.errors import OtelTrainError
from otel_train.integrations._common import StepDriver, telemetry_factory, train_interval, warn_once
from otel_train.integrations._keys import instrument_name, numeric_items, strip_prefix
from otel_train.integrations._lightning_batches import (
    batch_size,
    default_tokens,
    loss_of,
    total_norm,
)
from otel_train.integrations.lightning_logger import OtelTrainLogger
from otel_train.telemetry import Telemetry

__all__ = ["OtelTrainCallback", "OtelTrainLogger"]

_logger = logging.getLogger(__name__)

# Strategies whose parameters hold only this rank's shard of the gradients.
_SHARDED_STRATEGIES = frozenset(
    {"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy"}
)
_EVAL_PREFIXES = ("val/", "val_", "validation/", "validation_", "valid_", "eval/", "eval_")
_TRAIN_PREFIXES = ("train/", "train_")


class OtelTrainCallback(pl.Callback):  # type: ignore[misc]
    """`OtelTrainCallback(functools.partial(otel_train.setup, run=..., stage=...))`.

    `factory` is called once per process in the `setup` hook, with `config=` the module's
    hyperparameters when it has any; the telemetry it returns is shut down at `teardown`.
    Or pass `telemetry=` (single process only) and keep its life yourself. `count_tokens`
    maps a batch to its token count (a number or a device tensor); by default a mapping
    batch's `attention_mask.sum()` or `input_ids.numel()`.
    """

    def __init__(
        self,
        factory: Callable[..., Telemetry] | None = None,
        *,
        telemetry: Telemetry | None = None,
        count_tokens: Callable[[Any], Any] | None = None,
        grad_norm: bool = True,
    ) -> None:
        self._factory = telemetry_factory(factory, telemetry)
        self._telemetry = telemetry
        self._owns_telemetry = False
        self._count_tokens = count_tokens or default_tokens
        self._grad_norm = grad_norm
        self._driver: StepDriver | None = StepDriver(telemetry) if telemetry else None
        self._trainer: Any = None
        self._epoch: float | None = None
        self._eval_sum: Any = None
        self._eval_count = 0
        self._logged_eval: dict[str, Any] = {}
        self._warned: set[str] = set()
        self.logger = OtelTrainLogger(self)

    @property
    def telemetry(self) -> Telemetry | None:
        """This process's telemetry (None before the Trainer's `setup` hook)."""
        return self._telemetry

    # -- lifecycle ------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer
        if self._telemetry is None:
            assert self._factory is not None
            hparams = dict(getattr(pl_module, "hparams", None) or {})
            self._telemetry = self._factory(config=hparams) if hparams else self._factory()
            self._owns_telemetry = True
            self._driver = StepDriver(self._telemetry)
        self._check_intervals(trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()  # what was recorded up to the failure is exported

    # -- training -------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._advance()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        values: dict[str, Any] = {"learning_rate": optimizer.param_groups[0]["lr"]}
        if self._grad_norm and not self._sharded(trainer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:
                # Gradients are unscaled here and not clipped yet; a device tensor, staged.
                values["grad_norm"] = total_norm(grads)
        self._record({}, values)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        values: dict[str, Any] = {}
        loss = loss_of(outputs)
        if loss is not None:
            # Automatic optimisation divides the loss by accumulate_grad_batches before
            # backward and hands that over; the loss of the batch is the undivided one.
            if pl_module.automatic_optimization and trainer.accumulate_grad_batches != 1:
                loss = loss * trainer.accumulate_grad_batches
            values["loss"] = loss
        samples = batch_size(batch)
        if samples is not None:
            values["samples"] = samples
        tokens = self._count_tokens(batch)
        if tokens is not None:
            values["tokens"] = tokens
        batches = trainer.num_training_batches
        if isinstance(batches, int) and batches > 0:
            self._epoch = trainer.current_epoch + (batch_idx + 1) / batches
        else:  # an iterable dataset of unknown length: whole epochs only
            self._epoch = float(trainer.current_epoch)
        values["epoch"] = self._epoch
        self._record({}, values)
        # Lightning sends `self.log` values to loggers after this hook: step once they are in.
        if self._driver is not None:
            self._driver.defer(int(trainer.global_step))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._advance()
        if self._telemetry is not None:
            self._telemetry.end_epoch(self._epoch)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._advance()

    # -- evaluation -----------------------------------------------------------------------
    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._advance()
        self._eval_sum, self._eval_count, self._logged_eval = None, 0, {}

    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        loss = loss_of(outputs)
        if loss is None or trainer.sanity_checking:
            return
        weight = batch_size(batch) or 1
        weighted = loss.detach().float() * weight if hasattr(loss, "detach") else loss * weight
        self._eval_sum = weighted if self._eval_sum is None else self._eval_sum + weighted
        self._eval_count += weight

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            self._eval_sum, self._eval_count, self._logged_eval = None, 0, {}
            return
        self._emit_eval()

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._emit_eval()

    # -- for the logger -------------------------------------------------------------------
    def _log_metrics(self, metrics: Mapping[str, Any]) -> None:
        trainer = self._trainer
        if self._telemetry is None or trainer is None:
            warn_once(
                _logger,
                self._warned,
                "no-telemetry",
                "otel-train: OtelTrainLogger got metrics before the Trainer set up its "
                "callback: pass the same OtelTrainCallback in Trainer(callbacks=[...]).",
            )
            return
        if trainer.sanity_checking:
            return
        if trainer.validating or trainer.testing:
            for key, value in numeric_items(metrics):
                if key in ("epoch", "step"):
                    continue
                name = key if trainer.testing else strip_prefix(key, _EVAL_PREFIXES) or key
                self._logged_eval[name] = value
            return
        values: dict[str, Any] = {}
        for key, value in numeric_items(metrics):
            name = strip_prefix(key, _TRAIN_PREFIXES) or key
            if name in ("epoch", "step", "loss"):
                # The callback records these from the hooks: the loss of every micro-batch
                # (undivided), the fractional epoch. The logged copy would count twice.
                continue
            values[instrument_name(name)] = value
        self._record(values, {})

    # -- helpers --------------------------------------------------------------------------
    def _emit_eval(self) -> None:
        logged, self._logged_eval = self._logged_eval, {}
        loss = None
        if self._eval_count:
            loss = self._eval_sum / self._eval_count
        elif "loss" in logged:
            loss = logged.pop("loss")
        logged.pop("loss", None)  # the hooks' loss (validation_step's output) is the one kept
        self._eval_sum, self._eval_count = None, 0
        if self._telemetry is None or (loss is None and not logged):
            return
        metrics = {instrument_name(k, "eval").removeprefix("eval."): v for k, v in logged.items()}
        try:
            self._telemetry.evaluate(loss=loss, metrics=metrics)
        except OtelTrainError as error:
            warn_once(_logger, self._warned, "eval", "otel-train: eval not recorded: %s", error)

    def _record(self, values: Mapping[str, Any], standard: Mapping[str, Any]) -> None:
        if self._telemetry is None:
            return
        try:
            self._telemetry.record(values, **standard)
        except OtelTrainError as error:
            warn_once(_logger, self._warned, "record", "otel-train: not recorded: %s", error)

    def _advance(self) -> None:
        if self._driver is not None:
            self._driver.advance()

    def _close(self) -> None:
        self._advance()
        telemetry = self._telemetry
        if telemetry is None:
            return
        if self._owns_telemetry:
            telemetry.shutdown()
            self._telemetry, self._driver, self._owns_telemetry = None, None, False
        else:
            telemetry.flush()

    def _sharded(self, trainer: Any) -> bool:
        name = type(trainer.strategy).__name__
        if name in _SHARDED_STRATEGIES:
            warn_once(
                _logger,
                self._warned,
                "sharded",
                "otel-train: %s shards gradients across ranks; train/grad_norm is left out "
                "(a per-shard norm is not the global one). Record the strategy's global norm "
                "with tel.record(grad_norm=...).",
                name,
            )
            return True
        return False

    def _check_intervals(self, trainer: Any) -> None:
        every = self._telemetry and train_interval(self._telemetry)
        if not every or self.logger not in trainer.loggers:
            return
        if trainer.log_every_n_steps != every:
            warn_once(
                _logger,
                self._warned,
                "intervals",
                "otel-train: Lightning sends self.log values every %d steps "
                "(log_every_n_steps) but otel-train samples the train group every %d: a "
                "sampled step shows the value of the last log before it. Set "
                "Trainer(log_every_n_steps=%d) or setup(intervals={'train': %d}).",
                trainer.log_every_n_steps,
                every,
                every,
                trainer.log_every_n_steps,
            )

"""`OtelTrainTracker`: a tracker for accelerate's tracking API, so `accelerator.log(...)` and
`init_trackers(config=...)` land in otel-train (`Accelerator(log_with=[OtelTrainTracker(...)])`).

Every process records its own values (`main_process_only = False`): JSON lines per rank, W&B
on rank 0, as with `setup()` anywhere else. The values of one `step=` are recorded before the
clock moves to it, however many `log()` calls carry them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

try:
    from accelerate.tracking import GeneralTracker
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        'otel_train.integrations.accelerate needs accelerate: pip install "otel-train[hf]"'
    ) from error

from otel_train.errors import OtelTrainError
from otel_train.integrations._common import StepDriver, telemetry_factory, warn_once
from otel_train.integrations._keys import instrument_name, numeric_items, strip_prefix
from otel_train.telemetry import Telemetry

_logger = logging.getLogger(__name__)

_EVAL_PREFIXES = ("eval/", "eval_", "val/", "val_", "validation/", "validation_", "valid_")
_TRAIN_PREFIXES = ("train/", "train_")
_STANDARD = {
    "loss": "loss",
    "lr": "learning_rate",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "epoch": "epoch",
}


class OtelTrainTracker(GeneralTracker):  # type: ignore[misc]
    """`OtelTrainTracker(functools.partial(otel_train.setup, run=..., stage=...))`.

    `factory` is called once in this process, with `config=` the `init_trackers` config
    (or without one at the first `log()` / `.telemetry` use). Or pass `telemetry=` that you
    set up yourself (then `init_trackers`' config is not applied: give it to `setup()`).
    Keys: `loss`, `lr` / `learning_rate`, `grad_norm`, `epoch` (a `train_` or `train/`
    prefix dropped) are the standard instruments; `eval_*` / `val_*` keys an evaluation
    (`eval_loss` its loss); any other number `train/<key>`.
    """

    name = "otel_train"
    requires_logging_directory = False
    main_process_only = False

    def __init__(
        self,
        factory: Callable[..., Telemetry] | None = None,
        *,
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__()
        self._factory = telemetry_factory(factory, telemetry)
        self._telemetry = telemetry
        self._owns_telemetry = telemetry is None
        self._driver: StepDriver | None = StepDriver(telemetry) if telemetry else None
        self._warned: set[str] = set()

    @property
    def tracker(self) -> Telemetry:
        return self.telemetry

    @property
    def telemetry(self) -> Telemetry:
        """This process's telemetry; set up on first use if `init_trackers` gave no config."""
        if self._telemetry is None:
            self._set_up(None)
        assert self._telemetry is not None
        return self._telemetry

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        if self._telemetry is None:
            self._set_up(dict(values))
            return
        warn_once(
            _logger,
            self._warned,
            "config",
            "otel-train: init_trackers(config=...) came after the telemetry was set up; the "
            "config is not in this run. Call init_trackers before using tracker.telemetry, "
            "or pass config= to setup().",
        )

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """`accelerator.log(values, step=)`. `**kwargs` is accelerate's per-tracker options
        (`log_kwargs={"otel_train": {...}}`); this tracker takes none."""
        telemetry, driver = self.telemetry, self._driver
        assert driver is not None
        if step is None:
            warn_once(
                _logger,
                self._warned,
                "no-step",
                "otel-train: accelerator.log() without step=: its values are exported at the "
                "next step the clock reaches. Pass step= (the optimizer step).",
            )
        elif int(step) > max(driver.pending or 0, telemetry.last_step):
            driver.advance()  # a new step: the previous one has all its values
            driver.defer(int(step))
        standard: dict[str, Any] = {}
        train: dict[str, Any] = {}
        evaluation: dict[str, Any] = {}
        eval_loss = None
        for key, value in numeric_items(values):
            eval_key = strip_prefix(key, _EVAL_PREFIXES)
            if eval_key == "loss":
                eval_loss = value
            elif eval_key is not None:
                evaluation[instrument_name(eval_key, "eval").removeprefix("eval.")] = value
            else:
                name = strip_prefix(key, _TRAIN_PREFIXES) or key
                if name in _STANDARD:
                    standard[_STANDARD[name]] = value
                else:
                    train[instrument_name(name)] = value
        try:
            if train or standard:
                telemetry.record(train, **standard)
            if evaluation or eval_loss is not None:
                driver.advance()  # an evaluation belongs to the step it was logged at
                telemetry.evaluate(loss=eval_loss, metrics=evaluation)
        except OtelTrainError as error:
            warn_once(_logger, self._warned, "record", "otel-train: not recorded: %s", error)

    def finish(self) -> None:
        """`accelerator.end_training()`: the last step's values out, then shut down (or flush
        a telemetry you passed in)."""
        if self._telemetry is None:
            return
        if self._driver is not None:
            self._driver.advance()
        if self._owns_telemetry:
            self._telemetry.shutdown()
        else:
            self._telemetry.flush()

    def _set_up(self, config: Mapping[str, Any] | None) -> None:
        assert self._factory is not None
        self._telemetry = self._factory(config=config) if config else self._factory()
        self._driver = StepDriver(self._telemetry)

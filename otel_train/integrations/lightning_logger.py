"""`OtelTrainLogger`: Lightning's logger interface onto an `OtelTrainCallback`'s telemetry,
so `self.log(...)` values land in the same run, at the step they were logged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import Logger

if TYPE_CHECKING:
    from otel_train.integrations.lightning import OtelTrainCallback
    from otel_train.telemetry import Telemetry


class OtelTrainLogger(Logger):  # type: ignore[misc]
    """`self.log(...)` values into the callback's telemetry: train keys as `train/<key>`
    (a `train_` prefix dropped), validation keys as `eval/<key>` (`val_` dropped), on the
    step they were logged at. Get it as `callback.logger`."""

    def __init__(self, callback: OtelTrainCallback) -> None:
        super().__init__()
        self._callback = callback

    @property
    def name(self) -> str:
        return "otel_train"

    @property
    def version(self) -> str | None:
        telemetry = self._callback.telemetry
        return telemetry.context.run if telemetry is not None else None

    @property
    def experiment(self) -> Telemetry | None:
        return self._callback.telemetry

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._callback._log_metrics(metrics)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The module's hyperparameters went to `setup(config=...)` when the callback set up."""

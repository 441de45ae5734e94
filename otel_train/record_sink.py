"""Where one sampled step's resolved numbers land, and what it tallies on the way
(counter increments, non-finite values, the gauge series set for this export)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from otel_train.nonfinite import series_key
from otel_train.series import AttributeKey, GaugeStream

_logger = logging.getLogger(__name__)


class RecordSink:
    """Where resolved numbers land: streams or SDK instruments, the non-finite board (for the
    SDK, which drops NaN), the tallies.

    Built per sampled step by the telemetry; collects what the step's bookkeeping needs
    (counter increments of the standard instruments, how many values were non-finite).
    """

    def __init__(self, board: Any) -> None:
        self.board = board
        self.nonfinite = 0
        self.increments: dict[str, float] = {}
        self.fresh: set[Any] = set()  # gauge series set for this export (see reader.Freshness)
        self._warned: set[str] = set()

    def set_gauge(
        self, sdk: Any, name: str, attributes: Mapping[str, Any] | None, value: float
    ) -> None:
        if type(sdk) is GaugeStream:  # keeps NaN itself, and knows what was set: no board
            sdk.set(value, attributes)
            if value - value != 0.0:
                self.nonfinite += 1
            return
        self.fresh.add(series_key(name, attributes))
        if value - value == 0.0:  # finite (NaN and inf give NaN)
            sdk.set(value, attributes)
            self.board.clear(name, attributes)
        else:
            self.board.mark(name, attributes, value, unit=sdk.unit, description=sdk.description)
            self.nonfinite += 1

    def counted(self, name: str, key: AttributeKey, total: float) -> None:
        if key is None:
            self.increments[name] = self.increments.get(name, 0.0) + total

    def rejected(self, name: str, value: float, why: str, *, count_only: bool = False) -> None:
        self.nonfinite += 1
        if count_only or name in self._warned:
            return
        self._warned.add(name)
        _logger.error(
            "otel-train: %s got %s (%s) from a tensor; the value was dropped and counted in "
            "train.nonfinite, every other value of the step was exported.",
            name,
            value,
            why,
        )

"""Hold the loop's values until a sampled step, then turn them into numbers with one transfer.

The hot path only stores references (gauges: last value wins) or appends to a short list
(counters given tensors), so a device tensor is never synchronised on a non-sampled step.
On a sampled step every staged tensor of one device is packed into one vector and copied to
the host once (`stack(...).tolist()`): one device->host transfer per device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from otel_train.errors import OtelTrainError

# Fold a counter's pending device tensors into one (on the device, no sync) past this many,
# so a long interval or an event-only group cannot grow the list without bound.
_FOLD_AT = 256


def is_host_number(value: object) -> bool:
    return type(value) in (int, float) or isinstance(value, (int, float))


def is_tensor(value: object) -> bool:
    return hasattr(value, "detach") and hasattr(value, "device")


class StagedCounter:
    """A monotonic counter: host numbers add at once, device tensors are kept for later."""

    __slots__ = ("device_parts", "host_total", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.host_total: float = 0
        self.device_parts: list[Any] = []

    def add(self, amount: object) -> None:
        if type(amount) is int or type(amount) is float:
            if amount < 0:
                raise OtelTrainError(
                    f"{self.name} is a counter and cannot decrease; got increment {amount}. "
                    "Record the per-step amount (e.g. tokens in this batch), not a difference."
                )
            self.host_total += amount
        elif is_tensor(amount):
            parts = self.device_parts
            parts.append(amount)
            if len(parts) >= _FOLD_AT:
                self.device_parts = [_fold(parts)]
        elif is_host_number(amount) or hasattr(amount, "__float__"):
            self.add(float(amount))  # type: ignore[arg-type]  # numpy scalars and friends
        else:
            raise OtelTrainError(
                f"{self.name} takes a number or a 0-dim tensor, got {type(amount).__name__}"
            )


def _fold(parts: list[Any]) -> Any:
    import torch

    return torch.stack([p.detach().reshape(()) for p in parts]).sum()


@dataclass(slots=True)
class Resolved:
    """Host values from one resolution: gauges by instrument name and counter increments."""

    gauges: dict[str, float]
    counter_increments: dict[str, float]


def _wide_dtype(torch: Any, device: Any) -> Any:
    # MPS has no float64; everything else keeps integer token counts exact to 2**53.
    return torch.float32 if getattr(device, "type", "") == "mps" else torch.float64


def resolve(gauges: dict[str, Any], counters: Iterable[StagedCounter]) -> Resolved:
    """Materialise staged values: host numbers as they are, tensors once per device.

    Clears what it consumed. Raises OtelTrainError for a tensor that is not a single value,
    before anything is recorded, and drops that value so the following steps export normally.
    """
    result = Resolved(gauges={}, counter_increments={})
    by_device: dict[Any, list[tuple[str, str, Any]]] = {}
    for name, value in gauges.items():
        if value is None:
            continue
        if is_tensor(value):
            if value.numel() != 1:
                gauges[name] = None  # drop the bad value so later steps still export
                _reject_shape(name, value)
            by_device.setdefault(value.device, []).append(("gauge", name, value))
        else:
            result.gauges[name] = _to_float(name, value)
    for counter in counters:
        if counter.host_total:
            result.counter_increments[counter.name] = float(counter.host_total)
        for part in counter.device_parts:
            if part.numel() != 1:
                counter.device_parts = []
                _reject_shape(counter.name, part)
        if counter.device_parts:
            device = counter.device_parts[0].device
            by_device.setdefault(device, []).append(("counter", counter.name, counter.device_parts))
    for device, items in by_device.items():
        values = _transfer_once(device, items)
        for (kind, name, _), value in zip(items, values, strict=True):
            if kind == "gauge":
                result.gauges[name] = value
            else:
                result.counter_increments[name] = result.counter_increments.get(name, 0.0) + value
    for name in gauges:
        gauges[name] = None
    for counter in counters:
        counter.host_total = 0
        counter.device_parts = []
    return result


def _transfer_once(device: Any, items: list[tuple[str, str, Any]]) -> list[float]:
    import torch

    dtype = _wide_dtype(torch, device)
    column = []
    for kind, _, value in items:
        if kind == "gauge":
            column.append(value.detach().reshape(()).to(dtype))
        else:
            column.append(torch.stack([p.detach().reshape(()).to(dtype) for p in value]).sum())
    packed: list[float] = torch.stack(column).tolist()  # the one device->host transfer
    return packed


def _reject_shape(name: str, tensor: Any) -> None:
    raise OtelTrainError(
        f"{name} got a tensor of shape {tuple(tensor.shape)}; record a 0-dim tensor "
        "(e.g. loss.detach() or tensor.sum()), not a batch of values"
    )


def _to_float(name: str, value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type,unused-ignore]
    except (TypeError, ValueError) as error:
        raise OtelTrainError(
            f"{name} takes a number or a 0-dim tensor, got {type(value).__name__}"
        ) from error


def safe_exp(value: float) -> float:
    """Perplexity from a loss; overflow is +inf (reported as non-finite), never an exception."""
    if not math.isfinite(value):
        return value if value != -math.inf else 0.0
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf

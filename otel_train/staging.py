"""Hold the loop's values until a sampled step, then turn them into numbers with one transfer.

The hot path only checks a value's type and shape (host metadata, never the data), keeps
references and appends to short lists, so a device tensor is never synchronised on a
non-sampled step. On a sampled step every pending tensor of every due slot is flattened into
one float64 vector per device and copied to the host once: one device->host transfer per
device (on CUDA a non-blocking copy into pinned memory, its event polled: the training thread
never waits for the device). A value that cannot become a number is refused when it is
recorded, with an error that says what to pass instead, so it can never poison a later step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from otel_train.errors import OtelTrainError

# Fold a slot's pending device tensors (on the device, no sync) past this many, so a long
# interval or an event-only group cannot grow the lists without bound.
FOLD_AT = 256
FOLD_HISTOGRAM_AT = 4096


# Types seen to be tensors: later values of the same type skip the duck-typing probe.
_TENSOR_TYPES: set[type] = set()


def is_tensor(value: object) -> bool:
    if type(value) in _TENSOR_TYPES:
        return True
    if hasattr(value, "detach") and hasattr(value, "device") and hasattr(value, "numel"):
        _TENSOR_TYPES.add(type(value))
        return True
    return False


def stage_value(name: str, value: Any) -> Any:
    """A host float or a detached single-value tensor; anything else is refused here.

    Checks only metadata (type, numel, dtype, device): no data leaves the device.
    """
    kind = type(value)
    if kind is float:
        return value
    if kind is int:
        try:
            return float(value)
        except OverflowError:
            return _int_to_float(name, value)
    if kind in _TENSOR_TYPES or is_tensor(value):
        return _stage_tensor(name, value)
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise OtelTrainError(
            f"{name} takes a number or a 0-dim tensor, got {kind.__name__} {value!r:.40}; "
            "record the numeric value (e.g. float(x) or loss.detach())"
        )
    if isinstance(value, int):
        return _int_to_float(name, value)
    if getattr(value, "shape", ()) not in ((), (1,)) and hasattr(value, "size"):
        raise OtelTrainError(
            f"{name} got an array of shape {tuple(value.shape)}; record one value "
            "(e.g. array.mean()), or use tel.record_by_group for per-sample values"
        )
    try:
        number = float(value)  # numpy scalars, 0-d arrays, Decimal, Fraction
    except (TypeError, ValueError, OverflowError) as error:
        raise OtelTrainError(
            f"{name} takes a number or a 0-dim tensor, got {kind.__name__}: {error}"
        ) from None
    return number


def _int_to_float(name: str, value: int) -> float:
    try:
        return float(value)
    except OverflowError:
        raise OtelTrainError(
            f"{name} got an int too large for a float ({len(str(value))} digits); "
            "record a per-step amount, not an accumulated or corrupted one"
        ) from None


def _stage_tensor(name: str, tensor: Any) -> Any:
    if tensor.numel() != 1 or tensor.is_meta or tensor.is_complex():
        _reject_tensor(name, tensor)
    if tensor.ndim:
        tensor = tensor.reshape(())  # 0-dim from here on: folds stack without reshaping
    if tensor.requires_grad:
        return tensor.detach()  # keep no autograd graph alive until the sampled step
    return tensor


def _reject_tensor(name: str, tensor: Any) -> None:
    if tensor.numel() != 1:
        raise OtelTrainError(
            f"{name} got a tensor of shape {tuple(tensor.shape)}; record a 0-dim tensor "
            "(e.g. loss.detach() or tensor.sum()), not a batch of values "
            "(per-sample values with group labels: tel.record_by_group)"
        )
    if getattr(tensor, "is_meta", False):
        raise OtelTrainError(
            f"{name} got a meta-device tensor, which holds no value; record a tensor on a real "
            "device (cpu, cuda, ...)"
        )
    raise OtelTrainError(f"{name} got a complex tensor; record a real value (e.g. x.abs())")


# -- slots: the pending state of one instrument for one attribute set ----------------------
class Detachable:
    """`detach()` hands the interval's state to a twin and starts a fresh interval in place:
    the hot path keeps its references to the slot, the sampled step resolves the twin once
    its values have reached the host (possibly a few steps later, on CUDA)."""

    __slots__ = ()

    def detach(self) -> Any:
        cls = type(self)
        twin = object.__new__(cls)
        names: tuple[str, ...] = cls.__slots__  # type: ignore[attr-defined]
        for name in names:
            object.__setattr__(twin, name, getattr(self, name))
        self.__init__()  # type: ignore[misc]  # a fresh interval, same object
        return twin


class SumSlot(Detachable):
    """Counter / up-down counter: host amounts add at once, tensors are kept for later."""

    __slots__ = ("host", "parts")

    def __init__(self) -> None:
        self.host = 0.0
        self.parts: list[Any] = []

    def add(self, value: Any) -> None:
        if type(value) is float:
            self.host += value
            return
        parts = self.parts
        parts.append(value)
        if len(parts) >= FOLD_AT:
            self.parts = [_stack(parts).sum()]

    def pending(self) -> bool:
        return bool(self.parts) or self.host != 0.0

    def tensors(self) -> list[Any]:
        return self.parts

    def take(self, values: Sequence[float]) -> list[float]:
        """The amounts of the interval: the host sum and each resolved tensor part."""
        amounts = [self.host] if self.host != 0.0 else []
        amounts.extend(values)
        self.host, self.parts = 0.0, []
        return amounts

    def interval_value(self) -> Any:
        """The interval's sum without leaving the device (cross-rank reduction)."""
        total: Any = self.host
        for part in self.parts:
            total = part.reshape(()).double() + total
        return total


class LastSlot(Detachable):
    """Gauge: the last value recorded wins (a reference, resolved at the sampled step)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Any = None

    def add(self, value: Any) -> None:
        self.value = value

    def pending(self) -> bool:
        return self.value is not None

    def tensors(self) -> list[Any]:
        value = self.value
        return [value] if value is not None and type(value) is not float else []

    def take(self, values: Sequence[float]) -> float | None:
        value = self.value
        self.value = None
        if value is None:
            return None
        return values[0] if values else float(value)

    def interval_value(self) -> Any:
        value = self.value
        return value.reshape(()).double() if is_tensor(value) else value


class MeanSlot(Detachable):
    """Interval mean, max and last value of every recorded value (the standard loss)."""

    __slots__ = ("count", "folded", "host_max", "host_sum", "last_host", "parts")

    def __init__(self) -> None:
        self.host_sum = 0.0
        self.host_max = -math.inf
        self.last_host: float | None = None  # set when the most recent value was a number
        self.parts: list[Any] = []
        self.folded: list[tuple[Any, Any, int]] = []  # (sum, max, n) on the device
        self.count = 0

    def add(self, value: Any) -> None:
        self.count += 1
        if type(value) is float:
            self.host_sum += value
            if not value <= self.host_max and self.host_max == self.host_max:
                self.host_max = value  # also taken when value is NaN: then it stays NaN
            self.last_host = value
            return
        self.last_host = None
        parts = self.parts
        parts.append(value)
        if len(parts) >= FOLD_AT:
            stacked = _stack(parts[:-1])
            self.folded.append((stacked.sum(), stacked.max(), len(parts) - 1))
            self.parts = parts[-1:]  # the last value stays itself: final/train_loss needs it

    def pending(self) -> bool:
        return self.count > 0

    def tensors(self) -> list[Any]:
        out: list[Any] = []
        for total, maximum, _ in self.folded:
            out.append(total)
            out.append(maximum)
        out.extend(self.parts)
        return out

    def peek(self, values: Sequence[float]) -> tuple[float, int]:
        """(sum, count) of what is pending, leaving it pending (epoch ends)."""
        folded = len(self.folded)
        sums = [self.host_sum, *values[0 : 2 * folded : 2], *values[2 * folded :]]
        return _safe_sum(sums), self.count

    def take(self, values: Sequence[float]) -> tuple[float, float, float, int] | None:
        """(mean, max, last, count) of the interval, or None when nothing was recorded."""
        if self.count == 0:
            return None
        folded = len(self.folded)
        total, count = self.peek(values)
        maxima = [self.host_max, *values[1 : 2 * folded : 2], *values[2 * folded :]]
        last = self.last_host if self.last_host is not None else values[-1]
        self.host_sum, self.host_max = 0.0, -math.inf
        self.last_host, self.parts, self.folded, self.count = None, [], [], 0
        return total / count, _nanmax(maxima), last, count

    def interval_value(self) -> Any:
        """The interval mean without leaving the device (cross-rank reduction)."""
        total: Any = self.host_sum
        for part in (*(folded[0] for folded in self.folded), *self.parts):
            total = part.reshape(()).double() + total
        return total / self.count if self.count else None


class HistogramSlot(Detachable):
    """Every value of the interval, kept until the sampled step records them all."""

    __slots__ = ("host", "parts", "size")

    def __init__(self) -> None:
        self.host: list[float] = []
        self.parts: list[Any] = []
        self.size = 0

    def add(self, value: Any) -> None:
        if type(value) is float:
            self.host.append(value)
            return
        parts = self.parts
        parts.append(value)
        if len(parts) >= FOLD_HISTOGRAM_AT:
            self.parts = [_cat(parts)]

    def pending(self) -> bool:
        return bool(self.host) or bool(self.parts)

    def tensors(self) -> list[Any]:
        return self.parts

    def take(self, values: Sequence[float]) -> list[float]:
        recorded = [*self.host, *values]
        self.host, self.parts = [], []
        return recorded


def _safe_sum(values: Iterable[float]) -> float:
    try:
        return math.fsum(values)
    except ValueError:  # inf + -inf
        return math.nan


def _nanmax(values: Iterable[float]) -> float:
    result = -math.inf
    for value in values:
        if value != value:  # NaN: the interval's maximum is unknown, say so
            return math.nan
        if value > result:
            result = value
    return result


def _stack(parts: list[Any]) -> Any:
    import torch

    return torch.stack(parts)  # staged tensors are 0-dim (or folded 0-dim sums)


def _cat(parts: list[Any]) -> Any:
    import torch

    return torch.cat([p.reshape(-1) for p in parts])


def safe_exp(value: float) -> float:
    """Perplexity from a loss; overflow is +inf (reported as non-finite), never an exception."""
    if not math.isfinite(value):
        return value if value != -math.inf else 0.0
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf

"""Per-group metrics without a per-sample loop: `tel.record_by_group(...)`.

The field's version of per-dataset losses is a Python loop over samples with a `.item()` each,
every step: one device sync per sample. Here one call takes the per-sample values, their group
indices and the group names, and adds them into per-group sums and counts with `index_add_`
on the device (no sync, no loop over samples). The sampled step exports each group's interval
mean as `<name>{<attribute>=<group>}` and its sample count as `<name>.count`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from otel_train.errors import OtelTrainError
from otel_train.record_sink import RecordSink
from otel_train.staged_instruments import StagedInstrument
from otel_train.staging import Detachable, is_tensor
from otel_train.staging_registry import StagingRegistry


class GroupSlot(Detachable):
    """Per-group [sum, count] over the interval: one small device matrix (or host lists)."""

    __slots__ = ("device", "host")

    def __init__(self) -> None:
        self.device: Any = None  # (sums, counts): two [groups] tensors index_add_ adds into
        self.host: list[list[float]] | None = None

    def pending(self) -> bool:
        return self.device is not None or self.host is not None

    def tensors(self) -> list[Any]:
        return [] if self.device is None else list(self.device)

    def take(self, values: Sequence[float]) -> tuple[list[float], list[float]] | None:
        if not self.pending():
            return None
        size = len(self.host[0]) if self.host is not None else len(values) // 2
        sums, counts = [0.0] * size, [0.0] * size
        if self.host is not None:
            sums, counts = list(self.host[0]), list(self.host[1])
        half = len(values) // 2  # [sums..., counts...]
        for index in range(half):
            sums[index] += values[index]
            counts[index] += values[half + index]
        self.device = self.host = None
        return sums, counts


class StagedGroupedMean(StagedInstrument):
    """One instrument, one slot per tuple of group names; resolved with everything else."""

    kind = "grouped_mean"
    slot_type = GroupSlot

    def __init__(
        self, registry: StagingRegistry, meter: Any, name: str, unit: str, description: str
    ) -> None:
        sdk = registry.output(meter, "gauge", name, unit, description)
        super().__init__(registry, name, unit, description, sdk)
        self.sdk_count = registry.output(
            meter, "counter", f"{name}.count", "{sample}", f"Samples behind {name}"
        )
        self.attribute = "dataset"
        self.names: dict[Any, tuple[str, ...]] = {}

    def stage(self, values: Any, groups: Any, names: Sequence[str]) -> None:
        if not self.registry.enabled:
            return
        key = tuple(names)
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = GroupSlot()
            self.names[key] = key
        if is_tensor(values):
            slot.device = _add_on_device(self.staged_name, slot.device, values, groups, len(key))
        else:
            sums, counts = _host_sums(self.staged_name, values, groups, len(key))
            if slot.host is None:
                slot.host = [sums, counts]
            else:
                slot.host = [
                    [a + b for a, b in zip(slot.host[0], sums, strict=True)],
                    [a + b for a, b in zip(slot.host[1], counts, strict=True)],
                ]

    def apply(self, key: Any, taken: Any, sink: RecordSink) -> None:
        if taken is None:
            return
        sums, counts = taken
        for name, total, count in zip(self.names[key], sums, counts, strict=True):
            if count <= 0:
                continue  # no sample of this group in the interval: absent, not 0
            attributes = {self.attribute: name}
            sink.set_gauge(self.sdk, self.staged_name, attributes, total / count)
            self.sdk_count.add(count, attributes)


def _add_on_device(name: str, acc: Any, values: Any, groups: Any, size: int) -> Any:
    """acc[g] += [sum of values of group g, their count]: one index_add_, queued, no sync."""
    import torch

    if not is_tensor(groups):
        groups = torch.as_tensor(groups, device=values.device)
    if values.dim() != 1 or groups.dim() != 1 or values.shape[0] != groups.shape[0]:
        raise OtelTrainError(
            f"record_by_group({name!r}) takes two 1-D tensors of equal length (a value and a "
            f"group index per sample); got shapes {tuple(values.shape)} and {tuple(groups.shape)}"
        )
    if groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise OtelTrainError(
            f"record_by_group({name!r}): group indices must be an integer tensor, got "
            f"{groups.dtype}; e.g. batch['dataset_id'].long()"
        )
    if groups.device != values.device:
        groups = groups.to(values.device, non_blocking=True)
    if acc is None:
        wide = torch.float32 if values.device.type == "mps" else torch.float64
        acc = tuple(torch.zeros(size, dtype=wide, device=values.device) for _ in range(2))
    sums, counts = acc
    values = values.detach().to(sums.dtype)
    sums.index_add_(0, groups, values)  # in place on our own buffers: no allocation kept
    counts.index_add_(0, groups, torch.ones_like(values))
    return acc


def _host_sums(name: str, values: Any, groups: Any, size: int) -> tuple[list[float], list[float]]:
    try:
        pairs = list(zip(values, groups, strict=True))
    except (TypeError, ValueError):
        raise OtelTrainError(
            f"record_by_group({name!r}) takes equal-length sequences (or 1-D tensors) of "
            "values and group indices"
        ) from None
    sums, counts = [0.0] * size, [0.0] * size
    for value, group in pairs:
        index = int(group)
        if not 0 <= index < size:
            raise OtelTrainError(
                f"record_by_group({name!r}): group index {index} is outside the {size} names"
            )
        sums[index] += float(value)
        counts[index] += 1.0
    return sums, counts


def grouped_instrument(
    registry: StagingRegistry, name: str, attribute: str, unit: str = ""
) -> StagedGroupedMean:
    existing = registry.instruments.get(name)
    if existing is not None:
        if not isinstance(existing, StagedGroupedMean):
            raise OtelTrainError(
                f"{name!r} is already a {existing.kind}; record_by_group needs its own name"
            )
        if existing.attribute != attribute:
            raise OtelTrainError(
                f"{name!r} was recorded by group with attribute {existing.attribute!r}; "
                f"keep one attribute key per instrument (got {attribute!r})"
            )
        return existing
    instrument = registry.create_custom(
        name,
        lambda: StagedGroupedMean(
            registry, registry.sdk_meter, name, unit, f"{name}: mean per {attribute}"
        ),
    )
    grouped = cast(StagedGroupedMean, instrument)
    grouped.attribute = attribute
    return grouped


def check_names(names: Sequence[str] | Mapping[Any, str]) -> Sequence[str]:
    if isinstance(names, (str, bytes)) or not all(isinstance(n, str) for n in names):
        raise OtelTrainError(
            "record_by_group needs the group names as a list of strings, e.g. ['wiki', 'code']"
        )
    return list(names)

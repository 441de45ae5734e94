"""The one device->host copy per device of a sampled step's staged tensors.

CUDA: a non-blocking copy into pinned host memory behind an event, so the training thread never
waits for the device: `ready()` polls the event, `values()` waits for it (normally done long
before). CPU: the packed tensor is the copy, ready at once. Tests stand in for the CUDA copy
with a double that completes when told (the `transfer` seam of the staging registry).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class PendingValues:
    """Host values of one `DeviceTransfer.start`: ready at once on the CPU; on CUDA once the
    copy's event has completed (`ready()` polls it, `values()` waits for it)."""

    def __init__(self, size: int, copies: list[tuple[list[tuple[int, int]], Any, Any]]) -> None:
        self._size = size
        self._copies = copies  # per device: (request index, element count)..., host, event
        self._values: list[list[float]] | None = None if copies else [[] for _ in range(size)]

    def ready(self) -> bool:
        if self._values is not None:
            return True
        return all(event is None or event.query() for _, _, event in self._copies)

    def values(self) -> list[list[float]]:
        if self._values is None:
            results: list[list[float]] = [[] for _ in range(self._size)]
            for items, host, event in self._copies:
                if event is not None:
                    event.synchronize()  # the copy was queued long ago: normally done already
                numbers: list[float] = host.tolist()  # the one device->host transfer
                position = 0
                for index, size in items:
                    results[index].extend(numbers[position : position + size])
                    position += size
            self._values, self._copies = results, []
        return self._values


class DeviceTransfer:
    """One device->host copy per device for a list of requests (each a list of tensors).

    The tensors of a device are packed into one vector on that device (`_packed`). CUDA:
    copied with `non_blocking=True` into pinned host memory and an event recorded, never a
    blocking sync. CPU: the packed vector is the copy, ready at once. Other devices: one
    `tolist()` when the values are asked for.
    """

    def start(self, requests: Sequence[Sequence[Any]]) -> PendingValues:
        import torch

        every = [tensor for tensors in requests for tensor in tensors]
        if not every:
            return PendingValues(len(requests), [])
        # The usual case in one torch call: one device, one float dtype, 0-dim values (stack
        # refuses mixed devices or shapes; mixed dtypes are checked, as it would promote).
        if len({t.dtype for t in every}) == 1 and every[0].dtype.is_floating_point:
            try:
                packed = torch.stack(every)
            except RuntimeError:
                packed = None
            if packed is not None and packed.dim() == 1:
                runs = [(index, len(tensors)) for index, tensors in enumerate(requests) if tensors]
                return PendingValues(len(requests), [self._copied(torch, runs, packed)])
        return self._per_device(torch, requests)

    def _copied(self, torch: Any, runs: list[tuple[int, int]], packed: Any) -> tuple[Any, ...]:
        """CUDA: a non-blocking copy into pinned host memory and its event; else as is."""
        if packed.device.type != "cuda":
            return (runs, packed, None)
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(packed.device))
        return (runs, host, event)

    def _per_device(self, torch: Any, requests: Sequence[Sequence[Any]]) -> PendingValues:
        by_device: dict[Any, tuple[list[Any], list[tuple[int, int]]]] = {}
        for index, tensors in enumerate(requests):
            for tensor in tensors:
                entry = by_device.get(tensor.device)
                if entry is None:
                    entry = by_device[tensor.device] = ([], [])
                entry[0].append(tensor)
                entry[1].append((index, 1))
        copies = []
        for device, (tensors, items) in by_device.items():
            packed, counts = _packed(torch, tensors, getattr(device, "type", ""))
            if counts is not None:  # some tensors held more than one value
                items = [(index, count) for (index, _), count in zip(items, counts, strict=True)]
            copies.append(self._copied(torch, _merged_runs(items), packed))
        return PendingValues(len(requests), copies)


def _merged_runs(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(request, count) runs: consecutive values of one request read back in one slice."""
    runs: list[tuple[int, int]] = []
    for index, count in items:
        if runs and runs[-1][0] == index:
            runs[-1] = (index, runs[-1][1] + count)
        else:
            runs.append((index, count))
    return runs


def _packed(torch: Any, tensors: list[Any], kind: str) -> tuple[Any, list[int] | None]:
    """One new tensor holding every value (as of now, whatever comes next) and the element
    count of each input (None: one each), with as few torch calls as possible (each costs
    microseconds).

    One floating dtype: kept as is (float32 -> Python float is exact). Mixed or integer
    dtypes: widened to float64 (float32 on MPS), so every value reads back as a float.
    """
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and tensors[0].dtype.is_floating_point:
        try:
            stacked = torch.stack(tensors)  # staged values are 0-dim: the usual case
        except RuntimeError:  # 0-dim and 1-D (a folded histogram part) mixed
            stacked = None
        if stacked is not None and stacked.dim() == 1:
            return stacked, None
        flat = [t if t.dim() == 1 else t.reshape(-1) for t in tensors]  # per-group sums...
        return torch.cat(flat), [t.numel() for t in flat]
    wide = torch.float32 if kind == "mps" else torch.float64
    flat = [t.reshape(-1).to(wide) for t in tensors]
    return torch.cat(flat), [t.numel() for t in flat]


_DEFAULT_TRANSFER = DeviceTransfer()


def transfer(requests: list[list[Any]]) -> list[list[float]]:
    """Host values for each request now (events: an epoch end, an evaluation, shutdown)."""
    return _DEFAULT_TRANSFER.start(requests).values()

"""A tensor subclass that counts every copy of its value to the host (tests of zero-sync)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import ClassVar

import torch

MATERIALISING = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"}


class CountingTensor(torch.Tensor):
    """Counts every call that copies its value to the host, over all instances, and by the
    thread that made it (sampled steps are finished off the training thread)."""

    materialisations = 0
    by_thread: ClassVar[Counter[int]] = Counter()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in MATERIALISING:
            CountingTensor.materialisations += 1
            CountingTensor.by_thread[threading.get_ident()] += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def counting(value: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype or torch.float32).as_subclass(CountingTensor)


def on_this_thread() -> int:
    """Host copies made so far by the calling thread (the training thread, in tests)."""
    return CountingTensor.by_thread[threading.get_ident()]

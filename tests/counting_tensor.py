"""A tensor subclass that counts every copy of its value to the host (tests of zero-sync)."""

from __future__ import annotations

import torch

MATERIALISING = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"}


class CountingTensor(torch.Tensor):
    """Counts every call that copies its value to the host, over all instances."""

    materialisations = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in MATERIALISING:
            CountingTensor.materialisations += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def counting(value: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype or torch.float32).as_subclass(CountingTensor)

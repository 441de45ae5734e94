"""What the Lightning callback reads off a batch and the hooks' outputs, without a sync."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def loss_of(outputs: Any) -> Any:
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.ndim == 0:
        return outputs.detach()
    if isinstance(outputs, (int, float)) and not isinstance(outputs, bool):
        return float(outputs)
    return None


def total_norm(grads: list[Any]) -> Any:
    """The global 2-norm as a device tensor (torch >= 2.6 has it public; else the same sum)."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, foreach=True)
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g.detach()).to(device) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


def batch_size(batch: Any) -> int | None:
    from lightning.pytorch.utilities.data import extract_batch_size

    try:
        return int(extract_batch_size(batch))
    except Exception:  # Lightning raises when no tensor is found: no sample count then
        return None


def default_tokens(batch: Any) -> Any:
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return mask.sum()  # a device tensor: summed on the device, never synced here
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor):
            return ids.numel()
    return None

"""What MFU needs, computed once at setup: effective batch size, FLOPs per token, peak FLOP/s.

FLOPs per token follow the PaLM convention (Chowdhery et al. 2022, "PaLM: Scaling Language
Modeling with Pathways", appendix B): 6N + 12*L*H*T, where N is the number of trainable
parameters, L the layers, H the hidden size (heads x head dim) and T the sequence length.
6N is forward + backward matmuls (2N + 4N); 12LHT the attention score and value matmuls,
not halved for causal masking, and no activation recomputation (that would be HFU, not MFU).
It equals Megatron-LM's count (Narayanan et al. 2021, eq. 3) without recomputation.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from otel_train.errors import OtelTrainError
from otel_train.peak_flops import lookup_peak_flops, warn_unknown_once
from otel_train.ranks import detect_ranks
from otel_train.rates import ThroughputSettings

_logger = logging.getLogger("otel_train.throughput")

DeepSpeedConfig = Mapping[str, Any] | str | os.PathLike[str]

_LAYER_ATTRS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN_ATTRS = ("hidden_size", "n_embd", "d_model")


def load_deepspeed_config(config: DeepSpeedConfig) -> dict[str, Any]:
    """A dict as is, or a path to a DeepSpeed JSON config."""
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise OtelTrainError(f"deepspeed_config {str(path)!r} cannot be read: {error}") from None
    except json.JSONDecodeError as error:
        raise OtelTrainError(f"deepspeed_config {str(path)!r} is not JSON: {error}") from None
    if not isinstance(loaded, dict):
        raise OtelTrainError(f"deepspeed_config {str(path)!r} must hold a JSON object")
    return loaded


def _config_int(config: Mapping[str, Any], key: str, given: int | None) -> int | None:
    """The config's value, or the caller's when the config says "auto" or nothing."""
    value = config.get(key)
    if value is None:
        return given
    if value == "auto":
        if given is None:
            raise OtelTrainError(
                f'deepspeed_config has {key}="auto", which only the Hugging Face Trainer '
                f"resolves. Pass the value (e.g. effective_batch_size(config, "
                f"{_KWARG_FOR[key]}=...)) or write a number in the config."
            )
        return given
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise OtelTrainError(f"deepspeed_config {key} must be a positive int, got {value!r}")
    if given is not None and given != value:
        raise OtelTrainError(
            f"deepspeed_config {key}={value} disagrees with {_KWARG_FOR[key]}={given}; "
            "give one of them"
        )
    return value


_KWARG_FOR = {
    "train_batch_size": "batch_size",
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
}


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise OtelTrainError(f"{name} must be a positive int, got {value!r}")


def effective_batch_size(
    deepspeed_config: DeepSpeedConfig | None = None,
    *,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    world_size: int | None = None,
    batch_size: int | None = None,
) -> int:
    """Samples per optimizer step over all data-parallel ranks, resolved as DeepSpeed does.

    `train_batch_size`, else micro batch x gradient accumulation x world size; when all three
    are known they must agree (DeepSpeed refuses to start otherwise). "auto" values are taken
    from the keyword arguments or rejected. `world_size` defaults to the detected one.
    """
    for name, value in (
        ("micro_batch_size", micro_batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("world_size", world_size),
        ("batch_size", batch_size),
    ):
        _check_positive(name, value)
    config = load_deepspeed_config(deepspeed_config) if deepspeed_config is not None else {}
    world = world_size if world_size is not None else detect_ranks().world_size
    train = _config_int(config, "train_batch_size", batch_size)
    micro = _config_int(config, "train_micro_batch_size_per_gpu", micro_batch_size)
    accumulation = _config_int(config, "gradient_accumulation_steps", gradient_accumulation_steps)
    # DeepSpeed's _configure_train_batch_size: derive whichever of the three is missing.
    if train is not None and micro is not None and accumulation is None:
        accumulation = train // (micro * world)
    elif train is not None and accumulation is not None and micro is None:
        micro = train // (accumulation * world)
    elif train is not None and micro is None and accumulation is None:
        accumulation, micro = 1, train // world
    elif train is None and micro is not None:
        accumulation = accumulation or 1
        train = micro * accumulation * world
    elif train is None:
        raise OtelTrainError(
            "effective batch size unknown: give train_batch_size or "
            "train_micro_batch_size_per_gpu in the DeepSpeed config, or batch_size= / "
            "micro_batch_size= (with gradient_accumulation_steps=, world_size=)"
        )
    assert train is not None and micro is not None and accumulation is not None
    if micro <= 0 or accumulation <= 0 or train != micro * accumulation * world:
        raise OtelTrainError(
            f"inconsistent batch: train_batch_size {train} != micro batch {micro} x gradient "
            f"accumulation {accumulation} x world size {world}; DeepSpeed would refuse this "
            "config. Fix one of the values."
        )
    return train


def count_trainable_parameters(model: Any) -> int:
    """Trainable parameters, shared (tied) ones once; ZeRO-3 partitions counted in full."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += int(getattr(parameter, "ds_numel", 0) or parameter.numel())
    return total


def _first_attr(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def flops_per_token(
    model: Any = None,
    *,
    seq_len: int | None = None,
    n_params: int | None = None,
    n_layers: int | None = None,
    hidden_size: int | None = None,
) -> float:
    """Training FLOPs per token, 6N + 12*L*H*T (PaLM appendix B; see the module docstring).

    N, L and H come from the arguments or from `model` (its trainable parameters; layers
    and hidden size from a Hugging Face style `model.config`). Without L, H or T the
    attention term is left out and a warning says so.
    """
    if n_params is None:
        if model is None:
            raise OtelTrainError("flops_per_token needs model= or n_params=")
        n_params = count_trainable_parameters(model)
    config = getattr(model, "config", None)
    if config is not None:
        n_layers = n_layers if n_layers is not None else _first_attr(config, _LAYER_ATTRS)
        hidden_size = hidden_size if hidden_size is not None else _first_attr(config, _HIDDEN_ATTRS)
    for name, value in (
        ("n_params", n_params),
        ("seq_len", seq_len),
        ("n_layers", n_layers),
        ("hidden_size", hidden_size),
    ):
        _check_positive(name, value)
    flops = 6.0 * n_params
    if n_layers and hidden_size and seq_len:
        flops += 12.0 * n_layers * hidden_size * seq_len
    else:
        _logger.warning(
            "otel-train: FLOPs per token without the attention term (need seq_len=, and layers "
            "and hidden size from model.config or n_layers= / hidden_size=); MFU reads low "
            "for long sequences"
        )
    return flops


def peak_flops(device_name: str | None = None, dtype: object = "bf16") -> float | None:
    """Dense peak FLOP/s of one device for `dtype`, from `otel_train.peak_flops`' table.

    `device_name` defaults to CUDA's name of the current device. Unknown device or dtype:
    None, and one warning saying how to set it (MFU is then left out, never guessed).
    """
    if device_name is None:
        device_name = _current_cuda_device_name()
        if device_name is None:
            return None
    value = lookup_peak_flops(device_name, dtype)
    if value is None:
        warn_unknown_once(device_name, dtype)
    return value


def _current_cuda_device_name() -> str | None:
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is None or not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_name(torch.cuda.current_device()))


def mfu(
    tokens_per_second: float,
    flops_per_token: float,
    *,
    peak_flops: float,
    devices: int = 1,
) -> float:
    """Model FLOPs utilisation: tokens/s x FLOPs per token / (peak FLOP/s x devices).

    `tokens_per_second` is the throughput of those `devices` together (PaLM appendix B).
    """
    if peak_flops <= 0 or devices <= 0:
        raise OtelTrainError("mfu needs peak_flops > 0 and devices >= 1")
    return tokens_per_second * flops_per_token / (peak_flops * devices)


def resolve_throughput_settings(
    *,
    total_steps: int | None,
    flops_per_token_value: float | None,
    peak_flops_value: float | str | None,
    model: Any,
    seq_len: int | None,
    deepspeed_config: DeepSpeedConfig | None,
    batch_size: int | None,
    micro_batch_size: int | None,
    gradient_accumulation_steps: int | None,
    world_size: int,
    dtype: object,
) -> ThroughputSettings:
    """setup()'s options -> `ThroughputSettings` (validated once, before the first step)."""
    _check_positive("seq_len", seq_len)
    per_rank_samples: float | None = None
    if deepspeed_config is not None or batch_size is not None or micro_batch_size is not None:
        total = effective_batch_size(
            deepspeed_config,
            micro_batch_size=micro_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            world_size=world_size,
            batch_size=batch_size,
        )
        per_rank_samples = total / world_size
    fpt = flops_per_token_value
    if fpt is None and model is not None:
        fpt = flops_per_token(model, seq_len=seq_len)
    peak: float | None
    if isinstance(peak_flops_value, str):
        peak = peak_flops(peak_flops_value, dtype if dtype is not None else "bf16")
    elif peak_flops_value is not None:
        if peak_flops_value <= 0:
            raise OtelTrainError(f"peak_flops must be > 0 FLOP/s, got {peak_flops_value!r}")
        peak = float(peak_flops_value)
    else:
        peak = _env_peak_flops()
        if peak is None and fpt is not None:
            if dtype is not None:
                peak = peak_flops(None, dtype)
            elif _current_cuda_device_name() is not None:
                _logger.warning(
                    "otel-train: perf.mfu omitted: pass setup(dtype='bf16'|'fp16'|'tf32'|'fp8') "
                    "to look up this GPU's peak FLOP/s, or peak_flops=<FLOP/s>"
                )
    return ThroughputSettings(
        total_steps=total_steps,
        flops_per_token=fpt,
        peak_flops=peak,
        samples_per_step=per_rank_samples,
        tokens_per_sample=float(seq_len) if seq_len else None,
    )


def _env_peak_flops() -> float | None:
    raw = os.environ.get("OTEL_TRAIN_PEAK_FLOPS")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise OtelTrainError(f"OTEL_TRAIN_PEAK_FLOPS={raw!r} is not a number (FLOP/s)") from None
    if value <= 0:
        raise OtelTrainError(f"OTEL_TRAIN_PEAK_FLOPS must be > 0, got {raw!r}")
    return value

"""What MFU needs, computed once at setup: effective batch size, FLOPs per token, peak FLOP/s.

FLOPs per token are analytic, by stage (`otel_train.model_flops`: 6N + 12*L*H*T per trained
token, PaLM appendix B, plus a reference forward for DPO and a forward-only generation phase
for PPO / GRPO); the peak comes from `otel_train.peak_table`' table or the caller.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from otel_train import env as env_vars
from otel_train.errors import OtelTrainError
from otel_train.model_flops import STAGE_PASSES, stage_flops_per_token
from otel_train.model_flops import flops_per_token as flops_per_token  # its former home
from otel_train.peak_table import lookup_peak_flops, warn_no_device_once, warn_unknown_once
from otel_train.ranks import detect_ranks
from otel_train.rates import ThroughputSettings
from otel_train.validation import check_positive_int

_logger = logging.getLogger(__name__)

DeepSpeedConfig = Mapping[str, Any] | str | os.PathLike[str]


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
    check_positive_int(f"deepspeed_config {key}", value)
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
    if value is not None:
        check_positive_int(name, value)


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


def peak_flops(device_name: str | None = None, dtype: object = "bf16") -> float | None:
    """Dense peak FLOP/s of one device for `dtype`, from `otel_train.peak_table`' table.

    `device_name` defaults to CUDA's name of the current device. No CUDA device, unknown
    device or dtype: None, and one warning saying how to set it (MFU is then left out,
    never guessed).
    """
    if device_name is None:
        device_name = _current_cuda_device_name()
        if device_name is None:
            warn_no_device_once(dtype)
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
    stage: str = "train",
) -> ThroughputSettings:
    """setup()'s options -> `ThroughputSettings` (validated once, before the first step).

    `stage` is setup()'s free-form label: a known one (`STAGE_PASSES`) picks its FLOPs rule,
    any other counts as plain training.
    """
    _check_positive("seq_len", seq_len)
    if flops_per_token_value is not None and not flops_per_token_value > 0:
        raise OtelTrainError(f"flops_per_token must be > 0, got {flops_per_token_value!r}")
    rule = stage.lower() if stage.lower() in STAGE_PASSES else "train"
    passes = STAGE_PASSES[rule]
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
    generated: float | None = None
    if model is not None:
        counted = stage_flops_per_token(model, stage=rule, seq_len=seq_len)
        fpt = fpt if fpt is not None else counted.trained
        generated = counted.generated
    peak = _resolve_peak(peak_flops_value, dtype, wants_mfu=fpt is not None)
    if fpt is None and (peak_flops_value is not None or dtype is not None):
        _logger.warning(
            "otel-train: perf.flops_per_second and perf.mfu omitted: no FLOPs per token. Pass "
            "setup(model=<the trained module>, seq_len=<tokens per sequence>) or "
            "flops_per_token=<FLOPs per trained token>."
        )
    tokens_per_sample = float(seq_len * passes.sequences_per_sample) if seq_len else None
    return ThroughputSettings(
        total_steps=total_steps,
        flops_per_token=fpt,
        generation_flops_per_token=generated,
        peak_flops=peak,
        samples_per_step=per_rank_samples,
        tokens_per_sample=tokens_per_sample,
    )


def _resolve_peak(value: float | str | None, dtype: object, *, wants_mfu: bool) -> float | None:
    """Peak FLOP/s: a number, a device name, OTEL_TRAIN_PEAK_FLOPS, or this GPU x `dtype`."""
    if isinstance(value, str):
        return peak_flops(value, dtype if dtype is not None else "bf16")
    if value is not None:
        if not value > 0:
            raise OtelTrainError(f"peak_flops must be > 0 FLOP/s, got {value!r}")
        return float(value)
    peak: float | None = env_vars.PEAK_FLOPS.read()
    if peak is not None or not wants_mfu:
        return peak
    device = _current_cuda_device_name()
    if dtype is not None:
        if device is None:
            # Once per setup(): the table is for GPUs, and none is visible to this process.
            _logger.warning(
                "otel-train: perf.mfu omitted: setup(dtype=%r) looks up the peak FLOP/s of the "
                "current CUDA device, and this process sees none. Pass setup(peak_flops=<dense "
                "FLOP/s of this rank's devices>) or set OTEL_TRAIN_PEAK_FLOPS to report MFU.",
                str(dtype),
            )
            return None
        return peak_flops(device, dtype)
    if device is not None:
        _logger.warning(
            "otel-train: perf.mfu omitted: pass setup(dtype='bf16'|'fp16'|'tf32'|'fp8') "
            "to look up this GPU's peak FLOP/s, or peak_flops=<FLOP/s>"
        )
    return None

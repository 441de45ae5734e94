"""Dense peak FLOP/s of NVIDIA GPUs by device name and dtype: data, with a source per row.

Values are dense (no 2:4 sparsity; NVIDIA datasheets print sparse figures with an asterisk,
halved here). Tensor-core figures with FP32 accumulation, the way training runs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

_logger = logging.getLogger(__name__)

_T = 1e12
_H100_SXM = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
_H100_NVL = "https://www.nvidia.com/en-us/data-center/h100/ (H100 NVL column)"
_H200 = "https://www.nvidia.com/en-us/data-center/h200/"
_A100 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
_B200 = "https://www.nvidia.com/en-us/data-center/hgx/ (HGX B200, 8 GPUs, divided by 8)"
_ADA = "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf"
_L4 = "https://www.nvidia.com/en-us/data-center/l4/"
_L40S = "https://www.nvidia.com/en-us/data-center/l40s/"
_AMPERE = (
    "https://www.nvidia.com/content/PDF/nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf"
)
_A10 = "https://www.nvidia.com/en-us/data-center/products/a10-gpu/"
_V100 = "https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf"
_T4 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf"
_BLACKWELL = "https://images.nvidia.com/aem-dam/Solutions/geforce/blackwell/nvidia-rtx-blackwell-gpu-architecture.pdf"


def _row(source: str, **tflops: float) -> dict[str, Any]:
    return {"source": source, **{dtype: value * _T for dtype, value in tflops.items()}}


# Canonical name -> dtype -> dense FLOP/s. Keys are normalised names (see normalise_device_name).
PEAK_FLOPS_TABLE: Mapping[str, Mapping[str, Any]] = {
    # Hopper / Blackwell datacenter
    "h100 sxm": _row(_H100_SXM, fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9),
    "h100 pcie": _row(_H100_SXM, fp32=51.2, tf32=378.0, bf16=756.0, fp16=756.0, fp8=1513.0),
    "h100 nvl": _row(_H100_NVL, fp32=60.0, tf32=417.5, bf16=835.5, fp16=835.5, fp8=1670.5),
    "h200": _row(_H200, fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4, fp8=1978.9),
    "h200 nvl": _row(_H200, fp32=60.0, tf32=417.5, bf16=835.5, fp16=835.5, fp8=1670.5),
    "b200": _row(_B200, fp32=75.0, tf32=1125.0, bf16=2250.0, fp16=2250.0, fp8=4500.0),
    # Ampere / Ada datacenter
    "a100": _row(_A100, fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0),
    "a10": _row(_A10, fp32=31.2, tf32=62.5, bf16=125.0, fp16=125.0),
    "l4": _row(_L4, fp32=30.3, tf32=60.0, bf16=121.0, fp16=121.0, fp8=242.5),
    "l40s": _row(_L40S, fp32=91.6, tf32=183.0, bf16=362.05, fp16=362.05, fp8=733.0),
    "l40": _row(_ADA, fp32=90.5, tf32=90.5, bf16=181.05, fp16=181.05, fp8=362.0),
    # Older datacenter (no bf16 tensor cores)
    "v100 sxm": _row(_V100, fp32=15.7, fp16=125.0),
    "v100 pcie": _row(_V100, fp32=14.0, fp16=112.0),
    "t4": _row(_T4, fp32=8.1, fp16=65.0),
    # Consumer / workstation (GeForce tensor cores run FP32 accumulation at half rate)
    "rtx 5090": _row(_BLACKWELL, fp32=104.8, tf32=104.8, bf16=209.5, fp16=209.5, fp8=419.0),
    "rtx 4090": _row(_ADA, fp32=82.6, tf32=82.6, bf16=165.2, fp16=165.2, fp8=330.3),
    "rtx 4080": _row(_ADA, fp32=48.7, tf32=48.7, bf16=97.5, fp16=97.5, fp8=194.9),
    "rtx 6000 ada": _row(_ADA, fp32=91.1, tf32=182.1, bf16=364.2, fp16=364.2, fp8=728.5),
    "rtx 3090": _row(_AMPERE, fp32=35.6, tf32=35.6, bf16=71.0, fp16=71.0),
    "rtx 3080": _row(_AMPERE, fp32=29.8, tf32=29.8, bf16=59.5, fp16=59.5),
}

# Names as drivers report them that normalise to something other than a table key.
_ALIASES: Mapping[str, str] = {
    "h100": "h100 sxm",  # "NVIDIA H100 80GB HBM3" is the SXM5 part
    "h100 sxm5": "h100 sxm",
    "h200 sxm": "h200",
    "a100 sxm": "a100",
    "a100 sxm4": "a100",
    "a100 pcie": "a100",
    "v100 sxm2": "v100 sxm",
    "v100": "v100 sxm",
    "rtx 6000 ada generation": "rtx 6000 ada",
}

_DTYPES: Mapping[str, str] = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "tf32": "tf32", "tfloat32": "tf32",
    "fp8": "fp8", "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
}  # fmt: skip

_warned: set[str] = set()


def normalise_device_name(device_name: str) -> str:
    """'NVIDIA A100-SXM4-80GB' -> 'a100 sxm4'; 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    text = device_name.lower().replace("-", " ").replace("_", " ")
    words = [
        word
        for word in text.split()
        if word not in {"nvidia", "tesla", "geforce", "quadro"}
        and not re.fullmatch(r"\d+gb|hbm\d*e?|gddr\d*x?|pcie\d*gb", word)
    ]
    return " ".join(words)


def normalise_dtype(dtype: object) -> str | None:
    """Accepts torch dtypes and names: torch.bfloat16, 'bf16', 'float16', 'tf32', 'fp8'."""
    name = str(dtype).lower().removeprefix("torch.")
    return _DTYPES.get(name)


def lookup_peak_flops(device_name: str, dtype: object) -> float | None:
    """Dense peak FLOP/s of one device, or None when the device or dtype is not in the table."""
    key = normalise_device_name(device_name)
    key = _ALIASES.get(key, key)
    row = PEAK_FLOPS_TABLE.get(key)
    dtype_key = normalise_dtype(dtype)
    if row is None or dtype_key is None:
        return None
    value = row.get(dtype_key)
    return float(value) if value is not None else None


def warn_unknown_once(device_name: str, dtype: object) -> None:
    token = f"{device_name}|{dtype}"
    if token in _warned:
        return
    _warned.add(token)
    _logger.warning(
        "otel-train: no peak FLOP/s known for device %r with dtype %s, so perf.mfu is omitted. "
        "Pass setup(peak_flops=<dense FLOP/s of this rank's devices>) or set "
        "OTEL_TRAIN_PEAK_FLOPS to report MFU.",
        device_name,
        dtype,
    )


def warn_no_device_once(dtype: object) -> None:
    """`peak_flops(None, dtype)` without a CUDA device: the table has no CPU rows."""
    token = f"<no cuda device>|{dtype}"
    if token in _warned:
        return
    _warned.add(token)
    _logger.warning(
        "otel-train: no peak FLOP/s for dtype %s: no CUDA device is visible to look up, so "
        "perf.mfu is omitted. Pass setup(peak_flops=<dense FLOP/s of this rank's devices>) or "
        "set OTEL_TRAIN_PEAK_FLOPS to report MFU.",
        dtype,
    )

"""Every environment variable otel-train reads: name, parser, meaning, in one table.

`setup()` arguments win over these, and these over defaults. The README's table is generated
from `VARIABLES` (`python -m otel_train.env`); a test checks every `OTEL_TRAIN_*` name in the
code base is declared here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from otel_train.errors import OtelTrainError

_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True, kw_only=True)
class EnvVar:
    """One variable: `read()` gives the parsed value, or None when it is unset."""

    name: str
    meaning: str
    default: str
    parse: Callable[[str], Any]
    ours: bool = True  # False: a standard OTel / launcher variable we honour

    def read(self, env: Mapping[str, str] | None = None) -> Any:
        raw = (os.environ if env is None else env).get(self.name)
        return None if raw is None else self.parse(raw)


def _text(raw: str) -> str | None:
    return raw or None


def _flag(raw: str) -> bool:
    return raw.strip().lower() in _TRUE


def _names(raw: str) -> list[str]:
    return [name.strip() for name in raw.split(",") if name.strip()]


def _intervals(raw: str) -> dict[str, int] | None:
    from otel_train.sampling import parse_intervals  # sampling is heavier than this table

    return parse_intervals(raw, source="OTEL_TRAIN_INTERVALS=") if raw else None


def _peak_flops(raw: str) -> float | None:
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise OtelTrainError(f"OTEL_TRAIN_PEAK_FLOPS={raw!r} is not a number (FLOP/s)") from None
    if value <= 0:
        raise OtelTrainError(f"OTEL_TRAIN_PEAK_FLOPS must be > 0, got {raw!r}")
    return value


def _otlp_interval(raw: str) -> float | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise OtelTrainError(
            f"OTEL_TRAIN_OTLP_INTERVAL_MILLIS={raw!r} is not a number of milliseconds; e.g. "
            "10000, or unset it for step-sampled export"
        ) from None


def _lenient_int(raw: str) -> int | None:
    """Launchers' rank variables: unset, empty or not a number all mean "not given"."""
    if raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        return None


RUN = EnvVar(
    name="OTEL_TRAIN_RUN",
    meaning="run name when setup(run=) is not given; also names the env-configured JSONL run",
    default="run-<date>-<time>",
    parse=_text,
)
OUTPUT_DIR = EnvVar(
    name="OTEL_TRAIN_OUTPUT_DIR",
    meaning="folder holding `<run>/rank<N>.jsonl` (setup(output_dir=) wins)",
    default="runs",
    parse=_text,
)
EXPORTERS = EnvVar(
    name="OTEL_TRAIN_EXPORTERS",
    meaning="comma-separated exporter names when setup(exporters=) is not given",
    default="jsonl",
    parse=_names,
)
INTERVALS = EnvVar(
    name="OTEL_TRAIN_INTERVALS",
    meaning='sampling intervals in steps, e.g. "train=10,perf=20,gpu=50"',
    default="train=10,perf=20,gpu=50",
    parse=_intervals,
)
PEAK_FLOPS = EnvVar(
    name="OTEL_TRAIN_PEAK_FLOPS",
    meaning="dense peak FLOP/s of this rank's devices, for perf.mfu",
    default="from the GPU table and setup(dtype=)",
    parse=_peak_flops,
)
RESUME = EnvVar(
    name="OTEL_TRAIN_RESUME",
    meaning="1: the env-configured JSONL exporter appends to an existing run file",
    default="0",
    parse=_flag,
)
PROMETHEUS_PORT = EnvVar(
    name="OTEL_TRAIN_PROMETHEUS_PORT",
    meaning="base port of /metrics; each rank serves base + LOCAL_RANK (0: any free port)",
    default="9464",
    parse=_text,
)
PROMETHEUS_ADDRESS = EnvVar(
    name="OTEL_TRAIN_PROMETHEUS_ADDRESS",
    meaning="address /metrics binds to",
    default="127.0.0.1",
    parse=_text,
)
PROMETHEUS_GRACE_MILLIS = EnvVar(
    name="OTEL_TRAIN_PROMETHEUS_GRACE_MILLIS",
    meaning="how long /metrics keeps serving after shutdown for a last scrape (0: none)",
    default="5000",
    parse=_text,
)
OTLP_INTERVAL_MILLIS = EnvVar(
    name="OTEL_TRAIN_OTLP_INTERVAL_MILLIS",
    meaning="OTLP export period in ms (time-based); unset: exported at sampled steps",
    default="unset",
    parse=_otlp_interval,
)
WANDB_ALL_RANKS = EnvVar(
    name="OTEL_TRAIN_WANDB_ALL_RANKS",
    meaning="1: every rank logs its own W&B run (default: rank 0 only)",
    default="0",
    parse=_flag,
)

# Standard variables we honour (read by us, or by the SDK exporters we build).
SERVICE_NAME = EnvVar(
    name="OTEL_SERVICE_NAME",
    meaning="run name of the env-configured JSONL exporter when OTEL_TRAIN_RUN is unset",
    default="otel",
    parse=_text,
    ours=False,
)
METRICS_EXPORTER = EnvVar(
    name="OTEL_METRICS_EXPORTER",
    meaning="the OTel SDK configurator loads our exporters by name (jsonl, wandb, ...)",
    default="SDK default",
    parse=_names,
    ours=False,
)
OTLP_ENDPOINT = EnvVar(
    name="OTEL_EXPORTER_OTLP_ENDPOINT",
    meaning="OTLP/HTTP base URL (`/v1/metrics` appended); also `OTEL_EXPORTER_OTLP_METRICS_*`, "
    "`..._HEADERS`, `..._TIMEOUT`, `..._COMPRESSION` (SDK rules)",
    default="http://localhost:4318",
    parse=_text,
    ours=False,
)
LAUNCHER_RANKS = tuple(
    EnvVar(
        name=name,
        meaning=meaning,
        default=default,
        parse=_lenient_int,
        ours=False,
    )
    for name, meaning, default in (
        ("RANK", "this process's global rank (torchrun, deepspeed, accelerate)", "0"),
        ("LOCAL_RANK", "rank on this host (Prometheus port offset, GPU index)", "0"),
        ("WORLD_SIZE", "number of ranks", "1"),
        ("SLURM_PROCID", "global rank under SLURM when RANK is unset", "-"),
        ("SLURM_LOCALID", "local rank under SLURM when LOCAL_RANK is unset", "-"),
        ("SLURM_NTASKS", "number of ranks under SLURM when WORLD_SIZE is unset", "-"),
    )
)
_LAUNCHER_BY_NAME = {var.name: var for var in LAUNCHER_RANKS}

VARIABLES: tuple[EnvVar, ...] = (
    RUN,
    OUTPUT_DIR,
    EXPORTERS,
    INTERVALS,
    PEAK_FLOPS,
    RESUME,
    PROMETHEUS_PORT,
    PROMETHEUS_ADDRESS,
    PROMETHEUS_GRACE_MILLIS,
    OTLP_INTERVAL_MILLIS,
    WANDB_ALL_RANKS,
    SERVICE_NAME,
    METRICS_EXPORTER,
    OTLP_ENDPOINT,
    *LAUNCHER_RANKS,
)


def launcher_int(name: str) -> int | None:
    """RANK / LOCAL_RANK / WORLD_SIZE / SLURM_*: an int, or None when unset or not a number."""
    value: int | None = _LAUNCHER_BY_NAME[name].read()
    return value


def markdown_table() -> str:
    """The README's table of variables (regenerate with `python -m otel_train.env`)."""
    lines = ["| Variable | Meaning | Default |", "| --- | --- | --- |"]
    for var in VARIABLES:
        lines.append(f"| `{var.name}` | {var.meaning} | {var.default} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - a docs helper
    import sys

    sys.stdout.write(markdown_table() + "\n")

"""The numbers `report` and `compare` show for a run, computed from its JSON-lines rows."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from otel_train.runs import RunRecord, finite


@dataclass(frozen=True, slots=True)
class SummaryLine:
    label: str
    key: str  # stable name in summary.json
    compute: Callable[[RunRecord], float | None]
    fmt: str


def _values(run: RunRecord, key: str) -> list[float]:
    return finite(run.series(key)[1])


def _final_loss(run: RunRecord) -> float | None:
    return (
        run.last("final/train_loss")
        if run.last("final/train_loss") is not None
        else (run.last("train/loss"))
    )


def _min(key: str) -> Callable[[RunRecord], float | None]:
    return lambda run: min(_values(run, key), default=None)


def _median(key: str) -> Callable[[RunRecord], float | None]:
    def compute(run: RunRecord) -> float | None:
        values = _values(run, key)
        return statistics.median(values) if values else None

    return compute


def _best_perplexity(run: RunRecord) -> float | None:
    candidates = _values(run, "eval/perplexity") + _values(run, "eval/best_perplexity")
    return min(candidates, default=None)


def _gpu_memory_peak(run: RunRecord) -> float | None:
    """Max over every GPU memory-used key the run has (names come from the GPU exporter)."""
    keys = [k for k in run.keys() if k.startswith(("gpu/", "hw/")) and "memory" in k]
    keys = [k for k in keys if not any(w in k for w in ("limit", "total", "utilization"))]
    return max((v for k in keys for v in _values(run, k)), default=None)


SUMMARY: tuple[SummaryLine, ...] = (
    SummaryLine(
        "steps",
        "steps",
        lambda run: None if run.last_step is None else float(run.last_step),
        "{:.0f}",
    ),
    SummaryLine("final loss", "final_loss", _final_loss, "{:.4f}"),
    SummaryLine("best loss", "best_loss", _min("train/loss"), "{:.4f}"),
    SummaryLine("best eval perplexity", "best_eval_perplexity", _best_perplexity, "{:.3f}"),
    SummaryLine(
        "median tokens/s", "median_tokens_per_second", _median("perf/tokens_per_second"), "{:,.0f}"
    ),
    SummaryLine("median MFU", "median_mfu", _median("perf/mfu"), "{:.2%}"),
    SummaryLine("step time p50 (s)", "step_time_p50", _median("perf/step_time_p50"), "{:.4f}"),
    SummaryLine("step time p95 (s)", "step_time_p95", _median("perf/step_time_p95"), "{:.4f}"),
    SummaryLine("GPU memory peak (bytes)", "gpu_memory_peak", _gpu_memory_peak, "{:,.0f}"),
)


def summarize(run: RunRecord) -> dict[str, float | None]:
    return {line.key: line.compute(run) for line in SUMMARY}


def format_value(line: SummaryLine, value: float | None) -> str:
    if value is None:
        return "n/a"
    if line.key == "final_loss" and not math.isfinite(value):
        return f"{value} (diverged)"  # a NaN final loss is news, never a number to skim past
    if not math.isfinite(value):
        return str(value)
    return line.fmt.format(value)

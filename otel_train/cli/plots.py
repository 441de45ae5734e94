"""PNG plots over steps for `report` (one run) and `compare` (runs overlaid). Needs matplotlib."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from otel_train.runs import RunRecord

# (file stem, title, keys drawn on it, y label)
PANELS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("loss", "Loss", ("train/loss", "eval/loss"), "loss"),
    ("learning_rate", "Learning rate", ("train/learning_rate",), "lr"),
    ("throughput", "Throughput", ("perf/tokens_per_second",), "tokens/s"),
    ("mfu", "Model FLOPs utilisation", ("perf/mfu",), "MFU"),
)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(f'{error}; plots need: pip install "otel-train[cli]"') from error
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _draw(axes: Any, runs: Sequence[RunRecord], keys: Sequence[str], ylabel: str) -> None:
    drawn = False
    for run in runs:
        for key in keys:
            steps, values = run.series(key)
            if not steps:
                continue
            label = key if len(runs) == 1 else f"{run.name}: {key}"
            marker = "o" if key.startswith("eval/") or len(steps) < 3 else None
            axes.plot(steps, values, label=label, marker=marker)
            drawn = True
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if drawn:
        axes.legend(fontsize="small")
    else:
        axes.text(0.5, 0.5, f"no data for {', '.join(keys)}", ha="center", va="center",
                  transform=axes.transAxes)  # fmt: skip


def plot_run(run: RunRecord, directory: Path) -> list[Path]:
    """One PNG per panel, written into `directory` (the run's own folder by default)."""
    plt = _pyplot()
    written = []
    for stem, title, keys, ylabel in PANELS:
        figure, axes = plt.subplots(figsize=(7, 4))
        _draw(axes, [run], keys, ylabel)
        axes.set_title(f"{title} - {run.name}")
        path = directory / f"{stem}.png"
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def plot_comparison(runs: Sequence[RunRecord], path: Path) -> Path:
    """All panels in one figure, every run overlaid (the W&B-style comparison, offline)."""
    plt = _pyplot()
    figure, grid = plt.subplots(2, 2, figsize=(12, 8))
    for axes, (_, title, keys, ylabel) in zip(grid.flat, PANELS, strict=True):
        _draw(axes, runs, keys[:1], ylabel)
        axes.set_title(title)
    figure.suptitle(" vs ".join(run.name for run in runs))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

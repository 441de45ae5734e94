"""PNG plots over steps for `report` (one run) and `compare` (runs overlaid). Needs matplotlib."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from otel_train.errors import OtelTrainError
from otel_train.runs import RunRecord
from otel_train.safe_files import replace_file

_MAX_LABEL_CHARS = 80

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


def plain_text(text: str) -> str:
    """Text from a run file, safe for matplotlib: `$` would start mathtext (a name such as
    `$\\frac$` raises inside the renderer), a leading `_` hides a legend entry, and a
    megabyte-long name would take the renderer minutes."""
    text = " ".join(text.split())
    if len(text) > _MAX_LABEL_CHARS:
        text = text[: _MAX_LABEL_CHARS - 3] + "..."
    text = text.replace("$", r"\$")  # outside math, only `\$` is special: a literal dollar
    return f" {text}" if text.startswith("_") else text


def axis_label(runs: Sequence[RunRecord]) -> str:
    """One x-axis for the plot: runs on steps and runs on time cannot be overlaid."""
    labels = {run.axis_label for run in runs}
    if len(labels) > 1:
        named = ", ".join(f"{run.name} ({run.axis})" for run in runs)
        raise OtelTrainError(
            f"cannot overlay runs on steps with runs on time: {named}; compare runs of one kind"
        )
    return labels.pop()


def _draw(axes: Any, runs: Sequence[RunRecord], keys: Sequence[str], ylabel: str) -> None:
    drawn = False
    for run in runs:
        for key in keys:
            xs, values = run.series(key)
            if not xs:
                continue
            label = key if len(runs) == 1 else f"{run.name}: {key}"
            marker = "o" if key.startswith("eval/") or len(xs) < 3 else None
            axes.plot(xs, values, label=plain_text(label), marker=marker)
            drawn = True
    axes.set_xlabel(axis_label(runs))
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
        axes.set_title(plain_text(f"{title} - {run.name}"))
        figure.tight_layout()
        written.append(_save(plt, figure, directory / f"{stem}.png"))
    return written


def _save(plt: Any, figure: Any, path: Path) -> Path:
    """Rendered in memory, then swapped in whole: a link planted at `path` is replaced, not
    written through, and a reader never sees half a PNG."""
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(figure)
    return replace_file(path, buffer.getvalue())


def plot_comparison(runs: Sequence[RunRecord], path: Path) -> Path:
    """All panels in one figure, every run overlaid (the W&B-style comparison, offline)."""
    plt = _pyplot()
    figure, grid = plt.subplots(2, 2, figsize=(12, 8))
    for axes, (_, title, keys, ylabel) in zip(grid.flat, PANELS, strict=True):
        _draw(axes, runs, keys[:1], ylabel)
        axes.set_title(title)
    figure.suptitle(plain_text(" vs ".join(run.name for run in runs)))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(plt, figure, path)

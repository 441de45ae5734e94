"""`otel-train demo`: a tiny GPT on shipped text, fully instrumented, and where it all went.

JSON lines always; Prometheus and W&B (offline unless logged in) when installed. Their absence
is reported by `setup()` as a warning and the demo goes on with what it has.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import netrc
import os
import socket
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from otel_train import sampling
from otel_train.errors import OtelTrainError
from otel_train.rows import RowBuilder
from otel_train.run_context import RunContext, file_safe_run_name

DEFAULT_EXPORTERS = "jsonl,prometheus,wandb"
PROMETHEUS_PORT_ENV = "OTEL_TRAIN_PROMETHEUS_PORT"
PROMETHEUS_DEFAULT_PORT = 9464
PEAK_LR = 3e-3


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "demo", help="train a tiny GPT on CPU/GPU with every exporter, in under a minute"
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument(
        "--intervals",
        default="train=10,perf=20,gpu=50",
        help="sampling intervals, group=steps,... (default train=10,perf=20,gpu=50)",
    )
    parser.add_argument(
        "--exporters",
        default=DEFAULT_EXPORTERS,
        help=f"comma-separated exporter names (default {DEFAULT_EXPORTERS})",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("runs"), help="default ./runs")
    parser.add_argument("--stage", default="pretrain", help="stage label (default pretrain)")
    parser.add_argument("--run", default=None, help="run name (default demo-<time>)")
    parser.add_argument("--eval-every", type=int, default=100, help="eval interval in steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run_command=run)


def parse_intervals(text: str) -> dict[str, int]:
    return sampling.parse_intervals(text, source="--intervals")


class LatestValuesExporter(MetricExporter):
    """Keeps the newest exported value of each key: the progress bar reads what otel-train
    exported, so the demo adds no `.item()` of its own."""

    def __init__(self) -> None:
        super().__init__()
        self._rows = RowBuilder()
        self._lock = threading.Lock()
        self.values: dict[str, float] = {}

    def bind_run_context(self, context: RunContext) -> None:
        self._rows = RowBuilder(context.namer)

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        row = self._rows.build(metrics_data)
        with self._lock:
            self.values = {**self.values, **row.values}
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _choose_prometheus_port() -> int:
    """The standard port when free, else one the OS picks (several demos on one machine)."""
    if _port_free(PROMETHEUS_DEFAULT_PORT):
        return PROMETHEUS_DEFAULT_PORT
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _prepare_backends(names: list[str], run_dir: Path) -> dict[str, str]:
    """Environment for the named backends; returns what the closing table should say."""
    notes: dict[str, str] = {}
    if "prometheus" in names:
        port = int(os.environ.get(PROMETHEUS_PORT_ENV) or _choose_prometheus_port())
        os.environ[PROMETHEUS_PORT_ENV] = str(port)
        notes["prometheus_url"] = f"http://127.0.0.1:{port}/metrics"
    if "wandb" in names and importlib.util.find_spec("wandb") is not None:
        if not os.environ.get("WANDB_MODE") and not _wandb_logged_in():
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        if not os.environ.get("WANDB_DIR"):
            run_dir.mkdir(parents=True, exist_ok=True)
            os.environ["WANDB_DIR"] = str(run_dir)
        notes["wandb_mode"] = os.environ.get("WANDB_MODE", "online")
    return notes


def _scrape(url: str) -> int | None:
    """Number of sample lines the endpoint serves now, or None if it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            body = response.read().decode("utf-8", "replace")
    except OSError:
        return None
    return sum(1 for line in body.splitlines() if line and not line.startswith("#"))


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over 10% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 10)
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _checked_options(args: argparse.Namespace) -> tuple[list[str], dict[str, int], str, Path]:
    """Every option is checked before the model is built, the peak measured or a folder made:
    a typo costs a second, not a minute, and leaves nothing behind."""
    from otel_train.configure import STANDARD_INSTRUMENTS
    from otel_train.exporter_loading import check_exporter_names
    from otel_train.ranks import detect_ranks

    for flag, value in (("--steps", args.steps), ("--eval-every", args.eval_every)):
        if value <= 0:
            raise OtelTrainError(f"{flag} must be a positive int, got {value}")
    names = [n.strip() for n in args.exporters.split(",") if n.strip()]
    check_exporter_names(names)
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise OtelTrainError(f"--exporters lists {duplicated} twice; list each once")
    intervals = parse_intervals(args.intervals)
    unknown = sorted(set(intervals) - {*sampling.DEFAULT_INTERVALS, "health"})
    if unknown:  # setup() takes any group (for user instruments); the demo records only these
        raise OtelTrainError(
            f"--intervals {args.intervals!r}: unknown group(s) {unknown}; the demo's groups are "
            f"{', '.join([*sampling.DEFAULT_INTERVALS, 'health'])}"
        )
    sampling.resolve_views(intervals, STANDARD_INSTRUMENTS)  # unknown group, non-positive value
    run_name = args.run or time.strftime("demo-%Y%m%d-%H%M%S")
    run_dir = args.output_dir / file_safe_run_name(run_name)
    existing = run_dir / f"rank{detect_ranks().rank}.jsonl"
    if "jsonl" in names and existing.is_file() and existing.stat().st_size > 0:
        raise OtelTrainError(
            f"{existing} already holds a run named {run_name!r}; pass another --run or "
            "--output-dir (a demo never appends to an earlier run)"
        )
    return names, intervals, run_name, run_dir


def run(args: argparse.Namespace) -> int:
    _require_demo_extras()
    from rich.console import Console

    import otel_train

    console = Console()
    names, intervals, run_name, run_dir = _checked_options(args)
    notes = _prepare_backends(names, run_dir)
    demo = _build_demo_model(args.seed, console)
    latest = LatestValuesExporter()
    config = demo.config
    with otel_train.setup(
        run=run_name,
        stage=args.stage,
        output_dir=args.output_dir,
        exporters=[*names, latest],
        intervals=intervals,
        total_steps=args.steps,
        config={"model": "tiny-gpt", **asdict(config), "lr": PEAK_LR, "seed": args.seed},
        model=demo.model,
        seq_len=config.seq_len,
        # The demo trains plainly whatever --stage says: 6N + 12LHT, no reference forward.
        flops_per_token=otel_train.flops_per_token(demo.model, seq_len=config.seq_len),
        peak_flops=demo.peak_flops,
    ) as tel:
        _train(tel, demo, args, latest, console)
        tel.flush()
        if "prometheus_url" in notes:
            served = _scrape(notes["prometheus_url"])
            notes["prometheus_samples"] = "" if served is None else str(served)
        jsonl_path = tel.context.run_dir / f"rank{tel.context.rank}.jsonl"
    lines = jsonl_path.read_text().count("\n") if jsonl_path.exists() else 0
    console.print(_closing_table(names, notes, run_dir, jsonl_path, lines, tel.export_stats()))
    return 0 if lines > 0 else 1


def _require_demo_extras() -> None:
    """torch and rich, or an ImportError naming the install command, before anything runs."""
    try:
        import rich  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f'{error}; the demo needs: pip install "torch==2.13.0" "otel-train[cli]"'
        ) from error


@dataclass(frozen=True, slots=True)
class _DemoModel:
    config: Any  # tiny_gpt.TinyGptConfig
    model: Any
    optimizer: Any
    sampler: Any
    peak_flops: float


def _build_demo_model(seed: int, console: Any) -> _DemoModel:
    """The tiny GPT on the best device here, and that device's measured matmul peak (MFU)."""
    import torch

    from otel_train.cli import tiny_gpt

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = tiny_gpt.TinyGptConfig()
    model, optimizer, sampler = tiny_gpt.build(config, device, seed=seed)
    console.print(
        f"[bold]otel-train demo[/]: tiny GPT, {tiny_gpt.parameter_count(model):,} parameters, "
        f"on {device.type}; finding the device's matmul peak for MFU..."
    )
    peak_flops, peak_source = tiny_gpt.demo_peak_flops(device)
    console.print(f"MFU denominator: {peak_flops / 1e9:,.0f} GFLOP/s ({peak_source})")
    return _DemoModel(config, model, optimizer, sampler, peak_flops)


def _train(
    tel: Any, demo: _DemoModel, args: argparse.Namespace, latest: LatestValuesExporter, console: Any
) -> None:
    """The training loop, recording through otel-train; the bar shows what it exported."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from otel_train.cli import tiny_gpt

    sampler, steps = demo.sampler, args.steps
    train_bytes = len(sampler.train_data)
    progress = Progress(
        TextColumn("[bold]step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s  MFU {task.fields[mfu]}"),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task("train", total=steps, loss="-", tps="-", mfu="-")
        for step in range(1, steps + 1):
            lr = _lr_at(step, steps, PEAK_LR)
            for group in demo.optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = tiny_gpt.train_step(demo.model, demo.optimizer, sampler.batch())
            tel.training.record(
                loss=loss,
                learning_rate=lr,
                grad_norm=grad_norm,
                tokens=sampler.tokens_per_batch,
                samples=demo.config.batch_size,
                epoch=step * sampler.tokens_per_batch / train_bytes,
            )
            tel.step(step)
            if step % args.eval_every == 0 or step == steps:
                tel.evaluate(loss=tiny_gpt.eval_loss(demo.model, sampler))
            values = latest.values
            progress.update(
                task,
                advance=1,
                loss=_fmt(values.get("train/loss"), "{:.3f}"),
                tps=_fmt(values.get("perf/tokens_per_second"), "{:,.0f}"),
                mfu=_fmt(values.get("perf/mfu"), "{:.1%}"),
            )


def _closing_table(
    names: list[str],
    notes: dict[str, str],
    run_dir: Path,
    jsonl_path: Path,
    lines: int,
    stats: dict[str, Any],
) -> Any:
    """Where everything went: one row per backend, the export stats, the next command."""
    from rich.table import Table

    table = Table(title="Where everything went", show_lines=False)
    table.add_column("backend")
    table.add_column("where")
    table.add_row("JSON lines", f"{jsonl_path} ({lines} lines)")
    if "prometheus" in names:
        url = notes.get("prometheus_url", "")
        samples = notes.get("prometheus_samples", "")
        table.add_row(
            "Prometheus",
            f"{url} (served {samples} samples while training)"
            if samples
            else "not serving (exporter not installed or port taken; see warnings above)",
        )
    if "wandb" in names:
        found = sorted(run_dir.glob("wandb/*run-*")) if run_dir.exists() else []
        found = [p for p in found if p.is_dir()]
        table.add_row(
            f"W&B ({notes.get('wandb_mode', 'not installed')})",
            str(found[-1]) if found else "no W&B run (wandb or its exporter not installed)",
        )
    table.add_row("export stats", ", ".join(f"{k}: {v}" for k, v in stats.items()) or "-")
    table.add_row("next", f"otel-train report {run_dir}")
    return table


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else spec.format(value)

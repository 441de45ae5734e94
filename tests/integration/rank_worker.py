"""One rank of a torch.distributed (gloo, CPU, 127.0.0.1) job, run as its own process.

Rank r records tokens=(r+1)*10 and loss=r at every step. Prints one JSON summary line.
Usage: python rank_worker.py OUTPUT_DIR STEPS EXPORTERS [--reduce] [--fail-rank N]
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from typing import Any

import torch
import torch.distributed as dist
from opentelemetry.sdk.metrics.export import MetricExporter

import otel_train
from otel_train.testing import CapturingExporter
from tests.integration.proc_net import listening_ports


class FailingExporter(MetricExporter):
    """A backend that always raises: must not stall this rank or the others."""

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
        raise ConnectionError("backend down")

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return False

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        raise ConnectionError("backend down")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("steps", type=int)
    parser.add_argument("exporters")
    parser.add_argument("--reduce", action="store_true")
    parser.add_argument("--fail-rank", type=int, default=-1)
    args = parser.parse_args()
    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    capture = CapturingExporter()
    exporters: list[Any] = [name for name in args.exporters.split(",") if name]
    exporters.append(capture)
    before = set(listening_ports())  # torch's own store/gloo sockets are not ours
    if rank == args.fail_rank:
        exporters.append(FailingExporter())
    tel = otel_train.setup(
        run="multi",
        output_dir=args.output_dir,
        exporters=exporters,
        intervals={"train": 5, "perf": 10},
        reduce_across_ranks=args.reduce,
    )
    for step in range(1, args.steps + 1):
        tel.training.record(loss=torch.tensor(float(rank)), tokens=(rank + 1) * 10, samples=1)
        tel.step(step)
    ours = sorted(set(listening_ports()) - before)
    tel.flush()  # a scrape serves what the export thread has delivered
    scraped = {}
    for address, port in ours:
        with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=5) as response:
            scraped[port] = response.read().decode()
    reductions = tel._reducer.reductions if tel._reducer is not None else 0
    tel.shutdown(timeout_millis=3_000)
    summary = {
        "rank": rank,
        "resource": dict(capture.batches[0].resource_metrics[0].resource.attributes),
        "stats": tel.export_stats(),
        "reductions": reductions,
        "listening": ours,
        "scraped": scraped,
    }
    dist.destroy_process_group()
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

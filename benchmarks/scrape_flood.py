"""What a flood of `/metrics` scrapes costs the training thread: step-time p50 / p99 of a real
torch loop (tiny MLP, CPU) with the Prometheus endpoint quiet and with N client threads (a
separate process, raw sockets) scraping it as fast as it answers. Blocks alternate quiet /
flood so drift on a shared machine hits both alike; the result is the ratio flood / quiet.

Usage: python benchmarks/scrape_flood.py [--threads 8] [--blocks 4] [--block-steps 300]
       [--width 512] [--json out.json]
Runs against whatever `otel_train` / `exporters` are importable (PYTHONPATH), so the same
script measures an old and a new exporter side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

FLOOD_CLIENT = r"""
import socket, sys, threading, time
host, port, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
done = [0]
lock = threading.Lock()
def scrape_forever():
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    while True:
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                sock.sendall(request)
                while sock.recv(65536):
                    pass
        except OSError:
            time.sleep(0.001)
            continue
        with lock:
            done[0] += 1
for _ in range(threads):
    threading.Thread(target=scrape_forever, daemon=True).start()
while True:
    line = sys.stdin.readline()
    if not line:
        break
    with lock:
        print(done[0], flush=True)
"""


class Flood:
    """N scraping threads in their own process; `scrapes()` asks it how many it completed."""

    def __init__(self, url: str, threads: int) -> None:
        parsed = urllib.parse.urlparse(url)
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                FLOOD_CLIENT,
                parsed.hostname or "",
                str(parsed.port),
                str(threads),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 10
        while self.scrapes() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # measure only once the flood is really running

    def scrapes(self) -> int:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write("\n")
        self._process.stdin.flush()
        return int(self._process.stdout.readline())

    def stop(self) -> int:
        count = self.scrapes()
        self._process.kill()
        self._process.wait()
        return count


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=4, help="quiet/flood block pairs")
    parser.add_argument("--block-steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=512, help="MLP hidden width")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    import otel_train
    from exporters.prometheus import PrometheusExporter

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, args.width), torch.nn.ReLU(), torch.nn.Linear(args.width, 64)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    exporter = PrometheusExporter(port=0)
    tel = otel_train.setup(
        run="scrape-flood", output_dir=tempfile.mkdtemp(), exporters=(exporter,),
        intervals={"train": 10, "perf": 20}, gpu_metrics=False, handle_signals=False,
    )  # fmt: skip
    assert exporter.url is not None, "the Prometheus endpoint did not start"
    step = 0

    def train(steps: int) -> list[float]:
        nonlocal step
        times = []
        for _ in range(steps):
            began = time.perf_counter()
            x = torch.randn(32, 64)
            loss = torch.nn.functional.mse_loss(model(x), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            tel.training.record(loss=loss.detach(), learning_rate=0.01, tokens=32 * 64, samples=32)
            tel.step(step)
            times.append(time.perf_counter() - began)
        return times

    train(200)  # warm-up
    quiet: list[float] = []
    flooded: list[float] = []
    scrapes = 0
    flood_seconds = 0.0
    for _ in range(args.blocks):
        quiet += train(args.block_steps)
        flood = Flood(exporter.url, args.threads)
        began = time.perf_counter()
        flooded += train(args.block_steps)
        flood_seconds += time.perf_counter() - began
        scrapes += flood.stop()
    tel.shutdown(timeout_millis=2_000)

    def summary(times: list[float]) -> dict[str, float]:
        return {
            "p50_ms": statistics.median(times) * 1e3,
            "p99_ms": percentile(times, 0.99) * 1e3,
            "mean_ms": statistics.fmean(times) * 1e3,
        }

    result = {
        "threads": args.threads,
        "steps_per_phase": len(quiet),
        "quiet": summary(quiet),
        "flood": summary(flooded),
        "scrapes_per_second_during_flood": scrapes / flood_seconds if flood_seconds else 0.0,
    }
    result["ratio_p50"] = result["flood"]["p50_ms"] / result["quiet"]["p50_ms"]
    result["ratio_p99"] = result["flood"]["p99_ms"] / result["quiet"]["p99_ms"]
    print(f"{'':24}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name in ("quiet", "flood"):
        row = result[name]
        print(f"{name:24}{row['p50_ms']:>10.3f}{row['p99_ms']:>10.3f}{row['mean_ms']:>10.3f}")
    print(
        f"flood / quiet: p50 x{result['ratio_p50']:.2f}, p99 x{result['ratio_p99']:.2f} "
        f"({args.threads} threads, {result['scrapes_per_second_during_flood']:.0f} scrapes/s)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

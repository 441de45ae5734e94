"""4 ranks via torch.distributed (gloo, CPU, 127.0.0.1), each its own process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed")

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("rank_worker.py")
WORLD = 4
STEPS = 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(output_dir: Path, exporters: str, *extra: str, timeout: float = 120) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, str(WORKER), str(output_dir), str(STEPS), exporters, *extra]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    summaries = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)  # a hung rank fails the test here
            assert proc.returncode == 0, err[-3000:]
            summaries.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return sorted(summaries, key=lambda s: s["rank"])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _last_with(rows: list[dict], key: str) -> float:
    return [row["metrics"][key] for row in rows if key in row["metrics"]][-1]


def test_four_ranks_reduce_to_global_tokens_on_rank0_and_write_per_rank_files(tmp_path):
    summaries = run_ranks(tmp_path, "jsonl", "--reduce", "--fail-rank", "2")
    for rank, summary in enumerate(summaries):
        resource = summary["resource"]
        assert (resource["rank"], resource["local_rank"], resource["world_size"]) == (
            rank,
            rank,
            WORLD,
        )
        assert summary["reductions"] == STEPS // 5  # one all_reduce per train-sampled step
    files = sorted(p.name for p in (tmp_path / "multi").iterdir())
    assert files == [f"rank{r}.jsonl" for r in range(WORLD)]
    rank0 = _rows(tmp_path / "multi" / "rank0.jsonl")
    true_global_tokens = sum((r + 1) * 10 for r in range(WORLD)) * STEPS  # 4000
    assert _last_with(rank0, "train/num_input_tokens_seen") == true_global_tokens
    assert _last_with(rank0, "train/loss") == pytest.approx(sum(range(WORLD)) / WORLD)
    assert rank0[-1]["metrics"]["final/total_tokens"] == true_global_tokens
    # Other ranks keep their own values (sums over ranks in Prometheus never double-count).
    rank1 = _rows(tmp_path / "multi" / "rank1.jsonl")
    assert _last_with(rank1, "train/num_input_tokens_seen") == 20 * STEPS
    assert {row["rank"] for row in rank1} == {1}
    # Rank 2's failing exporter was counted, its JSON lines and the others' are complete.
    assert summaries[2]["stats"]["FailingExporter"]["failed"] > 0
    rank2_steps = [row["step"] for row in _rows(tmp_path / "multi" / "rank2.jsonl")]
    assert [s for s in rank2_steps if s % 5 == 0][: STEPS // 5] == list(range(5, STEPS + 1, 5))


def test_four_ranks_without_reduction_export_local_values(tmp_path):
    summaries = run_ranks(tmp_path, "jsonl")
    assert all(summary["reductions"] == 0 for summary in summaries)
    for rank in range(WORLD):
        rows = _rows(tmp_path / "multi" / f"rank{rank}.jsonl")
        assert _last_with(rows, "train/num_input_tokens_seen") == (rank + 1) * 10 * STEPS


def test_four_ranks_serve_prometheus_on_distinct_loopback_ports(tmp_path):
    pytest.importorskip("exporters.prometheus", reason="Prometheus exporter (issue 4) not merged")
    summaries = run_ranks(tmp_path, "jsonl,prometheus")
    listening = [summary["listening"] for summary in summaries]
    assert all(listening), listening  # every rank serves /metrics
    ports = [port for rank_ports in listening for _, port in rank_ports]
    assert len(ports) == len(set(ports))  # no two ranks share a port
    assert {address for rank_ports in listening for address, _ in rank_ports} == {"127.0.0.1"}
    for rank, summary in enumerate(summaries):
        text = "\n".join(summary["scraped"].values())
        assert "train_tokens" in text and f'rank="{rank}"' in text

"""A tiny GPT-style byte-level language model and the text it trains on (shipped, no download).

Used by `otel-train demo` and `benchmarks/overhead.py`, so both measure the same work.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

VOCAB_SIZE = 256  # bytes: no tokenizer to ship


@dataclass(frozen=True, slots=True, kw_only=True)
class TinyGptConfig:
    # Hugging Face style names, so `setup(model=, seq_len=)` finds them for FLOPs per token.
    num_layers: int = 2
    hidden_size: int = 48
    num_heads: int = 4
    seq_len: int = 64
    batch_size: int = 16


def load_corpus() -> bytes:
    """The demo text inside the package: a few paragraphs written for this project."""
    return (resources.files("otel_train.cli") / "data" / "demo_corpus.txt").read_bytes()


class _Block(nn.Module):
    def __init__(self, config: TinyGptConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.attn = nn.MultiheadAttention(config.hidden_size, config.num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(config.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, 4 * config.hidden_size),
            nn.GELU(),
            nn.Linear(4 * config.hidden_size, config.hidden_size),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyGpt(nn.Module):
    """Pre-norm decoder-only transformer with learned positions."""

    def __init__(self, config: TinyGptConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(VOCAB_SIZE, config.hidden_size)
        self.position = nn.Embedding(config.seq_len, config.hidden_size)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.head = nn.Linear(config.hidden_size, VOCAB_SIZE, bias=False)
        self.causal_mask: torch.Tensor
        mask = torch.triu(torch.ones(config.seq_len, config.seq_len, dtype=torch.bool), 1)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        mask = self.causal_mask[:length, :length]
        for block in self.blocks:
            x = block(x, mask)
        logits = self.head(self.norm(x))
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Square fp32 matmuls timed for the CPU peak: 2048 saturates the cores where 768 did not
# (one 2-core machine: 36-42 GFLOP/s at 768, 68 at 2048); the best single product counts.
PEAK_SIZES = (1024, 2048)
PEAK_BUDGET_SECONDS = 1.5


def measure_peak_flops(
    device: torch.device,
    *,
    sizes: tuple[int, ...] = PEAK_SIZES,
    budget_seconds: float = PEAK_BUDGET_SECONDS,
    min_trials: int = 3,
) -> float:
    """Dense fp32 matmul FLOP/s this device reaches: the best single product over a few
    sizes within a time budget (at least `min_trials` each, after one warm-up), so a busy
    machine lowers it less. The MFU denominator on a CPU, which has no datasheet entry."""
    best = 0.0
    per_size = budget_seconds / len(sizes)
    for size in sizes:
        a = torch.randn(size, size, device=device)
        b = torch.randn(size, size, device=device)
        a @ b  # warm-up: thread pool, allocator, kernel selection
        deadline = time.perf_counter() + per_size
        trials = 0
        while trials < min_trials or time.perf_counter() < deadline:
            start = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = max(best, 2.0 * size**3 / (time.perf_counter() - start))
            trials += 1
    return best


def measure_peak_flops_isolated(device: torch.device) -> float:
    """`measure_peak_flops` in a child process on a CPU: big matmuls in the training process
    were seen to slow the next ~100 steps of the small model up to 10x (thread-pool / allocator
    state); a child leaves the trainer's process untouched. Costs a torch import (~2 s)."""
    if device.type != "cpu":
        return measure_peak_flops(device)
    root = Path(__file__).resolve().parents[2]
    code = (
        "import torch; from otel_train.cli.tiny_gpt import measure_peak_flops; "
        "print(measure_peak_flops(torch.device('cpu')))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def demo_peak_flops(device: torch.device) -> tuple[float, str]:
    """The MFU denominator of the demo and where it came from. A GPU: its datasheet fp32
    (or TF32, when torch lets matmuls use it) peak, the honest denominator; measured only
    when the table lacks the chip. A CPU: measured, as it has no datasheet entry."""
    if device.type == "cuda":
        from otel_train.peak_table import lookup_peak_flops

        name = torch.cuda.get_device_name(device)
        dtype = "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
        value = lookup_peak_flops(name, dtype)
        if value is not None:
            return value, f"{name} datasheet {dtype} peak"
    return measure_peak_flops_isolated(device), "measured fp32 matmul peak"


class BatchSampler:
    """Random windows of the corpus: (inputs, next-byte targets). Held-out tail for eval."""

    def __init__(self, corpus: bytes, config: TinyGptConfig, device: torch.device) -> None:
        data = torch.tensor(list(corpus), dtype=torch.long)
        split = int(len(data) * 0.9)
        self.train_data, self.eval_data = data[:split], data[split:]
        self.config = config
        self.device = device
        self.generator = torch.Generator().manual_seed(0)

    def batch(self, *, evaluation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.eval_data if evaluation else self.train_data
        length = self.config.seq_len
        starts = torch.randint(
            0, len(data) - length - 1, (self.config.batch_size,), generator=self.generator
        )
        window = torch.stack([data[s : s + length + 1] for s in starts.tolist()])
        window = window.to(self.device, non_blocking=True)
        return window[:, :-1], window[:, 1:]

    @property
    def tokens_per_batch(self) -> int:
        return self.config.batch_size * self.config.seq_len


def build(
    config: TinyGptConfig, device: torch.device, *, seed: int = 0, lr: float = 3e-3
) -> tuple[TinyGpt, torch.optim.Optimizer, BatchSampler]:
    torch.manual_seed(seed)
    model = TinyGpt(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return model, optimizer, BatchSampler(load_corpus(), config, device)


def train_step(
    model: TinyGpt, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns (loss, grad_norm) as tensors, never synchronised here."""
    loss = model(*batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.detach(), grad_norm


@torch.no_grad()
def eval_loss(model: TinyGpt, sampler: BatchSampler, batches: int = 4) -> torch.Tensor:
    model.eval()
    losses: list[Any] = [model(*sampler.batch(evaluation=True)) for _ in range(batches)]
    model.train()
    return torch.stack(losses).mean()

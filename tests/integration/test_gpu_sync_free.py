"""On a GPU, the instrumented loop makes no blocking device sync: run under
`torch.cuda.set_sync_debug_mode("error")`, any `.item()`, `.tolist()` of a CUDA tensor or
blocking copy raises. Sampled steps still export the right values at the right steps.
Skipped without CUDA (benchmarks/gpu_overhead.py is the timing side)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@contextmanager
def syncs_are_errors() -> Any:
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _model() -> tuple[Any, Any, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 1)
    ).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs = torch.randn(32, 64, device="cuda")
    targets = torch.randn(32, 1, device="cuda")
    return model, optimizer, (inputs, targets)


def _train_step(model: Any, optimizer: Any, batch: Any) -> tuple[Any, Any]:
    inputs, targets = batch
    loss = torch.nn.functional.mse_loss(model(inputs), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
    )
    optimizer.step()
    return loss.detach(), grad_norm


def test_the_bare_step_itself_makes_no_sync():
    """Guard: a failure of the next test is otel-train's, not the training step's."""
    model, optimizer, batch = _model()
    _train_step(model, optimizer, batch)
    with syncs_are_errors():
        for _ in range(5):
            _train_step(model, optimizer, batch)
    torch.cuda.synchronize()


def test_instrumented_loop_with_every_exporter_makes_no_blocking_sync(tmp_path, monkeypatch):
    import otel_train
    from otel_train.testing import CapturingExporter

    monkeypatch.setenv("OTEL_TRAIN_PROMETHEUS_PORT", "0")
    monkeypatch.setenv("WANDB_MODE", "offline")
    capture = CapturingExporter()
    model, optimizer, batch = _model()
    groups = torch.tensor([0, 1] * 16, device="cuda")
    losses: list[Any] = []
    with otel_train.setup(
        run="gpu", output_dir=tmp_path, exporters=("jsonl", "prometheus", "wandb", capture),
        intervals={"train": 10, "perf": 20, "gpu": 50},
    ) as tel:  # fmt: skip
        margin = tel.meter.create_histogram("train.margin")
        chosen = tel.meter.create_counter("train.chosen_tokens")
        _train_step(model, optimizer, batch)  # CUDA context, kernels, allocator: warmed up
        with syncs_are_errors():
            for step in range(1, 61):
                loss, grad_norm = _train_step(model, optimizer, batch)
                losses.append(loss)
                tel.training.record(loss=loss, grad_norm=grad_norm, tokens=32, samples=32,
                                    learning_rate=0.01)  # fmt: skip
                margin.record(loss * 2)
                chosen.add(grad_norm)
                tel.record_by_group("train.sample_loss", loss.expand(32), groups, ["a", "b"])
                tel.step(step)
            tel.evaluate(loss=losses[-1])  # an event: its values are waited for, not synced
            tel.flush()
    host = [float(v) for v in torch.stack(losses).tolist()]
    assert capture.steps_with("train/loss") == [10, 20, 30, 40, 50, 60]
    for index, value in enumerate(capture.values_of("train/loss")):
        expected = sum(host[index * 10 : index * 10 + 10]) / 10
        assert value == pytest.approx(expected, rel=1e-6)
    assert capture.values_of("train/num_input_tokens_seen")[-1] == 60 * 32
    assert capture.steps_with("eval/loss") == [60]
    assert capture.values_of("train/sample_loss/dataset_a")[-1] == pytest.approx(
        sum(host[50:60]) / 10, rel=1e-6
    )

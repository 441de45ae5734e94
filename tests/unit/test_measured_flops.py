"""measure_flops=True: torch's FLOP counter runs around the first training step only, and its
count (forward + backward of every micro-batch) is exported as perf/actual_flops."""

from __future__ import annotations

import pytest

from otel_train import OtelTrainError
from otel_train.testing import CapturingExporter

torch = pytest.importorskip("torch")

BATCH, ACCUMULATION = 8, 2


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _train(tel, model, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, steps + 1):
        for _ in range(ACCUMULATION):
            x = torch.randn(BATCH, 16)
            loss = model(x).pow(2).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tel.training.record(loss=loss.detach(), samples=BATCH * ACCUMULATION)
        tel.step(step)
    tel.flush()


# Matmul FLOPs of one micro-batch, 2*m*n*k each: forward of both layers; backward: the second
# layer's input and weight gradients, the first layer's weight gradient (its input needs none).
MICRO_BATCH_FLOPS = 2 * BATCH * (16 * 32 + 32 * 4 + 32 * 4 * 2 + 16 * 32)
STEP_FLOPS = MICRO_BATCH_FLOPS * ACCUMULATION


def test_first_step_is_measured_once_and_exported_as_actual_flops(telemetry_factory):
    capture = CapturingExporter()
    model = _model()
    tel = telemetry_factory(
        exporters=[capture], intervals={"train": 10, "perf": 10}, model=model, measure_flops=True
    )
    assert len(model._forward_pre_hooks) == 1
    _train(tel, model, 30)
    assert capture.values_of("perf/actual_flops") == [STEP_FLOPS] * 3
    assert len(model._forward_pre_hooks) == 0  # measured: the hook is gone, no cost after
    # No FLOP counter left active on the dispatch stack.
    assert torch._C._len_torch_dispatch_stack() == 0


def test_remeasure_every_n_steps_keeps_the_hook(telemetry_factory):
    capture = CapturingExporter()
    model = _model()
    tel = telemetry_factory(
        exporters=[capture], intervals={"perf": 10}, model=model, measure_flops=10
    )
    _train(tel, model, 20)
    assert capture.values_of("perf/actual_flops") == [STEP_FLOPS] * 2
    assert len(model._forward_pre_hooks) == 1


def test_measure_flops_without_a_model_is_rejected(telemetry_factory):
    with pytest.raises(OtelTrainError, match="model="):
        telemetry_factory(measure_flops=True)

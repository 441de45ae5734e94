"""A real `accelerate.Accelerator(cpu=True)` loop logging through OtelTrainTracker:
`init_trackers(config=)` reaches setup() (secrets redacted), `accelerator.log(..., step=)`
lands at its step, eval keys become an evaluation, `end_training()` flushes."""

from __future__ import annotations

import functools
import json

import pytest

torch = pytest.importorskip("torch")
accelerate = pytest.importorskip("accelerate")

import otel_train  # noqa: E402
from otel_train.integrations.accelerate import OtelTrainTracker  # noqa: E402

pytestmark = pytest.mark.integration

STEPS, INTERVAL, EVAL_EVERY = 6, 2, 3


def test_accelerate_log_lands_in_otel_train_at_its_step(tmp_path):
    tracker = OtelTrainTracker(
        functools.partial(
            otel_train.setup,
            run="accelerate",
            stage="sft",
            output_dir=tmp_path,
            exporters=["jsonl"],
            intervals={"train": INTERVAL, "perf": INTERVAL},
            gpu_metrics=False,
        )
    )
    accelerator = accelerate.Accelerator(cpu=True, log_with=[tracker])
    accelerator.init_trackers("otel", config={"lr": 0.05, "wandb_api_key": "hunter2"})
    assert tracker.telemetry.context.config == {"lr": 0.05, "wandb_api_key": "***REDACTED***"}

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(32, 4)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    logged: dict[int, dict[str, float]] = {}
    for step, (inputs, targets) in enumerate(loader, start=1):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        logged[step] = {"train_loss": loss.item(), "lr": 0.05, "residual": 1.0 / step}
        accelerator.log(logged[step], step=step)
        if step % EVAL_EVERY == 0:
            accelerator.log({"eval_loss": 0.5 / step, "eval_accuracy": step / 10}, step=step)
        if step == STEPS:
            break
    accelerator.end_training()

    rows = [json.loads(line) for line in (tmp_path / "accelerate" / "rank0.jsonl").open()]
    train = {r["step"]: r["metrics"] for r in rows if "train/loss" in r["metrics"]}
    assert sorted(train) == [2, 4, 6]
    for step, metrics in train.items():
        losses = [logged[s]["train_loss"] for s in range(step - INTERVAL + 1, step + 1)]
        assert metrics["train/loss"] == pytest.approx(sum(losses) / INTERVAL)  # interval mean
        assert metrics["train/learning_rate"] == 0.05
        assert metrics["train/residual"] == pytest.approx(1.0 / step)  # last value of the step
    evals = {r["step"]: r["metrics"] for r in rows if "eval/loss" in r["metrics"]}
    assert sorted(evals) == [3, 6]
    assert evals[3]["eval/loss"] == pytest.approx(0.5 / 3)
    assert evals[6]["eval/accuracy"] == pytest.approx(0.6)
    assert "eval/perplexity" in evals[3]  # an SFT loss is a token cross-entropy
    assert any("final/total_steps" in r["metrics"] for r in rows)  # shut down by end_training


def test_several_log_calls_of_one_step_all_land_at_that_step(tmp_path, caplog):
    import logging

    tel = otel_train.setup(
        run="accelerate-calls",
        output_dir=tmp_path,
        exporters=["jsonl"],
        intervals={"train": INTERVAL},
        gpu_metrics=False,
    )
    tracker = OtelTrainTracker(telemetry=tel)  # set up by the caller: its life is the caller's
    accelerator = accelerate.Accelerator(cpu=True, log_with=[tracker])
    accelerator.init_trackers("otel")
    for step in range(1, 5):
        accelerator.log({"loss": torch.tensor(float(step))}, step=step)  # a tensor: staged
        accelerator.log({"grad_norm": 10.0 * step, "accuracy": step / 10}, step=step)
    with caplog.at_level(logging.WARNING, logger="otel_train.integrations.accelerate"):
        accelerator.log({"late": 1.0})  # no step: warned, exported with the next step
        accelerator.log({"late": 2.0})
    accelerator.end_training()
    assert [r for r in caplog.records if "without step=" in r.getMessage()] != []
    assert len([r for r in caplog.records if "without step=" in r.getMessage()]) == 1
    tel.shutdown()
    rows = [json.loads(line) for line in (tmp_path / "accelerate-calls" / "rank0.jsonl").open()]
    train = {r["step"]: r["metrics"] for r in rows if "train/loss" in r["metrics"]}
    assert sorted(train) == [2, 4]
    assert train[2]["train/loss"] == 1.5 and train[4]["train/loss"] == 3.5
    assert train[2]["train/grad_norm"] == 15.0  # the second call's values: same step
    assert train[4]["train/accuracy"] == pytest.approx(0.4)
    tail = [r["metrics"]["train/late"] for r in rows if "train/late" in r["metrics"]]
    assert tail == [2.0]  # recorded after step 4: exported at shutdown

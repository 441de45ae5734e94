"""DeepSpeedRecorder fed by a real `deepspeed.initialize` engine (single process, gloo, CPU),
and from a DeepSpeed config alone when no engine exists."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from otel_train import OtelTrainError
from otel_train.integrations.deepspeed import DeepSpeedRecorder
from otel_train.testing import CapturingExporter

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("deepspeed_worker.py")

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
    "optimizer": {"type": "Adam", "params": {"lr": 0.001, "torch_adam": True}},
    "zero_optimization": {"stage": 1},
    "gradient_clipping": 1.0,
    "steps_per_print": 1000,
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.integration
def test_real_deepspeed_engine_feeds_lr_grad_norm_loss_scale_and_skipped_steps(tmp_path):
    pytest.importorskip(
        "deepspeed", reason="deepspeed did not install (DS_BUILD_OPS=0 pip install deepspeed)"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    done = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), json.dumps(DS_CONFIG)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    micro_losses = {int(step): losses for step, losses in summary.pop("micro_losses").items()}
    assert summary == {"global_steps": 6, "batch": 4}
    assert [len(micro_losses[s]) for s in range(1, 7)] == [2] * 6  # gradient_accumulation_steps
    rows = [
        json.loads(line)
        for line in (tmp_path / "deepspeed" / "rank0.jsonl").read_text().splitlines()
    ]
    train_rows = [row for row in rows if "train/loss" in row["metrics"]]
    assert [row["step"] for row in train_rows] == [2, 4, 6]
    last = train_rows[-1]["metrics"]
    assert last["train/learning_rate"] == pytest.approx(0.001)
    assert last["train/grad_norm"] > 0  # DeepSpeed's cached global norm, staged without a sync
    assert last["train/loss_scale"] == 1.0  # fp32 ZeRO: the optimizer's scale is 1
    assert last["train/skipped_steps"] == 0
    assert last["train/samples"] == 6 * 4  # micro batch x accumulation per optimizer step
    # The loss of a step is the mean over its micro-batches (summed on the device); a
    # sampled step exports the mean of the interval's steps, and their max.
    step_means = {s: sum(losses) / len(losses) for s, losses in micro_losses.items()}
    for row in train_rows:
        step = row["step"]
        interval = [step_means[step - 1], step_means[step]]
        assert row["metrics"]["train/loss"] == pytest.approx(sum(interval) / 2, rel=1e-6)
        assert row["metrics"]["train/loss_max"] == pytest.approx(max(interval), rel=1e-6)


def test_recorder_works_from_a_deepspeed_config_alone(telemetry_factory):
    capture = CapturingExporter()
    tel = telemetry_factory(exporters=[capture], intervals={"train": 2})
    config = {"train_batch_size": 32, "gradient_accumulation_steps": 4}
    recorder = DeepSpeedRecorder(tel, deepspeed_config=config, world_size=2)
    assert (recorder.effective_batch_size, recorder.micro_batch_size) == (32, 4)
    accumulation = recorder.gradient_accumulation_steps
    for micro in range(1, 4 * accumulation + 1):
        # step= counts finished optimizer steps, as engine.global_steps would.
        recorder.after_step(loss=float(micro), step=micro // accumulation)
    tel.flush()
    assert capture.steps_with("train/loss") == [2, 4]
    # Step 1 = micro-batches 1..4 (mean 2.5), step 2 = 5..8 (6.5): exported at 2 as their
    # mean, with the larger step mean as the max; not the last micro-batch's loss (8).
    assert capture.values_of("train/loss") == [4.5, 12.5]
    assert capture.values_of("train/loss_max") == [6.5, 14.5]
    assert capture.values_of("train/samples") == [2 * 16, 4 * 16]  # this rank: 4 x 4 per step
    assert "train/loss_scale" not in capture.rows[-1].values  # no engine, no scale to read
    with pytest.raises(OtelTrainError, match="step="):
        recorder.after_step(loss=0.5)


def test_recorder_sums_tensor_losses_on_the_device_without_a_sync(telemetry_factory):
    pytest.importorskip("torch")
    from tests.counting_tensor import CountingTensor, counting, on_this_thread

    capture = CapturingExporter()
    tel = telemetry_factory(exporters=[capture], intervals={"train": 4, "perf": 4})
    recorder = DeepSpeedRecorder(
        tel,
        deepspeed_config={"train_batch_size": 8, "gradient_accumulation_steps": 2},
        world_size=1,
    )
    CountingTensor.materialisations = 0
    per_micro = []
    for micro in range(1, 9):  # 4 optimizer steps of 2 micro-batches; sampled at step 4
        before = on_this_thread()
        recorder.after_step(loss=counting(float(micro)), step=micro // 2)
        per_micro.append(on_this_thread() - before)
    assert per_micro == [0] * 8  # the training thread never reads a loss back
    tel.flush()
    assert CountingTensor.materialisations == 1  # one transfer for the sampled step 4
    # Steps 1-4 are micro-batches (1, 2), (3, 4), (5, 6), (7, 8): step means 1.5 ... 7.5.
    assert capture.values_of("train/loss") == [pytest.approx((1.5 + 3.5 + 5.5 + 7.5) / 4)]
    assert capture.values_of("train/loss_max") == [pytest.approx(7.5)]

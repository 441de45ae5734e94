"""A real `lightning.Trainer` run (CPU, accumulate_grad_batches=2, validation) with
OtelTrainCallback and its logger: the exported loss is the true mean of the undivided
micro-batch losses, grad norm and learning rate are the optimizer's, `self.log` values
arrive at the step they were logged at (compared with Lightning's own CSVLogger)."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")

import otel_train  # noqa: E402
from otel_train.integrations.lightning import OtelTrainCallback  # noqa: E402

pytestmark = pytest.mark.integration

ACCUMULATION, MICRO_BATCH, N_TRAIN, N_VAL, MAX_STEPS, INTERVAL = 2, 4, 32, 12, 8, 2
STEPS_PER_EPOCH = N_TRAIN // MICRO_BATCH // ACCUMULATION  # 4


class Regression(L.LightningModule):
    """Records what it computes (with .item(): test code) so the test knows the truth."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)
        self.train_losses: list[float] = []
        self.val_losses: list[tuple[float, int]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.train_losses.append(loss.item())
        self.log("train_mae", (self.layer(x) - y).abs().mean())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if not self.trainer.sanity_checking:
            self.val_losses.append((loss.item(), len(x)))
        self.log("val_mae", (self.layer(x) - y).abs().mean())
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9),
                "interval": "step",
            },
        }


class GroundTruth(L.Callback):
    """The grad norm and learning rate each optimizer step used, read with syncs (test only)."""

    def __init__(self) -> None:
        self.grad_norms: list[float] = []
        self.learning_rates: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.detach().flatten() for p in pl_module.parameters()]
        self.grad_norms.append(torch.linalg.vector_norm(torch.cat(grads)).item())
        self.learning_rates.append(optimizer.param_groups[0]["lr"])


def _loader(n: int, seed: int, shuffle: bool) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=generator)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=MICRO_BATCH, shuffle=shuffle
    )


def _interval_means(per_step: list[float]) -> dict[int, float]:
    """Exported at step s: the mean of every value of the steps (s - INTERVAL, s]."""
    return {
        step: sum(per_step[step - INTERVAL : step]) / INTERVAL
        for step in range(INTERVAL, MAX_STEPS + 1, INTERVAL)
    }


def _csv_metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_lightning_callback_and_logger_export_true_means_and_logged_values(tmp_path):
    callback = OtelTrainCallback(
        functools.partial(
            otel_train.setup,
            run="lightning",
            stage="regression",  # an MSE loss: no perplexity
            output_dir=tmp_path / "runs",
            exporters=["jsonl"],
            intervals={"train": INTERVAL, "perf": INTERVAL},
            gpu_metrics=False,
        )
    )
    truth = GroundTruth()
    csv_logger = L.loggers.CSVLogger(tmp_path / "csv", name="", version="")
    model = Regression()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=MAX_STEPS,
        accumulate_grad_batches=ACCUMULATION,
        log_every_n_steps=INTERVAL,
        num_sanity_val_steps=1,
        callbacks=[callback, truth],
        logger=[callback.logger, csv_logger],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, _loader(N_TRAIN, 1, True), _loader(N_VAL, 2, False))
    assert callback.telemetry is None  # set up in the setup hook, shut down at teardown

    rows = [json.loads(line) for line in (tmp_path / "runs" / "lightning" / "rank0.jsonl").open()]
    train = {r["step"]: r["metrics"] for r in rows if "train/loss" in r["metrics"]}
    assert sorted(train) == [2, 4, 6, 8]

    # Loss: the mean over every micro-batch of the interval, undivided by accumulation.
    assert len(model.train_losses) == MAX_STEPS * ACCUMULATION
    per_step = [
        sum(model.train_losses[i : i + ACCUMULATION]) / ACCUMULATION
        for i in range(0, len(model.train_losses), ACCUMULATION)
    ]
    for step, mean in _interval_means(per_step).items():
        assert train[step]["train/loss"] == pytest.approx(mean, rel=1e-6)
        first = (step - INTERVAL) * ACCUMULATION
        assert train[step]["train/loss_max"] == pytest.approx(
            max(model.train_losses[first : step * ACCUMULATION]), rel=1e-6
        )
    # Grad norm (before clipping, a device tensor staged per step): the interval mean.
    for step, mean in _interval_means(truth.grad_norms).items():
        assert train[step]["train/grad_norm"] == pytest.approx(mean, rel=1e-5)
        # The learning rate the optimizer applied at that step (the scheduler decays it).
        assert train[step]["train/learning_rate"] == pytest.approx(truth.learning_rates[step - 1])
    # Samples and tokens-free batches: samples counted, cumulative.
    assert train[8]["train/samples"] == MAX_STEPS * ACCUMULATION * MICRO_BATCH
    assert train[2]["train/epoch"] == pytest.approx(2 / STEPS_PER_EPOCH)

    # self.log values: the CSVLogger Lightning wrote saw the same values at the same steps.
    logged = [r for r in _csv_metrics(tmp_path / "csv") if r.get("train_mae")]
    assert [float(r["train_mae"]) for r in logged] == pytest.approx(
        [train[s]["train/mae"] for s in sorted(train)]
    )

    # Validation (at each epoch end, steps 4 and 8; the sanity check is not exported):
    evals = {r["step"]: r["metrics"] for r in rows if "eval/loss" in r["metrics"]}
    assert sorted(evals) == [4, 8]
    per_eval = len(model.val_losses) // 2
    for index, step in enumerate((4, 8)):
        batch = model.val_losses[index * per_eval : (index + 1) * per_eval]
        weighted = sum(loss * n for loss, n in batch) / sum(n for _, n in batch)
        assert evals[step]["eval/loss"] == pytest.approx(weighted, rel=1e-6)
    val_csv = [float(r["val_mae"]) for r in _csv_metrics(tmp_path / "csv") if r.get("val_mae")]
    assert [evals[s]["eval/mae"] for s in (4, 8)] == pytest.approx(val_csv)
    epochs = [r["metrics"]["epoch/number"] for r in rows if "epoch/number" in r["metrics"]]
    assert epochs == [1.0, 2.0]
    assert not [k for r in rows for k in r["metrics"] if "perplexity" in k]


def test_lightning_callback_without_factory_args_uses_module_hparams_as_config(tmp_path):
    seen: dict = {}

    def factory(**options):
        seen.update(options)
        return otel_train.setup(
            run="hparams", output_dir=tmp_path, exporters=["jsonl"], gpu_metrics=False, **options
        )

    callback = OtelTrainCallback(factory)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        callbacks=[callback],
        logger=callback.logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression(lr=0.01), _loader(16, 1, False))
    assert seen == {"config": {"lr": 0.01}}


class LoggedValidation(Regression):
    """A validation_step that returns nothing: the eval loss comes from self.log."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))


def test_lightning_val_loss_logged_with_self_log_is_the_eval_loss(tmp_path):
    callback = OtelTrainCallback(
        functools.partial(
            otel_train.setup,
            run="logged-val",
            stage="regression",
            output_dir=tmp_path / "runs",
            exporters=["jsonl"],
            gpu_metrics=False,
        )
    )
    csv_logger = L.loggers.CSVLogger(tmp_path / "csv", name="", version="")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=STEPS_PER_EPOCH,
        accumulate_grad_batches=ACCUMULATION,
        num_sanity_val_steps=0,
        callbacks=[callback],
        logger=[callback.logger, csv_logger],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LoggedValidation(), _loader(N_TRAIN, 1, True), _loader(N_VAL, 2, False))
    rows = [json.loads(line) for line in (tmp_path / "runs" / "logged-val" / "rank0.jsonl").open()]
    exported = [r["metrics"]["eval/loss"] for r in rows if "eval/loss" in r["metrics"]]
    logged = [float(r["val_loss"]) for r in _csv_metrics(tmp_path / "csv") if r.get("val_loss")]
    assert exported == pytest.approx(logged) and len(exported) == 1


def test_lightning_ddp_each_rank_sets_up_its_own_telemetry(tmp_path):
    """Lightning's DDP launcher starts rank 1 as a new process: both ranks export, each
    under its own rank, with the world size of the job."""
    import os
    import subprocess
    import sys

    worker = Path(__file__).with_name("lightning_ddp_worker.py")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "MASTER_ADDR": "127.0.0.1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, str(worker), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        rows = [json.loads(line) for line in (tmp_path / "ddp" / f"rank{rank}.jsonl").open()]
        train = [r for r in rows if "train/loss" in r["metrics"]]
        assert [r["step"] for r in train] == [2, 4]
        assert {r["rank"] for r in rows} == {rank}
        assert all("train/rank_loss" in r["metrics"] for r in train)

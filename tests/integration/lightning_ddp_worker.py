"""Two-process Lightning DDP (CPU, gloo) with OtelTrainCallback: each rank sets up its own
telemetry in the callback's setup hook. Usage: python lightning_ddp_worker.py OUTPUT_DIR.
Lightning re-runs this script for local rank 1 (its subprocess launcher)."""

from __future__ import annotations

import functools
import sys

import lightning.pytorch as L
import torch

import otel_train
from otel_train.integrations.lightning import OtelTrainCallback


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("rank_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> int:
    output_dir = sys.argv[1]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=generator)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    callback = OtelTrainCallback(
        functools.partial(
            otel_train.setup,
            run="ddp",
            output_dir=output_dir,
            exporters=["jsonl"],
            intervals={"train": 2},
            gpu_metrics=False,
        )
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        accumulate_grad_batches=2,
        log_every_n_steps=2,
        callbacks=[callback],
        logger=callback.logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    return 0


if __name__ == "__main__":
    sys.exit(main())

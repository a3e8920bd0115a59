"""An ordinary ``LightningCLI(Model, DataModule)`` script, as users write them (run with ``fit ...``).

Tests run it as the launcher does (the contract variables set, no lightning_grid import here).
``EDGES_KILL_AT_STEP=N`` sends this process a real SIGTERM at the start of train step N, once per
``EDGES_KILL_MARKER`` file. At the end it writes the weights to ``EDGES_OUT`` when set.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Model(pl.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.body(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        print(f"STEP {self.trainer.global_step}", flush=True)
        at, marker = os.environ.get("EDGES_KILL_AT_STEP"), os.environ.get("EDGES_KILL_MARKER", "")
        if at is not None and self.trainer.global_step == int(at) and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)


class DataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(96, 8, generator=g)
        y = (x[:, 0] > 0).long()
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=True)


def main() -> None:
    cli = LightningCLI(Model, DataModule, seed_everything_default=1234)
    out = os.environ.get("EDGES_OUT")
    if out:
        torch.save({k: v.detach().clone() for k, v in cli.model.state_dict().items()}, out)
    print("SCRIPT DONE", flush=True)


if __name__ == "__main__":
    main()

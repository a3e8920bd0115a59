"""A tiny Lightning DDP script for multi-node tests under torchrun (gloo on CPU).

Its node count and devices come from torchrun's environment, as a script written for a varying
number of machines does. Every rank appends the sample ids it trains on to
``<ids>/rank<R>-attempt<A>.jsonl``, so tests can count each sample of an epoch; rank 0 writes the
final weights to ``--out``. Random augmentation, dropout and a shuffled DistributedSampler make
"bit-identical" mean something.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_grid import Resumable


class Numbers(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.x[i] + 0.01 * torch.randn(8), self.y[i], i  # augmentation: the worker's RNG


class Model(L.LightningModule):
    def __init__(self, ids_dir: str | None, slow_save: float, sigterm_at: str | None = None) -> None:
        super().__init__()
        self.sigterm_at = tuple(int(v) for v in sigterm_at.split(":")) if sigterm_at else None
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
        self.ids_dir = ids_dir
        self.slow_save = slow_save
        self._ids = None

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y, idx = batch
        if self.ids_dir:
            if self._ids is None:
                name = f"rank{self.global_rank}-attempt{os.environ.get('LIGHTNING_GRID_ATTEMPT', '0')}.jsonl"
                self._ids = open(os.path.join(self.ids_dir, name), "a")  # noqa: SIM115
            row = {"epoch": self.current_epoch, "step": self.global_step, "ids": idx.tolist()}
            self._ids.write(json.dumps(row) + "\n")
            self._ids.flush()
        if (
            self.sigterm_at == (self.global_step, self.global_rank)
            and os.environ.get("LIGHTNING_GRID_ATTEMPT", "1") == "1"
        ):
            os.kill(os.getpid(), signal.SIGTERM)
        if os.environ.get("NODES_TRAIN_STEP_S"):
            time.sleep(float(os.environ["NODES_TRAIN_STEP_S"]))
        return nn.functional.cross_entropy(self.net(x), y)

    def on_save_checkpoint(self, checkpoint):  # noqa: ANN001, ANN201
        # A save slower than torchrun's own 30 s shutdown timeout (first attempt only).
        if self.slow_save and os.environ.get("LIGHTNING_GRID_ATTEMPT") == "1":
            print(f"rank {self.global_rank}: a slow save ({self.slow_save:g}s)", flush=True)
            time.sleep(self.slow_save)

    def configure_optimizers(self):  # noqa: ANN201
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--ids", default=None)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--every-n-steps", type=int, default=None)
    p.add_argument("--slow-save", type=float, default=0.0)
    p.add_argument("--accelerator", default="cpu", help="gpu: NCCL across the node's GPUs")
    p.add_argument(
        "--sigterm-at", default=None, help="STEP:RANK: that rank sends itself SIGTERM at that step"
    )
    p.add_argument(
        "--rank-notice", default=None, help="RANK:PATH: that rank alone reads a shutdown plan file"
    )
    args = p.parse_args()
    if args.rank_notice:  # as on a multi-machine job, where only the noticed machine has a plan
        rank, path = args.rank_notice.split(":", 1)
        if os.environ.get("RANK", "0") == rank:
            os.environ["LIGHTNING_GRID_NOTICE"] = path
    L.seed_everything(7, workers=True)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = L.Trainer(
        accelerator=args.accelerator,
        strategy="ddp" if world > 1 else "auto",
        devices=local,
        num_nodes=world // local,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Resumable(dirpath=args.ckpt_dir, every_n_train_steps=args.every_n_steps)],
    )
    loader = DataLoader(
        Numbers(args.samples),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    model = Model(args.ids, args.slow_save, args.sigterm_at)
    trainer.fit(model, loader)
    if trainer.is_global_zero:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out)
        print(f"done at step {trainer.global_step}", flush=True)


if __name__ == "__main__":
    main()

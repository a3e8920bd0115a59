"""DDP on CPU under torchrun, recording which samples every rank trains on: for re-sharding tests.

Launched as ``python -m torch.distributed.run --standalone --nproc-per-node W ddp_ids.py ...``. The
dataset returns ``(x, y, index)``; every training step appends its batch's indices, with the epoch,
global step and batch index, to ``<root>/ids-rank{r}-attempt{a}.jsonl`` (flushed). With
``--kill-step S`` the rank ``--kill-rank`` sends itself SIGTERM during the step taken at global step
S: Resumable cuts a checkpoint after it and the script exits 0. Rank 0 writes ``<root>/done.json``
when fit returns.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from lightning_grid import Resumable


class Indexed(Dataset):
    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return x, y, i


class Net(pl.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self._out = None

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        if self._out is None:
            path = os.path.join(
                self.args.root, f"ids-rank{self.global_rank}-attempt{self.args.attempt}.jsonl"
            )
            self._out = open(path, "a")  # noqa: SIM115 (open for the whole run, flushed per line)
        record = {
            "epoch": self.current_epoch,
            "step": self.global_step,
            "batch_idx": batch_idx,
            "ids": idx.tolist(),
        }
        self._out.write(json.dumps(record) + "\n")
        self._out.flush()
        if self.global_step == self.args.kill_step and self.global_rank == self.args.kill_rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return F.cross_entropy(self.body(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--attempt", type=int, required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--kill-step", type=int, default=-1)
    p.add_argument("--kill-rank", type=int, default=0)
    p.add_argument(
        "--no-distributed-sampler", action="store_true", help="Trainer(use_distributed_sampler=False)"
    )
    args = p.parse_args()

    pl.seed_everything(args.seed, verbose=False)  # also the DistributedSampler's seed (PL_GLOBAL_SEED)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    data = Indexed(datasets.MNIST(args.data_dir, train=True, download=False, transform=tf))
    local = int(os.environ["LOCAL_WORLD_SIZE"])
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=local,
        num_nodes=int(os.environ["WORLD_SIZE"]) // local,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Resumable(dirpath=os.path.join(args.root, "ckpt"))],
        use_distributed_sampler=not args.no_distributed_sampler,
    )
    trainer.fit(Net(args), DataLoader(data, batch_size=args.batch_size, shuffle=True))
    if trainer.is_global_zero:
        with open(os.path.join(args.root, "done.json"), "w") as handle:
            json.dump({"global_step": trainer.global_step, "epoch": trainer.current_epoch}, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())

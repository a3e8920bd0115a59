"""A configurable Lightning training script for the tests: an ordinary user script, run as a subprocess.

``--mode plain`` never imports lightning_grid (the reference); ``--mode callback`` adds
``Resumable``; ``--mode trainer`` uses ``lightning_grid.Trainer``; ``--mode env`` relies on the
callbacks-factory entry point only (as under the launcher). Interruptions are real signals the
script sends itself at precise points (``--kill``), the simplest honest way to hit a chosen step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, random_split
from torchvision import datasets, transforms


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["plain", "callback", "trainer", "env"], default="callback")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--persistent", action="store_true")
    p.add_argument("--loader", choices=["plain", "generator", "stateful"], default="plain")
    p.add_argument("--datamodule", action="store_true")
    p.add_argument(
        "--aug", action="store_true", help="random augmentation in __getitem__ (torch, random, numpy)"
    )
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--sched", choices=["none", "step", "epoch"], default="none")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--manual", action="store_true", help="manual optimization with two optimizers")
    p.add_argument("--val-check-interval", type=float, default=1.0)
    p.add_argument("--logger", choices=["csv", "tb", "none"], default="csv")
    p.add_argument("--logger-version", default=None)
    p.add_argument("--every-n-steps", type=int, default=None)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--signals", default="SIGTERM")
    p.add_argument("--kill", action="append", default=[], help="WHEN:ARG[:SIG], see KillAt")
    p.add_argument(
        "--step-sleep", type=float, default=0.0, help="seconds per training step (for timing tests)"
    )
    p.add_argument("--reload", type=int, default=0, help="reload_dataloaders_every_n_epochs")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--kill-rank", type=int, default=0, help="the rank that sends itself the --kill signals")
    p.add_argument(
        "--kill-settle",
        action="store_true",
        help="before a SIGKILL, let the checkpoint writes already started finish, so which checkpoints "
        "exist at the kill does not depend on the machine's load (a kill in the middle of a write is "
        "tested on its own)",
    )
    p.add_argument(
        "--slow-save",
        type=float,
        default=0.0,
        help="seconds a callback spends in on_save_checkpoint (a slow state gather, e.g. a big model)",
    )
    p.add_argument("--announce", action="store_true", help="print STEP <global_step> at every batch start")
    p.add_argument("--wide", type=int, default=32, help="hidden width (a bigger model, a bigger checkpoint)")
    return p.parse_args()


class Augmented(Dataset):
    """Random augmentation drawing from all three global RNGs, as real pipelines do."""

    def __init__(self, base: Dataset, aug: bool) -> None:
        self.base = base
        self.aug = aug

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.base[i]
        if self.aug:
            x = x + 0.1 * torch.randn_like(x)
            if random.random() < 0.5:
                x = torch.flip(x, dims=[-1])
            x = x * float(np.random.uniform(0.8, 1.2))
        return x, y


def mnist(args: argparse.Namespace, train: bool) -> Dataset:
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    return datasets.MNIST(args.data_dir, train=train, download=False, transform=tf)


def make_loader(args: argparse.Namespace, dataset: Dataset, shuffle: bool) -> DataLoader:
    kwargs = dict(
        batch_size=args.batch_size,
        num_workers=args.workers,
        persistent_workers=args.persistent and args.workers > 0,
    )
    if args.loader == "stateful" and shuffle:
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(dataset, shuffle=shuffle, **kwargs)
    if args.loader == "generator" and shuffle:
        return DataLoader(dataset, shuffle=shuffle, generator=torch.Generator().manual_seed(7), **kwargs)
    return DataLoader(dataset, shuffle=shuffle, **kwargs)


class DataModule(pl.LightningDataModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args

    def setup(self, stage: str) -> None:
        full = mnist(self.args, train=True)
        n_val = len(full) // 5
        self.train_set, self.val_set = random_split(
            full, [len(full) - n_val, n_val], generator=torch.Generator().manual_seed(0)
        )

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.args, Augmented(self.train_set, self.args.aug), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.args, self.val_set, shuffle=False)


class Net(pl.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, args.wide),
            nn.ReLU(),
            nn.Dropout(args.dropout),
            nn.Linear(args.wide, 10),
        )
        if args.manual:
            self.automatic_optimization = False
            self.critic = nn.Sequential(
                nn.Linear(10, 8), nn.ReLU(), nn.Dropout(args.dropout), nn.Linear(8, 1)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        if self.args.step_sleep:
            import time

            time.sleep(self.args.step_sleep)
        x, y = batch
        if not self.args.manual:
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss
        opt_g, opt_d = self.optimizers()
        logits = self(x)
        loss_g = F.cross_entropy(logits, y) - 0.01 * self.critic(logits.softmax(-1)).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        loss_d = self.critic(logits.detach().softmax(-1)).pow(2).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        if self.args.sched == "step":
            for sch in self.lr_schedulers():
                sch.step()
        self.log("train_loss", loss_g, on_step=True)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.body.parameters(), lr=0.05, momentum=0.9)
        if self.args.manual:
            opt_d = torch.optim.Adam(self.critic.parameters(), lr=1e-3)
            if self.args.sched == "step":
                return [opt, opt_d], [
                    torch.optim.lr_scheduler.StepLR(opt, 3, 0.9),
                    torch.optim.lr_scheduler.StepLR(opt_d, 3, 0.9),
                ]
            return [opt, opt_d]
        if self.args.sched == "none":
            return opt
        sched = torch.optim.lr_scheduler.StepLR(
            opt, step_size=3 if self.args.sched == "step" else 1, gamma=0.9
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.args.sched}}


class Announce(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.is_global_zero:
            print(f"STEP {trainer.global_step}", flush=True)


class SlowSave(pl.Callback):
    """Makes every checkpoint take longer to cut, as gathering a large state does."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        time.sleep(self.seconds)


class KillAt(pl.Callback):
    """Sends this process a real signal at a chosen point. Specs:

    ``train:S``   at the start of the training batch taken when global_step == S
    ``val:S:J``   in the validation run after global step S, at validation batch J
    ``epoch_end:E``  in on_train_epoch_end of epoch E
    ``last:E``    at the start of the last training batch of epoch E
    An optional third/fourth field names the signal (default SIGTERM), e.g. ``train:9:SIGKILL``.
    """

    def __init__(self, specs: list[str], root: str, rank: int = 0, settle: bool = False) -> None:
        self.root = root
        self.rank = rank
        self.settle = settle
        self._writers_seen: list[object] = []  # Resumable's writes in flight (``background.Job``)
        self._released_writers: list[object] = []
        self.specs = [s.split(":") for s in specs]
        self.fired: set[int] = set()

    def _fire(self, index: int, sig: str) -> None:
        # Once per run, across relaunches: a resumed run that passes the same point again goes on.
        marker = os.path.join(self.root, f".killed-{index}")
        if self._trainer.global_rank != self.rank:
            return
        if index in self.fired or os.path.exists(marker):
            return
        self.fired.add(index)
        os.makedirs(self.root, exist_ok=True)
        open(marker, "w").close()
        if self.settle and sig == "SIGKILL":
            for job in self._released_writers:
                job.join(timeout=120)  # type: ignore[attr-defined]
        os.kill(os.getpid(), getattr(signal, sig))

    def _sig(self, spec: list[str], n: int) -> str:
        return spec[n] if len(spec) > n else "SIGTERM"

    def setup(self, trainer, pl_module, stage):
        self._trainer = trainer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # A write in flight at the previous batch start was handed over at an earlier batch end, and
        # Resumable (the last callback) has since let it commit; one handed over at the last batch end
        # may still be waiting for Resumable's next hook, so waiting for it here would never end.
        self._released_writers = self._writers_seen
        callback = sys.modules.get("lightning_grid.resumable.callback")  # not imported in --mode plain
        self._writers_seen = [
            cb._writer
            for cb in trainer.callbacks
            if callback is not None and isinstance(cb, callback.Resumable) and cb._writer is not None
        ]
        for i, spec in enumerate(self.specs):
            if spec[0] == "train" and trainer.global_step == int(spec[1]):
                self._fire(i, self._sig(spec, 2))
            if (
                spec[0] == "last"
                and trainer.current_epoch == int(spec[1])
                and batch_idx == trainer.num_training_batches - 1
            ):
                self._fire(i, self._sig(spec, 2))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            return
        for i, spec in enumerate(self.specs):
            if spec[0] == "val" and trainer.global_step == int(spec[1]) and batch_idx == int(spec[2]):
                self._fire(i, self._sig(spec, 3))

    def on_train_epoch_end(self, trainer, pl_module):
        for i, spec in enumerate(self.specs):
            if spec[0] == "epoch_end" and trainer.current_epoch == int(spec[1]):
                self._fire(i, self._sig(spec, 2))


def main() -> int:
    args = parse()
    pl.seed_everything(args.seed, workers=False, verbose=False)
    model = Net(args)
    callbacks: list[pl.Callback] = (
        [KillAt(args.kill, args.root, args.kill_rank, args.kill_settle)] if args.kill else []
    )
    if args.announce:
        callbacks.append(Announce())
    if args.slow_save:
        callbacks.append(SlowSave(args.slow_save))
    logger: object
    if args.logger == "csv":
        logger = CSVLogger(args.root, name="logs", version=args.logger_version)
    elif args.logger == "tb":
        logger = TensorBoardLogger(args.root, name="tb", version=args.logger_version)
    else:
        logger = False
    trainer_kwargs = dict(
        default_root_dir=args.root,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        strategy=args.strategy,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        val_check_interval=args.val_check_interval if args.val_check_interval != 1.0 else 1.0,
        accumulate_grad_batches=args.accum,
        deterministic=True,
        reload_dataloaders_every_n_epochs=args.reload,
    )
    trainer_cls = pl.Trainer
    if args.mode in ("callback", "trainer"):
        from lightning_grid import Resumable, Trainer

        resumable = Resumable(
            dirpath=args.ckpt_dir,
            every_n_train_steps=args.every_n_steps,
            keep=args.keep,
            signals=[getattr(signal, s) for s in args.signals.split(",")],
        )
        if args.mode == "callback":
            callbacks.append(resumable)
        else:
            trainer_cls = Trainer
            trainer_kwargs["resumable"] = resumable
    trainer = trainer_cls(callbacks=callbacks, **trainer_kwargs)
    if args.datamodule:
        trainer.fit(model, datamodule=DataModule(args))
    else:
        train_set = Augmented(mnist(args, train=True), args.aug)
        val_set = mnist(args, train=False)
        trainer.fit(
            model, make_loader(args, train_set, shuffle=True), make_loader(args, val_set, shuffle=False)
        )
    if trainer.is_global_zero:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, args.out)
        with open(args.out + ".json", "w") as handle:
            json.dump({"global_step": trainer.global_step, "epoch": trainer.current_epoch}, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())

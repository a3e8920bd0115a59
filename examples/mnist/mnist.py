"""MNIST with PyTorch Lightning: an ordinary research script.

Three ways to run it:

    python examples/mnist/mnist.py                        # plain Lightning, no lightning_grid
    python examples/mnist/mnist.py --resumable            # adds lightning_grid.Resumable
    lightning-grid run --use_spot --resumable --instance_type p3.2xlarge examples/mnist/mnist.py
                                                          # unmodified, supervised by the launcher

Offline machines: ``--synthetic`` writes learnable MNIST-shaped IDX files and reads them through the
same ``torchvision.datasets.MNIST`` code path; ``--data-dir`` points at files already on disk.
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms

HERE = os.path.dirname(os.path.abspath(__file__))


class MNISTDataModule(pl.LightningDataModule):
    def __init__(self, data_dir: str, batch_size: int, num_workers: int, synthetic: bool) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.synthetic = synthetic
        self.transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
        )

    def prepare_data(self) -> None:
        if self.synthetic:
            sys.path.insert(0, HERE)
            from synthetic_mnist import has_synthetic_mnist, write_synthetic_mnist

            # All four files, not just the first: a preemption while they were being written (a
            # notice in the first seconds) leaves some, and the restored folder must not pass for whole.
            if not has_synthetic_mnist(self.data_dir):
                write_synthetic_mnist(self.data_dir)
            return
        try:
            datasets.MNIST(self.data_dir, train=True, download=True)
            datasets.MNIST(self.data_dir, train=False, download=True)
        except Exception as exc:  # offline, proxy, mirror down: one clear line, no traceback
            print(
                f"error: could not download MNIST to {self.data_dir} ({type(exc).__name__}). Run with --synthetic"
                " for generated MNIST-shaped data, or --data-dir pointing at the IDX files.",
                file=sys.stderr,
            )
            raise SystemExit(2) from None

    def setup(self, stage: str) -> None:
        full = datasets.MNIST(self.data_dir, train=True, transform=self.transform)
        n_val = len(full) // 12
        self.train_set, self.val_set = random_split(
            full, [len(full) - n_val, n_val], generator=torch.Generator().manual_seed(42)
        )
        self.test_set = datasets.MNIST(self.data_dir, train=False, transform=self.transform)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size, num_workers=self.num_workers)


class LitCNN(pl.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train", on_epoch=True, on_step=stage == "train")
        self.log(f"{stage}_acc", acc, prog_bar=True, on_epoch=True, on_step=False)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data-dir", default=os.path.join(os.getcwd(), "data"))
    p.add_argument("--synthetic", action="store_true", help="generate MNIST-shaped data locally (offline)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--resumable", action="store_true", help="add lightning_grid.Resumable (SIGTERM-safe)")
    p.add_argument("--every-n-steps", type=int, default=None, help="with --resumable: periodic checkpoints")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--weights-out", default=None, help="save the final weights here (for comparisons)")
    args = p.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    dm = MNISTDataModule(args.data_dir, args.batch_size, args.num_workers, args.synthetic)
    model = LitCNN(lr=args.lr)
    callbacks: list[pl.Callback] = [ModelCheckpoint(monitor="val_acc", mode="max", save_last=True)]
    if args.resumable:
        from lightning_grid import Resumable

        callbacks.append(Resumable(every_n_train_steps=args.every_n_steps))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=args.devices,
        precision=args.precision,
        callbacks=callbacks,
        logger=CSVLogger("logs", name="mnist"),
        default_root_dir=os.getcwd(),
        deterministic=args.deterministic,
        log_every_n_steps=20,
    )
    trainer.fit(model, datamodule=dm)
    results = trainer.test(model, datamodule=dm, verbose=False)
    if trainer.is_global_zero:
        print(f"test_acc={results[0]['test_acc']:.4f} test_loss={results[0]['test_loss']:.4f}")
        if args.weights_out:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, args.weights_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

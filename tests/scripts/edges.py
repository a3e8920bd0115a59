"""A small, ordinary Lightning script with life after ``fit()``: the edges of an interruption.

``fit`` on tiny synthetic data (map-style, or a stateful ``IterableDataset`` under torchdata's
``StatefulDataLoader``), then optionally ``trainer.test()`` (as Lightning's ``bug_report_model.py``
does) and a post-processing loop, and only then the outputs. ``--mode plain`` never imports
lightning_grid (the reference); ``--mode callback`` adds ``Resumable``; ``--mode env`` relies on the
launcher's entry point (set the contract variables). ``--kill WHERE:N`` sends this process a real
SIGTERM once per run directory: at the start of train step N, test batch N, or post-processing
iteration N. Prints ``STEP``/``TEST``/``POST`` lines so a test can follow it and signal it from outside.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

N_SAMPLES = 96
DIM = 8


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["plain", "callback", "env"], default="callback")
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", choices=["map", "iterable"], default="map")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--after", choices=["none", "test", "post", "both"], default="none")
    p.add_argument("--post-iters", type=int, default=6)
    p.add_argument(
        "--sleep", type=float, default=0.0, help="seconds per train step / test batch / post iteration"
    )
    p.add_argument("--kill", action="append", default=[], help="train:N, test:N or post:N")
    p.add_argument(
        "--c-exit-abort",
        action="store_true",
        help="register a C exit handler that aborts (as a library's static destructor that crashes)",
    )
    p.add_argument("--no-fast-exit", action="store_true", help="Resumable(fast_exit=False)")
    p.add_argument(
        "--exit-probes",
        default=None,
        help="folder: a global file left open with a line in its buffer, and a global whose __del__"
        " (run by module teardown only) writes 'teardown'",
    )
    return p.parse_args()


class OnTeardown:
    def __init__(self, path: str) -> None:
        self.path = path
        self.open = open  # teardown may have cleared the builtins' name by the time __del__ runs

    def __del__(self) -> None:
        with self.open(self.path, "w") as handle:
            handle.write("ran")


_probes: list[object] = []  # module globals, as a script's own would be


def tensors(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, DIM, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


class ShuffledStream(IterableDataset):
    """A stateful stream: each epoch a seeded permutation; ``state_dict`` is the position in it.

    Correct on its own: restoring a state taken after k samples continues with sample k.
    """

    def __init__(self, seed: int = 3) -> None:
        self.x, self.y = tensors(seed)
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._restored = False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self._restored:
            self.pos = 0
        self._restored = False
        order = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        while self.pos < N_SAMPLES:
            i = int(order[self.pos])
            self.pos += 1
            yield self.x[i], self.y[i]
        self.epoch += 1
        self.pos = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._restored = True


class Net(pl.LightningModule):
    def __init__(self, sleep: float) -> None:
        super().__init__()
        self.sleep = sleep
        self.body = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.sleep:
            time.sleep(self.sleep)
        x, y = batch
        loss = F.cross_entropy(self.body(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if self.sleep:
            time.sleep(self.sleep)
        x, y = batch
        self.log("test_loss", F.cross_entropy(self.body(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Probe(pl.Callback):
    """Announces progress and sends the ``--kill`` signals (once per run directory)."""

    def __init__(self, specs: list[str], root: str) -> None:
        self.specs = [(s.split(":")[0], int(s.split(":")[1])) for s in specs]
        self.root = root

    def fire(self, where: str, n: int) -> None:
        fire(self.specs, self.root, where, n)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        print(f"STEP {trainer.global_step}", flush=True)
        self.fire("train", trainer.global_step)

    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        print(f"TEST {batch_idx}", flush=True)
        self.fire("test", batch_idx)


def fire(specs: list[tuple[str, int]], root: str, where: str, n: int) -> None:
    for index, (kind, at) in enumerate(specs):
        marker = os.path.join(root, f".killed-{index}")
        if kind == where and at == n and not os.path.exists(marker):
            os.makedirs(root, exist_ok=True)
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler runs here, as it would for a signal from outside


def main() -> int:
    args = parse()
    if args.exit_probes:
        notes = open(os.path.join(args.exit_probes, "global-file"), "w")  # noqa: SIM115 (left open on purpose)
        notes.write("a line still in the buffer\n")
        _probes.extend([notes, OnTeardown(os.path.join(args.exit_probes, "teardown"))])
    if args.c_exit_abort:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.on_exit.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        libc.on_exit(ctypes.cast(libc.abort, ctypes.c_void_p), None)
    pl.seed_everything(1234, verbose=False)
    model = Net(args.sleep)
    callbacks: list[pl.Callback] = [Probe(args.kill, args.root)]
    if args.mode == "callback":
        from lightning_grid import Resumable

        callbacks.append(Resumable(fast_exit=not args.no_fast_exit))
    trainer = pl.Trainer(
        default_root_dir=args.root,
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
        callbacks=callbacks,
    )
    if args.data == "iterable":
        from torchdata.stateful_dataloader import StatefulDataLoader

        train: DataLoader = StatefulDataLoader(ShuffledStream(), batch_size=args.batch_size)
    else:
        train = DataLoader(TensorDataset(*tensors(3)), batch_size=args.batch_size, shuffle=True)
    trainer.fit(model, train)
    print(f"FIT DONE {trainer.global_step}", flush=True)
    # Code after fit() that draws from the global RNG: a relaunch must see what the finished run saw.
    result: dict[str, Any] = {
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "draw": torch.rand(1).item(),
    }
    if args.after in ("test", "both"):
        test = DataLoader(TensorDataset(*tensors(5)), batch_size=args.batch_size)
        result["test"] = trainer.test(model, test, verbose=False)
    if args.after in ("post", "both"):
        for i in range(args.post_iters):
            print(f"POST {i}", flush=True)
            fire([(s.split(":")[0], int(s.split(":")[1])) for s in args.kill], args.root, "post", i)
            time.sleep(args.sleep)
        result["post"] = args.post_iters
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out)
    with open(args.out + ".json", "w") as handle:
        json.dump(result, handle)
    print("SCRIPT DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

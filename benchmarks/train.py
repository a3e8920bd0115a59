"""The one training script every benchmark runs: an ordinary Lightning script, data in memory.

``--mode plain`` never imports lightning_grid (the reference); ``--mode callback`` adds
``Resumable`` explicitly; ``--mode env`` relies on the callbacks-factory entry point only (as under
``lightning-grid run --resumable``).

The model is an MLP (``--hidden``) plus, with ``--state-mb``, one extra parameter sized so that the
model and its SGD-momentum state together take that many megabytes: the checkpoint then has that
size while a step stays cheap (a real model of that size would also touch every byte per step).

Lines printed for the harness (each flushed as it happens, ``time.monotonic()`` is system-wide):

* ``STEP <global_step> <t>`` at every training batch start (``--announce``);
* ``DONE <global_step> <t>`` after every optimizer step (``--announce``);
* ``TRAINING <global_step> <t>`` when training starts (or resumes);
* ``THROUGHPUT <steps/s> <steps/CPU-s>`` over the steps after ``--warmup`` (``--max-steps`` ends the run);
* ``BLOCK <saves 0|1> <steps> <seconds> <CPU-s> <seconds in Resumable's batch hooks>`` for each block
  of ``--ab-block`` steps after ``--warmup``: periodic saves are switched on and off in turn, so
  that each block with saves has a block without them on either side, seconds apart;
* ``TRACE <label> <t>`` at the points of a preemption's exit path (``--trace``).
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["plain", "callback", "env"], default="callback")
    p.add_argument("--root", required=True, help="default_root_dir (checkpoints go to <root>/resumable)")
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--state-mb", type=float, default=0.0, help="model + optimizer state, in MB (1e6)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=1000, help="training batches per epoch")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--warmup", type=int, default=20, help="steps before the throughput clock starts")
    p.add_argument("--every-n-steps", type=int, default=None, help="Resumable periodic saves")
    p.add_argument(
        "--ab-block",
        type=int,
        default=0,
        help="steps per block: periodic saves (--every-n-steps) on in every other block only",
    )
    p.add_argument(
        "--checksum",
        choices=["xxh3_128", "sha256"],
        default=None,
        help="the commit record's checksum (sha256: the save before the twelfth session)",
    )
    p.add_argument(
        "--buffered-writes",
        action="store_true",
        help="write checkpoints through the page cache, not O_DIRECT (the save before the twelfth session)",
    )
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--announce", action="store_true")
    p.add_argument("--trace", action="store_true")
    p.add_argument(
        "--no-fast-exit", action="store_true", help="Resumable(fast_exit=False): the exit before it"
    )
    p.add_argument(
        "--end-at-once",
        action="store_true",
        help="after fit, print 'ENDING <t>' and os._exit(0): the floor of any process's end",
    )
    p.add_argument("--logger", choices=["csv", "none"], default="csv")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--accelerator", default="cpu", help="cpu, or gpu: the state lives on the GPU")
    return p.parse_args(argv)


_SAY = threading.Lock()


def say(*parts: object) -> None:
    """One whole line per call, also from the checkpoint writer's threads (``--trace``)."""
    line = " ".join(str(p) for p in parts) + "\n"
    with _SAY:
        sys.stdout.write(line)
        sys.stdout.flush()


class Synthetic(Dataset):
    """``batches * batch_size`` samples; a fixed table of 4096 random rows, indexed modulo its size."""

    def __init__(self, length: int, features: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(4096, features, generator=gen)
        self.y = torch.randint(0, 10, (4096,), generator=gen)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i % 4096], self.y[i % 4096]


class Net(pl.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.core = nn.Sequential(
            nn.Linear(args.features, args.hidden),
            nn.ReLU(),
            nn.Linear(args.hidden, args.hidden),
            nn.ReLU(),
            nn.Linear(args.hidden, 10),
        )
        core = sum(p.numel() for p in self.core.parameters())
        # Parameters and their momentum buffers: 2 × 4 bytes per element.
        extra = max(0, int(args.state_mb * 1e6 / 8) - core)
        self.bulk = nn.Parameter(torch.empty(extra).uniform_(-1, 1)) if extra else None

    def training_step(self, batch, batch_idx):
        if self.args.step_sleep:
            time.sleep(self.args.step_sleep)
        x, y = batch
        loss = F.cross_entropy(self.core(x), y)
        if self.bulk is not None:
            loss = loss + 1e-9 * self.bulk.mean()
        self.log("train_loss", loss, on_step=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Harness(pl.Callback):
    """Announces steps and measures steady-state throughput."""

    def __init__(self, args: argparse.Namespace, resumable: pl.Callback | None = None) -> None:
        self.args = args
        self.t0: float | None = None
        self.c0 = 0.0
        self.n0 = 0
        self.resumable = resumable
        self.block: tuple[bool, int, float, float, float] | None = None  # saves, step, t, cpu, hooks
        self.hook_s = 0.0  # time the training thread spent in Resumable's batch hooks
        if resumable is not None and args.ab_block:
            self._time_hooks(resumable)

    def _time_hooks(self, resumable: pl.Callback) -> None:
        for name in ("on_train_batch_start", "on_train_batch_end"):
            hook = getattr(resumable, name)

            def timed(*a, _hook=hook, **k):
                started = time.perf_counter()
                try:
                    return _hook(*a, **k)
                finally:
                    self.hook_s += time.perf_counter() - started

            setattr(resumable, name, timed)

    def _next_block(self, step: int) -> None:
        """Runs before Resumable's own batch end hook: a block with saves saves at its first step."""
        now, cpu = time.perf_counter(), time.process_time()
        saves = True  # the first block is without saves: with an odd count, every block with has two without
        if self.block is not None:
            saves, begun, t, c, hooks = self.block
            say("BLOCK", int(saves), step - begun, now - t, cpu - c, self.hook_s - hooks)
        saves = not saves
        self.resumable.every_n_train_steps = self.args.every_n_steps if saves else None
        self.block = (saves, step, now, cpu, self.hook_s)

    def on_train_start(self, trainer, pl_module):
        say("TRAINING", trainer.global_step, time.monotonic())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.args.announce:
            say("STEP", trainer.global_step, time.monotonic())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.args.announce:
            say("DONE", step, time.monotonic())
        if step == self.args.warmup:
            self.t0, self.c0, self.n0 = time.perf_counter(), time.process_time(), step
        if (
            self.args.ab_block
            and step >= self.args.warmup
            and (step - self.args.warmup) % self.args.ab_block == 0
        ):
            self._next_block(step)

    def on_train_end(self, trainer, pl_module):
        if self.t0 is not None and trainer.global_step > self.n0:
            steps = trainer.global_step - self.n0
            # Per second of wall time, and per second of this process's CPU time (all its threads):
            # the second one does not move when other programs share the machine.
            say(
                "THROUGHPUT", steps / (time.perf_counter() - self.t0), steps / (time.process_time() - self.c0)
            )

    def on_exception(self, trainer, pl_module, exception):
        if self.args.trace:
            say("TRACE on_exception", time.monotonic(), type(exception).__name__)


def _install_trace() -> None:
    """Print a timestamp at each stage of the exit path (wraps product functions; benchmark only).

    Wraps what exists, so the same script profiles older and newer versions of the save path:
    ``write`` is each ``os.write``/``os.writev`` (or the older ``HashingWriter._write``), ``fsync`` and
    ``fsync_dir`` each ``os.fsync`` of a file or a folder, ``rename`` each ``os.replace``."""
    import stat

    from lightning_grid import _io, checkpoints
    from lightning_grid.resumable import callback, signals

    def wrap(owner: object, name: str, label: str | Callable[..., str]) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def traced(*a, **k):
            tag = label(*a) if callable(label) else label
            say("TRACE", f"{tag}:start", time.monotonic())
            try:
                return original(*a, **k)
            finally:
                say("TRACE", f"{tag}:end", time.monotonic())

        setattr(owner, name, traced)

    handler = signals.SignalFlag._handler

    def on_signal(self, signum, frame):
        say("TRACE", "signal", time.monotonic())
        handler(self, signum, frame)

    def fsync_kind(fd: int) -> str:
        try:
            return "fsync_dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync"
        except OSError:
            return "fsync"

    signals.SignalFlag._handler = on_signal  # type: ignore[method-assign]
    wrap(callback._lightning, "dump_checkpoint", "dump_checkpoint")
    wrap(callback.Resumable, "_save", "save_on_training_thread")
    wrap(torch, "save", "torch.save")
    wrap(checkpoints.CheckpointStore, "save", "store.save")
    wrap(checkpoints.CheckpointStore, "_write_small", "write_small")
    wrap(checkpoints.CheckpointStore, "prune", "prune")
    wrap(checkpoints, "_layout", "layout")
    wrap(_io.StreamWriter if hasattr(_io, "StreamWriter") else None, "close", "stream_close")
    wrap(getattr(_io, "_DirectStaging", None), "fill", "copy")  # into the O_DIRECT staging buffers
    wrap(_io.HashingWriter if hasattr(_io, "HashingWriter") else None, "_write", "write")
    wrap(_io.HashingWriter if hasattr(_io, "HashingWriter") else None, "write", "hashing_write")
    wrap(os, "write", "write")
    wrap(os, "writev", "write")
    wrap(_io, "_SYNC_FILE_RANGE", "writeback")  # the hint that starts the disk writing
    wrap(os, "fsync", fsync_kind)
    wrap(os, "replace", "rename")
    wrap(callback.Resumable, "_release_commit", "release_commit")
    wrap(callback.Resumable, "_reap_writer", "reap_writer")
    wrap(callback.Resumable, "_finish_preemption", "finish_preemption")
    wrap(callback.Resumable, "teardown", "teardown")
    atexit.register(lambda: say("TRACE", "atexit", time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    pl.seed_everything(args.seed, verbose=False)
    model = Net(args)
    resumable: pl.Callback | None = None
    if args.trace:
        _install_trace()
    if args.buffered_writes or args.checksum:
        from lightning_grid import _io

        _io.StreamWriter.DIRECT = not args.buffered_writes
        _io.CHECKSUM = args.checksum or _io.CHECKSUM
    if args.mode == "callback":
        from lightning_grid import Resumable

        resumable = Resumable(every_n_train_steps=args.every_n_steps, fast_exit=not args.no_fast_exit)
    elif args.ab_block:
        raise SystemExit("--ab-block needs --mode callback")
    elif args.every_n_steps is not None:
        os.environ.setdefault("LIGHTNING_GRID_EVERY_N_TRAIN_STEPS", str(args.every_n_steps))
    harness = Harness(args, resumable)
    # The harness first: its batch end (a block's boundary) runs before Resumable's.
    callbacks: list[pl.Callback] = [harness] + ([resumable] if resumable is not None else [])
    trainer = pl.Trainer(
        default_root_dir=args.root,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=1,
        logger=CSVLogger(args.root, name="logs") if args.logger == "csv" else False,
        log_every_n_steps=10,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(
        Synthetic(args.batches * args.batch_size, args.features), batch_size=args.batch_size, shuffle=True
    )
    trainer.fit(model, loader)
    say("FINISHED", trainer.global_step, time.monotonic())
    if args.end_at_once:
        say("ENDING", time.monotonic())
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

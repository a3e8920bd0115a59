"""Pins every private Lightning API lightning_grid relies on (see resumable/_lightning.py).

If an upgrade moves one of them, these fail here with a named cause instead of a silently
inexact resume in a user's run.
"""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_grid.resumable import _lightning


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val", self.layer(batch[0]).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 4)), batch_size=4)


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def test_wrap_train_loaders_sees_processed_loaders(tmp_path) -> None:
    seen = []

    class Wrap(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            _lightning.wrap_train_loaders(trainer, lambda dl: seen.append(dl) or dl)

    trainer = _trainer(tmp_path, [Wrap()])
    trainer.fit(Tiny(), _loader())
    assert len(seen) == 1 and isinstance(seen[0], DataLoader) and trainer.global_step == 4


def test_inject_checkpoint_resumes_like_ckpt_path(tmp_path) -> None:
    first = _trainer(tmp_path, [], max_steps=2)
    first.fit(Tiny(), _loader())
    path = tmp_path / "two.ckpt"
    first.save_checkpoint(path)
    loaded = torch.load(path, weights_only=False)
    started_at = []

    class Inject(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            _lightning.inject_checkpoint(trainer, loaded)

        def on_train_start(self, trainer, pl_module):
            started_at.append(trainer.global_step)

    second = _trainer(tmp_path, [Inject()], max_steps=4, max_epochs=3)
    second.fit(Tiny(), _loader())
    assert started_at == [2] and second.global_step == 4


def test_dump_checkpoint_validation_due_and_logged_step(tmp_path) -> None:
    record = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record.append(
                (batch_idx, _lightning.validation_due_after_batch(trainer), _lightning.logged_step(trainer))
            )
            if batch_idx == 1:
                ckpt = _lightning.dump_checkpoint(trainer)
                assert {"state_dict", "loops", "callbacks", "optimizer_states"} <= set(ckpt)

    trainer = _trainer(tmp_path, [Probe()], val_check_interval=2, max_epochs=1)
    trainer.fit(Tiny(), _loader(), _loader(8))
    assert [(b, due) for b, due, _ in record] == [(0, False), (1, True), (2, False), (3, True)]
    assert [s for _, _, s in record] == [0, 1, 2, 3]


def test_take_lightning_sigterm_keeps_training_going(tmp_path) -> None:
    taken = []

    class Take(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler is installed during fit
                taken.append(_lightning.take_lightning_sigterm(trainer))

    trainer = _trainer(tmp_path, [Take()])
    trainer.fit(Tiny(), _loader())
    assert taken == [True] and trainer.global_step == 4


def test_logger_attributes_used_for_reopening(tmp_path) -> None:
    csv_logger = CSVLogger(tmp_path, name="c")
    tb_logger = TensorBoardLogger(tmp_path, name="t")
    for logger in (csv_logger, tb_logger):
        assert hasattr(logger, "_version") and hasattr(logger, "_experiment")
    assert isinstance(tb_logger._kwargs, dict)
    _ = csv_logger.experiment
    assert hasattr(csv_logger.experiment, "metrics_keys")
    assert _lightning.reopen_logger(csv_logger, 7, last_step=0)
    assert csv_logger.version == 7 and os.path.isdir(csv_logger.log_dir)


def test_the_prefetching_fetcher_and_the_loader_state_hook() -> None:
    """(a) A stateful loader's position is taken from our snapshots through ``CombinedLoader._state_dicts``
    (what Lightning stores of loaders with ``state_dict``), with the batches the fetcher prefetched
    (``fit_loop._data_fetcher.batches``) subtracted."""
    from lightning.fabric.utilities.types import _Stateful
    from lightning.pytorch.utilities.combined_loader import CombinedLoader

    assert callable(CombinedLoader._state_dicts) and isinstance(CombinedLoader.flattened, property)
    assert _Stateful is not None
    seen: list[tuple[bool, int]] = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            fetcher = trainer.fit_loop._data_fetcher
            seen.append((hasattr(fetcher, "batches"), _lightning._prefetched(trainer)))

    trainer = pl.Trainer(
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[Probe()]
    )
    trainer.fit(Tiny(), _loader())
    assert seen and all(has for has, _ in seen)
    assert all(isinstance(n, int) and 0 <= n <= 2 for _, n in seen)


def test_lightning_cli_save_config_callback_has_what_we_patch() -> None:
    """(g) The attributes our SaveConfigCallback.setup wrapper reads, and its setup signature."""
    import inspect

    from lightning.pytorch.cli import SaveConfigCallback

    assert list(inspect.signature(SaveConfigCallback.setup).parameters) == [
        "self",
        "trainer",
        "pl_module",
        "stage",
    ]
    init = inspect.signature(SaveConfigCallback.__init__).parameters
    assert {"parser", "config", "config_filename", "overwrite", "save_to_log_dir"} <= set(init)
    source = inspect.getsource(SaveConfigCallback)
    assert "self.already_saved" in source and "self.overwrite" in source

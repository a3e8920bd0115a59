"""A tiny Lightning FSDP script (``state_dict_type="sharded"``) for tests under torchrun.

``--strategy modelparallel``: ``ModelParallelStrategy`` instead, with FSDP2's ``fully_shard``
applied in ``configure_model`` (it runs on CPU with gloo as it is).

On a machine without a GPU it runs FSDP on CPU with gloo: Lightning refuses ``FSDPStrategy`` with
``accelerator="cpu"`` (an exact-type check) and hands FSDP ``device_id=None`` there, which torch's
FSDP refuses without an accelerator; the subclass below only passes ``device_id=cpu`` instead.
Everything else (the sharded state dicts, ``save_checkpoint``/``load_checkpoint`` through DCP) is
Lightning's own code. At the end every rank takes part in gathering the full state, and rank 0
writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from nodes_train import Numbers  # the same data as the DDP tests (this folder is on sys.path)
from torch import nn
from torch.utils.data import DataLoader

from lightning_grid import Resumable


class CPUFSDPStrategy(FSDPStrategy):
    """FSDP with the module on CPU (gloo): the one thing Lightning does not do there."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


class Model(L.LightningModule):
    def __init__(
        self,
        sigterm_at: str | None = None,
        sigkill_at: str | None = None,
        ids_dir: str | None = None,
        hidden: int = 32,
    ) -> None:
        super().__init__()
        self.ids_dir = ids_dir
        self.sigterm_at = tuple(int(v) for v in sigterm_at.split(":")) if sigterm_at else None
        self.sigkill_at = tuple(int(v) for v in sigkill_at.split(":")) if sigkill_at else None
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 2))

    def configure_model(self) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y, idx = batch
        if self.ids_dir:  # which samples each rank trained on, per attempt (exactly-once checks)
            name = f"rank{self.global_rank}-attempt{os.environ.get('LIGHTNING_GRID_ATTEMPT', '0')}.jsonl"
            with open(os.path.join(self.ids_dir, name), "a") as handle:
                handle.write(json.dumps({"epoch": self.current_epoch, "ids": idx.tolist()}) + "\n")
        if (
            self.sigterm_at == (self.global_step, self.global_rank)
            and os.environ.get("LIGHTNING_GRID_ATTEMPT", "1") == "1"
        ):
            os.kill(os.getpid(), signal.SIGTERM)
        if (
            self.sigkill_at == (self.global_step, self.global_rank)
            and os.environ.get("LIGHTNING_GRID_ATTEMPT", "1") == "1"
        ):
            os.kill(os.getpid(), signal.SIGKILL)
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):  # noqa: ANN201
        opt = torch.optim.AdamW(self.parameters(), lr=0.01)  # state per parameter: sharded too
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)]


def full_state(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0 (every rank must call this)."""
    if isinstance(trainer.strategy, ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(trainer.lightning_module, options=options)
        return {k: v.detach().clone() for k, v in full.items()}
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = trainer.strategy.model
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        state = model.state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--every-n-steps", type=int, default=None)
    p.add_argument("--plain", action="store_true", help="plain Lightning: no Resumable")
    p.add_argument("--strategy", choices=["fsdp", "modelparallel"], default="fsdp")
    p.add_argument(
        "--sigterm-at", default=None, help="STEP:RANK: that rank sends itself SIGTERM at that step"
    )
    p.add_argument("--sigkill-at", default=None, help="STEP:RANK: that rank SIGKILLs itself at that step")
    p.add_argument("--ids", default=None, help="a folder: record the sample ids each rank trains on")
    p.add_argument("--hidden", type=int, default=32, help="the hidden layer's width (a bigger state to save)")
    args = p.parse_args()
    L.seed_everything(7, workers=True)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    callbacks = (
        [] if args.plain else [Resumable(dirpath=args.ckpt_dir, every_n_train_steps=args.every_n_steps)]
    )
    trainer = L.Trainer(
        accelerator=accelerator,
        strategy=CPUFSDPStrategy(state_dict_type="sharded")
        if args.strategy == "fsdp"
        else ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
        devices=local,
        num_nodes=world // local,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    loader = DataLoader(Numbers(args.samples), batch_size=args.batch_size, shuffle=True)
    model = Model(args.sigterm_at, args.sigkill_at, args.ids, args.hidden)
    trainer.fit(model, loader)
    state = full_state(trainer)
    if trainer.is_global_zero:
        torch.save(state, args.out)
        print(f"done at step {trainer.global_step}", flush=True)


if __name__ == "__main__":
    main()

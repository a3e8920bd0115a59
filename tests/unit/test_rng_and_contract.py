from __future__ import annotations

import io
import random

import numpy as np
import torch

from lightning_grid.contract import (
    ENV_ATTEMPT,
    ENV_CHECKPOINTS,
    ENV_EVERY_N_SECONDS,
    ENV_EVERY_N_TRAIN_STEPS,
    ENV_RESUMABLE,
    Contract,
)
from lightning_grid.resumable import rng


def _draw() -> tuple:
    return (random.random(), float(np.random.rand()), float(torch.rand(1)))


def test_capture_restore_every_generator() -> None:
    state = rng.capture()
    first = [_draw() for _ in range(3)]
    rng.restore(state)
    assert [_draw() for _ in range(3)] == first


def test_snapshot_survives_weights_only_serialisation() -> None:
    state = rng.capture()
    buffer = io.BytesIO()
    torch.save({"rng": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["rng"]
    expected = _draw()
    rng.restore(loaded)
    assert _draw() == expected


def test_contract_parses_and_round_trips() -> None:
    env = {ENV_RESUMABLE: "1", ENV_CHECKPOINTS: "s3://b/x", ENV_ATTEMPT: "3"}
    contract = Contract.from_env(env)
    assert contract == Contract(resumable=True, checkpoints="s3://b/x", attempt=3)
    assert Contract.from_env(contract.to_env()) == contract
    assert Contract.from_env({ENV_ATTEMPT: "junk"}).attempt == 1
    assert Contract.from_env({ENV_RESUMABLE: "no"}).resumable is False
    periodic = Contract(resumable=True, every_n_train_steps=50, every_n_seconds=1.5)
    assert Contract.from_env(periodic.to_env()) == periodic
    garbled = {ENV_EVERY_N_TRAIN_STEPS: "often", ENV_EVERY_N_SECONDS: "-3"}
    assert (Contract.from_env(garbled).every_n_train_steps, Contract.from_env(garbled).every_n_seconds) == (
        None,
        None,
    )

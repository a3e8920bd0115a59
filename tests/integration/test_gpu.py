"""GPU checks (skipped without CUDA): CUDA RNG state round-trips, and a GPU run resumes bit-exactly
with deterministic kernels, in fp32 and in 16-mixed (GradScaler state included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_grid.resumable import rng
from tests.helpers import assert_bit_identical, child_env, run_until_done

pytestmark = pytest.mark.gpu


def test_cuda_rng_round_trip() -> None:
    torch.cuda.init()
    state = rng.capture()
    assert "cuda" in state and len(state["cuda"]) == torch.cuda.device_count()
    first = torch.rand(4, device="cuda")
    rng.restore(state)
    assert torch.equal(torch.rand(4, device="cuda"), first)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_gpu_resume_is_bit_identical(precision: str, tmp_path: Path, mnist_dir: Path, reference) -> None:
    options = [
        "--aug",
        "--dropout",
        "0.2",
        "--accelerator",
        "gpu",
        "--precision",
        precision,
        "--workers",
        "2",
    ]
    expected = reference.get(options)
    out = tmp_path / "w.pt"
    run_until_done(
        mnist_dir,
        tmp_path / "run",
        out,
        options + ["--kill", "train:5", "--kill", "train:18"],
        env=child_env(),
    )
    assert_bit_identical(expected, out)

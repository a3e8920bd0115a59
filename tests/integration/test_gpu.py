"""GPU checks (skipped without CUDA): CUDA RNG state round-trips, and a GPU run resumes bit-exactly
with deterministic kernels, in fp32 and in 16-mixed (GradScaler state included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_grid.resumable import rng
from tests.helpers import (
    EXAMPLE,
    assert_bit_identical,
    child_env,
    grid,
    grid_status,
    run_example,
    run_until_done,
)

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


def test_mnist_example_on_gpu_preempted_twice_under_the_launcher(tmp_path: Path) -> None:
    args = [
        "--synthetic",
        "--epochs",
        "6",
        "--accelerator",
        "gpu",
        "--devices",
        "1",
        "--deterministic",
        "--weights-out",
        "w.pt",
    ]
    plain_dir = tmp_path / "plain"
    plain = run_example(plain_dir, args)
    assert plain.returncode == 0, plain.stderr[-3000:]
    home = tmp_path / "home"
    run = ["run", "--use_spot", "--resumable", "--instance_type", "g4dn.xlarge", "--name", "gpu"]
    launched = grid(home, *run, "--simulate-preemptions", "8,8", str(EXAMPLE), *args, timeout=900)
    assert launched.returncode == 0, launched.stderr[-3000:]
    info = grid_status(home, "gpu")
    assert info["status"] == "succeeded" and info["restarts"] == 2
    assert_bit_identical(plain_dir / "w.pt", home / "artifacts" / "gpu" / "execdir" / "files" / "w.pt")


def test_instance_type_decides_the_visible_devices(tmp_path: Path) -> None:
    script = tmp_path / "p" / "devices.py"
    script.parent.mkdir()
    script.write_text(
        "import os, torch\nprint('DEVICES', os.environ.get('CUDA_VISIBLE_DEVICES'), torch.cuda.device_count())\n"
    )
    home = tmp_path / "home"
    run = grid(home, "run", "--instance_type", "g4dn.xlarge", "--name", "d", str(script), timeout=300)
    assert run.returncode == 0, run.stderr
    assert "DEVICES 0 1" in run.stdout
    too_many = grid(home, "run", "--instance_type", "p4d.24xlarge", "--name", "d2", str(script), timeout=300)
    if torch.cuda.device_count() < 8:
        assert too_many.returncode == 2 and "needs 8 GPU" in too_many.stderr

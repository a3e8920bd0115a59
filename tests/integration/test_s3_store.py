"""Checkpoints on s3:// against a real S3 API server (moto's server mode) on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_grid.checkpoints import CheckpointStore
from tests.helpers import assert_bit_identical, child_env, run_until_done

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*CREDS, "AWS_ENDPOINT_URL"]}
    os.environ.update(CREDS, AWS_ENDPOINT_URL=url)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(anon=False).mkdir("lg-bucket")
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def test_store_contract_on_s3(s3_endpoint: str) -> None:
    import torch

    store = CheckpointStore("s3://lg-bucket/contract")
    store.check_writable()
    first = store.save({"w": torch.ones(3)}, step=1)
    second = store.save({"w": torch.zeros(3)}, step=2)
    found = store.latest_valid()
    assert found is not None and found[0] == second
    store.fs.pipe_file(f"lg-bucket/contract/{second.name}", b"garbage")
    found = store.latest_valid()
    assert found is not None and found[0] == first
    store.write_marker({"step": 1})
    assert store.read_marker() == {"step": 1}


def test_sigterm_checkpoint_to_s3_and_exact_resume(
    s3_endpoint: str, tmp_path: Path, mnist_dir: Path, reference
) -> None:
    options = ["--aug", "--dropout", "0.2"]
    expected = reference.get(options)
    env = child_env(**CREDS, AWS_ENDPOINT_URL=s3_endpoint)
    out = tmp_path / "w.pt"
    runs = run_until_done(
        mnist_dir,
        tmp_path / "run",
        out,
        options + ["--ckpt-dir", "s3://lg-bucket/run1", "--kill", "train:5"],
        env=env,
    )
    assert len(runs) == 2 and "s3://lg-bucket/run1/ckpt-" in runs[0].output
    assert_bit_identical(expected, out)
    assert not (tmp_path / "run" / "resumable").exists()
    assert CheckpointStore("s3://lg-bucket/run1").committed()


def test_artifact_sync_on_s3(s3_endpoint: str, tmp_path: Path) -> None:
    from lightning_grid.launcher import artifacts

    src = tmp_path / "exec"
    (src / "logs").mkdir(parents=True)
    (src / "train.py").write_text("print('hi')\n")
    (src / "logs" / "metrics.csv").write_text("step,loss\n0,1.0\n")
    url = "s3://lg-bucket/exp/execdir"
    assert artifacts.upload(str(src), url).transferred == 2
    assert artifacts.upload(str(src), url).transferred == 0  # unchanged: nothing re-uploaded
    dest = tmp_path / "restored"
    artifacts.restore(url, str(dest))
    assert (dest / "logs" / "metrics.csv").read_text() == "step,loss\n0,1.0\n"
    assert artifacts.upload(str(dest), url).transferred == 0

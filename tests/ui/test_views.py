"""What the pages are computed from: log tails, checkpoint and artifact listings, the list's rows."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning_grid.launcher.experiment import Status
from lightning_grid.launcher.registry import Registry
from lightning_grid.ui import views
from tests.ui.conftest import fake_experiment


def test_log_tail_keeps_the_last_whole_lines_and_any_bytes(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(1000)) + b"bad \xff byte\n")
    tail = views.log_tail(str(log), max_bytes=200, max_lines=5)
    assert tail["lines"] == ["line 996", "line 997", "line 998", "line 999", "bad \ufffd byte"]
    assert tail["truncated"] and not tail["missing"]
    short = views.log_tail(str(log), max_bytes=10_000_000, max_lines=2000)
    assert short["lines"][0] == "line 0" and not short["truncated"]
    assert views.log_tail(str(tmp_path / "none.log"))["missing"]


def test_checkpoints_tell_committed_from_uncommitted(tmp_path: Path) -> None:
    store = tmp_path / "ckpts"
    store.mkdir()
    for step in (10, 20):
        name = f"ckpt-{step:010d}-{1000 + step}.ckpt"
        (store / name).write_bytes(b"x" * step)
        record = {"name": name, "step": step, "sha256": "0" * 64, "size": step, "time": 1000.0 + step}
        (store / f"{name}.commit.json").write_text(json.dumps(record))
    (store / "ckpt-0000000030-1030.ckpt").write_bytes(b"half")
    (store / "PREEMPTED.json").write_text("{}")
    listing = views.checkpoints(str(store))
    assert listing.error is None
    assert [(c["step"], c["committed"], c["size"]) for c in listing.entries] == [
        (20, True, 20),
        (10, True, 10),
        (30, False, 4),
    ]
    assert views.checkpoints(str(tmp_path / "nothing-yet")).entries == []
    broken = views.checkpoints("nosuchscheme://bucket/x")
    assert broken.entries == [] and broken.error and "nosuchscheme" in broken.error


def test_rows_for_the_list_newest_first_filtered_with_durations(tmp_path: Path) -> None:
    home = tmp_path / "home"
    now = time.time()
    fake_experiment(home, "old", Status.STOPPED, now - 1000)
    fake_experiment(home, "new", Status.PENDING, now - 100)
    registry = Registry(str(home))
    rows = views.experiment_rows(registry)
    assert [(r["name"], r["status"], r["attempts"], r["restarts"]) for r in rows] == [
        ("new", "pending", 1, 1),
        ("old", "stopped", 1, 1),
    ]
    assert rows[0]["seconds"] is None and rows[0]["created"] == now - 100  # live: the page counts up
    assert rows[1]["seconds"] == 140.0 and rows[1]["duration_text"] == "2m20s"  # ended: to its last change
    assert rows[1]["cost_spot_usd"] > 0 and rows[1]["cost_on_demand_usd"] > rows[1]["cost_spot_usd"]
    assert [r["name"] for r in views.experiment_rows(registry, "stopped")] == ["old"]
    detail = views.experiment_detail(registry, "new", now=now)
    assert [lane["number"] for lane in detail["timeline"]["lanes"]] == [1, 2]
    assert detail["logs"][0]["lines"] == ["step 1", "step 2"]
    assert detail["artifact_files"]["entries"] == [] and detail["artifact_files"]["error"] is None
    json.dumps(detail)  # the API serves it as it is


def test_sizes_read_well() -> None:
    assert [views.format_bytes(n) for n in (None, 12, 4_200, 17_000_000, 3_500_000_000)] == [
        "-",
        "12 B",
        "4.2 KB",
        "17.0 MB",
        "3.5 GB",
    ]

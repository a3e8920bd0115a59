"""What one open list page costs the dashboard's server: CPU seconds per minute of polling.

Not a test (no timing assertion belongs in the suite): the numbers in docs/dashboard.md come from

    python -m tests.ui.measure_polling --experiments 200 --seconds 60
    python -m tests.ui.measure_polling --experiments 200 --seconds 60 --writer   # a change every poll

It fills a fresh registry with ``fake_experiment`` (one in ten live), starts a real
``lightning-grid ui``, and imitates the list page's script: one request for the table every
``--interval`` seconds, sending back the last ETag as ``If-None-Match`` (``--unconditional``: as the
old page did, never). ``--writer`` records an event on a live experiment before every poll, so every
poll finds a change (the worst case). ``--pythonpath`` runs another copy of the package (before/after).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from lightning_grid.launcher.experiment import Status
from lightning_grid.launcher.registry import Registry
from tests.ui.conftest import fake_experiment

REPO = Path(__file__).resolve().parents[2]
#: One experiment in ten is live (running, pending, queued...): the page keeps polling.
MIX = [Status.STOPPED] * 9 + [Status.RUNNING]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=2.0, help="the list page polls every 2 s")
    parser.add_argument("--unconditional", action="store_true", help="never send If-None-Match")
    parser.add_argument("--writer", action="store_true", help="record an event before every poll")
    parser.add_argument("--path", default="/fragments/list", help="what to poll (an experiment: its page)")
    parser.add_argument("--pythonpath", default=str(REPO), help="the copy of lightning_grid to serve")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        now = time.time()
        for i in range(args.experiments):
            fake_experiment(home, f"exp-{i:04d}", MIX[i % len(MIX)], now - 10_000 + i)
        env = {**os.environ, "LIGHTNING_GRID_HOME": str(home), "PYTHONPATH": args.pythonpath}
        server = subprocess.Popen(
            [sys.executable, "-m", "lightning_grid.cli", "ui", "--port", "0"],
            env=env,
            cwd=tmp,  # `-m` puts the working directory first on sys.path: only --pythonpath counts
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            match = re.search(r"http://127\.0\.0\.1:(\d+)/(?:\?token=(\S+))?", server.stdout.readline())
            assert match, "the server printed no URL"
            auth = {"Authorization": f"Bearer {match.group(2)}"} if match.group(2) else {}  # older: none
            conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=30)
            registry = Registry(str(home))
            live = f"exp-{len(MIX) - 1:04d}"

            def poll(etag: str | None) -> tuple[int, str | None]:
                headers = {"If-None-Match": etag, **auth} if etag and not args.unconditional else auth
                conn.request("GET", args.path, headers=headers)
                response = conn.getresponse()
                response.read()
                return response.status, response.getheader("etag") or etag

            status, etag = poll(None)  # the page's first load (and the server's imports) are not counted
            assert status == 200, status
            process = psutil.Process(server.pid)
            before = process.cpu_times()
            counts: dict[int, int] = {}
            start = time.monotonic()
            for k in range(int(args.seconds / args.interval)):  # setInterval: a fixed rate
                time.sleep(max(0.0, start + k * args.interval - time.monotonic()))
                if args.writer:
                    registry.note(live, "a change the page must show")
                status, etag = poll(etag)
                counts[status] = counts.get(status, 0) + 1
            time.sleep(max(0.0, start + args.seconds - time.monotonic()))
            after = process.cpu_times()
            cpu = (after.user - before.user) + (after.system - before.system)
            print(
                f"{args.path}, {args.experiments} experiments, {sum(counts.values())} polls every {args.interval:g}s"
                f" ({', '.join(f'{n}x {s}' for s, n in sorted(counts.items()))}"
                f"{', a change before each' if args.writer else ''}):"
                f" server CPU {cpu:.3f}s in {args.seconds:g}s = {cpu * 60 / args.seconds:.2f} CPU-s/min"
                f" ({cpu / args.seconds * 100:.2f} % of a core)"
            )
        finally:
            server.terminate()
            server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())

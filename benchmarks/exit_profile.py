"""Where the SIGTERM → exit time goes, stage by stage, for one state size (1 GB by default).

The training script runs with ``--trace``: it prints a time stamp at the start and end of each
stage of the exit path (the product's functions, ``os.write``, ``os.fsync``, ``os.replace``,
wrapped in the child only). The stages, on the path the exit waits for:

* step in flight: the signal → the cut at the end of the batch that was running;
* dump: Lightning's ``dump_checkpoint`` and the rest of ``_save`` on the training thread;
* serialize: pickling and the zip layout (everything of ``torch.save`` but the tensor bytes);
* copy: the payload's bytes into the page-aligned staging buffers ``O_DIRECT`` writes from
  (the twelfth session on, where the file system takes ``O_DIRECT``);
* write: ``os.write``/``os.writev`` of the payload (to the disk with ``O_DIRECT``, otherwise into
  the page cache, with the hints that start the disk writing it: ``sync_file_range``, which
  waits while the disk's queue is full); direct writes run on a thread of their own while the
  next buffer is copied (the thirteenth session on), and only what no copy overlaps counts here,
  so that the stages still add up to the exit;
* hash: the checksum left to wait for after the last write (it runs alongside the writes);
* fsync: the payload's ``fsync`` (the disk writing what is not yet on it);
* rename: the payload's rename and its folder's ``fsync``;
* commit: the commit record (temp file, ``fsync``, rename, folder ``fsync``);
* prune: removing checkpoints beyond ``keep``;
* marker: the rest of the training thread's exit path (the ``PREEMPTED`` marker, the join);
* teardown: ``Preempted`` raised → the process is gone (Lightning's and the interpreter's exit);
* other: what no stage accounts for (thread hand-overs, gaps): the check that the list is complete.

Every time stamp is ``time.monotonic()`` (system-wide), so the child's stamps and the harness's
signal and exit times are on one clock.
"""

from __future__ import annotations

import random
import shutil
from collections import defaultdict

from benchmarks.common import (
    SIGTERM,
    Proc,
    Row,
    Settings,
    Stat,
    checkpoint_files,
    fresh_dir,
    log,
    raw_write,
    step_at_least,
    train_cmd,
)

STAGES = (
    "step in flight",
    "dump",
    "serialize",
    "copy",
    "write",
    "hash",
    "fsync",
    "rename",
    "commit",
    "prune",
    "marker",
    "teardown",
    "other",
)

#: The stages that are the save path's own work, from the cut to the commit record.
SAVE_PATH = ("serialize", "copy", "write", "hash", "fsync", "rename", "commit")

Intervals = dict[str, list[tuple[float, float]]]


def parse_trace(lines: list[str]) -> tuple[Intervals, dict[str, float]]:
    """``TRACE label:start t`` / ``TRACE label:end t`` lines → intervals per label, and the
    points (``signal``, ``atexit``)."""
    open_: dict[str, list[float]] = defaultdict(list)
    intervals: Intervals = defaultdict(list)
    points: dict[str, float] = {}
    for line in lines:
        parts = line.split()
        if len(parts) < 3 or parts[0] != "TRACE":
            continue
        try:
            label, at = parts[1], float(parts[2])
        except ValueError:
            continue
        if label.endswith(":start"):
            open_[label[: -len(":start")]].append(at)
        elif label.endswith(":end"):
            name = label[: -len(":end")]
            if open_[name]:
                intervals[name].append((open_[name].pop(0), at))
        else:
            points.setdefault(label, at)
    return intervals, points


def _total(spans: list[tuple[float, float]], within: tuple[float, float] | None = None) -> float:
    if within is None:
        return sum(end - start for start, end in spans)
    lo, hi = within
    return sum(end - start for start, end in spans if start >= lo and end <= hi)


def _outside(spans: list[tuple[float, float]], holes: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(s, e) for s, e in spans if not any(hs <= s and e <= he for hs, he in holes)]


def _not_covered(spans: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    """The time in ``spans`` that no span of ``cover`` overlaps (neither list overlaps itself)."""
    total = 0.0
    for start, end in spans:
        total += end - start
        for lo, hi in cover:
            total -= max(0.0, min(end, hi) - max(start, lo))
    return total


def breakdown(lines: list[str], sent: float, exited: float) -> dict[str, float]:
    """The stages (see the module's docstring) of one SIGTERM → exit, in seconds; they add up to
    the whole (``other`` is the remainder)."""
    spans, _ = parse_trace(lines)
    cut = spans["save_on_training_thread"][-1]
    save = spans["store.save"][-1]
    small = [s for s in spans["write_small"] if s[0] >= save[0]]
    commit = [s for s in small if s[1] <= save[1]]
    # The kernel's writeback hints (sync_file_range) block while the disk's queue is full: the
    # disk's time, counted with the writes.
    copies = [c for c in spans["copy"] if c[0] >= save[0] and c[1] <= save[1]]
    disk = [w for w in spans["write"] + spans["writeback"] if w[0] >= save[0] and w[1] <= save[1]]
    writes = _not_covered(disk, copies)
    if spans.get("layout"):
        serialize = _total(spans["layout"], save)
        # close() writes the last batch, then waits for (or computes) the hash of what is left.
        closing = [s for s in spans["stream_close"] if save[0] <= s[0] and s[1] <= save[1]]
        hashing = _not_covered(closing, disk)
    else:  # torch.save wrote through HashingWriter (the code before the streamed writer)
        hashing_writes = _total(spans["hashing_write"], save)
        serialize = _total(spans["torch.save"], save) - hashing_writes
        hashing = hashing_writes - writes
    payload_fsync = _outside([s for s in spans["fsync"] if save[0] <= s[0] and s[1] <= save[1]], commit)
    payload_dir = _outside([s for s in spans["fsync_dir"] if save[0] <= s[0] and s[1] <= save[1]], commit)
    payload_rename = _outside([s for s in spans["rename"] if save[0] <= s[0] and s[1] <= save[1]], commit)
    finish = spans["finish_preemption"][-1]
    pruning = [s for s in spans["prune"] if s[0] >= save[1]]
    writer_done = max([save[1]] + [end for _, end in pruning])
    stages = {
        "step in flight": cut[0] - sent,
        "dump": cut[1] - cut[0],
        "serialize": serialize,
        "copy": _total(copies),
        "write": writes,
        "hash": hashing,
        "fsync": _total(payload_fsync),
        "rename": _total(payload_rename) + _total(payload_dir),
        "commit": _total(commit),
        "prune": _total(pruning),
        # From the end of the writer's work to the end of the exit path on the training thread.
        "marker": finish[1] - max(writer_done, cut[1]),
        "teardown": exited - finish[1],
    }
    stages["other"] = (exited - sent) - sum(stages.values())
    return stages


def exit_breakdown(settings: Settings) -> tuple[list[Row], dict]:
    """SIGTERM → exit of a ``settings.profile_mb`` state, traced, ``settings.reps`` times."""
    rng = random.Random(2)
    mb = settings.profile_mb
    samples: dict[str, list[float]] = defaultdict(list)
    totals: list[float] = []
    raws: list[float] = []
    for rep in range(settings.reps):
        root = fresh_dir(settings.work, f"profile-{mb:g}")
        proc = Proc(train_cmd(root, "--state-mb", str(mb), "--announce", "--trace", "--batches", "100000"))
        proc.wait_for(step_at_least("STEP", rng.randint(5, 20)))
        sent = proc.signal(SIGTERM)
        exited = proc.finish()
        if proc.popen.returncode != 0 or not checkpoint_files(root):
            raise RuntimeError(f"traced SIGTERM run failed (exit {proc.popen.returncode}):\n{proc.tail()}")
        size = checkpoint_files(root)[-1].stat().st_size
        stages = breakdown(proc.lines, sent, exited)
        raw = raw_write(size, root)
        shutil.rmtree(root, ignore_errors=True)
        for stage, seconds in stages.items():
            samples[stage].append(seconds)
        totals.append(exited - sent)
        raws.append(raw)
        log(
            f"exit breakdown {mb:g} MB rep {rep + 1}: {exited - sent:.3f}s (raw {raw:.3f}s): "
            + ", ".join(f"{k} {v * 1000:.0f}" for k, v in stages.items())
            + " ms"
        )
    # What the save path itself costs (cut → committed), next to the raw write of the same bytes:
    # the exit minus the step in flight and the teardown, which do not depend on it.
    saves = [sum(samples[stage][i] for stage in SAVE_PATH) for i in range(len(totals))]
    save_stat, raw_stat = Stat.of(saves), Stat.of(raws)
    save_row = Row(
        figure="SIGTERM → exit, stage by stage",
        case=f"{mb:g} MB state: the save path ({', '.join(SAVE_PATH)})",
        unit="s",
        value=save_stat,
        baseline=raw_stat,
        baseline_label="os.write + fsync of the same bytes",
        ratio=Stat.of(s / r for s, r in zip(saves, raws)),
        target="≤ 1.15 × raw (the exit's target, less what is not the save's)",
        met=save_stat.median <= 1.15 * raw_stat.median,
    )
    other = Stat.of(abs(v) for v in samples["other"])
    row = Row(
        figure="SIGTERM → exit, stage by stage",
        case=f"{mb:g} MB state: time no stage accounts for",
        unit="s",
        value=other,
        baseline=Stat.of(totals),
        baseline_label="SIGTERM → exit of the same runs (traced)",
        ratio=Stat.of(abs(o) / t for o, t in zip(samples["other"], totals)),
        target="≤ 0.1 s: every 100 ms is accounted for",
        met=other.median <= 0.1,
        notes="stages in the table below (results.md) and in results.json, extra.exit_breakdown",
    )
    extra = {
        "exit_breakdown": {
            "mb": mb,
            "stages": {stage: Stat.of(samples[stage]) for stage in STAGES},
            "total": Stat.of(totals),
            "raw": Stat.of(raws),
        }
    }
    return [save_row, row], extra

"""Resume state: one checkpoint per run, kept across other runs within a bound."""

from __future__ import annotations

import os
from pathlib import Path

from checkpoint import KEEP_OTHER_RUNS, checkpoint_path, fingerprint, prune_other_runs


def test_each_run_has_its_own_checkpoint_file(tmp_path: Path) -> None:
    data = tmp_path / "train.pt"
    data.write_bytes(b"images")
    a = fingerprint([], "device cpu", [data])
    assert fingerprint([], "device cpu", [data]) == a
    assert fingerprint([], "device cuda", [data]) != a  # another device: another run
    data.write_bytes(b"other images")
    assert fingerprint([], "device cpu", [data]) != a  # other data: another run
    assert checkpoint_path(tmp_path, a) == tmp_path / f"{a[:16]}.pt"


def test_other_runs_checkpoints_are_kept_up_to_the_bound(tmp_path: Path) -> None:
    own = tmp_path / f"{'0' * 16}.pt"
    own.write_bytes(b"")
    others = []
    for age in range(KEEP_OTHER_RUNS + 2):  # the oldest last
        path = tmp_path / f"{age + 1:016x}.pt"
        path.write_bytes(b"state")
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
        others.append(path)
    os.utime(own, (1, 1))  # the oldest of all, and never removed
    kept = [tmp_path / "train.lock", tmp_path / "mine.pt"]  # not checkpoints: never removed
    for path in kept:
        path.write_text("1\n")
        os.utime(path, (0, 0))
    removed = prune_other_runs(own)
    assert removed == others[KEEP_OTHER_RUNS:]
    assert sorted(tmp_path.iterdir()) == sorted([own, *kept, *others[:3]])
    assert prune_other_runs(own) == []  # within the bound: nothing more goes

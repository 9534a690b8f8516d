"""GPU claims (src/pipeline/gpus.py), with a faked device count: one GPU per run, a
run waiting while every GPU is held, all-or-none, locks shared by every user's runs
and named by the GPUs' ids."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import gpus
from pipeline.errors import PipelineError

# The claim itself needs no torch (the GPUs are faked), so the claimers run without it:
# a stand-in module spares each of them torch's import, seconds of CPU; a claim that
# came to use torch would fail here on the stand-in's missing attribute.
CLAIM = """
import sys, time, types
sys.path.insert(0, "src")
sys.modules["torch"] = types.ModuleType("torch")
from pipeline import gpus
print(gpus.claim_gpus(int(sys.argv[1]), ["0", "1"], sys.argv[2]), flush=True)
time.sleep(600)
"""


def claimer(count: int, lock_dir: Path) -> subprocess.Popen:
    """A process that claims `count` of two faked GPUs, prints their positions and holds them."""
    root = Path(__file__).parent.parent
    return subprocess.Popen(
        [sys.executable, "-c", CLAIM, str(count), str(lock_dir)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )


def claimed(run: subprocess.Popen) -> str:
    """The line with the positions `run` took, after any waiting messages."""
    line = run.stdout.readline()
    while line.startswith("wait"):
        line = run.stdout.readline()
    return line


def test_each_run_claims_a_gpu_that_no_other_run_holds(tmp_path: Path) -> None:
    first, second = claimer(1, tmp_path), None
    try:
        assert first.stdout.readline() == "[0]\n"
        second = claimer(1, tmp_path)
        assert second.stdout.readline() == "[1]\n"
    finally:
        for run in (first, second):
            if run:
                run.kill()
                run.wait()


def test_a_run_waits_while_every_gpu_is_held_and_takes_a_freed_one(tmp_path: Path) -> None:
    holders = [claimer(1, tmp_path) for _ in range(2)]
    waiting = None
    try:
        assert sorted(h.stdout.readline() for h in holders) == ["[0]\n", "[1]\n"]
        waiting = claimer(1, tmp_path)
        message = waiting.stdout.readline()
        assert message.startswith("waiting for 1 free GPU(s) of 2: other runs of this project")
        assert f"GPU 0: pid {holders[0].pid}" in message or f"GPU 1: pid {holders[0].pid}" in (
            message
        )
        time.sleep(1)
        assert waiting.poll() is None
        holders[1].kill()  # dies without releasing anything: the OS releases its lock
        holders[1].wait()
        assert waiting.stdout.readline().startswith("waited ")
        assert waiting.stdout.readline() in ("[0]\n", "[1]\n")
    finally:
        for run in [*holders, waiting]:
            if run:
                run.kill()
                run.wait()


def test_a_run_takes_all_the_gpus_it_needs_or_none(tmp_path: Path) -> None:
    one = claimer(1, tmp_path)
    pair = single = None
    try:
        assert one.stdout.readline() == "[0]\n"
        pair = claimer(2, tmp_path)
        assert pair.stdout.readline().startswith("waiting for 2 free GPU(s) of 2")
        # while it waits it holds nothing: another single claim gets the free GPU (it may
        # first meet the pair's retry, which holds that GPU for an instant, and wait)
        single = claimer(1, tmp_path)
        assert claimed(single) == "[1]\n"
        single.kill()
        single.wait()
        one.kill()
        one.wait()
        assert claimed(pair) == "[0, 1]\n"
    finally:
        for run in (one, pair, single):
            if run:
                run.kill()
                run.wait()


def test_more_gpus_than_there_are_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="3 GPUs wanted, but this machine shows 2"):
        gpus.claim_gpus(3, ["0", "1"], tmp_path)


def test_gpu_locks_are_shared_by_every_users_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locks = tmp_path / "locks"
    assert gpus.claim_gpus(1, ["0", "1"], locks) == [0]  # held until pytest ends: a temp dir
    assert locks.stat().st_mode & 0o7777 == 0o1777  # like /tmp: anyone adds, only owners remove
    assert (locks / "gpu-0.lock").stat().st_mode & 0o777 == 0o666
    # a lock file another user made read-only for us still locks (flock needs no write)
    (locks / "gpu-1.lock").write_text("4242\n")

    def refused(path: str, flags: int, *args: object) -> int:  # writing, as for another user
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise PermissionError("not ours")
        return real_open(path, flags, *args)

    real_open = os.open
    monkeypatch.setattr(gpus.os, "open", refused)
    assert gpus.claim_gpus(1, ["0", "1"], locks) == [1]
    assert (locks / "gpu-1.lock").read_text() == "4242\n"  # could not write our pid


def test_gpu_locks_are_named_by_the_gpus_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs that number one GPU differently (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER)
    still lock the same file: its UUID's."""
    monkeypatch.setattr(gpus, "gpu_ids", lambda: ["GPU-5a1e"])
    assert gpus.claim_gpus(1, ["3"], tmp_path) == [0]
    assert [p.name for p in tmp_path.iterdir()] == ["gpu-GPU-5a1e.lock"]


def test_a_link_in_the_shared_lock_folder_is_refused(tmp_path: Path) -> None:
    """Anyone may write in the folder: a link there must not make us chmod, truncate or
    write another file (someone else's ~/.bashrc, say)."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "gpu-0.lock").symlink_to(victim)
    os.link(victim, locks / "gpu-1.lock")
    for gpu in ("0", "1"):
        with pytest.raises(PipelineError, match=f"gpu-{gpu}.lock is not a plain lock file"):
            gpus.claim_gpus(1, [gpu], locks)
    assert victim.read_text() == "precious\n" and victim.stat().st_mode & 0o777 == 0o600


def test_a_lock_folder_we_may_not_write_to_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(path: str, flags: int, *args: object) -> int:  # no file yet, no right to add one
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(gpus.os, "open", refused)
    with pytest.raises(PipelineError, match=r"cannot open the GPU lock .*gpu-0.lock \(No such"):
        gpus.claim_gpus(1, ["0"], tmp_path)


def test_gpus_are_named_by_uuid_where_torch_reports_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA_VISIBLE_DEVICES=1,0 and =0,1 name the same two GPUs: their locks are by UUID."""
    uuids = {0: "GPU-5a1e", 1: "GPU-77c3"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=uuids[1 - i])
    )
    assert gpus.visible_gpus() == ["1", "0"]
    assert gpus.gpu_ids() == ["GPU-77c3", "GPU-5a1e"]

    def no_uuid(i: int) -> object:  # an older torch, or a device without one
        return SimpleNamespace()

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_uuid)
    assert gpus.gpu_ids() is None  # claim_gpus then names the locks as visible_gpus does

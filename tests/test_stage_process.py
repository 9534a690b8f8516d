"""A stage's process: it stops when the process that started it dies (however), and two
runs of one stage never write one workspace's outputs at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    TINY,
    alive,
    processes_running,
    wait_until,
    write_params,
    write_processed,
)

from pipeline.errors import PipelineError
from pipeline.locks import stage_lock

# A stand-in stage: runs under process.run like every stage, says it started, and
# records that its `finally` ran (the atomic writes' clean-up runs there).
STAGE = """
import sys, time
sys.path.insert(0, {src!r})
from pipeline import process

def main():
    open("started", "w").close()
    try:
        while True:
            time.sleep(0.05)
    finally:
        open("cleaned-up", "w").close()

time.sleep({delay})  # still importing, as a stage does before it calls run()
process.run(main)
"""

# A stand-in for `dvc`, named dvc as DVC's entry point is: starts the stage as DVC does
# (DVC_STAGE set; through a shell, as with SHELL=/bin/sh, or directly) and waits.
FAKE_DVC = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as under a terminal, even if the tests run in nohup
command = [sys.executable, "stage.py"]
if sys.argv[1] == "shell":
    command = ["/bin/sh", "-c", " ".join(command) + "; true"]  # `; true`: sh cannot exec
subprocess.Popen(command, env=os.environ | {{"DVC_STAGE": "train"}})
time.sleep(600)
"""


def stage_pids(folder: Path) -> list[int]:
    return processes_running(b"stage.py", folder)


def stage_pid(folder: Path) -> int:
    [pid] = stage_pids(folder)  # the interpreter itself, never the shell (its argv differs)
    return pid


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("launch", ["direct", "shell"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL, signal.SIGHUP])
def test_a_stage_stops_when_its_dvc_process_dies(tmp_path: Path, launch: str, signum: int) -> None:
    (tmp_path / "stage.py").write_text(STAGE.format(src=str(ROOT / "src"), delay=0))
    (tmp_path / "dvc").write_text(FAKE_DVC.format())
    dvc = subprocess.Popen([sys.executable, "dvc", launch], cwd=tmp_path)
    pid = 0
    try:
        wait_until(lambda: (tmp_path / "started").exists(), seconds=30)
        assert (tmp_path / "started").exists(), "the stage did not start"
        pid = stage_pid(tmp_path)
        dvc.send_signal(signum)  # not reaped yet: a zombie `dvc` counts as dead too
        start = time.monotonic()
        wait_until(lambda: not alive(pid), seconds=10)
        assert not alive(pid), f"the stage outlived its dvc process by 10 s ({launch})"
        assert time.monotonic() - start < 5
        assert (tmp_path / "cleaned-up").exists()  # it stopped as an interrupt stops it
    finally:
        dvc.kill()
        dvc.wait()
        if pid and alive(pid):  # leave nothing running behind a failed test
            os.kill(pid, signal.SIGKILL)


# A stand-in stage whose clean-up takes a while, as removing a large temp folder does,
# and whose interpreter would take a minute to shut down (torch's takes seconds on a
# loaded machine).
SLOW_CLEANUP_STAGE = """
import atexit, signal, sys, time
sys.path.insert(0, {src!r})
from pipeline import process
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as under a terminal, even if the tests run in nohup
atexit.register(time.sleep, 60)

def main():
    print("working")  # held in stdout's buffer (a pipe)
    open("started", "w").close()
    try:
        while True:
            time.sleep(0.05)
    finally:
        open("stopping", "w").close()
        time.sleep(1)
        open("cleaned-up", "w").close()

process.run(main)
"""


@pytest.mark.parametrize(
    "signums", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGHUP, signal.SIGTERM)]
)
def test_a_repeated_stop_signal_does_not_cut_the_clean_up_short(
    tmp_path: Path, signums: tuple[int, int]
) -> None:
    """The death of `dvc` sends its stage two SIGTERMs (the kernel's and the watcher's),
    SLURM and systemd may repeat theirs: the second must not interrupt the `finally`
    blocks that the first started (seen once under load in the dvc-death test above).
    Once they have run the stage is gone at once, its output written, without waiting
    for the interpreter's shutdown."""
    (tmp_path / "stage.py").write_text(SLOW_CLEANUP_STAGE.format(src=str(ROOT / "src")))
    stage = subprocess.Popen(
        [sys.executable, "stage.py"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},  # buffered
    )
    try:
        wait_until(lambda: (tmp_path / "started").exists(), seconds=30)
        stage.send_signal(signums[0])
        wait_until(lambda: (tmp_path / "stopping").exists(), seconds=10)
        assert (tmp_path / "stopping").exists(), "the first signal did not stop the stage"
        stage.send_signal(signums[1])
        stdout, stderr = stage.communicate(timeout=30)
    finally:
        stage.kill()
    assert (tmp_path / "cleaned-up").exists(), stderr
    assert stage.returncode == 130, stderr
    assert (stdout, stderr) == ("working\n", "interrupted\n")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("launch", ["direct", "shell"])
def test_a_stage_whose_dvc_died_while_it_started_stops_too(tmp_path: Path, launch: str) -> None:
    (tmp_path / "stage.py").write_text(STAGE.format(src=str(ROOT / "src"), delay=3))
    (tmp_path / "dvc").write_text(FAKE_DVC.format())
    dvc = subprocess.Popen([sys.executable, "dvc", launch], cwd=tmp_path)
    pid = 0
    try:
        wait_until(lambda: bool(stage_pids(tmp_path)), seconds=30)
        pid = stage_pid(tmp_path)
        dvc.kill()  # before the stage reached run(): it is an orphan when it gets there
        dvc.wait()
        wait_until(lambda: not alive(pid), seconds=15)
        assert not alive(pid), f"an orphaned stage ran on ({launch})"
    finally:
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_second_holder_of_a_stage_lock_is_refused_naming_the_first(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys, time
                sys.path.insert(0, {str(ROOT / "src")!r})
                from pipeline.locks import stage_lock
                with stage_lock("train", {str(tmp_path)!r}):
                    print("held", flush=True)
                    time.sleep(600)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(PipelineError) as error, stage_lock("train", tmp_path):
            pass
        assert f"another run of the train stage (pid {holder.pid})" in str(error.value)
        with stage_lock("evaluate", tmp_path):  # another stage: its own lock
            pass
    finally:
        holder.kill()  # the operating system releases the lock of a killed holder
        holder.wait()
    with stage_lock("train", tmp_path):
        assert (tmp_path / "train.lock").read_text() == f"{os.getpid()}\n"


def test_a_second_trainer_fails_at_once_naming_the_first(project: Path) -> None:
    write_processed(project)
    write_params(project, TINY | {"train": TINY["train"] | {"epochs": 500}})
    first = subprocess.Popen(
        [sys.executable, "src/train.py"],
        cwd=project,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = project / "models/checkpoints"
    try:
        # the first run is past its data once it has checkpointed an epoch; then the
        # data goes, so that a second run that read it before the lock would fail so
        wait_until(lambda: any(checkpoints.glob("*.pt")), seconds=120)
        (project / "data/processed").rename(project / "data/processed-aside")
        second = subprocess.run(
            [sys.executable, "src/train.py"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=60,  # a second trainer that is not refused would train on
        )
        assert second.returncode == 1
        assert second.stderr.splitlines() == [
            f"error: another run of the train stage (pid {first.pid}) is writing this "
            "workspace's outputs (models/checkpoints/train.lock is locked): wait for it, "
            "or stop it"
        ]
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
    assert not (project / "models/model.pt").exists()

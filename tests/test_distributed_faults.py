"""Data-parallel training (src/pipeline/distributed.py) with Gloo on the CPU when
something goes wrong: a process that fails or is killed stops the others with one
error naming the cause; a hang-up, SIGTERM and SIGKILL to the launcher; the killed
run resuming to the weights of an uninterrupted one. (What two processes train:
test_distributed.py.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import (
    TWO,
    alive,
    largest_difference,
    make_project,
    processes_running,
    run_cmd,
    tiny_train_params,
    wait_until,
    write_params,
    write_processed,
)

from pipeline import distributed, process
from pipeline.distributed import STOP_SIGNALS
from pipeline.errors import PipelineError
from pipeline.files import load_torch
from pipeline.loop import Run, out_of_memory_named
from pipeline.settings import training_settings


def workers_of(launcher: int) -> dict[int, int]:
    """{rank: pid} of the training processes that `launcher` started."""
    workers = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and process._parent_of(int(entry.name)) == launcher:
                env = dict(
                    v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if v
                )
                if b"RANK" in env:
                    workers[int(env[b"RANK"])] = int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return workers


def start_long_run(
    project: Path, epochs: int, preexec_fn: Callable[[], object] | None = None
) -> subprocess.Popen:
    """`python src/train.py` with two processes, returned once epoch 1's checkpoint is
    written; `preexec_fn` runs in the launcher before it starts (as nohup does)."""
    write_params(project, {"train": TWO["train"] | {"epochs": epochs}})
    (project / "tmp").mkdir(exist_ok=True)  # the launcher's logs, left when it is killed
    run = subprocess.Popen(
        [sys.executable, "src/train.py"],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"TMPDIR": str(project / "tmp")},
        preexec_fn=preexec_fn,
    )
    checkpoints = project / "models/checkpoints"
    wait_until(lambda: any(checkpoints.glob("*.pt")), seconds=60)  # epoch 1 is done
    assert any(checkpoints.glob("*.pt")), run.communicate()
    return run


def test_a_failed_process_stops_the_others_with_one_error(project: Path) -> None:
    write_processed(project)
    run = start_long_run(project, epochs=200)
    workers = workers_of(run.pid)
    assert sorted(workers) == [0, 1]
    assert sorted(processes_running(b"src/train.py", project)) == sorted(
        [run.pid, *workers.values()]
    )
    os.kill(workers[1], signal.SIGKILL)  # as the out-of-memory killer would
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 1
    # one line: not the traceback of process 0, whose all-reduce lost its peer
    [line] = stderr.splitlines()
    logs = re.fullmatch(
        r"error: training process 1 of 2 was killed by signal 9 \(its error, if it printed "
        r"one, is above; every process's stderr is in (\S+)\); the others were stopped, and "
        r"`dvc repro` resumes from the run's last checkpoint if one was written "
        r"\(train\.checkpoint_minutes, train\.checkpoint_every\), else trains it again",
        line,
    )
    assert logs, line
    # kept there: process 0's account (its peer's connection lost, or stopped: "interrupted")
    assert distributed.stderr_of(Path(logs[1]), 0).strip()
    wait_until(lambda: not any(alive(pid) for pid in workers.values()), seconds=40)
    assert processes_running(b"src/train.py", project) == []
    assert not (project / "models/model.pt").exists()
    assert not (project / "reports/train").exists()


LONG_RUN_EPOCHS = 6


@pytest.fixture(scope="module")
def uninterrupted_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The weights of the run that the interrupted runs below make, never interrupted."""
    project = make_project(tmp_path_factory.mktemp("uninterrupted") / "project")
    write_processed(project)
    write_params(project, {"train": TWO["train"] | {"epochs": LONG_RUN_EPOCHS}})
    run_cmd([sys.executable, "src/train.py"], cwd=project)
    return load_torch(project / "models/model.pt")["state_dict"]


def stopped_leaving_a_checkpoint(
    project: Path, run: subprocess.Popen, workers: dict[int, int]
) -> str:
    """Wait for `run` and its workers to end; check they left the run's checkpoint and no
    model; its stderr."""
    _, stderr = run.communicate(timeout=60)
    # the workers gone, not only their command lines: an exiting one has none but runs on
    wait_until(lambda: not any(alive(pid) for pid in workers.values()), seconds=40)
    assert not any(alive(pid) for pid in workers.values())
    assert processes_running(b"src/train.py", project) == []
    assert not (project / "models/model.pt").exists()
    assert len([c for c in (project / "models/checkpoints").glob("*.pt")]) == 1
    return stderr


def test_a_killed_run_resumes_to_the_same_weights(
    project: Path, uninterrupted_weights: dict[str, torch.Tensor]
) -> None:
    write_processed(project)
    run = start_long_run(project, LONG_RUN_EPOCHS)
    workers = workers_of(run.pid)
    assert sorted(workers) == [0, 1]
    run.send_signal(signal.SIGKILL)  # the launcher dies outright
    stopped_leaving_a_checkpoint(project, run, workers)
    resumed = subprocess.run(  # a process that did not resume would wait for the others
        [sys.executable, "src/train.py"], cwd=project, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from models/checkpoints/" in resumed.stdout
    weights = load_torch(project / "models/model.pt")["state_dict"]
    assert largest_difference(weights, uninterrupted_weights) == 0.0


def test_a_hang_up_is_ignored_and_sigterm_stops_every_process_as_an_interrupt(
    project: Path,
) -> None:
    """`nohup dvc repro &` with several processes: a hang-up stops none of them, they
    train on; SIGTERM to the launcher (dvc's kill reaches it) stops them all as an
    interrupt, leaving the checkpoint to resume from."""
    write_processed(project)
    run = start_long_run(
        project, epochs=60, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)
    )
    workers = workers_of(run.pid)
    assert sorted(workers) == [0, 1]
    [checkpoint] = (project / "models/checkpoints").glob("*.pt")
    run.send_signal(signal.SIGHUP)
    for _ in range(2):  # two more epochs' checkpoints: every process trains on
        last = checkpoint.stat().st_mtime_ns
        wait_until(lambda: checkpoint.stat().st_mtime_ns != last or run.poll() is not None, 60)  # noqa: B023
        assert run.poll() is None and checkpoint.stat().st_mtime_ns != last, run.communicate()
    assert all(alive(pid) for pid in workers.values())
    run.send_signal(signal.SIGTERM)
    stderr = stopped_leaving_a_checkpoint(project, run, workers)
    assert run.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted"


def stderr_logs(tmp_path: Path, stderr: dict[int, str]) -> Path:
    """A launch's log folder (the launch API's layout) with each rank's stderr."""
    for rank, text in stderr.items():
        folder = tmp_path / "run" / "attempt_0" / str(rank)
        folder.mkdir(parents=True)
        (folder / "stderr.log").write_text(text)
    return tmp_path


LOST = "Traceback (most recent call last):\n...\nRuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5302\n"  # noqa: E501
OOM = "Traceback (most recent call last):\n...\ntorch.OutOfMemoryError: CUDA out of memory.\n"
# NCCL's words for a peer that is gone, and for an error of this rank's own GPU
NCCL_LOST = "Traceback (most recent call last):\n...\ntorch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:2027, remote process exited or there was a network error, NCCL version 2.27.5\nncclRemoteError: A call failed possibly due to a network error or a remote process exiting prematurely.\n"  # noqa: E501
GLOO_TIMEOUT = "Traceback (most recent call last):\n...\nRuntimeError: [../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv operation to complete\n"  # noqa: E501
NCCL_TIMEOUT = "[rank0]:[E] [PG ID 0 PG GUID 0(default_pg) Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE) ran for 600000 milliseconds before timing out.\n"  # noqa: E501
NCCL_OWN = "Traceback (most recent call last):\n...\ntorch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:2027, unhandled cuda error (run with NCCL_DEBUG=INFO for details), NCCL version 2.27.5\nncclUnhandledCudaError: Call to CUDA function failed.\n"  # noqa: E501


@pytest.mark.parametrize(
    ("exit_codes", "stderr", "cause"),
    [
        ({0: 1, 1: -9}, {0: LOST, 1: ""}, 1),  # killed (the OOM killer); 0 lost its peer
        ({0: 130, 1: -9}, {0: "interrupted\n", 1: ""}, 1),  # 0 stopped by the launcher
        ({0: 130, 1: 1}, {0: "interrupted\n", 1: OOM}, 1),  # an error on rank 1 alone
        ({0: 1, 1: 1}, {0: LOST, 1: OOM}, 1),
        ({0: -9, 1: 1}, {0: "", 1: OOM}, 1),  # 0 hung in NCCL, killed after the timeout
        ({0: -9, 1: 1}, {0: "", 1: "error: checkpoint unreadable\n"}, 1),
        ({0: 1, 1: -15}, {0: "error: out of memory on cuda ...\n", 1: ""}, 0),
        ({0: 130, 1: 1}, {0: "interrupted\n", 1: ""}, 1),  # 1 exited silently
        ({0: 1, 1: -15}, {0: "", 1: ""}, 0),  # 1 stopped before its handler was set
        ({0: 1, 1: 1}, {0: LOST, 1: LOST}, 0),  # no evidence either way: the lower
        ({0: 1, 1: -9}, {0: NCCL_LOST, 1: ""}, 1),  # NCCL: its peer is gone
        ({0: -9, 1: 1}, {0: "", 1: NCCL_OWN}, 1),  # an NCCL error of its own: a cause
        ({0: 1, 1: -9}, {0: GLOO_TIMEOUT, 1: ""}, 1),  # waited for its peer in vain
        ({0: 1, 1: -9}, {0: NCCL_TIMEOUT, 1: ""}, 1),
    ],
)
def test_the_failure_named_is_the_cause_not_a_consequence(
    tmp_path: Path, exit_codes: dict[int, int], stderr: dict[int, str], cause: int
) -> None:
    assert distributed.root_cause(exit_codes, stderr_logs(tmp_path, stderr)) == cause


def test_out_of_memory_on_any_process_is_one_clear_error() -> None:
    def records() -> Iterator[dict]:
        yield {"epoch": 1}
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    p = tiny_train_params(batch_size=50)
    named = out_of_memory_named(records(), Run(p, training_settings(p, torch.device("cpu"))))
    assert next(named) == {"epoch": 1}
    with pytest.raises(PipelineError, match=r"^out of memory on cpu with train.batch_size = 50 "):
        next(named)


def test_the_launcher_puts_its_signal_handlers_back(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launch API installs its own handlers and leaves them: they are ours again after."""
    handlers = {getattr(signal, n): signal.getsignal(getattr(signal, n)) for n in STOP_SIGNALS}

    def launch_api(config: object, entrypoint: str) -> Callable[[str], None]:
        def run(script: str) -> None:
            for signum in handlers:
                signal.signal(signum, lambda *_: None)

        return run

    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", launch_api)
    monkeypatch.setenv(distributed.LAUNCHER_ENV, "")  # launch sets it for its workers
    distributed.launch(2, str(project / "src/train.py"), None)
    assert {s: signal.getsignal(s) for s in handlers} == handlers

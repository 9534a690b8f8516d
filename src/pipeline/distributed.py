"""Data-parallel training on torch.distributed, launched as torchrun launches it.

With `train.processes` > 1, `python src/train.py` starts that many workers of
itself through torch.distributed's elastic launch API (what `torchrun` runs:
c10d rendezvous on this machine, no restarts) and waits for them. A process
that torchrun started (it sets RANK, WORLD_SIZE, LOCAL_RANK, ...) is a worker
already: `torchrun --nnodes 2 --nproc-per-node 4 ... src/train.py` trains on
several machines. Workers join one process group (NCCL on GPUs, Gloo on CPUs);
DistributedDataParallel all-reduces the gradients and SyncBatchNorm the
BatchNorm statistics, so N processes train the model that one process trains
with the same global batch (docs/scaling.md).

Read by the train stage only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import ERROR_PREFIX, EXIT_INTERRUPTED, PipelineError
from pipeline.gpus import claim_for_workers
from pipeline.locks import LAUNCHER_ENV
from pipeline.progress import say
from pipeline.settings import resolve_processes

# The signals that stop a run; the launch API installs handlers for them.
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
# Exit codes of a worker that the launch API stopped with SIGTERM: a consequence.
STOPPED = {EXIT_INTERRUPTED, -signal.SIGTERM}  # -15: stopped before our handler was set
# What a worker prints when a peer is gone (Gloo's closed connection, NCCL's remote
# error or aborted communicator): a consequence too. Any other error, an NCCL error
# about this process's own GPU included, is evidence of a cause.
LOST_PEER = (
    "Connection closed by peer",
    "Connection reset by peer",
    "ncclRemoteError",
    "remote process exited",
    "communicator was aborted",
    "Timed out waiting",  # Gloo, its peer gone silent
    "Watchdog caught collective operation timeout",  # NCCL, likewise
)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0  # among all processes, on every machine
    size: int = 1  # all processes
    local_rank: int = 0  # among this machine's processes
    local_size: int = 1  # this machine's processes

    @property
    def main(self) -> bool:
        """The process that logs, prints and writes the checkpoints, model and reports."""
        return self.rank == 0


ONE_PROCESS = World()


def world_from_env() -> World | None:
    """The world torchrun (or our launcher) described in the environment; None if none."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    env = os.environ
    size = int(env["WORLD_SIZE"])
    return World(
        int(env["RANK"]),
        size,
        int(env.get("LOCAL_RANK", env["RANK"])),
        int(env.get("LOCAL_WORLD_SIZE", size)),
    )


def launch(processes: int, script: str, gpus: list[str] | None) -> None:
    """Run `script` as `processes` workers on this machine (elastic launch, as
    `torchrun --standalone --nproc-per-node N` does) and wait for them. `gpus`: the
    CUDA devices claimed for them, one each. If one fails, the launch API stops the
    others. The workers' stderr goes to files: on success the main process's is
    printed; on a failure only the one that caused it (root_cause), then one
    PipelineError. The others' tracebacks (lost their peer) would only mislead."""
    from torch.distributed.elastic.multiprocessing.api import (
        DefaultLogsSpecs,
        SignalException,
        Std,
    )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ[LAUNCHER_ENV] = str(os.getpid())
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    # the agent logs each worker's failure at length; ours is the one line below
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logs = Path(tempfile.mkdtemp(prefix="train-launch-"))
    config = LaunchConfig(
        logs_specs=DefaultLogsSpecs(log_dir=str(logs), redirects=Std.ERR),
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=f"train-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        max_restarts=0,  # a failure is reported, not retried: a resume is `dvc repro`
        monitor_interval=0.5,
    )
    # the launch API handles these signals itself; not those that were ignored here
    # (nohup's SIGHUP, a background job's SIGINT): they stay ignored, as in one process
    if "signals_to_handle" in {f.name for f in dataclasses.fields(LaunchConfig)}:
        config.signals_to_handle = ",".join(handled_signals())
    saved = {getattr(signal, n): signal.getsignal(getattr(signal, n)) for n in STOP_SIGNALS}
    try:
        elastic_launch(config, sys.executable)(script)
        sys.stderr.write(stderr_of(logs, 0))  # warnings, say
        shutil.rmtree(logs, ignore_errors=True)
    except ChildFailedError as failed:  # the logs stay: the others' stderr may still help
        rank = root_cause({r: f.exitcode for r, f in failed.failures.items()}, logs)
        failure = failed.failures[rank]
        sys.stderr.write(stderr_of(logs, rank))
        how = (
            f"was killed by signal {-failure.exitcode}"
            if failure.exitcode < 0
            else f"exited with code {failure.exitcode}"
        )
        raise PipelineError(
            f"training process {rank} of {processes} {how} (its error, if it printed one, "
            f"is above; every process's stderr is in {logs}); the others were stopped, "
            "and `dvc repro` resumes from the run's last checkpoint if one was written "
            "(train.checkpoint_minutes, train.checkpoint_every), else trains it again"
        ) from None
    except SignalException:  # the agent stopped the workers first
        shutil.rmtree(logs, ignore_errors=True)
        raise KeyboardInterrupt from None
    finally:  # the launch API leaves its handlers installed
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def launch_if_several(
    requested: int | str, batch_size: int, device: torch.device, script: str
) -> bool:
    """With several training processes wanted (`train.processes`) and none started yet,
    claim their GPUs, start them as workers of `script` and wait for them: True if it
    did. A worker already (ours, or torchrun's) or one process: False."""
    if world_from_env() is not None:
        return False
    gpu_count = torch.cuda.device_count() if device.type == "cuda" else 0
    processes = resolve_processes(requested, gpu_count, batch_size)
    if processes == 1:
        return False
    claimed = claim_for_workers(processes, device)
    where = f"GPUs {', '.join(claimed)} (NCCL)" if claimed else "the CPU (Gloo)"
    say(f"starting {processes} training processes on {where}")
    launch(processes, script, claimed)
    return True


def stderr_of(logs: Path, local_rank: int) -> str:
    """What the worker `local_rank` wrote to stderr (the launch API's log layout)."""
    files = sorted(logs.glob(f"*/attempt_*/{local_rank}/stderr.log"))
    return files[-1].read_text(errors="replace") if files else ""


def root_cause(exit_codes: dict[int, int], logs: Path) -> int:
    """The rank whose failure caused the others', by the evidence each left: first one
    that stopped with its own error line (a PipelineError), then one with a traceback
    that is not about a lost peer (an error on that rank alone, out of memory say), then
    one killed by a signal (the out-of-memory killer's SIGKILL), then the lowest. Not
    causes: those the launch API stopped (SIGTERM: EXIT_INTERRUPTED from our handler, or
    -15) and tracebacks of a lost peer (LOST_PEER). Two ranks
    both killed by SIGKILL (one by the kernel, one hung in NCCL and killed by the launch
    API) cannot be told apart: the lower is named."""

    def evidence(rank: int) -> int:
        text = stderr_of(logs, rank).strip()
        if text and text.splitlines()[-1].startswith(ERROR_PREFIX):
            return 0
        if exit_codes[rank] in STOPPED:
            return 4
        if "Traceback" in text and not any(s in text for s in LOST_PEER):
            return 1
        return 2 if exit_codes[rank] < 0 else 3

    return min(exit_codes, key=lambda rank: (evidence(rank), rank))


def handled_signals() -> list[str]:
    """The stop signals that this process does not ignore."""
    return [n for n in STOP_SIGNALS if signal.getsignal(getattr(signal, n)) is not signal.SIG_IGN]


def start(world: World, device: torch.device) -> None:
    """Join the process group of `world` (from torchrun's environment variables)."""
    if world.size == 1:
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        torch.set_num_threads(threads_per_process(world.local_size))
        dist.init_process_group("gloo")


def threads_per_process(local_size: int) -> int:
    """Torch threads of each of `local_size` training processes on one machine's CPU:
    its cores shared among them, as torchrun does."""
    return max(1, (os.cpu_count() or 1) // local_size)


def all_done() -> None:
    """Wait until every process got here: the main one writes the outputs while the
    others are done, and NCCL's teardown may itself be collective."""
    if dist.is_initialized():
        dist.barrier()


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(net: nn.Module, device: torch.device, world: World) -> nn.Module:
    """`net` wrapped so that its gradients are averaged over the processes after each
    backward pass (DistributedDataParallel); `net` itself when there is one process."""
    if world.size == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all processes, in place."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def from_main(obj: Any) -> Any:
    """The main process's `obj`, in every process (pickled: our own objects only)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]

"""The device a run uses, and what every `auto` setting means there.

One Settings object holds what the `auto` params resolved to, for training (the
train stage, the benchmark) and for inference (the evaluate stage, predict, the
validation inside training). Every rule is here, with the measurement behind it
(docs/speed.md), so train, evaluate, predict and bench cannot disagree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.params import ANY_MACHINE

if TYPE_CHECKING:
    from pipeline.train_params import TrainParams

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# `auto` images per evaluation batch: large batches fill a GPU, while on the 2-core
# Xeon inference ran 1.2x to 1.6x slower at batch 256 and up than at 32 or 64
# (docs/speed.md; reports/bench/cpu-eval-batch.txt), so a CPU takes 64.
EVAL_BATCH_AUTO = {"cpu": 64, "cuda": 1024, "mps": 1024}


def available_devices() -> dict[str, bool]:
    return {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}


def missing_device(requested: str) -> str | None:
    """Why `requested` (a Device) cannot run here, or None if it can."""
    if requested in ANY_MACHINE or available_devices()[requested]:
        return None
    return f"torch {torch.__version__} sees no {requested.upper()} device on this machine"


def pick_device(requested: str) -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; a named device that is absent is an error."""
    if requested == "auto":
        has = available_devices()
        return torch.device(next((n for n in ("cuda", "mps") if has[n]), "cpu"))
    if missing_device(requested):
        raise PipelineError(
            f"device '{requested}' was asked for but torch sees none on this machine "
            f"(torch {torch.__version__}); use 'auto' or 'cpu'"
        )
    return torch.device(requested)


def cpu_has_amx() -> bool:
    """Intel AMX: tile matrix units that run bf16 matmuls and convolutions in hardware."""
    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(supported and supported())


@dataclass(frozen=True)
class Settings:
    """What `auto` resolved to on this device: how a run computes, not what."""

    device: torch.device
    precision: str  # fp32, bf16 or fp16 (autocast)
    channels_last: bool
    eval_batch_size: int  # images per inference batch
    compile: bool = False  # training only, as are the options below
    cuda_graphs: bool = False
    fused_optimizer: bool = False
    sync_batchnorm: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """None for plain fp32."""
        return AUTOCAST_DTYPES[self.precision]

    def autocast(self) -> torch.autocast:
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled)

    def compiled(self, net: nn.Module) -> nn.Module:
        """`net` as the training step calls it: compiled, with CUDA graphs, or as is."""
        if not self.compile:
            return net
        return torch.compile(net, mode="reduce-overhead" if self.cuda_graphs else None)

    def identity(self) -> dict:
        """The settings as they identify a run: the kind of device, not which one."""
        return dataclasses.asdict(self) | {"device": self.device.type}

    def describe(self) -> str:
        return (
            f"device {self.device}, precision {self.precision}, "
            f"channels_last {self.channels_last}, "
            f"compile {self.compile}, cuda_graphs {self.cuda_graphs}, "
            f"fused_optimizer {self.fused_optimizer}, eval_batch_size {self.eval_batch_size}"
        )

    def describe_inference(self) -> str:
        return (
            f"device {self.device}, precision {self.precision}, "
            f"channels_last {self.channels_last}, batch_size {self.eval_batch_size}"
        )


# --------------------------------------------------------------------------- the rules


def resolve_precision(requested: str, device: torch.device) -> str:
    """bf16 autocast under `auto`: on GPUs it doubles tensor-core throughput; on the
    2-core Xeon with AMX it trained 2.3-2.4x and evaluated 3.1x faster than fp32,
    channels_last on in both (docs/speed.md); on CPUs without AVX-512/AMX it ran
    ~14x slower, and on MPS it is unmeasured, so those keep fp32."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_amx() else "fp32"


def resolve_channels_last(requested: bool | str, device: torch.device) -> bool:
    """NHWC layout under `auto` on CUDA and CPUs; not on MPS. On the 2-core Xeon it
    trained 1.2-1.3x and evaluated 1.35x faster in bf16; fp32 inference there ran
    0.96x (width 64) to 1.33x (width 16) as fast (docs/speed.md)."""
    return device.type in ("cuda", "cpu") if requested == "auto" else bool(requested)


def resolve_eval_batch(requested: int | str, device: torch.device) -> int:
    return EVAL_BATCH_AUTO[device.type] if requested == "auto" else int(requested)


def resolve_sync_batchnorm(requested: bool | str, processes: int, device: torch.device) -> bool:
    """BatchNorm statistics over the global batch, as one process computes them. torch's
    SyncBatchNorm runs only on GPUs (and XPU/HPU): on CPUs each process normalises its
    own share of the batch ("ghost batch" BatchNorm, Hoffer et al. 2017)."""
    if processes == 1:
        return False  # one process sees the whole batch: nothing to synchronise
    if requested == "auto":
        return device.type == "cuda"
    if requested and device.type != "cuda":
        raise PipelineError(
            f"train.sync_batchnorm = true needs CUDA devices (torch's SyncBatchNorm runs "
            f"only there), not {device.type}: use auto or false"
        )
    return bool(requested)


def resolve_processes(requested: int | str, cuda_devices: int, batch_size: int) -> int:
    """`train.processes`: auto is one process per visible CUDA device (else 1), or as
    many as share `batch_size` evenly (512 on 6 GPUs: 4); a number must share it."""
    if requested == "auto":
        return max(n for n in range(1, max(1, cuda_devices) + 1) if batch_size % n == 0)
    if batch_size % int(requested):
        raise PipelineError(
            f"params.yaml: train.processes = {requested} does not divide train.batch_size = "
            f"{batch_size} (each process takes an equal share of every batch)"
        )
    return int(requested)


def inference_settings(
    device: torch.device,
    precision: str = "auto",
    channels_last: bool | str = "auto",
    batch_size: int | str = "auto",
) -> Settings:
    """Settings for inference on `device` (the evaluate stage, predict)."""
    return Settings(
        device,
        resolve_precision(precision, device),
        resolve_channels_last(channels_last, device),
        resolve_eval_batch(batch_size, device),
    )


def training_settings(p: TrainParams, device: torch.device, processes: int = 1) -> Settings:
    """Settings for training with the train params `p` on `device`, in `processes`."""
    # torch.compile pays only in long runs. On the H200 the 15-epoch recipe took 38.7 s
    # compiled (24.9 s of it in epoch 1, compiling) and 16.4 s eager; compiled steps ran
    # 1.06x, with CUDA graphs 1.37x, as fast (reports/runs/gpu-h200-session.txt). On a
    # small CPU compiling takes minutes. So auto is off: set both true for long runs.
    compile_model = p.compile if p.compile != "auto" else False
    cuda_graphs = p.cuda_graphs if p.cuda_graphs != "auto" else False
    if cuda_graphs and not (device.type == "cuda" and compile_model):
        raise PipelineError("train.cuda_graphs = true needs a CUDA device and train.compile")
    # one fused update kernel instead of foreach's several: on the 2-core CPU it measured
    # 1.00x to 1.05x foreach (within noise), and it is the fast path on CUDA
    fused = p.fused_optimizer if p.fused_optimizer != "auto" else device.type in ("cuda", "cpu")
    inference = inference_settings(device, p.precision, p.channels_last, p.eval_batch_size)
    return dataclasses.replace(
        inference,
        compile=compile_model,
        cuda_graphs=cuda_graphs,
        fused_optimizer=fused,
        sync_batchnorm=resolve_sync_batchnorm(p.sync_batchnorm, processes, device),
    )

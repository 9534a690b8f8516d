"""The device a stage runs on, and what `auto` means there: precision, memory layout
and evaluation batch size, from measurements (docs/speed.md). Read by the train and
evaluate stages, the predict command and the benchmark.
"""

from __future__ import annotations

from typing import Any, Literal

from common import PipelineError

Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


def pick_device(requested: str) -> Any:
    """'auto' picks CUDA, then Apple MPS, then CPU; a named device that is absent is an error."""
    import torch

    has = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if requested == "auto":
        name = next((n for n in ("cuda", "mps") if has[n]), "cpu")
        return torch.device(name)
    if requested != "cpu" and not has[requested]:
        raise PipelineError(
            f"device '{requested}' was asked for but torch sees none on this machine "
            f"(torch {torch.__version__}); use 'auto' or 'cpu'"
        )
    return torch.device(requested)


def cpu_has_amx() -> bool:
    """Intel AMX: tile matrix units that run bf16 matmuls and convolutions in hardware."""
    import torch

    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(supported and supported())


def resolve_precision(requested: str, device: Any) -> str:
    """'fp32', 'bf16' or 'fp16': what `requested` (a Precision) means on `device`.

    bf16 autocast under `auto`: on GPUs it doubles tensor-core throughput; on the
    2-core Xeon with AMX it trained 2.3-2.4x and evaluated 3.1x faster than fp32,
    channels_last on in both (README, "Speed"); on CPUs without AVX-512/AMX it ran
    ~14x slower, and on MPS it is unmeasured, so those keep fp32."""
    import torch

    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_amx() else "fp32"


def autocast_dtype_of(precision: str) -> Any:
    """The torch.autocast dtype of a resolved precision; None for plain fp32."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def memory_format_of(channels_last: bool) -> Any:
    """The torch memory format of a resolved channels_last."""
    import torch

    return torch.channels_last if channels_last else torch.contiguous_format


def resolve_channels_last(requested: bool | str, device: Any) -> bool:
    """NHWC layout under `auto` on CUDA and CPUs; not on MPS. On the 2-core Xeon it
    trained 1.2-1.3x and evaluated 1.35x faster in bf16; fp32 inference there ran
    0.96x (width 64) to 1.33x (width 16) as fast (README, "Speed")."""
    return device.type in ("cuda", "cpu") if requested == "auto" else bool(requested)


# `auto` images per evaluation batch: large batches fill a GPU, while on the 2-core
# Xeon inference ran 1.2x to 1.6x slower at batch 256 and up than at 32 or 64
# (README, "Speed"; reports/bench/cpu-eval-batch.txt), so a CPU takes 64.
EVAL_BATCH_AUTO = {"cpu": 64, "cuda": 1024, "mps": 1024}


def resolve_eval_batch(requested: int | Literal["auto"], device: Any) -> int:
    """The evaluation batch size that `requested` ('auto' or a number) means on `device`."""
    return EVAL_BATCH_AUTO[device.type] if requested == "auto" else int(requested)

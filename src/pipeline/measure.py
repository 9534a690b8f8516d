"""How the benchmark (src/bench.py) times and sizes things: device synchronisation,
timed steps, FLOPs per image, peak memory, the hardware's name and GPU peak rates."""

from __future__ import annotations

import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model import resnet18

# Dense peak TFLOP/s by GPU name and autocast precision (vendor data sheets, SXM parts).
# "fp32" is TF32: cuDNN runs fp32 convolutions on TF32 tensor cores by default.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.7},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def training_flops_per_image(width: int) -> float:
    """FLOPs of forward + backward for one 32x32 image (torch's FLOP counter)."""
    net = resnet18(width=width)
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 1, 32, 32)).sum().backward()
    return float(counter.get_total_flops())


def timed(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls of step() after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - start


def peak_memory_mib(device: torch.device) -> float:
    """Peak device memory since the last reset on CUDA; elsewhere the process's peak
    resident memory so far (it never goes down, so only the largest row means much)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes vs KiB


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    return f"{model}, {torch.get_num_threads()} threads"

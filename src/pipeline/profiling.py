"""Where a training epoch's time goes, for `bench.py --profile`: torch.profiler over
one epoch after a warm-up epoch, the ops that take the most device (on a CPU, CPU)
time, and how busy the GPU was over the epoch's wall time."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from pipeline.measure import sync


def profile_epoch(epochs: Iterator[dict], device: torch.device) -> str:
    """The profile of the second epoch `epochs` yields (the first warms up: compilation,
    autotuning); far under 100% GPU busy means the host is the limit. Closes `epochs`."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    next(epochs)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        record = next(epochs)
        sync(device)
        wall = time.perf_counter() - start
    epochs.close()
    averages = prof.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    lines = [averages.table(sort_by=sort_by, row_limit=15, max_name_column_width=70)]
    if cuda:
        # kernel rows only: a kernel's time also shows as the self device time of the op
        # that launched it, so summing every row would count it twice
        busy = (
            sum(
                e.self_device_time_total
                for e in averages
                if e.device_type == DeviceType.CUDA
                and not getattr(e, "is_user_annotation", False)  # absent in older torch
            )
            / 1e6
        )
        lines.append(
            f"profiled epoch: {wall:.3f} s wall ({record['images_per_s']:.0f} images/s under "
            f"the profiler), GPU kernels {busy:.3f} s = {busy / wall:.0%} busy"
        )
    return "\n".join(lines)

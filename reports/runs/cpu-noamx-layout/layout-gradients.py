"""One training step's gradients at full size on this CPU, as
../cpu-amx-epoch1/step-gradients.py, but each against fp64 (contiguous, two threads)
and in both memory layouts: fp32 and bf16, one thread and two, channels_last on and
off. Shows where the error of fp32 on this CPU comes from. Its output on the 2-core
AMD EPYC without AMX (torch 2.14.1): layout-gradients.txt.

    .venv/bin/python reports/runs/cpu-noamx-layout/layout-gradients.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

PROJECT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(PROJECT / "src"))
from pipeline.model import normalise, resnet18  # noqa: E402

BATCH = 512
PROCESSED = PROJECT / "data/processed"
data = torch.load(PROCESSED / "train.pt", weights_only=True)
stats = json.loads((PROCESSED / "stats.json").read_text())
images = normalise(data["images"][:BATCH], stats["mean"], stats["std"])
labels = data["labels"][:BATCH]


def step(
    threads: int, bf16: bool, channels_last: bool, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """All the gradients (flattened, in fp64) and the logits of one step from seed 42."""
    torch.set_num_threads(threads)
    torch.manual_seed(42)
    net, batch = resnet18(64).to(dtype).train(), images.to(dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = net(batch)
        loss = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels)
    loss.backward()
    grads = torch.cat([p.grad.double().flatten() for p in net.parameters()])
    return grads, logits.detach().double()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


reference, reference_logits = step(2, False, False, torch.float64)
for threads in (1, 2):
    for bf16 in (False, True):
        for channels_last in (False, True):
            grads, logits = step(threads, bf16, channels_last)
            print(
                f"{'bf16' if bf16 else 'fp32'}, {threads} thread(s), "
                f"{'channels_last' if channels_last else 'contiguous'}: gradients "
                f"{relative(grads, reference):.4f}, logits "
                f"{relative(logits, reference_logits):.5f} (against fp64)"
            )

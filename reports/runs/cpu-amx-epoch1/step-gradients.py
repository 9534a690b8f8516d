"""One training step's gradients at full size on this CPU, from the same initial weights
(seed 42) and the same batch (the first 512 training images), in fp32 and bf16 with one
thread and with two, each against fp32 on one thread: the relative L2 error of all the
gradients, the worst tensor's, and the logits'. channels_last as the train stage's
`auto`. docs/recipe.md, "At full size on a CPU"; its output: step-gradients.txt.

    .venv/bin/python reports/runs/cpu-amx-epoch1/step-gradients.py
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


def step(threads: int, bf16: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.set_num_threads(threads)
    torch.manual_seed(42)
    net = resnet18(64).to(memory_format=torch.channels_last).train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = net(images.contiguous(memory_format=torch.channels_last))
        loss = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels)
    loss.backward()
    return [p.grad.float().flatten() for p in net.parameters()], logits.detach().float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


reference, reference_logits = step(1, False)
for threads, bf16 in [(1, False), (2, False), (1, True), (2, True)]:
    grads, logits = step(threads, bf16)
    whole = relative(torch.cat(grads), torch.cat(reference))
    worst = max(relative(g, r) for g, r in zip(grads, reference, strict=True))
    print(
        f"{'bf16' if bf16 else 'fp32'}, {threads} thread(s): gradients {whole:.4f}, "
        f"worst tensor {worst:.4f}, logits {relative(logits, reference_logits):.4f}"
    )

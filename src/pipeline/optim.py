"""The optimiser and the learning-rate schedule of the train stage."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pipeline.train_params import TrainParams


def make_optimizer(net: nn.Module, p: TrainParams, fused: bool) -> torch.optim.SGD:
    """SGD; no weight decay on BatchNorm and biases ("no bias decay", He et al. 2019, sec. 3.1)."""
    decay = [t for t in net.parameters() if t.ndim > 1]
    no_decay = [t for t in net.parameters() if t.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": p.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(
        groups,
        lr=p.lr,
        momentum=p.momentum,
        nesterov=p.nesterov,
        fused=fused or None,  # None: torch's default, foreach
    )


SCHEDULES = ("cosine", "linear")  # the decay after the warm-up, to 0 at the last step


def lr_factor(step: int, warmup_steps: int, total_steps: int, shape: str = "cosine") -> float:
    """Linear warm-up from ~0 to 1 over `warmup_steps`, then decay to 0 at `total_steps`:
    half a cosine, or a straight line (the "linear decay" of Defazio et al. 2023, which
    matched or beat cosine on a fixed budget in their comparison)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if shape == "linear":
        return 1.0 - progress
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, p: TrainParams, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate of every step: p.lr times lr_factor (a step is one batch)."""
    warmup_steps, total_steps = round(p.warmup_epochs * steps_per_epoch), p.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, p.schedule)
    )


def mean_lr(p: TrainParams, epoch: int, steps_per_epoch: int) -> float:
    """The learning rate averaged over the steps of `epoch` (from 1): what the lr plot shows."""
    warmup_steps, total_steps = round(p.warmup_epochs * steps_per_epoch), p.epochs * steps_per_epoch
    first = (epoch - 1) * steps_per_epoch
    steps = range(first, first + steps_per_epoch)
    factors = (lr_factor(s, warmup_steps, total_steps, p.schedule) for s in steps)
    return p.lr * (sum(factors) / steps_per_epoch)

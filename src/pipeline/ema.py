"""An exponential moving average of the weights (Polyak and Juditsky 1992): after
every step, average <- decay * average + (1 - decay) * weights, BatchNorm's running
statistics included (as timm's ModelEmaV2 averages buffers). The average, not the
last weights, is validated and saved when `train.ema_decay` is above 0. Its first
steps use a smaller decay, (1 + step) / (10 + step) (TensorFlow's
ExponentialMovingAverage with num_updates), so that the average is not held near
the random initialisation. With it on, a checkpoint holds the weights twice.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def warmup_rate(decay: float, step: int) -> float:
    """The decay at `step` (counted from 0): `decay`, or less while (1 + step) /
    (10 + step) is less."""
    return min(decay, (1 + step) / (10 + step))


def unreached_note(decay: float, steps: int) -> str | None:
    """A line for a run of `steps` updates that ends before the warm-up reaches `decay`:
    then the warm-up sets the rate throughout, whatever `decay` is (0.995 takes 1,790
    steps; the default run has 856). None when the run reaches it, keeps no average
    (decay 0) or takes no step."""
    last = warmup_rate(decay, steps - 1)
    if not decay or not steps or last >= decay:
        return None
    return (
        f"note: train.ema_decay {decay} is not reached in this run's {steps} steps: the "
        f"average's warm-up rate, (1 + step) / (10 + step), sets it throughout ({last:.4f} "
        f"at the last step), so any value above {last:.4f} trains the same average "
        "(pipeline/ema.py)"
    )


class WeightAverage:
    """The running average of `net`'s parameters and buffers, as a network of its own."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.decay = decay
        self.net = copy.deepcopy(net).eval()
        self.steps = 0
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)
        self.tensors = list(self.net.state_dict().values())  # the same tensors, in place

    def rate(self) -> float:
        """The decay of this step: `decay`, less at first."""
        return warmup_rate(self.decay, self.steps)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        decay = self.rate()
        averaged, current = self.tensors, list(net.state_dict().values())
        floats = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1 - decay)
        for a, c in zip(averaged, current, strict=True):
            if not a.is_floating_point():  # BatchNorm's count of batches: the latest
                a.copy_(c)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.steps = state["steps"]

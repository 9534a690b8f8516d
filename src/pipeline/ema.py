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
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

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

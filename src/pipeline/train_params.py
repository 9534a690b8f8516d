"""The train stage's params: params.yaml `model` and `train`, checked on loading.

Free of torch, as every stage's params are: pipeline/params.py says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pipeline.params import Auto, Device, Precision, check


@dataclass(frozen=True)
class ModelParams:
    SECTION: ClassVar[str] = "model"
    width: int

    def __post_init__(self) -> None:
        check(self, "width", self.width >= 1, "an integer >= 1 (64 = ResNet-18)")


@dataclass(frozen=True)
class TrainParams:
    SECTION: ClassVar[str] = "train"
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    label_smoothing: float
    schedule: Literal["cosine", "linear"]
    warmup_epochs: float
    ema_decay: float
    bn_momentum: float
    zero_init_residual: bool
    max_shift: int
    max_rotate: float
    max_scale: float
    cutout: int
    elastic_alpha: float
    elastic_sigma: float
    unaugmented_epochs: int
    seed: int
    device: Device
    precision: Precision
    channels_last: Auto
    compile: Auto
    cuda_graphs: Auto
    fused_optimizer: Auto
    deterministic: bool
    eval_batch_size: int | Literal["auto"]
    checkpoint_every: int
    checkpoint_minutes: float
    processes: int | Literal["auto"]
    sync_batchnorm: Auto

    def __post_init__(self) -> None:
        check(self, "epochs", self.epochs >= 1, "an integer >= 1")
        check(self, "batch_size", self.batch_size >= 1, "an integer >= 1")
        check(self, "lr", self.lr > 0, "a number > 0")
        check(self, "momentum", 0 <= self.momentum < 1, "a number in [0, 1)")
        nesterov_ok = not self.nesterov or self.momentum > 0
        check(self, "nesterov", nesterov_ok, "false when train.momentum is 0")
        check(self, "weight_decay", self.weight_decay >= 0, "a number >= 0")
        check(self, "label_smoothing", 0 <= self.label_smoothing < 1, "a number in [0, 1)")
        warmup_ok = 0 <= self.warmup_epochs <= self.epochs
        check(self, "warmup_epochs", warmup_ok, f"a number in [0, train.epochs = {self.epochs}]")
        check(self, "ema_decay", 0 <= self.ema_decay < 1, "a number in [0, 1) (0 = off)")
        check(self, "bn_momentum", 0 < self.bn_momentum <= 1, "a number in (0, 1]")
        check(self, "max_shift", 0 <= self.max_shift <= 8, "0..8 pixels")
        check(self, "max_rotate", 0 <= self.max_rotate <= 45, "0..45 degrees")
        check(self, "max_scale", 0 <= self.max_scale < 0.5, "a number in [0, 0.5)")
        check(self, "cutout", 0 <= self.cutout <= 32, "0..32 pixels (0 = off)")
        check(self, "elastic_alpha", 0 <= self.elastic_alpha <= 100, "0..100 pixels (0 = off)")
        check(self, "elastic_sigma", 1 <= self.elastic_sigma <= 16, "1..16 pixels")
        plain_ok = 0 <= self.unaugmented_epochs <= self.epochs
        check(self, "unaugmented_epochs", plain_ok, f"0..train.epochs = {self.epochs}")
        eval_ok = self.eval_batch_size == "auto" or self.eval_batch_size >= 1
        check(self, "eval_batch_size", eval_ok, "an integer >= 1 or auto")
        every_ok = self.checkpoint_every >= 0
        check(self, "checkpoint_every", every_ok, "an integer >= 0 (epochs; 0 = none by count)")
        minutes_ok = self.checkpoint_minutes >= 0
        check(self, "checkpoint_minutes", minutes_ok, "a number >= 0 (minutes; 0 = none by time)")
        processes_ok = self.processes == "auto" or self.processes >= 1
        check(self, "processes", processes_ok, "an integer >= 1 or auto")

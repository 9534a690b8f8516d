"""The benchmark's ablation: each option of `bench.py --ablate` set opposite to what
`auto` chose, so that its row shows the option's worth against ours as it is.

`augment` is the rotation, scaling, elastic distortion and Cutout: all off where
params.yaml has any, else the default recipe's on (docs/recipe.md).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.settings import Settings
    from pipeline.train_params import TrainParams

OPTIONS = ("precision", "channels_last", "compile", "cuda_graphs", "fused_optimizer", "augment")
# What `--ablate augment` turns on where params.yaml has no augmentation but the shift:
# the default recipe's (docs/recipe.md: Cutout left out); where it has some, the flip
# turns it all off.
AUGMENT = {"max_rotate": 10.0, "max_scale": 0.1, "cutout": 0, "elastic_alpha": 0.0}


def flipped_precision(precision: str) -> tuple[str, dict]:
    """A label and the change that flips a resolved precision: mixed <-> fp32."""
    other = "bf16" if precision == "fp32" else "fp32"
    return f"precision {other}", {"precision": other}


def flipped_switch(option: str, value: bool) -> tuple[str, dict]:
    """A label and the change that flips an on/off option."""
    return f"{option} {not value}", {option: not value}


def flipped_augment(p: TrainParams) -> tuple[str, dict]:
    """A label and the change that turns the rotation, scaling, elastic distortion and
    Cutout off if any is on, else AUGMENT's on: their cost is ours against this row."""
    if any(getattr(p, key) for key in AUGMENT):
        return "augment off", {key: type(value)(0) for key, value in AUGMENT.items()}
    return "augment on", dict(AUGMENT)


def flipped(p: TrainParams, s: Settings, option: str) -> tuple[str, TrainParams]:
    """`p` with `option` set opposite to what auto chose, and a label for it."""
    if option not in OPTIONS:
        raise PipelineError(f"--ablate: unknown option '{option}' (one of {', '.join(OPTIONS)})")
    if option == "precision":
        label, changes = flipped_precision(s.precision)
    elif option == "augment":
        label, changes = flipped_augment(p)
    else:
        label, changes = flipped_switch(option, getattr(s, option))
    if option == "cuda_graphs" and changes["cuda_graphs"]:
        changes["compile"] = True  # CUDA graphs come with torch.compile
    return label, dataclasses.replace(p, **changes)

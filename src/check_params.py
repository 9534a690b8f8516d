"""Params stage: check the whole of params.yaml before any stage's outputs are touched.

DVC deletes a stage's outputs before it runs the stage, so a bad value found by
the stage itself (`dvc exp run -S train.lr=abc`) leaves the workspace without
that stage's outputs; and a misspelt key added with `-S +train.learnign_rate=0.1`
is read by no stage, so DVC would run nothing and record an experiment. This
stage depends on the whole file and comes first (download depends on its
output), so both fail here, at once, with the workspace as it was.

Inputs:  params.yaml, every section; the stages' params dataclasses.
Outputs: `paths.params_check`, a file whose content never changes, so that a
         valid change of params reruns only the stages that read it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from download import DataParams
from pipeline.errors import PipelineError
from pipeline.evaluate_params import EvaluateParams
from pipeline.files import atomic_path
from pipeline.mnist import NUM_CLASSES, TEST_IMAGES, TRAIN_IMAGES
from pipeline.params import (
    ANY_MACHINE,
    PARAMS_FILE,
    Paths,
    parse_section,
    read_params_file,
    require,
)
from pipeline.plot_params import PlotParams
from pipeline.preprocess_params import PreprocessParams
from pipeline.process import run
from pipeline.train_params import ModelParams, TrainParams

SECTIONS = (
    Paths,
    DataParams,
    PreprocessParams,
    ModelParams,
    TrainParams,
    EvaluateParams,
    PlotParams,
)
CHECKED = "params.yaml: every section is valid\n"


def check_document(document: Any) -> dict[str, Any]:
    """Every section parsed into its dataclass, or a PipelineError naming the first
    problem: an unknown section or key, a missing key, a bad value, sizes that cannot
    fit MNIST, a device this machine does not have."""
    if not isinstance(document, dict):
        raise PipelineError(f"{PARAMS_FILE}: not a mapping of sections")
    known = [cls.SECTION for cls in SECTIONS]
    for name in document:
        if name not in known:
            raise PipelineError(
                f"{PARAMS_FILE}: unknown section '{name}'; valid sections: {', '.join(known)}"
            )
    parsed = {cls.SECTION: parse_section(cls, document.get(cls.SECTION)) for cls in SECTIONS}
    pre, train = parsed["preprocess"], parsed["train"]
    available = TRAIN_IMAGES - pre.val_size
    require(
        pre.val_size < TRAIN_IMAGES - NUM_CLASSES,
        "preprocess.val_size",
        pre.val_size,
        f"fewer than MNIST's {TRAIN_IMAGES} training images minus {NUM_CLASSES}",
    )
    require(
        pre.train_limit <= available,
        "preprocess.train_limit",
        pre.train_limit,
        f"0 or at most the {available} training images left after preprocess.val_size",
    )
    require(
        pre.test_limit <= TEST_IMAGES,
        "preprocess.test_limit",
        pre.test_limit,
        f"0 or at most MNIST's {TEST_IMAGES} test images",
    )
    images = pre.train_limit or available
    require(
        train.batch_size <= images,
        "train.batch_size",
        train.batch_size,
        f"at most the {images} training images",
    )
    for key in ("train.device", "evaluate.device"):
        section, name = key.split(".")
        requested = getattr(parsed[section], name)
        if requested in ANY_MACHINE:
            continue
        # Imported here, not above: asking for a GPU needs torch, which takes longer to
        # import than the rest of this stage takes to run (docs/speed.md, start-up).
        from pipeline.settings import missing_device

        why = missing_device(requested)
        require(why is None, key, requested, f"{why}; use auto or cpu")
    return parsed


def make_visible_to_git(path: Path) -> None:
    """Give `path` a modification time in a later second than its last write, so that
    git sees it changed. `dvc exp run -S key=value` resets params.yaml, refreshing its
    entry in git's index, and writes the new value within the same second, often at the
    same size (`lr: 0.2` -> `lr: abc`); git, which compares whole seconds and sizes,
    then takes the file for unchanged: `git status` shows nothing and `git checkout
    params.yaml` does nothing, so a refused value stayed in place (docs/faults.md)."""
    wait = math.floor(path.stat().st_mtime) + 1 - time.time()
    if wait > 0:
        time.sleep(wait)
    os.utime(path)


def main() -> None:
    try:
        document = read_params_file()
        parsed = check_document(document)
    except PipelineError:
        if PARAMS_FILE.exists():
            make_visible_to_git(PARAMS_FILE)
        raise
    output = Path(parsed["paths"].params_check)
    with atomic_path(output) as tmp:
        tmp.write_text(CHECKED)
    print(CHECKED, end="")


if __name__ == "__main__":
    run(main)

"""Writing outputs whole or not at all, and reading tensor files safely."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block
    succeeds, so a crash never leaves a half-written file or folder at `path`.

    A folder that `path` replaces is first renamed aside, so a crash at any moment
    leaves either the old or the new output. Temp folders of an earlier, killed
    run of the same output are removed first (DVC runs one stage at a time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            os.replace(path, tmp / "replaced")
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# torch is imported where it is used: the download stage, which needs none of it,
# starts without its second of imports.


def save_torch(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path) -> Any:
    """Load a tensor file or checkpoint without unpickling arbitrary objects."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the stage that makes it first") from None

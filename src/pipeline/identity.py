"""Which run a checkpoint belongs to: a run is its params, settings, data and code.

The identity is a hash of the `model`/`train` params (as parsed, not as printed),
the settings `auto` resolved to (the kind of device, not which one), the images
BatchNorm normalises over, torch's version, and the bytes of the training data and
of the code the stage runs: the script and every module of src/ it imports,
found by reading their imports (stage_code), the same list that dvc.yaml gives
as the stage's deps (tests/test_params.py checks both agree). A checkpoint
resumes only under the same identity, so a new param, setting or module can never
resume an old run's state under new code.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.settings import Settings

SRC = Path(__file__).resolve().parents[1]  # src/: the stage scripts; pipeline/ inside
# Params that change how a run is scheduled, never what it computes: a run resumed
# with other values of these is the same run (docs/faults.md).
SCHEDULING = ("processes", "checkpoint_every", "checkpoint_minutes")


def _module_file(name: str) -> Path | None:
    """The file of src/ that `import name` loads, or None if it is not ours."""
    parts = name.split(".")
    for candidate in (SRC.joinpath(*parts).with_suffix(".py"), SRC.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _import_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of `tree` but those under `if TYPE_CHECKING:`, which run only for the
    type checker: importing a module for a type hint is no dependency at run time."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_import_nodes(child)])
            continue
        yield node
        yield from _import_nodes(node)


def _imported(script: Path) -> set[Path]:
    """The files of src/ that `script` imports directly (packages' __init__ too)."""
    found = set()
    for node in _import_nodes(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # pipeline, pipeline.model
                module = _module_file(".".join(parts[:depth]))
                if module:
                    found.add(module)
    return found


def stage_code(script: str | Path) -> list[Path]:
    """`script` and every file of src/ it imports, directly or through the others, sorted."""
    todo, seen = [Path(script).resolve()], set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_imported(path) - seen)
    return sorted(seen)


def batchnorm_batch(batch_size: int, processes: int, sync_batchnorm: bool) -> int:
    """The images BatchNorm computes its statistics over in training."""
    return batch_size if sync_batchnorm or processes == 1 else batch_size // processes


def run_id(recipe: dict[str, Any], files: list[Path]) -> str:
    """The identity of a run: a hash of `recipe` (JSON-able: params as dicts, settings)
    and of the bytes of `files` (data and code)."""
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode())
    for path in files:
        h.update(path.read_bytes())
    return h.hexdigest()


def training_recipe(params: dict[str, Any], settings: Settings, processes: int) -> dict[str, Any]:
    """What identifies a run besides its data and code: its params by section
    (dataclasses; the scheduling ones left out), its settings, BatchNorm's batch and
    torch's version. Not the number of processes: N train as one does if BatchNorm
    sees the same batches."""
    sections = {name: dataclasses.asdict(section) for name, section in params.items()}
    train = {k: v for k, v in sections["train"].items() if k not in SCHEDULING}
    bn_batch = batchnorm_batch(train["batch_size"], processes, settings.sync_batchnorm)
    return sections | {
        "train": train,
        "settings": {k: v for k, v in settings.identity().items() if k != "sync_batchnorm"},
        "batchnorm_batch": bn_batch,
        "torch": torch.__version__,
    }

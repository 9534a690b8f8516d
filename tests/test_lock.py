"""dvc.lock describes the committed defaults: every param it recorded is params.yaml's,
and every git-tracked output it hashed is the file in the repository."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, committed_params_text

LOCK = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]


def lookup(document: dict, key: str) -> Any:
    """params.yaml's value of a dotted key (`train.lr`) or a whole section (`train`)."""
    value = document
    for part in key.split("."):
        value = value[part]
    return value


def git_tracked(path: str) -> bool:
    listed = subprocess.run(
        ["git", "ls-files", "--", path], cwd=ROOT, capture_output=True, text=True
    ).stdout
    return bool(listed.strip())


def dvc_md5(path: Path) -> str:
    """The md5 that DVC records for a file or folder (`<md5>.dir` for a folder)."""
    from dvc.fs import LocalFileSystem
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db.local import LocalHashFileDB

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(LocalHashFileDB(fs, scratch), str(path), fs, "md5")
    return obj.hash_info.value


def test_the_locked_params_are_the_committed_defaults() -> None:
    params = yaml.safe_load(committed_params_text())
    checked = 0
    for name, stage in LOCK.items():
        for key, value in stage.get("params", {}).get("params.yaml", {}).items():
            assert lookup(params, key) == value, f"dvc.lock's {name} stage has {key} = {value!r}"
            checked += 1
    assert checked > 0


@pytest.mark.parametrize(
    "out",
    [out for stage in LOCK.values() for out in stage.get("outs", []) if git_tracked(out["path"])],
    ids=lambda out: out["path"],
)
def test_git_tracked_outputs_are_the_locked_ones(out: dict) -> None:
    assert dvc_md5(ROOT / out["path"]) == out["md5"], out["path"]


@pytest.mark.parametrize(
    "dep",
    [dep for stage in LOCK.values() for dep in stage.get("deps", []) if git_tracked(dep["path"])],
    ids=lambda dep: dep["path"],
)
def test_the_locked_code_is_the_committed_code(dep: dict) -> None:
    assert dvc_md5(ROOT / dep["path"]) == dep["md5"], (
        f"{dep['path']} changed since the baseline in dvc.lock was run: the locked metrics "
        "no longer describe the committed code; run `dvc repro` and commit dvc.lock and reports/"
    )


def test_the_lock_records_every_dependency_that_dvc_yaml_declares() -> None:
    """A module added to a stage's deps (or removed) without the lock recording it would
    leave the baseline standing for code it never ran with."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    paths = yaml.safe_load(committed_params_text())["paths"]
    for name, stage in pipeline.items():
        declared = set()
        for dep in stage["deps"]:
            for key, value in paths.items():
                dep = dep.replace(f"${{paths.{key}}}", value)
            declared.add(dep)
        assert {dep["path"] for dep in LOCK[name]["deps"]} == declared, name

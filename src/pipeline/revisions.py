"""The revisions that src/report.py compares: a git revision, a DVC experiment or the
workspace, resolved to its commit; the files it holds, read without checking it out
(git is enough, so a fresh clone needs no DVC cache); and DVC's JSON answers about it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError
from pipeline.params import PARAMS_FILE

WORKSPACE = "workspace"  # DVC's name for the files as they are now


@dataclass(frozen=True)
class Revision:
    """A revision as the user named it, and the commit it is (None: the workspace)."""

    name: str
    sha: str | None

    @property
    def label(self) -> str:
        """How the report names it: `main (1a2b3c4)`, or `workspace`."""
        if self.sha is None:
            return self.name
        if self.sha.startswith(self.name):  # named by its commit
            return self.sha[:7]
        return f"{self.name} ({self.sha[:7]})"

    @property
    def dvc_rev(self) -> str:
        return WORKSPACE if self.sha is None else self.sha


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def experiment_commits(name: str) -> set[str]:
    """The commits of the DVC experiments called `name`: DVC keeps each one under
    refs/exps/<2 hex>/<rest of its baseline's sha>/<name>, so git alone finds them."""
    refs = git("for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").stdout
    pairs = (line.split(" ", 1) for line in refs.splitlines())
    return {sha for sha, ref in pairs if ref.rsplit("/", 1)[-1] == name}


def resolve(name: str) -> Revision:
    """The commit that `name` is, a git revision first, then a DVC experiment's name."""
    if name == WORKSPACE:
        return Revision(name, None)
    found = git("rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")
    if found.returncode == 0:
        return Revision(name, found.stdout.strip())
    commits = experiment_commits(name)
    if len(commits) > 1:
        raise PipelineError(
            f"revision {name!r} is ambiguous: {len(commits)} DVC experiments have that name "
            "(`dvc exp list --all-commits` shows them; name one by its commit)"
        )
    if not commits:
        raise PipelineError(
            f"unknown revision {name!r}: neither a git revision nor a DVC experiment here "
            "(`git branch -a`, `dvc exp list --all-commits`)"
        )
    return Revision(name, commits.pop())


def read_at(rev: Revision, path: str) -> bytes | None:
    """The bytes of `path` at `rev` (None where it has no such file)."""
    if rev.sha is None:
        file = Path(path)
        return file.read_bytes() if file.is_file() else None
    shown = subprocess.run(["git", "show", f"{rev.sha}:{path}"], capture_output=True)
    return shown.stdout if shown.returncode == 0 else None


def pngs_at(rev: Revision, folder: str) -> list[str]:
    """The names of the PNG files directly in `folder` at `rev`, sorted."""
    if rev.sha is None:
        names = [p.name for p in Path(folder).glob("*.png") if p.is_file()]
    else:
        listed = git("ls-tree", "--name-only", f"{rev.sha}:{folder}").stdout
        names = [name for name in listed.splitlines() if name.endswith(".png")]
    return sorted(names)


def paths_at(rev: Revision) -> dict[str, str]:
    """The `paths:` section of params.yaml at `rev`: where that revision kept its files."""
    text = read_at(rev, str(PARAMS_FILE))
    if text is None:
        raise PipelineError(f"{rev.label} has no {PARAMS_FILE}: not a revision of this project")
    try:
        paths = (yaml.safe_load(text) or {}).get("paths")
    except yaml.YAMLError as error:
        raise PipelineError(f"{PARAMS_FILE} at {rev.label} is not valid YAML: {error}") from None
    if not isinstance(paths, dict):
        raise PipelineError(f"{PARAMS_FILE} at {rev.label} has no 'paths' section")
    return paths


def dvc_json(*args: str) -> Any:
    """`dvc <args> --json`, parsed; a failure is one line naming the command."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args, "--json"],
        capture_output=True,
        text=True,
        env=os.environ | {"DVC_NO_ANALYTICS": "1"},
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1].removeprefix("ERROR: ") if lines else f"exit {result.returncode}"
        raise PipelineError(f"`dvc {' '.join(args)}` failed: {reason}")
    return json.loads(result.stdout or "{}")


def stale_stages(status: dict) -> list[str]:
    """The stages of `dvc status --json` whose code, params or inputs changed since
    dvc.lock: their results in the workspace are not of the workspace's code. Missing
    files ("deleted": a clone that has not pulled the DVC cache) do not count."""
    stale = []
    for stage, changes in status.items():
        for change in changes if isinstance(changes, list) else []:
            deps = change.get("changed deps", {}) if isinstance(change, dict) else {}
            if any(state != "deleted" for state in flatten_states(deps)):
                stale.append(stage)
                break
    return stale


def flatten_states(changes: dict) -> Iterator[str]:
    """The states ("modified", "new", "deleted") in a `changed deps` mapping, where a
    params file maps each changed key to its own state."""
    for value in changes.values():
        if isinstance(value, dict):
            yield from flatten_states(value)
        else:
            yield str(value)


def in_dvc_repo() -> None:
    """Stop unless run from the root of a git repository that DVC tracks."""
    top = git("rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise PipelineError("not in a git repository: run from the project's root")
    if not Path(".dvc").is_dir() or not Path("dvc.yaml").is_file():
        raise PipelineError(
            "not the root of a DVC project (no .dvc/ and dvc.yaml here): run from the "
            "project's root"
        )

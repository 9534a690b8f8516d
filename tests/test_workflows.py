"""The GitHub Actions workflows (.github/): actionlint finds no error in them (with
shellcheck on their `run:` scripts), shellcheck none in the local action's scripts, and
they keep the promises of docs/ci.md: least permission, the README's commands, a quick
configuration that params.yaml accepts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, committed_params_text

from check_params import check_document

WORKFLOWS = sorted((ROOT / ".github/workflows").glob("*.yml"))
ACTIONS = sorted((ROOT / ".github/actions").glob("*/action.yml"))


def tool(name: str) -> str:
    """A linter that requirements.txt installs beside this interpreter: its absence is a
    failure, not a reason to skip, or a broken workflow would pass unseen."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: pip install -r requirements.txt")
    return found


def actionlint(*files: Path) -> subprocess.CompletedProcess:
    """actionlint on `files`, with shellcheck (the pinned one, not whichever is on PATH)
    on their `run:` scripts; -no-color for plain messages."""
    return subprocess.run(
        [tool("actionlint"), "-no-color", f"-shellcheck={tool('shellcheck')}", *map(str, files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def load(path: Path) -> dict:
    """A workflow as YAML 1.1 reads it: GitHub's `on:` key comes back as True."""
    return yaml.safe_load(path.read_text())


def test_workflows_pass_actionlint() -> None:
    assert [p.name for p in WORKFLOWS] == ["report.yml", "test.yml"]
    result = actionlint(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_actionlint_fails_a_broken_workflow(tmp_path: Path) -> None:
    """The check above can fail: an unknown context, a misspelt key and an unquoted
    variable in a script (which shellcheck reports through actionlint) are each an
    error."""
    broken = tmp_path / ".github/workflows/broken.yml"
    broken.parent.mkdir(parents=True)
    text = (ROOT / ".github/workflows/test.yml").read_text()
    text = text.replace("${{ github.ref }}", "${{ github.reff }}")
    text = text.replace("timeout-minutes:", "timeout-minute:")
    text = text.replace("run: pytest", 'run: pytest $PYTEST_ARGS && echo "$PWD"')
    broken.write_text(text)
    result = subprocess.run(
        [tool("actionlint"), "-no-color", f"-shellcheck={tool('shellcheck')}", str(broken)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    for rule in ("[expression]", "[syntax-check]", "[shellcheck]"):
        assert rule in result.stdout, result.stdout
    assert "SC2086" in result.stdout  # double quote to prevent globbing and word splitting


def scripts(action: Path) -> list[str]:
    """The bash scripts of a composite action, with each `${{ ... }}` made a plain
    word, as actionlint does for workflows (it does not read actions' scripts)."""
    steps = load(action)["runs"]["steps"]
    runs = [step["run"] for step in steps if "run" in step and step.get("shell") == "bash"]
    return [re.sub(r"\$\{\{.*?\}\}", "EXPRESSION", run) for run in runs]


@pytest.mark.parametrize("action", ACTIONS, ids=lambda p: p.parent.name)
def test_local_actions_pass_shellcheck(action: Path, tmp_path: Path) -> None:
    found = scripts(action)
    assert found
    for i, script in enumerate(found):
        file = tmp_path / f"step{i}.sh"
        file.write_text(f"#!/usr/bin/env bash\nset -e\n{script}")
        result = subprocess.run(
            [tool("shellcheck"), "--shell=bash", str(file)], capture_output=True, text=True
        )
        assert result.returncode == 0, f"{action}, script {i}:\n{result.stdout}"


def test_shellcheck_fails_a_broken_script(tmp_path: Path) -> None:
    file = tmp_path / "broken.sh"
    file.write_text('#!/usr/bin/env bash\nmirror="$1"\nrm -rf $mirror\n')
    result = subprocess.run([tool("shellcheck"), str(file)], capture_output=True, text=True)
    assert result.returncode == 1 and "SC2086" in result.stdout


def test_least_permission() -> None:
    """Read-only by default; only the report job may write, and only pull-request
    comments. No pull_request_target, which would run a fork's code with this
    repository's secrets and a writable token."""
    for path in WORKFLOWS:
        workflow = load(path)
        assert workflow["permissions"] == {"contents": "read"}, path.name
        assert "pull_request_target" not in workflow[True], path.name
        for name, job in workflow["jobs"].items():
            expected = {"contents": "read", "pull-requests": "write"}
            if (path.name, name) == ("report.yml", "report"):
                assert job["permissions"] == expected
            else:
                assert "permissions" not in job, (path.name, name)
    secrets = {m for p in WORKFLOWS for m in re.findall(r"secrets\.(\w+)", p.read_text())}
    assert secrets == {"GITHUB_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_actions_are_pinned() -> None:
    """GitHub's own actions by major version at least; any other by its commit, as a
    tag can be moved to other code."""
    files = [*WORKFLOWS, *ACTIONS]
    used = {m for p in files for m in re.findall(r"uses: *([^\s#]+)", p.read_text())}
    assert used
    for action in used:
        name, _, ref = action.partition("@")
        if name.startswith("./"):
            continue
        pattern = r"v\d+(\.\d+)*" if name.startswith("actions/") else r"[0-9a-f]{40}"
        assert re.fullmatch(pattern, ref), action


def test_the_test_workflow_runs_the_readme_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    steps = load(ROOT / ".github/workflows/test.yml")["jobs"]["test"]["steps"]
    script = "\n".join(step.get("run", "") for step in steps)
    for command in ("pip install -r requirements.txt", "pytest"):
        assert re.search(rf"^{re.escape(command)}\b", readme, re.M), command
        assert re.search(rf"^{re.escape(command)}$", script, re.M), command
    for command in ("ruff check .", "ruff format --check ."):  # as .ci/run
        assert command in script


def test_quick_configuration_is_valid_params() -> None:
    """QUICK_PARAMS, applied to the committed params.yaml as `dvc exp run -S` applies
    them, passes the check_params stage: a renamed key or a bad value fails here, not
    in every pull request's report."""
    quick = load(ROOT / ".github/workflows/report.yml")["env"]["QUICK_PARAMS"].split()
    params = yaml.safe_load(committed_params_text())
    for setting in quick:
        key, _, value = setting.partition("=")
        section, name = key.split(".")
        assert name in params[section], key  # -S sets keys that exist (no `+`)
        params[section][name] = yaml.safe_load(value)
    parsed = check_document(params)
    assert parsed["model"].width == 16 and parsed["train"].epochs == 3

"""src/report.py: the Markdown report of one revision's results against another's. Its
parts on known values, then (`slow`) the real `dvc` CLI on two real tiny runs of a
temporary repository, which differ in train.lr: the table's numbers are those of
`dvc metrics diff --json`, in the repository and in a fresh clone of it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import LOW_LR, LOW_LR_VALUE, ROOT, TinyRepo, copy_repo, run_cmd

import report
from pipeline import comparison, revisions
from pipeline.comparison import Change
from pipeline.errors import PipelineError
from pipeline.revisions import Revision

# --------------------------------------------------------------------------- parts

# Every metric the pipeline writes, and which way it is better: a new metric fails
# test_every_metric_of_the_pipeline_has_its_direction until it is added here.
DIRECTIONS = {
    "test.accuracy": comparison.HIGHER_IS_BETTER,
    "test.macro_f1": comparison.HIGHER_IS_BETTER,
    "test.loss": comparison.LOWER_IS_BETTER,
    "test.errors": comparison.LOWER_IS_BETTER,
    "test.images": comparison.NEUTRAL,
    "val.acc": comparison.HIGHER_IS_BETTER,
    "val.loss": comparison.LOWER_IS_BETTER,
    "train.acc": comparison.HIGHER_IS_BETTER,
    "train.loss": comparison.LOWER_IS_BETTER,
    "lr": comparison.NEUTRAL,
    "step": comparison.NEUTRAL,
    "epoch_time_s": comparison.DURATION,
    "train_time_s": comparison.DURATION,
    "images_per_s": comparison.RATE,
    "train_images_per_s": comparison.RATE,
}


def flat_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        name = f"{prefix}{key}"
        keys |= flat_keys(value, f"{name}.") if isinstance(value, dict) else {name}
    return keys


def test_every_metric_of_the_pipeline_has_its_direction() -> None:
    written = set()
    for path in yaml.safe_load((ROOT / "dvc.yaml").read_text())["metrics"]:
        path = path.replace("${paths.train_report}", "reports/train")
        path = path.replace("${paths.eval_report}", "reports/eval")
        written |= flat_keys(json.loads((ROOT / path).read_text()))
    assert written == set(DIRECTIONS)
    for metric, sense in DIRECTIONS.items():
        assert comparison.sense_of(metric) is sense, metric


@pytest.mark.parametrize(
    ("metric", "old", "new", "verdict"),
    [
        ("test.accuracy", 0.99, 0.995, "better"),
        ("test.accuracy", 0.99, 0.98, "worse"),
        ("test.errors", 34, 31, "better"),
        ("val.loss", 0.1, 0.2, "worse"),
        ("train_time_s", 20.0, 10.0, "faster"),
        ("images_per_s", 500.0, 400.0, "slower"),
        ("lr", 0.1, 0.2, "changed"),
        ("test.accuracy", 0.99, 0.99, "same"),
        ("test.accuracy", None, 0.99, "new"),
        ("test.accuracy", 0.99, None, "removed"),
    ],
)
def test_verdict(metric: str, old: float | None, new: float | None, verdict: str) -> None:
    assert Change("m.json", metric, old, new).verdict == verdict


def test_numbers_keep_six_significant_digits() -> None:
    assert comparison.number(0.9969) == "0.9969"
    assert comparison.number(0.10364321619272232) == "0.103643"
    assert comparison.number(17179.436581345995) == "17,179.4"
    assert comparison.number(10000) == "10,000"
    assert comparison.number(0.00029999999999996696, sign=True) == "+0.0003"
    assert comparison.number(-3, sign=True) == "-3"
    assert comparison.number(0.0, sign=True) == "+0"
    assert comparison.number(None) == "—"


def test_table_puts_the_test_set_first_and_timing_last() -> None:
    diff = {
        "reports/train/metrics.json": {
            "train_time_s": {"old": 20.0, "new": 10.0},
            "lr": {"old": 0.1, "new": 0.1},
            "val.acc": {"old": 0.9, "new": 0.95},
        },
        "reports/eval/metrics.json": {
            "test.loss": {"old": 0.2, "new": 0.1},
            "test.note": {"old": "a", "new": "b"},  # not a number: left out
        },
    }
    changes = comparison.changes_of(diff)
    assert [c.metric for c in changes] == ["test.loss", "val.acc", "lr", "train_time_s"]
    table = comparison.metrics_table(
        changes, Revision("main", "a" * 40), Revision("workspace", None)
    )
    lines = table.splitlines()
    assert lines[0] == "| Metric | Better | main (aaaaaaa) | workspace | Change | Verdict |"
    assert lines[2] == "| test.loss | ↓ | 0.2 | 0.1 | -0.1 | **better** |"
    assert lines[5] == "| train_time_s | ↓ (speed) | 20 | 10 | -10 | faster |"
    assert comparison.summary(changes) == "Quality metrics: 2 better, 0 worse, 0 unchanged."


def test_a_metric_in_two_files_is_named_with_its_file() -> None:
    diff = {
        "a/metrics.json": {"test.loss": {"old": 0.2, "new": 0.1}},
        "b/metrics.json": {"test.loss": {"old": 0.3, "new": 0.4}},
    }
    table = comparison.metrics_table(
        comparison.changes_of(diff), Revision("x", None), Revision("y", None)
    )
    assert "| a/metrics.json: test.loss |" in table
    assert "| b/metrics.json: test.loss |" in table


def test_params_table_shows_values_as_yaml() -> None:
    base, head = Revision("main", "b" * 40), Revision("exp-1", "c" * 40)
    diff = {
        "params.yaml": {
            "train.lr": {"old": 0.2, "new": 0.05},
            "train.nesterov": {"old": True, "new": False},
            "data.mirrors": {"old": ["a/", "b/"], "new": ["a/"]},
            "train.new_key": {"old": None, "new": 3},
        }
    }
    assert comparison.params_table(diff, base, head).splitlines() == [
        "| Param | main (bbbbbbb) | exp-1 (ccccccc) |",
        "|---|--:|--:|",
        "| data.mirrors | `[a/, b/]` | `[a/]` |",
        "| train.lr | `0.2` | `0.05` |",
        "| train.nesterov | `true` | `false` |",
        "| train.new_key | — | `3` |",
    ]
    assert comparison.params_table({}, base, head) == "No params changed."


def test_stale_stages_are_those_whose_code_or_params_changed() -> None:
    status = {
        # a clone without the DVC cache: missing files are not staleness
        "download": [{"changed outs": {"data/raw": "deleted"}}],
        "preprocess": [{"changed deps": {"data/raw": "deleted"}}],
        "train": [{"changed deps": {"params.yaml": {"train.lr": "modified"}}}],
        "evaluate": [{"changed deps": {"src/evaluate.py": "modified"}}],
    }
    assert revisions.stale_stages(status) == ["train", "evaluate"]
    assert revisions.stale_stages({}) == []


def test_curves_show_accuracy_as_the_plot_stage_does() -> None:
    """The accuracy panel on the plot stage's axis (the error on a log scale, labelled in
    accuracy, better higher up): base at 60%, 99%, 99.5%, head a little better."""
    index = pd.Index([1, 2, 3], name="step")
    base = {"val acc": pd.Series([0.6, 0.99, 0.995], index=index)}
    head = {"val acc": pd.Series([0.7, 0.992, 0.997], index=index)}
    fig = report.curves_figure(base, head, ("main", "exp"))
    fig.canvas.draw()
    ax = fig.axes[1]
    assert ax.get_yscale() == "log"
    for line in ax.get_lines():
        _, y = ax.transData.transform(line.get_xydata()).T  # display pixels, up is larger
        assert y[2] > y[1] > y[0]
    assert {"99", "99.5"} <= {t.get_text() for t in ax.get_yticklabels()}
    base_line, head_line = ax.get_lines()
    assert list(base_line.get_ydata()) == pytest.approx([40.0, 1.0, 0.5])  # errors, %
    assert list(head_line.get_ydata()) == pytest.approx([30.0, 0.8, 0.3])


def test_output_folder_replaces_only_an_earlier_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    first = report.Report("# one\n", {"a.png": b"\x89PNG one"})
    report.write_report(first, out)
    report.write_report(report.Report("# two\n", {"b.png": b"\x89PNG two"}), out)
    assert sorted(p.name for p in out.iterdir()) == ["b.png", "report.md"]
    assert (out / "report.md").read_text() == "# two\n"

    code = tmp_path / "src"
    code.mkdir()
    (code / "train.py").write_text("keep")
    with pytest.raises(PipelineError, match=r"holds 'train.py', which no report writes"):
        report.write_report(first, code)
    assert (code / "train.py").read_text() == "keep"
    (tmp_path / "file").write_text("keep")
    with pytest.raises(PipelineError, match="is a file, not a folder"):
        report.write_report(first, tmp_path / "file")


def test_revisions_are_git_names_then_experiment_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An experiment is found by its name under refs/exps (as DVC keeps it); a git name
    comes first; a name two experiments share is refused."""
    monkeypatch.chdir(tmp_path)
    run_cmd(["git", "init", "-q"], cwd=tmp_path)
    for message in ("one", "two"):
        run_cmd(["git", "commit", "-q", "--allow-empty", "-m", message], cwd=tmp_path)
    one, two = (git(tmp_path, "rev-parse", rev) for rev in ("HEAD~1", "HEAD"))
    run_cmd(["git", "update-ref", f"refs/exps/{two[:2]}/{two[2:]}/tidy-dogs", one], cwd=tmp_path)
    assert revisions.resolve("tidy-dogs") == Revision("tidy-dogs", one)
    assert revisions.resolve("tidy-dogs").label == f"tidy-dogs ({one[:7]})"
    assert revisions.resolve("HEAD~1") == Revision("HEAD~1", one)
    assert revisions.resolve(one[:9]).label == one[:7]
    assert revisions.resolve("workspace") == Revision("workspace", None)
    run_cmd(["git", "branch", "tidy-dogs", two], cwd=tmp_path)
    assert revisions.resolve("tidy-dogs").sha == two  # the branch
    run_cmd(["git", "branch", "-D", "tidy-dogs"], cwd=tmp_path)
    run_cmd(["git", "update-ref", f"refs/exps/{one[:2]}/{one[2:]}/tidy-dogs", two], cwd=tmp_path)
    with pytest.raises(PipelineError, match="'tidy-dogs' is ambiguous: 2 DVC experiments"):
        revisions.resolve("tidy-dogs")
    with pytest.raises(PipelineError, match="unknown revision 'nope'"):
        revisions.resolve("nope")


def test_outside_a_dvc_project_it_says_so(tmp_path: Path) -> None:
    result = run_report(tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr == "error: not in a git repository: run from the project's root\n"
    run_cmd(["git", "init", "-q"], cwd=tmp_path)
    result = run_report(tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: not the root of a DVC project (no .dvc/ and dvc.yaml")


# --------------------------------------------------------------------------- two real runs

EXP = LOW_LR  # the experiment: train.lr from 0.2 down to 0.01
EXP_LR = LOW_LR_VALUE


def run_report(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """src/report.py as a user runs it: from the project's root, the project's own copy
    where it has one."""
    script = cwd / "src/report.py"
    script = script if script.exists() else ROOT / "src/report.py"
    return run_cmd([sys.executable, str(script), *args], cwd=cwd, check=check)


def dvc(project: Path, *args: str, **env: str) -> str:
    return run_cmd([sys.executable, "-m", "dvc", *args], cwd=project, **env).stdout


def git(project: Path, *args: str) -> str:
    return run_cmd(["git", *args], cwd=project).stdout.strip()


def experiment_commit(project: Path, name: str) -> str:
    """The commit of the DVC experiment `name` (which is no branch or tag)."""
    assert (
        run_cmd(["git", "rev-parse", "--verify", "-q", name], cwd=project, check=False).stdout == ""
    )
    refs = git(project, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps")
    (sha,) = [line.split()[0] for line in refs.splitlines() if line.endswith(f"/{name}")]
    return sha


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_experiment: TinyRepo) -> Path:
    """A repository of the project with the tiny params and two real runs: `main`, with
    train.lr as committed, and the experiment EXP, another train.lr, which is applied
    to the workspace (as `dvc exp run` leaves it)."""
    return copy_repo(tiny_experiment.path, tmp_path_factory.mktemp("report") / "project")


def table(markdown: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table after `heading`, as {column: cell}."""
    lines = markdown.split(f"\n{heading}\n", 1)[1].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip("|").split(" | ")])
    header, body = block[0], block[2:]
    return [dict(zip(header, row, strict=True)) for row in body]


def value(text: str) -> float | None:
    return None if text == "—" else float(text.replace(",", ""))


def check_against_dvc(markdown: str, diff: dict, base: str, head: str) -> None:
    """Every metric of `dvc metrics diff --json --all` is in the table once, with its
    values, change and verdict; and nothing else is."""
    rows = {row["Metric"]: row for row in table(markdown, "### Metrics")}
    expected = {m: v for metrics in diff.values() for m, v in metrics.items()}
    assert set(rows) == set(expected)
    for metric, values in expected.items():
        row = rows[metric]
        shown = (value(row[base]), value(row[head]), value(row["Change"]))
        for got, want in zip(shown, (values["old"], values["new"], values["diff"]), strict=True):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-12), (metric, row)
        sense = comparison.sense_of(metric)
        rise = values["diff"] > 0
        verdict = "same" if values["diff"] == 0 else sense.rise if rise else sense.fall
        assert row["Verdict"].strip("*") == verdict, (metric, row)
        assert row["Better"] == sense.better, metric


@pytest.mark.slow
def test_report_of_an_experiment_against_main(runs: Path) -> None:
    result = run_report(runs, "--base", "main", "--head", EXP, "--out-dir", "out")
    markdown = (runs / "out/report.md").read_text()
    main_sha, exp_sha = git(runs, "rev-parse", "main"), experiment_commit(runs, EXP)
    base_label, head_label = f"main ({main_sha[:7]})", f"{EXP} ({exp_sha[:7]})"
    assert result.stdout == f"wrote out/report.md: {head_label} against {base_label}\n"
    assert markdown.startswith(f"## DVC report: {head_label} against {base_label}\n")

    diff = json.loads(dvc(runs, "metrics", "diff", "main", EXP, "--json", "--all"))
    check_against_dvc(markdown, diff, base_label, head_label)
    # and those are the experiment's own files' numbers
    rows = {row["Metric"]: row for row in table(markdown, "### Metrics")}
    test = json.loads(git(runs, "show", f"{exp_sha}:reports/eval/metrics.json"))["test"]
    assert value(rows["test.accuracy"][head_label]) == test["accuracy"]
    assert value(rows["test.errors"][head_label]) == test["errors"]

    # the params: train.lr and nothing else
    assert table(markdown, "### Params") == [
        {"Param": "train.lr", base_label: "`0.2`", head_label: f"`{EXP_LR}`"}
    ]

    # the plots: each linked image is a PNG beside the report, and each PNG is linked
    linked = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    pngs = sorted(p.name for p in (runs / "out").glob("*.png"))
    assert sorted(linked) == pngs and "curves.png" in pngs
    for side in ("base", "head"):
        for name in ("training_curves", "confusion_matrix", "misclassified", "per_class_accuracy"):
            assert f"{side}-{name}.png" in pngs
    assert (runs / "out/head-misclassified.png").read_bytes() == subprocess.run(
        ["git", "show", f"{exp_sha}:reports/plots/misclassified.png"],
        cwd=runs,
        capture_output=True,
        check=True,
    ).stdout
    for png in pngs:
        assert (runs / "out" / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), png

    # nothing that changes from run to run or machine to machine: the same bytes again
    assert str(runs.parent) not in markdown and not re.search(r"\d{4}-\d\d-\d\d", markdown)
    before = {p.name: p.read_bytes() for p in (runs / "out").iterdir()}
    run_report(runs, "--base", "main", "--head", EXP, "--out-dir", "out")
    assert {p.name: p.read_bytes() for p in (runs / "out").iterdir()} == before


@pytest.mark.slow
def test_report_of_the_workspace_is_the_default(runs: Path) -> None:
    """`dvc exp run` applied the experiment to the workspace: the plain command reports
    it against main, with the same numbers."""
    result = run_report(runs)
    base_label = f"main ({git(runs, 'rev-parse', 'main')[:7]})"
    assert result.stdout == f"wrote report/report.md: workspace against {base_label}\n"
    markdown = (runs / "report/report.md").read_text()
    diff = json.loads(dvc(runs, "metrics", "diff", "main", "--json", "--all"))
    check_against_dvc(markdown, diff, base_label, "workspace")
    assert "Stale" not in markdown


@pytest.mark.slow
def test_report_in_a_fresh_clone_of_head_against_an_experiment(runs: Path) -> None:
    """A clone has the git-tracked results and, once pulled, the experiment; it needs
    no DVC cache: none is there."""
    clone = runs.parent / "clone"
    run_cmd(["git", "clone", "-q", str(runs), str(clone)], cwd=runs.parent)
    dvc(clone, "exp", "pull", "origin", EXP)
    run_report(clone, "--base", "HEAD", "--head", EXP)
    assert not (clone / "models/model.pt").exists()
    markdown = (clone / "report/report.md").read_text()
    diff = json.loads(dvc(clone, "metrics", "diff", "HEAD", EXP, "--json", "--all"))
    head_label = f"{EXP} ({experiment_commit(clone, EXP)[:7]})"
    check_against_dvc(markdown, diff, f"HEAD ({git(clone, 'rev-parse', 'HEAD')[:7]})", head_label)
    run_report(runs, "--base", "main", "--head", EXP, "--out-dir", "out")
    original = (runs / "out/report.md").read_text()
    assert markdown == original.replace("main (", "HEAD (")


@pytest.mark.slow
def test_bad_revisions_are_named(runs: Path) -> None:
    result = run_report(runs, "--base", "nope", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: unknown revision 'nope': neither a git revision")
    # the first commit, before any run: no metrics to report
    result = run_report(runs, "--head", "main~1", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no metrics at main~1 (")
    assert "run the pipeline there first" in result.stderr
    # as base it is fine: every value is new
    run_report(runs, "--base", "main~1", "--head", "main", "--out-dir", "first")
    markdown = (runs / "first/report.md").read_text()
    assert "has no metrics: every value is new" in markdown
    assert all(row["Verdict"] == "new" for row in table(markdown, "### Metrics"))

"""Compare the pipeline's results at two revisions: a Markdown report with its plots, for a
pull request (.github/workflows/report.yml posts it) or for yourself before pushing.

    python src/report.py [--base REV] [--head REV] [--out-dir report] [--note TEXT]

A REV is anything git names (a branch, a tag, a commit, HEAD~1) or the name of a DVC
experiment (`dvc exp list`); `workspace` is the files as they are now. --base defaults to
main and --head to the workspace, so after `dvc exp run -S train.lr=0.05` the plain
command shows what that change did. --note puts a paragraph under the title (the CI
workflow says there how the runs were made). Not a stage: no stage imports it.

Inputs:  the metrics (dvc.yaml `metrics:`) through `dvc metrics diff --json` and the params
         through `dvc params diff --json`; from each revision's own tree, its params.yaml
         `paths`, the DVCLive per-epoch TSVs (`paths.train_report`/plots/metrics) and the
         plot stage's PNGs (`paths.plots`). All are git-tracked, so a fresh clone needs
         neither the DVC cache nor a remote.
Outputs: OUT_DIR/report.md: a table of every metric (base, head, change, the direction of
         better and whether the change is better or worse), the params that changed, and
         the plots; beside it, linked from it, curves.png (both revisions' per-epoch loss,
         accuracy and learning rate overlaid) and base-<plot>.png, head-<plot>.png (the
         plot stage's figures). No timestamps and no absolute paths, so the same results
         give the same bytes. The folder is replaced whole, atomically, and only if it
         holds nothing but an earlier report. stdout: one line naming the report.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.errors import PipelineError
from pipeline.figures import accuracy_axis, error_percent
from pipeline.files import atomic_path
from pipeline.params import PARAMS_FILE
from pipeline.process import run

WORKSPACE = "workspace"  # DVC's name for the files as they are now
REPORT = "report.md"
CURVES = "curves.png"

# --------------------------------------------------------------------------- revisions


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


# --------------------------------------------------------------------------- dvc


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


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Sense:
    """Which way a metric is better, and the words for its rising and falling."""

    better: str  # shown in the table: ↑, ↓ or nothing
    rise: str
    fall: str


HIGHER_IS_BETTER = Sense("↑", "better", "worse")
LOWER_IS_BETTER = Sense("↓", "worse", "better")
# Timing depends on the machine and on what else ran there: not a measure of the model.
RATE = Sense("↑ (speed)", "faster", "slower")
DURATION = Sense("↓ (speed)", "slower", "faster")
NEUTRAL = Sense("", "changed", "changed")  # a setting or a count (lr, step, images)


def sense_of(metric: str) -> Sense:
    """The direction of better for a metric of this pipeline, by its last key."""
    leaf = metric.rsplit(".", 1)[-1]
    if leaf in ("acc", "accuracy", "macro_f1"):
        return HIGHER_IS_BETTER
    if leaf in ("loss", "errors"):
        return LOWER_IS_BETTER
    if leaf.endswith("_per_s"):
        return RATE
    if leaf.endswith("_time_s"):
        return DURATION
    return NEUTRAL


@dataclass(frozen=True)
class Change:
    """One metric at both revisions (None where a revision lacks it)."""

    file: str
    metric: str
    old: float | None
    new: float | None

    @property
    def diff(self) -> float | None:
        return None if self.old is None or self.new is None else self.new - self.old

    @property
    def sense(self) -> Sense:
        return sense_of(self.metric)

    @property
    def verdict(self) -> str:
        if self.old is None or self.new is None:
            return "new" if self.old is None else "removed"
        if self.new == self.old:
            return "same"
        return self.sense.rise if self.new > self.old else self.sense.fall


# The table's order: the test set first, as it decides; then validation, training, timing.
ORDER = ("test.", "val.", "train.")


def rank(change: Change) -> tuple:
    group = next((i for i, p in enumerate(ORDER) if change.metric.startswith(p)), len(ORDER))
    speed = change.sense in (RATE, DURATION)
    quality = change.sense in (HIGHER_IS_BETTER, LOWER_IS_BETTER)
    return (speed, not quality, group, change.metric)


def changes_of(diff: dict) -> list[Change]:
    """Every metric of a `dvc metrics diff --all --json`, in the table's order. Values
    that are not numbers (a metric may be a string) are left out."""
    changes = []
    for file, metrics in diff.items():
        for metric, values in metrics.items():
            old, new = values.get("old"), values.get("new")
            if all(v is None or is_number(v) for v in (old, new)) and (old, new) != (None, None):
                changes.append(Change(file, metric, old, new))
    return sorted(changes, key=rank)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(value: float | None, sign: bool = False) -> str:
    """A metric as the table shows it: six significant digits, thousands separated."""
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:+,}" if sign else f"{value:,}"
    return f"{value:+,.6g}" if sign else f"{value:,.6g}"


def cell(text: object) -> str:
    """Text made safe for a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def metrics_table(changes: list[Change], base: Revision, head: Revision) -> str:
    rows = [
        f"| Metric | Better | {cell(base.label)} | {cell(head.label)} | Change | Verdict |",
        "|---|:-:|--:|--:|--:|---|",
    ]
    names = [c.metric for c in changes]
    for c in changes:
        name = c.metric if names.count(c.metric) == 1 else f"{c.file}: {c.metric}"
        diff = number(c.diff, sign=True) if c.diff is not None else "—"
        verdict = f"**{c.verdict}**" if c.verdict in ("better", "worse") else c.verdict
        rows.append(
            f"| {cell(name)} | {c.sense.better} | {number(c.old)} | {number(c.new)} "
            f"| {diff} | {verdict} |"
        )
    return "\n".join(rows)


def summary(changes: list[Change]) -> str:
    """One line: how many quality metrics got better and worse, naming the worse."""
    quality = [c for c in changes if c.sense in (HIGHER_IS_BETTER, LOWER_IS_BETTER)]
    better = [c.metric for c in quality if c.verdict == "better"]
    worse = [c.metric for c in quality if c.verdict == "worse"]
    same = [c.metric for c in quality if c.verdict == "same"]
    new = [c.metric for c in quality if c.verdict in ("new", "removed")]
    parts = [f"{len(better)} better", f"{len(worse)} worse", f"{len(same)} unchanged"]
    parts += [f"{len(new)} at one revision only"] if new else []
    named = f" (worse: {', '.join(worse)})" if worse else ""
    return f"Quality metrics: {', '.join(parts)}{named}."


# --------------------------------------------------------------------------- params


def params_table(diff: dict, base: Revision, head: Revision) -> str:
    """The params that differ, from `dvc params diff --json`; a file other than
    params.yaml is named."""
    rows = []
    for file, params in diff.items():
        for key, values in sorted(params.items()):
            name = key if file == str(PARAMS_FILE) else f"{file}: {key}"
            rows.append(
                f"| {cell(name)} | {cell(param_value(values.get('old')))} "
                f"| {cell(param_value(values.get('new')))} |"
            )
    if not rows:
        return "No params changed."
    header = [f"| Param | {cell(base.label)} | {cell(head.label)} |", "|---|--:|--:|"]
    return "\n".join(header + rows)


def param_value(value: Any) -> str:
    """A param as YAML writes it (`true`, `0.05`, `[a, b]`); `—` where it is absent."""
    if value is None:
        return "—"
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"))
    return f"`{text.strip().removesuffix('...').strip()}`"  # a scalar's dump ends in `...`


# --------------------------------------------------------------------------- curves

CURVE_FILES = {  # per-epoch series that DVCLive writes under <train_report>/plots/metrics
    "train loss": "train/loss.tsv",
    "val loss": "val/loss.tsv",
    "train acc": "train/acc.tsv",
    "val acc": "val/acc.tsv",
    "lr": "lr.tsv",
}


def curves_at(rev: Revision, paths: dict[str, str]) -> dict[str, pd.Series]:
    """The per-epoch series of one revision, by CURVE_FILES's names; those it lacks
    (no run there yet, or an older layout) are left out."""
    folder = f"{paths.get('train_report', 'reports/train')}/plots/metrics"
    series = {}
    for name, file in CURVE_FILES.items():
        data = read_at(rev, f"{folder}/{file}")
        if data is None:
            continue
        column = name.split()[-1]
        try:
            table = pd.read_csv(io.BytesIO(data), sep="\t")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            continue
        if {"step", column} <= set(table.columns):
            series[name] = table.set_index("step")[column]
    return series


def curves_figure(base: dict[str, pd.Series], head: dict[str, pd.Series], labels: tuple) -> Figure:
    """Loss, accuracy and learning rate per epoch: base dashed, head solid; accuracy on
    the plot stage's axis (the error on a log scale, pipeline.figures)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), layout="constrained")
    panels = (
        (axes[0], ("train loss", "val loss"), "Loss (no smoothing)"),
        (axes[1], ("train acc", "val acc"), "Accuracy (%, log scale of the error)"),
        (axes[2], ("lr",), "Learning rate (epoch mean)"),
    )
    colours = {"train loss": "tab:blue", "val loss": "tab:orange", "lr": "tab:green"}
    colours |= {"train acc": "tab:blue", "val acc": "tab:orange"}
    for ax, names, title in panels:
        drawn = []
        for curves, label, style, face in (
            (base, labels[0], "--", "none"),  # hollow markers: base
            (head, labels[1], "-", None),
        ):
            for name in names:
                if name in curves:
                    s = error_percent(curves[name]) if name.endswith("acc") else curves[name]
                    drawn.append(s)
                    ax.plot(
                        s.index,
                        s,
                        style,
                        color=colours[name],
                        marker="o",
                        markersize=4,
                        markerfacecolor=face,
                        label=f"{name.split()[0]}: {label}",
                    )
        if ax is axes[1] and drawn:
            accuracy_axis(ax, pd.concat(drawn))
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"{labels[0]} (dashed) against {labels[1]} (solid)", fontsize=9)
    return fig


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Report:
    markdown: str
    images: dict[str, bytes | Figure]  # file name in the report's folder -> its content


def plots_section(base: Revision, head: Revision) -> tuple[list[str], dict[str, bytes | Figure]]:
    """Markdown blocks and their images: the overlaid curves, then the plot stage's
    figures of both revisions side by side (folded, as they are large)."""
    base_paths, head_paths = paths_at(base), paths_at(head)
    blocks: list[str] = []
    images: dict[str, bytes | Figure] = {}
    base_curves, head_curves = curves_at(base, base_paths), curves_at(head, head_paths)
    if base_curves or head_curves:
        images[CURVES] = curves_figure(base_curves, head_curves, (base.label, head.label))
        blocks.append(f"![Per-epoch curves: {base.label} dashed, {head.label} solid]({CURVES})")
    figures: dict[str, dict[str, str]] = {}  # plot name -> side -> file in the report
    for side, rev, paths in (("base", base, base_paths), ("head", head, head_paths)):
        folder = paths.get("plots", "reports/plots")
        for name in pngs_at(rev, folder):
            data = read_at(rev, f"{folder}/{name}")
            if data is not None:
                images[f"{side}-{name}"] = data
                figures.setdefault(name, {})[side] = f"{side}-{name}"
    if figures:
        rows = [f"| {cell(base.label)} | {cell(head.label)} |", "|---|---|"]
        for name, files in sorted(figures.items()):
            shown = [
                f"![{name.removesuffix('.png')}: {rev.label}]({files[side]})"
                if side in files
                else "—"
                for side, rev in (("base", base), ("head", head))
            ]
            rows.append(f"| {shown[0]} | {shown[1]} |")
        # GitHub renders Markdown inside <details> when blank lines set it apart
        table = "\n".join(rows)
        blocks.append(
            "<details><summary>The plot stage's figures, side by side</summary>\n\n"
            f"{table}\n\n</details>"
        )
    return blocks or ["No plots at either revision."], images


def build_report(base: Revision, head: Revision, note: str = "") -> Report:
    """The whole report of `head` against `base`, `note` (how the runs were made, say)
    under its title."""
    revs = [base.dvc_rev, head.dvc_rev]
    metrics = changes_of(dvc_json("metrics", "diff", *revs, "--all"))
    if not any(c.new is not None for c in metrics):
        raise PipelineError(
            f"no metrics at {head.label}: run the pipeline there first (`dvc repro`)"
        )
    params = dvc_json("params", "diff", *revs)
    sections = [f"## DVC report: {head.label} against {base.label}"] + ([note] if note else [])
    if head.sha is None:
        stale = stale_stages(dvc_json("status"))
        if stale:
            sections.append(
                f"> **Stale:** stage(s) {', '.join(stale)} changed since dvc.lock, so the "
                "workspace's results are not of its code and params: run `dvc repro`."
            )
    if not any(c.old is not None for c in metrics):
        sections.append(f"{base.label} has no metrics: every value is new.")
    plots, images = plots_section(base, head)
    sections += [
        "### Metrics",
        summary(metrics),
        metrics_table(metrics, base, head),
        "### Params",
        params_table(params, base, head),
        "### Plots",
        *plots,
    ]
    return Report("\n\n".join(sections) + "\n", images)


def check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that holds anything but an earlier report: the folder
    is replaced whole, so `--out-dir src` must not be taken for one."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PipelineError(f"--out-dir {out_dir} is a file, not a folder")
    if out_dir.is_dir():
        others = [p.name for p in out_dir.iterdir() if not (p.name == REPORT or p.suffix == ".png")]
        if others:
            raise PipelineError(
                f"--out-dir {out_dir} holds {others[0]!r}, which no report writes: "
                "name a new folder (it is replaced whole)"
            )


def write_report(report: Report, out_dir: Path) -> None:
    """report.md and its images into `out_dir`, all at once."""
    check_out_dir(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        (tmp / REPORT).write_text(report.markdown)
        for name, image in report.images.items():
            if isinstance(image, Figure):
                # no "Software"/date metadata: the same results give the same bytes
                image.savefig(tmp / name, dpi=100, metadata={"Software": None})
                plt.close(image)
            else:
                (tmp / name).write_bytes(image)


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="revision to compare against (main)")
    parser.add_argument("--head", default=WORKSPACE, help="revision to report on (the workspace)")
    parser.add_argument(
        "--out-dir", default="report", type=Path, help="folder for report.md and its PNGs"
    )
    parser.add_argument("--note", default="", help="a paragraph (Markdown) under the title")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    in_dvc_repo()
    check_out_dir(args.out_dir)  # before the work, not after
    base, head = resolve(args.base), resolve(args.head)
    report = build_report(base, head, args.note)
    write_report(report, args.out_dir)
    print(f"wrote {args.out_dir / REPORT}: {head.label} against {base.label}")


if __name__ == "__main__":
    run(main)

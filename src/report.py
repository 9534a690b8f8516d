"""Compare the pipeline's results at two revisions: a Markdown report with its plots, for a
pull request (.github/workflows/report.yml posts it) or for yourself before pushing.

    python src/report.py [--base REV] [--head REV] [--out-dir report] [--note TEXT]

A REV is anything git names (a branch, a tag, a commit, HEAD~1) or the name of a DVC
experiment (`dvc exp list`); `workspace` is the files as they are now. --base defaults to
main and --head to the workspace, so after `dvc exp run -S train.lr=0.05` the plain
command shows what that change did. --note puts a paragraph under the title (the CI
workflow says there how the runs were made). Not a stage: no stage imports it.
Its parts: `pipeline/revisions.py` (what a revision holds), `pipeline/comparison.py` (the
tables), `pipeline/figures.py` (the accuracy axis, the plot stage's).

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
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.comparison import cell, changes_of, metrics_table, params_table, summary
from pipeline.errors import PipelineError
from pipeline.figures import accuracy_axis, error_percent
from pipeline.files import atomic_path
from pipeline.process import run
from pipeline.revisions import (
    WORKSPACE,
    Revision,
    dvc_json,
    in_dvc_repo,
    paths_at,
    pngs_at,
    read_at,
    resolve,
    stale_stages,
)

REPORT = "report.md"
CURVES = "curves.png"

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

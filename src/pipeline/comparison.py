"""The report's tables (src/report.py): each metric at two revisions with the direction
of better and a verdict, in the order that decides (the test set first, timing last),
and the params that differ, as YAML writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.params import PARAMS_FILE
from pipeline.revisions import Revision


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

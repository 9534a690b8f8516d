"""The recipe study's table (.ci/recipe-table, docs/recipe.md): runs of earlier tables
pooled, means and paired differences over the seeds two recipes share, and a seed
listed twice refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SCRIPT = ROOT / ".ci/recipe-table"


def table(runs: dict[str, float], epochs: dict[str, int]) -> str:
    """A table as the script prints it: recipe rows (their epochs), then per-run lines."""
    rows = [f"| {recipe} | {n} | 1 | 0 | 0 | |" for recipe, n in epochs.items()]
    lines = [f"{name} test.accuracy={acc} test.errors=0 val.acc=0.99" for name, acc in runs.items()]
    return "\n".join(["Made by hand.", "", *rows, "", *lines]) + "\n"


def recipe_table(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True
    )


def test_two_tables_pool_into_one_paired_comparison(tmp_path: Path) -> None:
    first = tmp_path / "first.md"
    first.write_text(
        table({"old15-w16-s1": 0.9970, "new8-w16-s1": 0.9968}, {"old15-w16": 15, "new8-w16": 8})
    )
    second = tmp_path / "second.md"
    second.write_text(
        table(
            {"old15-w16-s2": 0.9966, "new8-w16-s2": 0.9972, "new8-w16-s3": 0.9960},
            {"old15-w16": 15, "new8-w16": 8},
        )
    )
    done = recipe_table(first, second)
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if "|" in line}
    # the candidate: three seeds, mean 99.667; against the reference on seeds 1 and 2 only:
    # -0.02 and +0.06, mean +0.020, standard error 0.04 (std 0.0566 / sqrt 2)
    assert "| new8-w16 | 8 | 3 | 99.667 ± 0.061 | 99.68, 99.72, 99.60 |" in rows["new8-w16"]
    assert "+0.020 over 2 (standard error 0.040; 1 better, 1 worse)" in rows["new8-w16"]
    assert "| old15-w16 | 15 | 2 | 99.680 ± 0.028 | 99.70, 99.66 |  |" in rows["old15-w16"]
    assert "new8-w16-s3 test.accuracy=0.996 " in done.stdout and "(second.md)" in done.stdout
    # its own output pools again, to the same table
    pooled = tmp_path / "pooled.md"
    pooled.write_text(done.stdout)
    again = recipe_table(pooled)
    assert again.returncode == 0, again.stderr
    table_rows = lambda text: [ln for ln in text.splitlines() if ln.startswith("|")]  # noqa: E731
    assert table_rows(again.stdout) == table_rows(done.stdout)


def test_a_seed_in_two_sources_is_refused(tmp_path: Path) -> None:
    first = tmp_path / "first.md"
    first.write_text(table({"old15-w16-s1": 0.9970}, {"old15-w16": 15}))
    second = tmp_path / "second.md"
    second.write_text(table({"old15-w16-s1b": 0.9966}, {"old15-w16": 15}))
    done = recipe_table(first, second)
    assert done.returncode == 1
    assert "a seed run twice: ['old15-w16-s1', 'old15-w16-s1b']" in done.stderr


def test_runs_of_recipe_seeds_join_a_table(tmp_path: Path) -> None:
    earlier = tmp_path / "earlier.md"
    earlier.write_text(table({"old15-w16-s1": 0.9970, "old15-w16-s2": 0.9966}, {"old15-w16": 15}))
    out = tmp_path / "seeds-out"
    out.mkdir()
    # as .ci/recipe-seeds writes it: one run with its epochs, one from before it recorded
    # them (read from its console), one failed (left out)
    runs = [
        {"recipe": "bn", "seed": 1, "accuracy": 99.5, "errors": 50},
        {"recipe": "bn", "seed": 2, "epochs": 8, "accuracy": 99.62, "errors": 38},
        {"recipe": "bn", "seed": 3, "failed": "train exit 1 (see bn-s3.txt)"},
    ]
    for run in runs[:2]:
        run |= {"val_acc": 99.11999999999999, "train_time_s": 600.0, "wall_s": 630.0}
    (out / "runs.json").write_text(json.dumps(runs))
    (out / "bn-s1.txt").write_text("training from the start: 8 epochs of 107 steps\n")
    done = recipe_table(earlier, out / "runs.json")
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if "|" in line}
    # -0.20 and -0.04 against the reference: mean -0.120, standard error 0.080
    assert "| bn | 8 | 2 | 99.560 ± 0.085 | 99.50, 99.62 |" in rows["bn"]
    assert "-0.120 over 2 (standard error 0.080; 0 better, 2 worse)" in rows["bn"]
    assert "bn-s1 test.accuracy=0.9950 test.errors=50 val.acc=0.9912 " in done.stdout
    assert "(seeds-out/runs.json)" in done.stdout and "bn-s3" not in done.stdout

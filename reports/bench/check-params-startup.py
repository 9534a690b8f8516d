"""The check_params stage's wall time at two revisions, side by side.

    .venv/bin/python reports/bench/check-params-startup.py OLD_REV [NEW_REV|workspace] [ROUNDS]

Each revision's `src/` and `params.yaml` go into a temp folder; its stage command,
`python src/check_params.py`, then runs there in turns (old, new, old, new, ...) so
that the machine's drift falls on both alike. Prints each revision's median and
range over the rounds, the ratio of the medians, and which heavy libraries a run
of each imports. Output: reports/bench/cpu-check-params-startup.txt.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
from pipeline.measure import hardware  # noqa: E402

HEAVY = ("torch", "matplotlib", "pandas", "dvclive")
PROBE = (
    "import runpy, sys; sys.path.insert(0, 'src'); "
    "runpy.run_path('src/check_params.py', run_name='__main__'); "
    f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
)


def checkout(rev: str, dest: Path) -> Path:
    """`src/` and `params.yaml` of `rev` (or of the working tree) in `dest`."""
    dest.mkdir()
    if rev == "workspace":
        subprocess.run(["cp", "-r", ROOT / "src", ROOT / "params.yaml", dest], check=True)
    else:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "src", "params.yaml"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def seconds(folder: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "src/check_params.py"], cwd=folder, check=True, capture_output=True
    )
    return time.perf_counter() - start


def main() -> None:
    old, new = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "workspace"
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    cpu = hardware(torch.device("cpu"))  # this process's threads, not the stage's
    print(f"{cpu}, Python {platform.python_version()}, {rounds} rounds")
    with tempfile.TemporaryDirectory() as scratch:
        folders = {
            rev: checkout(rev, Path(scratch) / f"rev{i}") for i, rev in enumerate((old, new))
        }
        for folder in folders.values():
            seconds(folder)  # one untimed run each: the files into the page cache
        times: dict[str, list[float]] = {rev: [] for rev in folders}
        for _ in range(rounds):
            for rev, folder in folders.items():
                times[rev].append(seconds(folder))
        for rev, folder in folders.items():
            imported = subprocess.run(
                [sys.executable, "-c", PROBE],
                cwd=folder,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.splitlines()[-1]
            t = times[rev]
            print(
                f"{rev}: median {statistics.median(t):.3f} s "
                f"(range {min(t):.3f}-{max(t):.3f} s); imports {imported}"
            )
    ratio = statistics.median(times[old]) / statistics.median(times[new])
    print(f"{old} / {new}, medians: {ratio:.1f}x")


if __name__ == "__main__":
    main()

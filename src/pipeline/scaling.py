"""Data-parallel scaling: the train stage's images/s with 1, 2, 4, ... processes.

`python src/bench.py --scaling`, run in the project's folder, runs the train stage
itself (`python src/train.py`, 2 epochs, no checkpoints) in a temporary copy of the
project for each number of processes, up to the number of GPUs (on a CPU: 1 and 2
Gloo processes), and prints the images/s of its last epoch, the ratio to one
process, and one JSON line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from pipeline.errors import PipelineError
from pipeline.measure import hardware
from pipeline.params import PARAMS_FILE, load_paths, read_params_file

SOURCE = Path("src")  # the project's code, copied with its params into each run's folder


def bench_scaling(counts: list[int], width: int, device: str, processed: Path) -> dict[int, float]:
    """{processes: images/s of the last of 2 epochs} of `python src/train.py` in a temp
    copy of the project (the data in `processed`) with `train.processes` at each count."""
    results, paths = {}, load_paths()
    processed = processed.resolve()
    params = read_params_file()
    params["model"]["width"] = width
    params["train"].update(
        epochs=2, warmup_epochs=1, checkpoint_every=0, checkpoint_minutes=0, device=device
    )
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            project = Path(tmp)
            shutil.copytree(SOURCE, project / "src")
            (project / paths.processed).parent.mkdir(parents=True, exist_ok=True)
            (project / paths.processed).symlink_to(processed)
            params["train"]["processes"] = count
            (project / PARAMS_FILE).write_text(yaml.safe_dump(params))
            done = subprocess.run(
                [sys.executable, "src/train.py"], cwd=project, capture_output=True, text=True
            )
            if done.returncode:
                raise PipelineError(f"{count} processes: {done.stderr.strip()[-400:]}")
            metrics = json.loads((project / paths.train_report / "metrics.json").read_text())
            results[count] = metrics["images_per_s"]
            print(
                f"{count:>9}{results[count]:>12.1f}{results[count] / results[counts[0]]:>10.3f}",
                flush=True,
            )
    return results


def report_scaling(width: int, device: torch.device, processed: Path) -> None:
    """The train stage's images/s with 1, 2, 4, ... processes on `device`'s kind: the
    table as it is measured, then the JSON line."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= max(gpus, 2)]
    if device.type == "cuda" and gpus < 2:
        print("one GPU: nothing to scale over; measuring 1 process only")
        counts = [1]
    where = f"{gpus} GPUs (NCCL)" if device.type == "cuda" else "the CPU (Gloo)"
    name = hardware(device)
    print(f"{name}; torch {torch.__version__}; width {width}; on {where}")
    print(f"{'processes':>9}{'images/s':>12}{'vs 1':>10}")
    results = bench_scaling(counts, width, device.type, processed)
    print(json.dumps({"scaling": {"hardware": name, "images_per_s": results}}))

"""The side averages of docs/recipe.md's span study, evaluated as the evaluate stage does.

Each FILE is what `side-averages.patch` saved at the end of one training run (the six
side averages and the last weights, by name); each is evaluated on the validation split
without TTA (as the train stage validates) and on the test set without TTA and with
evaluate.tta's 4 shifted copies (evaluate.inference_logits, precision and layout as
evaluate's `auto`). Writes {seed: {"<name>/<split>/tta<n>": {"errors", "loss"}}} to OUT;
`table` prints OUT as a table, each row's differences paired by seed with REFERENCE's.

    OMP_NUM_THREADS=1 .venv/bin/python \
        reports/runs/recipe-ema-span/evaluate_side_averages.py 16 OUT.json s6.pt s7.pt ...
    .venv/bin/python reports/runs/recipe-ema-span/evaluate_side_averages.py table OUT.json k10d995
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

PROJECT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(PROJECT / "src"))
from evaluate import inference_logits  # noqa: E402
from pipeline.model import resnet18  # noqa: E402
from pipeline.settings import inference_settings  # noqa: E402

PROCESSED = PROJECT / "data/processed"
TEST_IMAGES = 10_000  # MNIST's whole test set (preprocess.test_limit 0), as the study's runs had


def evaluated(states: dict, width: int, splits: dict, stats: dict) -> dict:
    settings = inference_settings(torch.device("cpu"), "auto", "auto", "auto")
    row = {}
    for name, state in states.items():
        if name == "steps":
            continue
        net = resnet18(width=width)
        net.load_state_dict(state)
        for split, data in splits.items():
            for tta in (0,) if split == "val" else (0, 4):
                logits = inference_logits(net, data["images"], stats, settings, tta)
                row[f"{name}/{split}/tta{tta}"] = {
                    "errors": int((logits.argmax(1) != data["labels"]).sum()),
                    "loss": float(F.cross_entropy(logits, data["labels"])),
                }
    return row


def table(results: dict, reference: str) -> str:
    """Per name: validation errors over the seeds, then test errors and accuracy (TTA 4),
    the test's paired difference from `reference` and TTA 0's errors."""
    seeds = sorted(results, key=int)
    names = [k.split("/")[0] for k in results[seeds[0]] if k.endswith("/val/tta0")]
    lines = [
        f"{len(seeds)} seeds: {', '.join(seeds)}. Errors summed over the seeds; accuracy "
        "mean ± standard deviation; the difference paired by seed (points, standard error).",
        "",
        "| weights | validation errors (no TTA) | test errors (TTA 4) | test accuracy (%) "
        f"| vs {reference} (points) | test errors (no TTA) |",
        "|---|---|---|---|---|---|",
    ]

    def errors(name: str, split: str, seed: str) -> int:
        return results[seed][f"{name}/{split}"]["errors"]

    def test_accuracy(name: str) -> list[float]:  # TTA 4, in %, seed by seed
        return [100 - 100 * errors(name, "test/tta4", s) / TEST_IMAGES for s in seeds]

    base = test_accuracy(reference)
    for name in names:
        ours = test_accuracy(name)
        gaps = [a - b for a, b in zip(ours, base, strict=True)]
        spread = statistics.stdev(gaps) / len(gaps) ** 0.5
        lines.append(
            f"| {name} | {sum(errors(name, 'val/tta0', s) for s in seeds)} "
            f"| {sum(errors(name, 'test/tta4', s) for s in seeds)} "
            f"| {statistics.mean(ours):.3f} ± {statistics.stdev(ours):.3f} "
            f"| {statistics.mean(gaps):+.3f} ({spread:.3f}) "
            f"| {sum(errors(name, 'test/tta0', s) for s in seeds)} |"
        )
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1] == "table":
        print(table(json.loads(Path(sys.argv[2]).read_text()), sys.argv[3]))
        return
    width, out, files = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    stats = json.loads((PROCESSED / "stats.json").read_text())
    splits = {n: torch.load(PROCESSED / f"{n}.pt", weights_only=True) for n in ("val", "test")}
    results = json.loads(out.read_text()) if out.exists() else {}
    for file in files:
        seed = Path(file).stem.removeprefix("s")
        results[seed] = evaluated(torch.load(file, weights_only=True), width, splits, stats)
        out.write_text(json.dumps(results, indent=1))
        print(seed, {k: v["errors"] for k, v in results[seed].items() if "/val/" in k})


if __name__ == "__main__":
    main()

"""The benchmark's (src/bench.py) output: each measurement's row as soon as it is
known, then the summary with the ratios and FLOP rates, a warning when the figures
look noisy, and the one JSON line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from pipeline.measure import PEAK_TFLOPS, hardware, peak_memory_mib, training_flops_per_image
from pipeline.settings import Settings


def measure(rows: dict[str, Callable[[], float]], repeats: int, device: torch.device) -> tuple:
    """Run each measurement `repeats` times and print its row as soon as it is known:
    ({row: best images/s}, {row: peak memory MiB}, {row: worst/best})."""
    memory_label = "peak MiB" if device.type == "cuda" else "RSS MiB"
    # vs auto: a training row against ours, an evaluate row against the evaluate stage as is
    print(f"{'measurement':<34}{'images/s':>12}{'vs auto':>10}{memory_label:>10}{'min/max':>10}")
    results, memory, spread = {}, {}, {}
    for key, run_once in rows.items():
        # a fresh compile per measurement: one process compiling many models would
        # otherwise hit dynamo's recompile limit and silently fall back to eager
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # the best of --repeats: the first measurement in a process ran up to 7% slow
        # on the 2-core CPU whatever it measured (docs/speed.md)
        values = [run_once() for _ in range(repeats)]
        results[key], spread[key] = max(values), min(values) / max(values)
        memory[key] = peak_memory_mib(device)
        ratio = results[key] / results[reference_row(key)]
        print(
            f"{key:<34}{results[key]:>12.1f}{ratio:>10.3f}{memory[key]:>10.0f}{spread[key]:>10.3f}",
            flush=True,
        )
    return results, memory, spread


def reference_row(key: str) -> str:
    """The row a row's "vs auto" is over: an evaluate row the evaluate stage's as auto
    runs it, a data path row ours' data path, any other training row ours."""
    return next((r for r in ("evaluate", "data path") if key.startswith(r)), "ours")


def augment_share(results: dict[str, float]) -> float | None:
    """The augmentation's share of a training step: the data path's seconds per image
    with it minus those without it, over ours' (with it); None unless both data path
    rows were measured (`--ablate augment`)."""
    if "data path, augment off" in results:  # ours augments: the flip turned it off
        with_it, without, step = "data path", "data path, augment off", "ours"
    elif "data path, augment on" in results:  # ours does not: the flip turned it on
        with_it, without, step = "data path, augment on", "data path", "ours, augment on"
    else:
        return None
    return (1 / results[with_it] - 1 / results[without]) * results[step]


def summary(args: argparse.Namespace, s: Settings, evaluation: Settings, figures: tuple) -> dict:
    """The JSON summary of the run, with the ratios and FLOP rates."""
    results, memory, spread = figures
    name = hardware(s.device)
    flops = training_flops_per_image(args.width)
    peak = next((v[s.precision] for k, v in PEAK_TFLOPS.items() if k in name), None)
    tflops = results["ours"] * flops / 1e12
    share = augment_share(results)
    return {
        "hardware": name,
        "device": s.device.type,
        "torch": torch.__version__,
        "width": args.width,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "settings": s.describe(),
        "evaluate_settings": evaluation.describe_inference(),
        "seed_workers": args.seed_workers,
        "images_per_s": {k: round(v, 2) for k, v in results.items()},
        "ours_over_seed_style": round(results["ours"] / results["seed-style"], 3),
        "ours_over_ceiling": round(results["ours"] / results["ceiling"], 3),
        "augment_share_of_step": None if share is None else round(share, 4),
        "train_gflop_per_image": round(flops / 1e9, 3),
        "ours_tflops": round(tflops, 4),
        "peak_tflops": peak,
        "fraction_of_peak": round(tflops / peak, 4) if peak else None,
        "peak_memory_mib": {k: round(v, 1) for k, v in memory.items()},
        "repeats": args.repeats,
        "min_over_max": {k: round(v, 3) for k, v in spread.items()},
    }


def report(figures: dict, spread: dict) -> None:
    """The closing lines: the ratios, a warning if the figures look noisy, the JSON."""
    tflops, peak = figures["ours_tflops"], figures["peak_tflops"]
    print(
        f"ours/seed-style {figures['ours_over_seed_style']:.3f}, ours/ceiling "
        f"{figures['ours_over_ceiling']:.3f}; {figures['train_gflop_per_image']:.3f} GFLOP "
        f"per training image, {tflops:.4f} TFLOP/s"
        + (f" = {tflops / peak:.1%} of {peak:.0f} peak" if peak else "")
    )
    share = figures["augment_share_of_step"]
    if share is not None:
        print(
            f"augmentation: {share:.2%} of a training step (the data path timed alone with "
            "and without it, against ours' step)"
        )
    if (
        figures["steps"] < 10
        or min(spread.values()) < 0.95
        or not 0.5 < figures["ours_over_ceiling"] < 1.5
    ):
        print(
            "note: few timed steps, repeats more than 5% apart or an implausible ratio: the "
            "figures are noisy; use --steps 10 or more on an otherwise idle machine"
        )
    print(json.dumps({"bench": figures}), flush=True)

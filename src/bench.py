"""Benchmark: our train step against the seed-style loop and the model-only ceiling.

On one device, in one run, measures training images/s for
  ours        the train stage's own loop (`pipeline.loop.fit`): data on the device, uint8,
              shifted and normalised there in whole batches, mixed precision etc.
              as `auto` resolves them, the real optimiser and schedule;
  seed-style  torchvision's `MNIST` dataset with per-image Resize(32)/ToTensor/
              Normalize through a DataLoader, fp32, eager: the seed README's loop;
  ceiling     forward+backward+step on one fixed batch already on the device,
              with the same settings as ours (no data path at all);
then ours with each option of `--ablate` flipped from what `auto` chose (and
`augment`: the rotation, scaling and Cutout off, or where none is on, the default
recipe's rotation and scaling on; with it, the data path of a step timed alone with
and without them, whose difference is their share of a step), the
evaluate stage's images/s (as params.yaml's `evaluate` section resolves on the
device, `auto` by default; at the other `auto` batch size; and with each of
`--ablate`'s precision and channels_last flipped),
achieved TFLOP/s (and the fraction of the GPU's peak), peak memory and the
hardware. Prints a table, then one JSON line.

With --scaling, instead: the train stage itself (`python src/train.py`, 2 epochs
in a temp copy of the project) with 1, 2, 4, ... processes up to the number of
GPUs (on a CPU: 1 and 2 Gloo processes), and the images/s of its last epoch.

    python src/bench.py                         # the best device here, width 64
    python src/bench.py --device cpu --width 16 --steps 5
    python src/bench.py --scaling               # data-parallel scaling over the GPUs

Inputs: `paths.processed`/{train,val}.pt and `paths.raw`/ (`dvc repro preprocess`).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

import evaluate
import train
from pipeline.ablation import OPTIONS, flipped, flipped_precision, flipped_switch
from pipeline.bench_report import measure, report, summary
from pipeline.errors import PipelineError
from pipeline.loop import Data, Run, augmentation, batch, fit, new_state, train_step
from pipeline.measure import hardware, timed
from pipeline.model import normalise, resnet18
from pipeline.params import load_params, load_paths
from pipeline.process import run
from pipeline.profiling import profile_epoch
from pipeline.scaling import report_scaling
from pipeline.seed_style import bench_seed_style
from pipeline.settings import (
    EVAL_BATCH_AUTO,
    Settings,
    inference_settings,
    pick_device,
    training_settings,
)


def fit_epochs(data: Data, p: train.TrainParams, width: int, steps: int) -> Iterator[dict]:
    """The train stage's `fit` on the first `steps` batches of the data: one epoch per
    `next()`, each of `steps` steps (and a 256-image validation); no checkpoints."""
    n = steps * p.batch_size
    subset = dataclasses.replace(
        data,
        train_x=data.train_x[:n],
        train_y=data.train_y[:n],
        val_x=data.val_x[:256],
        val_y=data.val_y[:256],
    )
    settings = training_settings(p, data.train_x.device)
    torch.manual_seed(p.seed)
    return fit(train.build_model(width, p.bn_momentum, False), subset, Run(p, settings))


def bench_ours(data: Data, p: train.TrainParams, width: int, steps: int) -> float:
    """Images/s of the train stage's loop: a 2-epoch `fit` of `steps` steps each; the
    first epoch warms up (compilation, cuDNN autotuning), the second is timed."""
    return list(fit_epochs(data, p, width, steps))[-1]["images_per_s"]


def profile_ours(data: Data, p: train.TrainParams, width: int, steps: int) -> str:
    """Where the time of ours goes: one epoch profiled after a warm-up epoch."""
    return profile_epoch(fit_epochs(data, p, width, steps), data.train_x.device)


def bench_ceiling(data: Data, p: train.TrainParams, width: int, warmup: int, steps: int) -> float:
    """Images/s of the train stage's own step (`loop.train_step`) on one fixed batch
    already on the device, settings as ours: the model's cost without the data path."""
    s = training_settings(p, data.train_x.device)
    net = train.build_model(width, p.bn_momentum, False)
    state = new_state(net, Run(p, s), steps=warmup + steps)
    net.train()
    forward = s.compiled(net)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    x = normalise(data.train_x[: p.batch_size], data.mean, data.std)
    x = x.contiguous(memory_format=s.memory_format)
    y = data.train_y[: p.batch_size]
    step = lambda: train_step(forward, x, y, state, loss_fn, s)  # noqa: E731
    return steps * p.batch_size / timed(step, warmup, steps, s.device)


def bench_data_path(data: Data, p: train.TrainParams, steps: int) -> float:
    """Images/s of the train stage's data path alone (`loop.batch`: one step's batch
    indexed, augmented and normalised), over 20 times `steps` steps. It takes a few
    milliseconds a step, less than the noise of the step around it, so the
    augmentation's cost is read from two of these, with and without it."""
    device = data.train_x.device
    generator = torch.Generator(device=device).manual_seed(p.seed)
    indices = torch.randperm(len(data.train_y), generator=generator, device=device)
    indices, run_ = indices[: p.batch_size], Run(p, training_settings(p, device))
    calls, how = 20 * steps, augmentation(p, 1)
    seconds = timed(lambda: batch(data, indices, run_, generator, how), 5, calls, device)
    return calls * p.batch_size / seconds


def bench_evaluate(data: Data, width: int, images: int, s: Settings) -> float:
    """Images/s of the evaluate stage's inference (`evaluate.inference_logits`) run as `s`
    says, on the first `images` validation images."""
    net = resnet18(width=width)
    x = data.val_x[:images]
    stats = {"mean": data.mean, "std": data.std}
    seconds = timed(lambda: evaluate.inference_logits(net, x, stats, s), 1, 1, x.device)
    return len(x) / seconds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--width", type=int, default=64, help="model width (64 = ResNet-18)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per step (default: train.batch_size; 64 on CPU)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument(
        "--repeats", type=int, default=2, help="times each measurement runs; the best counts"
    )
    parser.add_argument(
        "--seed-workers", type=int, default=2, help="DataLoader workers of the seed-style loop"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one epoch of ours: top ops by device time, GPU busy fraction",
    )
    parser.add_argument(
        "--ablate",
        default=None,
        help=f"options to flip from auto, comma-separated, of {', '.join(OPTIONS)}"
        " (augment: the rotation, scaling and Cutout off, or on as the defaults have them;"
        " default: all on CUDA, channels_last"
        " elsewhere; '' for none)",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="instead: the train stage's images/s with 1, 2, 4, ... processes",
    )
    args = parser.parse_args()
    for name in ("width", "steps", "batch_size", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def evaluate_variants(ablate: list[str], device: torch.device) -> dict[str, Settings]:
    """The evaluate stage's settings (params.yaml's `evaluate`, as resolved here), then
    with each of precision and channels_last flipped (if in `ablate`) and at the
    other of the two batch sizes that `auto` picks from."""
    p = load_params(evaluate.EvaluateParams)
    base = inference_settings(device, p.precision, p.channels_last, p.batch_size)
    small, large = EVAL_BATCH_AUTO["cpu"], EVAL_BATCH_AUTO["cuda"]
    other_batch = small if base.eval_batch_size != small else large
    flips = (
        ("precision", *flipped_precision(base.precision)),
        ("channels_last", *flipped_switch("channels_last", base.channels_last)),
        # last: a larger batch raises a CPU's peak-memory column for every row after it
        ("batch", f"batch {other_batch}", {"eval_batch_size": other_batch}),
    )
    return {"evaluate": base} | {
        f"evaluate, {label}": dataclasses.replace(base, **change)
        for option, label, change in flips
        if option == "batch" or option in ablate
    }


def measurements(
    args: argparse.Namespace, data: Data, p: train.TrainParams, evaluations: dict[str, Settings]
) -> dict[str, Callable[[], float]]:
    """Every measurement of the run, in the order they are taken."""
    device = data.train_x.device
    paths, width, steps = load_paths(), args.width, args.steps
    ablate = [o.strip() for o in args.ablate.split(",") if o.strip()]
    large = EVAL_BATCH_AUTO["cuda"]
    eval_images = min(len(data.val_y), max(2 * steps * p.batch_size, 2 * large))
    if eval_images >= large:
        eval_images -= eval_images % large  # whole batches at either size
    seed_style = (Path(paths.raw), device, width, p.batch_size, args.seed_workers)
    rows = {
        "ours": lambda: bench_ours(data, p, width, steps),
        "seed-style": lambda: bench_seed_style(*seed_style, args.warmup, steps),
        "ceiling": lambda: bench_ceiling(data, p, width, args.warmup, steps),
    }
    evaluate_rows = {
        label: (lambda s=s: bench_evaluate(data, width, eval_images, s))
        for label, s in evaluations.items()
    }
    settings = training_settings(p, device)
    variants = {label: variant for label, variant in (flipped(p, settings, o) for o in ablate)}
    ablation_rows = {
        f"ours, {label}": (lambda v=variant: bench_ours(data, v, width, steps))
        for label, variant in variants.items()
    }
    if "augment" in ablate:  # the augmentation's share of a step (bench_report.summary)
        label = next(label for label in variants if label.startswith("augment"))
        ablation_rows["data path"] = lambda: bench_data_path(data, p, steps)
        flip = variants[label]
        ablation_rows[f"data path, {label}"] = lambda: bench_data_path(data, flip, steps)
    if device.type == "cuda":
        # ablations last: each compiles anew, so a run cut short by a time limit (a GPU
        # session) loses only some of them
        return rows | evaluate_rows | ablation_rows
    # evaluate last: a CPU's memory column is the process's peak so far, which a large
    # evaluation batch would raise for every row after it
    return rows | ablation_rows | evaluate_rows


def main() -> None:
    args = parse_args()
    paths = load_paths()
    device = pick_device(args.device)
    if args.scaling:
        report_scaling(args.width, device, Path(paths.processed))
        return
    torch.backends.cudnn.benchmark = True  # as the train stage does (not deterministic)
    p = load_params(train.TrainParams)
    args.batch_size = args.batch_size or (64 if device.type == "cpu" else p.batch_size)
    p = dataclasses.replace(
        p,
        batch_size=args.batch_size,
        epochs=2,
        warmup_epochs=1,
        unaugmented_epochs=0,  # the timed epoch augments, as most of a run's do
        checkpoint_every=0,
        device=device.type,
    )
    data = train.load_data(Path(paths.processed), device)
    if len(data.train_y) < args.steps * p.batch_size:
        raise PipelineError(
            f"{args.steps} steps of {p.batch_size} images need {args.steps * p.batch_size} "
            f"training images; {paths.processed} has {len(data.train_y)}"
        )
    settings = training_settings(p, device)
    if args.ablate is None:  # every option on CUDA; elsewhere channels_last alone
        args.ablate = ",".join(OPTIONS) if device.type == "cuda" else "channels_last"
    evaluations = evaluate_variants(args.ablate.split(","), device)
    print(
        f"{hardware(device)}; torch {torch.__version__}; width {args.width}, batch "
        f"{p.batch_size}, {args.steps} timed steps; {settings.describe()}; "
        f"evaluate stage: {evaluations['evaluate'].describe_inference()}"
    )
    figures = measure(measurements(args, data, p, evaluations), args.repeats, device)
    report(summary(args, settings, evaluations["evaluate"], figures), figures[2])
    if args.profile:  # after the JSON line: a run cut short during profiling keeps it
        torch._dynamo.reset()
        print(profile_ours(data, p, args.width, args.steps))


if __name__ == "__main__":
    run(main)

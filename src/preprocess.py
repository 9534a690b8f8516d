"""Preprocess stage: IDX files -> 32x32 uint8 tensors, split and normalisation stats.

Parses the IDX files with validation, resizes 28x28 -> 32x32 (bilinear, as the
seed's `transforms.Resize(32)`), splits a seeded, stratified validation set off
the 60,000 training images, optionally takes stratified subsets for quick runs,
and computes the mean/std of the training split. Images stay uint8: training
normalises them on the device.

Inputs:  `paths.raw`/ (the four IDX files); params.yaml `preprocess`.
Outputs: `paths.processed`/{train,val,test}.pt, each {"images": uint8 (N,1,32,32),
         "labels": int64 (N,)}, and stats.json {"mean", "std", counts}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import PipelineError
from pipeline.files import atomic_path
from pipeline.mnist import NUM_CLASSES, RAW_FILES
from pipeline.params import check, load_params, load_paths
from pipeline.preprocess_params import PreprocessParams
from pipeline.process import run

IMAGE_SIZE = 32  # the model's input: 28x28 digits upsampled so 4 stride-2 stages end at 4x4
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


# --------------------------------------------------------------------------- IDX


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    data = path.read_bytes()
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic:
        shown = "missing" if found is None else f"{found:#010x}"
        raise PipelineError(f"{path}: magic number {shown}, expected {magic:#010x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise PipelineError(f"{path}: {len(data)} bytes, shorter than its IDX header")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise PipelineError(
            f"{path}: header says {dims} ({expected} bytes) but the file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_images(path: Path) -> Tensor:
    """uint8 (N, 28, 28) from an IDX3 image file, validated."""
    images = _read_idx(path, IDX_IMAGES_MAGIC, 3)
    if images.shape[1:] != (28, 28):
        raise PipelineError(f"{path}: images are {images.shape[1:]}, expected (28, 28)")
    return torch.from_numpy(images.copy())


def read_idx_labels(path: Path) -> Tensor:
    """int64 (N,) from an IDX1 label file, validated to lie in 0..9."""
    labels = _read_idx(path, IDX_LABELS_MAGIC, 1)
    if labels.size and labels.max() >= NUM_CLASSES:
        raise PipelineError(f"{path}: label {labels.max()} is outside 0..{NUM_CLASSES - 1}")
    return torch.from_numpy(labels.astype(np.int64))


def read_split(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    images, labels = read_idx_images(images_path), read_idx_labels(labels_path)
    if len(images) != len(labels):
        raise PipelineError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    return images, labels


# --------------------------------------------------------------------------- transforms


def resize(images: Tensor) -> Tensor:
    """uint8 (N,28,28) -> uint8 (N,1,32,32), bilinear, half-pixel centres.

    28->32 puts every sample point on a 1/16 grid, so the float32 arithmetic is
    exact and the result is the same on every CPU."""
    x = images.unsqueeze(1).float()
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def stratified_split(
    labels: Tensor, count: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Indices (chosen, rest), both sorted: `count` indices drawn at random with
    the class proportions of `labels` (largest-remainder rounding)."""
    n = len(labels)
    if not 0 < count < n:
        raise ValueError(f"count must be in 1..{n - 1}, got {count}")
    order = torch.randperm(n, generator=generator)
    class_counts = torch.bincount(labels, minlength=NUM_CLASSES).double()
    quota = class_counts * count / n
    take = quota.floor().long()
    remainder = count - int(take.sum())
    take[torch.argsort(quota - take, descending=True, stable=True)[:remainder]] += 1
    chosen = torch.cat([order[labels[order] == c][: int(take[c])] for c in range(NUM_CLASSES)])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)


def normalisation_stats(images: Tensor) -> tuple[float, float]:
    """Mean and std of uint8 pixels scaled to [0,1], from an exact histogram (so the
    same on every machine)."""
    counts = torch.bincount(images.flatten(), minlength=256).tolist()
    n = sum(counts)
    total = sum(v * c for v, c in enumerate(counts))
    squares = sum(v * v * c for v, c in enumerate(counts))
    mean = total / n / 255.0
    var = squares / n / 255.0**2 - mean**2
    return mean, var**0.5


def make_splits(
    train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], p: PreprocessParams
) -> dict[str, dict[str, Tensor]]:
    """Split and subset (stratified, seeded); returns {"train","val","test"} of images/labels."""
    (train_x, train_y), (test_x, test_y) = train, test
    check(
        p,
        "val_size",
        p.val_size < len(train_y) - NUM_CLASSES,
        f"fewer than the {len(train_y)} training images minus {NUM_CLASSES}",
    )

    def generator() -> torch.Generator:  # one per draw: each subset depends on its own size only
        return torch.Generator().manual_seed(p.seed)

    val_idx, train_idx = stratified_split(train_y, p.val_size, generator())
    if p.train_limit:
        check(
            p,
            "train_limit",
            p.train_limit <= len(train_idx),
            f"0 or at most {len(train_idx)} (training images after the validation split)",
        )
        if p.train_limit < len(train_idx):
            keep, _ = stratified_split(train_y[train_idx], p.train_limit, generator())
            train_idx = train_idx[keep]
    test_idx = torch.arange(len(test_y))
    if p.test_limit:
        check(p, "test_limit", p.test_limit <= len(test_y), f"0 or at most {len(test_y)}")
        if p.test_limit < len(test_y):
            test_idx, _ = stratified_split(test_y, p.test_limit, generator())
    return {
        "train": {"images": resize(train_x[train_idx]), "labels": train_y[train_idx]},
        "val": {"images": resize(train_x[val_idx]), "labels": train_y[val_idx]},
        "test": {"images": resize(test_x[test_idx]), "labels": test_y[test_idx]},
    }


def main() -> None:
    params = load_params(PreprocessParams)
    paths = load_paths()
    raw = Path(paths.raw)
    train = read_split(raw / RAW_FILES["train_images"], raw / RAW_FILES["train_labels"])
    test = read_split(raw / RAW_FILES["test_images"], raw / RAW_FILES["test_labels"])
    splits = make_splits(train, test, params)
    mean, std = normalisation_stats(splits["train"]["images"])
    stats = {"mean": mean, "std": std} | {f"{k}_size": len(v["labels"]) for k, v in splits.items()}

    with atomic_path(paths.processed) as tmp:
        tmp.mkdir()
        for name, tensors in splits.items():
            torch.save(tensors, tmp / f"{name}.pt")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    sizes = ", ".join(f"{k} {len(v['labels'])}" for k, v in splits.items())
    print(f"wrote {paths.processed}: {sizes}; train mean {mean:.4f} std {std:.4f}")


if __name__ == "__main__":
    run(main, stage="preprocess")

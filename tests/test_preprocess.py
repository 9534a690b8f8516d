"""IDX parsing with validation, the 28->32 resize, stratified splits and stats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import committed_params_text, idx_bytes, synthetic_digits, write_params

import preprocess
from pipeline.errors import PipelineError
from pipeline.files import load_torch
from pipeline.mnist import RAW_FILES
from preprocess import PreprocessParams


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_reads_images_and_labels(tmp_path: Path) -> None:
    images, labels = synthetic_digits(50, seed=0)
    x, y = preprocess.read_split(
        write(tmp_path / "img", idx_bytes(images)), write(tmp_path / "lab", idx_bytes(labels))
    )
    assert x.dtype == torch.uint8 and x.shape == (50, 28, 28)
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    assert torch.equal(x, torch.from_numpy(images))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: idx_bytes(np.zeros(5, np.uint8)), "magic number 0x00000801, expected 0x00000803"),
        (lambda: idx_bytes(np.zeros((3, 27, 28), np.uint8)), "images are (27, 28)"),
        (lambda: idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-10], "but the file has 2358 bytes"),
        # bytes after the payload: a concatenated or corrupted file, not three images
        (lambda: idx_bytes(np.zeros((3, 28, 28), np.uint8)) + b"\x00", "the file has 2369 bytes"),
        (lambda: b"\x00\x00", "magic number missing"),
        (lambda: idx_bytes(np.zeros((3, 28, 28), np.uint8))[:10], "shorter than its IDX header"),
    ],
)
def test_bad_image_file_is_named(tmp_path: Path, make, message: str) -> None:
    path = write(tmp_path / "bad-images", make())
    with pytest.raises(PipelineError, match="bad-images") as error:
        preprocess.read_idx_images(path)
    assert message in str(error.value)


def test_bad_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "labels", idx_bytes(np.array([1, 2, 10], np.uint8)))
    with pytest.raises(PipelineError, match="labels: label 10 is outside 0..9"):
        preprocess.read_idx_labels(path)
    longer = write(tmp_path / "longer", idx_bytes(np.array([1, 2, 3], np.uint8)) + b"\x04")
    with pytest.raises(PipelineError, match=r"header says \[3\] \(11 bytes\) but the file has 12"):
        preprocess.read_idx_labels(longer)


def test_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    images, labels = synthetic_digits(20, seed=0)
    with pytest.raises(PipelineError, match="has 20 images but .*lab has 19 labels"):
        preprocess.read_split(
            write(tmp_path / "img", idx_bytes(images)),
            write(tmp_path / "lab", idx_bytes(labels[:19])),
        )


def test_resize_to_32_keeps_uint8_and_content() -> None:
    images = torch.from_numpy(synthetic_digits(10, seed=0)[0])
    out = preprocess.resize(images)
    assert out.shape == (10, 1, 32, 32) and out.dtype == torch.uint8
    flat = preprocess.resize(torch.full((1, 28, 28), 77, dtype=torch.uint8))
    assert torch.all(flat == 77)
    # within one grey level of PIL's bilinear resize (torchvision's Resize(32) on a PIL image)
    from PIL import Image

    pil = np.stack(
        [np.array(Image.fromarray(a).resize((32, 32), Image.BILINEAR)) for a in images.numpy()]
    )
    assert np.abs(pil.astype(int) - out[:, 0].numpy().astype(int)).max() <= 1


def test_stratified_split_is_exact_disjoint_and_seeded() -> None:
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    chosen, rest = preprocess.stratified_split(labels, 100, torch.Generator().manual_seed(3))
    assert len(chosen) == 100 and len(rest) == 900
    assert torch.bincount(labels[chosen]).tolist() == [50, 30, 20]
    assert sorted(torch.cat([chosen, rest]).tolist()) == list(range(1000))
    again, _ = preprocess.stratified_split(labels, 100, torch.Generator().manual_seed(3))
    other, _ = preprocess.stratified_split(labels, 100, torch.Generator().manual_seed(4))
    assert torch.equal(chosen, again) and not torch.equal(chosen, other)


def test_stratified_split_rounds_by_largest_remainder() -> None:
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 3)  # quotas for 5: 2.33, 1.67, 1.0
    chosen, _ = preprocess.stratified_split(labels, 5, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[chosen]).tolist() == [2, 2, 1]


def make_data(n_train: int = 400, n_test: int = 100):
    train_x, train_y = synthetic_digits(n_train, seed=1)
    test_x, test_y = synthetic_digits(n_test, seed=2)
    return (
        (torch.from_numpy(train_x), torch.from_numpy(train_y.astype(np.int64))),
        (torch.from_numpy(test_x), torch.from_numpy(test_y.astype(np.int64))),
    )


def test_make_splits_sizes_dtypes_and_stratification() -> None:
    train, test = make_data()
    splits = preprocess.make_splits(train, test, PreprocessParams(50, 200, 30, seed=0))
    assert {k: len(v["labels"]) for k, v in splits.items()} == {"train": 200, "val": 50, "test": 30}
    for split in splits.values():
        assert split["images"].dtype == torch.uint8 and split["images"].shape[1:] == (1, 32, 32)
        assert split["labels"].dtype == torch.int64
        counts = torch.bincount(split["labels"], minlength=10)
        assert counts.max() - counts.min() <= 1  # synthetic classes are balanced
    everything = preprocess.make_splits(train, test, PreprocessParams(50, 0, 0, seed=0))
    assert len(everything["train"]["labels"]) == 350 and len(everything["test"]["labels"]) == 100


def test_test_subset_does_not_depend_on_the_other_splits() -> None:
    train, test = make_data()
    a = preprocess.make_splits(train, test, PreprocessParams(50, 0, 30, seed=0))
    b = preprocess.make_splits(train, test, PreprocessParams(60, 200, 30, seed=0))
    assert torch.equal(a["test"]["images"], b["test"]["images"])


def test_every_split_depends_on_the_seed() -> None:
    train, test = make_data()
    a = preprocess.make_splits(train, test, PreprocessParams(50, 200, 30, seed=0))
    again = preprocess.make_splits(train, test, PreprocessParams(50, 200, 30, seed=0))
    b = preprocess.make_splits(train, test, PreprocessParams(50, 200, 30, seed=1))
    for name in ("train", "val", "test"):
        assert torch.equal(a[name]["images"], again[name]["images"]), name
        assert not torch.equal(a[name]["images"], b[name]["images"]), name


def test_validation_images_are_not_training_images() -> None:
    train, test = make_data()
    splits = preprocess.make_splits(train, test, PreprocessParams(50, 0, 0, seed=0))
    val = {bytes(x.numpy()) for x in splits["val"]["images"]}
    assert not val & {bytes(x.numpy()) for x in splits["train"]["images"]}


@pytest.mark.parametrize(
    ("params", "key"),
    [
        (PreprocessParams(395, 0, 0, 0), "preprocess.val_size = 395"),
        (PreprocessParams(50, 351, 0, 0), "preprocess.train_limit = 351"),
        (PreprocessParams(50, 0, 101, 0), "preprocess.test_limit = 101"),
    ],
)
def test_sizes_larger_than_the_data_are_errors(params: PreprocessParams, key: str) -> None:
    with pytest.raises(PipelineError, match=key):
        preprocess.make_splits(*make_data(), params)


def test_normalisation_stats_match_float64() -> None:
    images = torch.randint(0, 256, (100, 1, 32, 32), dtype=torch.uint8)
    mean, std = preprocess.normalisation_stats(images)
    scaled = images.double() / 255
    assert mean == pytest.approx(scaled.mean().item(), abs=1e-12)
    assert std == pytest.approx(scaled.std(unbiased=False).item(), abs=1e-12)


def test_main_splits_the_training_file_and_keeps_the_test_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic_files: dict[str, bytes]
) -> None:
    """The stage end to end on the synthetic files: 300 training and 100 test images,
    so a mix-up of the two files shows in the sizes as well as in the images."""
    (tmp_path / "params.yaml").write_text(committed_params_text())
    write_params(tmp_path, {"preprocess": {"val_size": 50, "train_limit": 0, "test_limit": 0}})
    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    for name, data in synthetic_files.items():
        write(raw / name, data)
    monkeypatch.chdir(tmp_path)
    preprocess.main()

    out = tmp_path / "data/processed"
    splits = {name: load_torch(out / f"{name}.pt") for name in ("train", "val", "test")}
    stats = json.loads((out / "stats.json").read_text())
    assert {k: stats[f"{k}_size"] for k in splits} == {"train": 250, "val": 50, "test": 100}
    train_x, train_y = preprocess.read_split(
        raw / RAW_FILES["train_images"], raw / RAW_FILES["train_labels"]
    )
    test_x, test_y = preprocess.read_split(
        raw / RAW_FILES["test_images"], raw / RAW_FILES["test_labels"]
    )
    # the test file whole and in order; train and val together the training file, each
    # image with its own label
    assert torch.equal(splits["test"]["images"], preprocess.resize(test_x))
    assert torch.equal(splits["test"]["labels"], test_y)
    label_of = {
        bytes(x.numpy()): int(y) for x, y in zip(preprocess.resize(train_x), train_y, strict=True)
    }
    pairs = [
        (bytes(x.numpy()), int(y))
        for name in ("train", "val")
        for x, y in zip(splits[name]["images"], splits[name]["labels"], strict=True)
    ]
    assert sorted(pairs) == sorted(label_of.items())
    mean, std = preprocess.normalisation_stats(splits["train"]["images"])
    assert (stats["mean"], stats["std"]) == (mean, std)  # of the training split only

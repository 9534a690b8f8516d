"""The real MNIST from MNIST_MIRROR, through the real download and preprocess code."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import download
import preprocess
from pipeline.mnist import RAW_FILES
from preprocess import PreprocessParams

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def raw_dir(mnist_mirror: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mnist") / "raw"
    download.download_all([mnist_mirror], out, timeout_s=30)
    return out


def mirror_checksums(mnist_mirror: str) -> dict[str, str]:
    """The mirror's own list of SHA-256 of the decompressed files: a source that
    the download code does not read."""
    sums = Path(mnist_mirror) / "SHA256SUMS.decompressed"
    if "://" in mnist_mirror or not sums.exists():
        pytest.skip(f"no SHA256SUMS.decompressed in MNIST_MIRROR={mnist_mirror}")
    pairs = (line.split() for line in sums.read_text().splitlines() if line.strip())
    return {name: digest for digest, name in pairs}


def test_download_verifies_against_the_real_mnist(mnist_mirror: str) -> None:
    """The SHA-256 that download checks every file against are those of the real
    MNIST, one for each file that preprocess reads; a changed or missing one here
    would let other bytes through, or fail every real download."""
    assert mirror_checksums(mnist_mirror) == download.SHA256
    assert set(download.SHA256) == set(RAW_FILES.values())


def test_downloaded_files_are_the_real_mnist_and_nothing_else(
    raw_dir: Path, mnist_mirror: str
) -> None:
    expected = mirror_checksums(mnist_mirror)
    written = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in raw_dir.iterdir()}
    assert written == expected


def test_counts_per_class_and_pixel_statistics(raw_dir: Path) -> None:
    train_x, train_y = preprocess.read_split(
        raw_dir / RAW_FILES["train_images"], raw_dir / RAW_FILES["train_labels"]
    )
    test_x, test_y = preprocess.read_split(
        raw_dir / RAW_FILES["test_images"], raw_dir / RAW_FILES["test_labels"]
    )
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert torch.bincount(train_y).tolist() == TRAIN_COUNTS
    assert torch.bincount(test_y).tolist() == TEST_COUNTS
    mean, std = preprocess.normalisation_stats(train_x)
    assert (round(mean, 4), round(std, 4)) == (0.1307, 0.3081)


def test_default_split_is_stratified(raw_dir: Path) -> None:
    train = preprocess.read_split(
        raw_dir / RAW_FILES["train_images"], raw_dir / RAW_FILES["train_labels"]
    )
    test = preprocess.read_split(
        raw_dir / RAW_FILES["test_images"], raw_dir / RAW_FILES["test_labels"]
    )
    splits = preprocess.make_splits(train, test, PreprocessParams(5000, 0, 0, seed=0))
    val_counts = torch.bincount(splits["val"]["labels"]).tolist()
    assert sum(val_counts) == 5000 and len(splits["train"]["labels"]) == 55000
    for count, total in zip(val_counts, TRAIN_COUNTS, strict=True):
        assert abs(count - total * 5000 / 60000) < 1
    assert splits["test"]["images"].shape == (10000, 1, 32, 32)

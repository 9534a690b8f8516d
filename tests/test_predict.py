"""predict.py: MNIST-style preparation of image files, and predictions on real MNIST
test digits written out as photos of all kinds, against the evaluate stage's.

Measured on the 2-core Xeon (torch 2.14.1, bf16 by evaluate's `auto`), with a width-8
model trained here on 4,000 images for 3 epochs (97.5% on the 200 originals): predict
gives 196 of the 200 image files (98.0%) the evaluate stage's digit, all 158 that
evaluate gives >= 80%; the 4 others are digits evaluate itself gives 0.35-0.50. The
file took 2 to 3.6 min on the machine shared with other jobs (load average 4-5), most
of it training the model (20 s when that ran alone).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, committed_params_text, run_cmd
from PIL import Image

import download
import evaluate
import predict
import preprocess
import train
from pipeline.errors import PipelineError
from pipeline.files import save_torch
from pipeline.loop import Data, Run, fit
from pipeline.mnist import RAW_FILES
from pipeline.model import load_model, resnet18, save_model
from pipeline.params import parse_section
from pipeline.settings import inference_settings, training_settings

CPU = torch.device("cpu")
TRAIN_IMAGES = 4000  # real MNIST training images for the fixture's model (stratified)
WIDTH = 8  # model width: ~0.7 M parameters, a few seconds an epoch on 2 cores
TEST_DIGITS = 200  # the first real MNIST test digits, written out as image files
MIN_AGREEMENT = 0.97  # predict's digit == the evaluate stage's, on at least this share
CLEAR = 0.8  # evaluate's probability for a clear digit (label smoothing 0.1 caps it near 0.91)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mnist(mnist_mirror: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The real MNIST through the download stage's code: train and test (28x28) splits."""
    raw = tmp_path_factory.mktemp("mnist") / "raw"
    download.download_all([mnist_mirror], raw, timeout_s=30)
    names = {s: (RAW_FILES[f"{s}_images"], RAW_FILES[f"{s}_labels"]) for s in ("train", "test")}
    return {s: preprocess.read_split(raw / x, raw / y) for s, (x, y) in names.items()}


@pytest.fixture(scope="module")
def model_file(mnist: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ResNet-18 trained on real MNIST with the train stage's loop, saved as
    train.py saves it."""
    p = parse_section(
        train.TrainParams,
        yaml.safe_load(committed_params_text())["train"]
        | {"epochs": 3, "batch_size": 64, "lr": 0.05, "warmup_epochs": 0.5, "device": "cpu"},
    )
    limits = preprocess.PreprocessParams(500, train_limit=TRAIN_IMAGES, test_limit=10, seed=0)
    splits = preprocess.make_splits(mnist["train"], mnist["test"], limits)
    (train_x, train_y), (val_x, val_y) = (splits[s].values() for s in ("train", "val"))
    mean, std = preprocess.normalisation_stats(train_x)
    data = Data(train_x, train_y, val_x, val_y, mean, std)
    torch.manual_seed(p.seed)
    net = resnet18(width=WIDTH)
    out = tmp_path_factory.mktemp("model")
    records = list(fit(net, data, Run(p, training_settings(p, CPU))))
    print(f"fixture model: validation accuracy {records[-1]['val/acc']:.4f}")
    params = {"model": train.ModelParams(width=WIDTH), "train": p}
    save_model(out / "model.pt", net, params, {"mean": mean, "std": std})
    return out / "model.pt"


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """predict.main() in this process: exit status, stdout, stderr."""
    try:
        predict.main(list(args))
        status = 0
    except SystemExit as exit_:
        status = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


# --------------------------------------------------------------------------- images


def ink_of(
    digit: np.ndarray, size: int, canvas: tuple[int, int], at: tuple[int, int]
) -> np.ndarray:
    """Ink in [0, 1] on a blank canvas: a 28x28 uint8 digit enlarged (bicubic) to `size`
    px, its top left at `at`."""
    big = Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC)
    ink = np.zeros(canvas, dtype=np.float64)
    ink[at[0] : at[0] + size, at[1] : at[1] + size] = np.asarray(big) / 255.0
    return ink


def paint(ink: np.ndarray, paper: tuple, pen: tuple) -> np.ndarray:
    """uint8 (H, W, C): paper colour where there is no ink, pen colour where it is full."""
    a = ink[..., None]
    return np.round(np.array(paper) * (1 - a) + np.array(pen) * a).clip(0, 255).astype(np.uint8)


def write_digit(
    digit: np.ndarray, kind: str, folder: Path, i: int, rng: np.random.Generator
) -> Path:
    """One real MNIST digit as an image file of `kind`, enlarged 3-11x and off-centre."""
    size = int(rng.integers(90, 300))
    canvas = (size + int(rng.integers(30, 300)), size + int(rng.integers(30, 300)))
    at = (int(rng.integers(0, canvas[0] - size)), int(rng.integers(0, canvas[1] - size)))
    ink = ink_of(digit, size, canvas, at)
    path = folder / f"{i:03d}-{kind}"
    if kind == "dark-on-light.png":
        Image.fromarray(paint(ink, (235,), (25,))[..., 0]).save(path)
    elif kind == "light-on-dark.jpg":
        Image.fromarray(paint(ink, (20,), (240,))[..., 0]).save(path, quality=85)
    elif kind == "blue-pen.png":
        Image.fromarray(paint(ink, (245, 240, 225), (30, 50, 160))).save(path)
    elif kind == "chalk-on-board.jpg":
        Image.fromarray(paint(ink, (40, 70, 55), (235, 235, 220))).save(path, quality=85)
    elif kind == "transparent.png":  # black ink on a transparent background
        rgba = np.zeros((*canvas, 4), dtype=np.uint8)
        rgba[..., 3] = np.round(ink * 255)
        Image.fromarray(rgba).save(path)
    elif kind == "16-bit.png":  # light on dark, 16 bits per pixel
        Image.fromarray(np.round(3000 + ink * 57000).astype(np.uint16)).save(path)
    elif kind == "photo.jpg":  # light falling off by 40% across the page, noise, JPEG
        h, w = canvas
        light = np.linspace(0.6, 1.0, w)[None, :, None] * np.linspace(0.9, 1.0, h)[:, None, None]
        rgb = light * paint(ink, (235, 230, 215), (40, 40, 55)) + rng.normal(0, 5, (h, w, 3))
        Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8)).save(path, quality=75)
    elif kind == "exif-rotated.jpg":  # stored sideways with an orientation tag, as phones do
        image = Image.fromarray(paint(ink, (230,), (30,))[..., 0])
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": exif_transpose rotates 270
        image.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif)
    else:
        raise ValueError(kind)
    return path


KINDS = [
    "dark-on-light.png",
    "light-on-dark.jpg",
    "blue-pen.png",
    "chalk-on-board.jpg",
    "transparent.png",
    "16-bit.png",
    "photo.jpg",
    "exif-rotated.jpg",
]


def synthetic_digit(height: int = 240, width: int = 320) -> np.ndarray:
    """A grey image in [0, 1]: a dark '7'-like stroke (top bar, long diagonal) off-centre
    on light paper; its box is 120 tall and 80 wide."""
    grey = np.full((height, width), 0.9)
    grey[40:52, 150:230] = 0.1  # the bar
    for r in range(52, 160):  # the diagonal, from the bar's right end down to the left
        c = 230 - (r - 52) * 60 // 108
        grey[r, c - 12 : c] = 0.1
    return grey


def box_of(digit: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(digit.any(1)), np.flatnonzero(digit.any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def centre_of_mass(digit: np.ndarray) -> tuple[float, float]:
    d = digit.astype(np.float64)
    return (d.sum(1) * np.arange(28)).sum() / d.sum(), (d.sum(0) * np.arange(28)).sum() / d.sum()


# --------------------------------------------------------------------------- preparation


def test_digit_fits_20x20_keeping_aspect_and_is_centred_by_mass() -> None:
    digit = predict.to_mnist(synthetic_digit())
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    assert box_of(digit) == (20, 13)  # 120x80 scaled by 1/6
    row, col = centre_of_mass(digit)
    assert abs(row - 14) <= 0.5 and abs(col - 14) <= 0.5, (row, col)
    assert digit.max() == 255 and digit[0].max() == digit[:, 0].max() == 0  # light on black


def test_polarity_is_detected_both_ways_and_on_grey_paper() -> None:
    dark_on_light = predict.to_mnist(synthetic_digit())
    light_on_dark = predict.to_mnist(1.0 - synthetic_digit())
    lighter_on_grey = predict.to_mnist(0.5 + (0.9 - synthetic_digit()) / 2)  # 0.5 paper, 0.9 ink
    for other in (light_on_dark, lighter_on_grey):
        assert np.abs(other.astype(int) - dark_on_light).max() <= 1


def test_noise_far_from_the_digit_is_ignored() -> None:
    grey = synthetic_digit()
    speckled = grey.copy()
    speckled[200, 20] = speckled[10, 300] = 0.0  # dust: single dark pixels
    assert np.abs(predict.to_mnist(speckled).astype(int) - predict.to_mnist(grey)).max() <= 1


def test_uneven_light_across_a_photo_is_not_taken_for_ink() -> None:
    even = predict.to_mnist(synthetic_digit())
    uneven = predict.to_mnist(synthetic_digit() * np.linspace(0.4, 1.0, 320))  # dim on the left
    assert np.abs(uneven.astype(int) - even).max() <= 2


def test_exif_orientation_transparency_and_16_bits_are_read(tmp_path: Path) -> None:
    grey = np.round(synthetic_digit() * 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "plain.png")
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 270 degrees clockwise to view"
    Image.fromarray(grey).transpose(Image.Transpose.ROTATE_270).save(tmp_path / "r.png", exif=exif)
    rgba = np.zeros((*grey.shape, 4), dtype=np.uint8)
    rgba[..., 3] = 255 - grey  # black ink, transparent paper: composited onto white
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(grey.astype(np.uint16)).save(tmp_path / "shallow.png")  # 8-bit values
    assert Image.open(tmp_path / "deep.png").mode == Image.open(tmp_path / "shallow.png").mode
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    plain = predict.load_image(tmp_path / "plain.png")
    assert plain.dtype == np.float32 and plain.shape == grey.shape
    for name in ("r.png", "alpha.png", "deep.png", "shallow.png"):
        loaded = predict.load_image(tmp_path / name)
        assert loaded.shape == plain.shape and np.abs(loaded - plain).max() <= 1 / 255, name


# --------------------------------------------------------------------------- real digits


def test_real_mnist_digits_as_image_files_agree_with_the_evaluate_stage(
    mnist: dict, model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images, labels = mnist["test"][0][:TEST_DIGITS], mnist["test"][1][:TEST_DIGITS]
    net, saved = load_model(model_file, CPU)
    committed = yaml.safe_load(committed_params_text())["evaluate"]
    p = parse_section(evaluate.EvaluateParams, committed)
    settings = inference_settings(CPU, p.precision, p.channels_last, p.batch_size)
    logits = evaluate.inference_logits(net, preprocess.resize(images), saved["stats"], settings)
    chance, expected = (t.numpy() for t in logits.softmax(1).max(1))  # the evaluate stage's

    rng = np.random.default_rng(0)
    kinds = [KINDS[i % len(KINDS)] for i in range(TEST_DIGITS)]
    files = [write_digit(images[i].numpy(), kinds[i], tmp_path, i, rng) for i in range(TEST_DIGITS)]
    status, out, err = run_main(capsys, *map(str, files), "--json", "--model", str(model_file))
    assert status == 0 and err == ""
    agree = np.array([entry["digit"] for entry in json.loads(out)]) == expected

    clear = chance >= CLEAR
    by_kind = Counter(k for k, a in zip(kinds, agree, strict=True) if a)
    with capsys.disabled():
        print(
            f"\npredict agrees with evaluate on {agree.sum()} of {len(agree)} image files "
            f"({agree.mean():.1%}), on {agree[clear].sum()} of the {clear.sum()} that evaluate "
            f"gives >= {CLEAR:.0%}; evaluate's probability where they differ: "
            f"{', '.join(f'{c:.2f}' for c in sorted(chance[~agree]))}; per kind: "
            f"{', '.join(f'{k} {by_kind[k]}/{kinds.count(k)}' for k in KINDS)}; "
            f"evaluate's accuracy on the originals {(expected == labels.numpy()).mean():.1%}"
        )
    assert agree.mean() >= MIN_AGREEMENT and agree[clear].mean() >= 0.99


# --------------------------------------------------------------------------- errors and output


def test_each_bad_file_gets_its_error_and_the_others_are_predicted(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = tmp_path / "seven.png"
    Image.fromarray(np.round(synthetic_digit() * 255).astype(np.uint8)).save(good)
    text = tmp_path / "notes.png"
    text.write_text("not a picture\n")
    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (200, 100), (240, 240, 235)).save(blank)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.jpg"
    Image.fromarray(np.round(synthetic_digit() * 255).astype(np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:2000])  # a download that stopped part-way
    missing = tmp_path / "missing.png"
    files = [good, missing, text, blank, empty, cut, tmp_path]
    status, out, err = run_main(capsys, *map(str, files), "--model", str(model_file))
    assert status == 1
    assert re.fullmatch(
        rf"{re.escape(str(good))}: \d \(\d+\.\d%\); next \d \(\d+\.\d%\), \d \(\d+\.\d%\)\n", out
    )
    lines = err.splitlines()  # Pillow's own words end the line of the cut file
    assert lines.pop(4).startswith(f"error: {cut}: cannot read the image (image file is truncated")
    assert lines == [
        f"error: {missing}: no such file",
        f"error: {text}: not an image (no format that Pillow reads)",
        f"error: {blank}: blank image: no digit (contrast 0.0%, below 5%)",
        f"error: {empty}: empty file (0 bytes)",
        f"error: {tmp_path}: is a directory, not an image file",
    ]


def test_json_lists_every_file_with_top3_or_error(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = tmp_path / "seven.png"
    Image.fromarray(np.round(synthetic_digit() * 255).astype(np.uint8)).save(good)
    status, out, _ = run_main(capsys, str(good), "nope.png", "--json", "--model", str(model_file))
    assert status == 1
    first, second = json.loads(out)
    assert second == {"file": "nope.png", "error": "no such file"}
    assert set(first) == {"file", "digit", "probability", "top3"} and first["file"] == str(good)
    digits = [g["digit"] for g in first["top3"]]
    chances = [g["probability"] for g in first["top3"]]
    assert digits[0] == first["digit"] and len(set(digits)) == 3
    assert chances[0] == first["probability"] and chances == sorted(chances, reverse=True)
    assert 0 < sum(chances) <= 1 + 1e-5


def test_missing_or_broken_model_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "models" / "model.pt"
    first_model = "for a first model in a minute or two"
    with pytest.raises(PipelineError, match=rf"^{missing} not found: {first_model}"):
        predict.main(["digit.png", "--model", str(missing)])
    text = tmp_path / "params.yaml"
    text.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(PipelineError) as error:
        predict.main(["digit.png", "--model", str(text)])
    assert str(error.value) == (
        f"{text} is not a model that src/train.py wrote (not a file that torch.save writes)"
    )
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PipelineError, match=rf"^{broken} is not a model that src/train.py wrote"):
        predict.main(["digit.png", "--model", str(broken)])
    stranger = tmp_path / "stranger.pt"
    save_torch({"weights": torch.zeros(3)}, stranger)
    with pytest.raises(PipelineError, match="is not a model that src/train.py wrote"):
        predict.main(["digit.png", "--model", str(stranger)])


def test_command_line_end_to_end(model_file: Path, tmp_path: Path) -> None:
    """As a user runs it: from a folder with params.yaml, whose paths.model is the model."""
    paths = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]  # as src/ reads them
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"paths": paths | {"model": str(model_file)}})
    )
    Image.fromarray(np.round(synthetic_digit() * 255).astype(np.uint8)).save(tmp_path / "d.png")
    script = str(ROOT / "src" / "predict.py")
    done = run_cmd([sys.executable, script, "d.png", "gone.jpg"], tmp_path, check=False)
    assert done.returncode == 1
    assert re.fullmatch(
        r"d\.png: \d \(\d+\.\d%\); next \d \(\d+\.\d%\), \d \(\d+\.\d%\)\n", done.stdout
    )
    assert done.stderr == "error: gone.jpg: no such file\n"
    absent = tmp_path / "absent.pt"
    done = run_cmd([sys.executable, script, "d.png", "--model", str(absent)], tmp_path, check=False)
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.splitlines()  # one line, the fastest way to a model on this machine
    assert line.startswith(f"error: {absent} not found: for a first model in a minute or two")
    assert f"`{predict.QUICK_EXPERIMENT}`" in line


def test_a_reader_that_leaves_early_gets_no_traceback(model_file: Path, tmp_path: Path) -> None:
    """`predict.py *.png | head -1`: once the reader has gone, predict stops quietly."""
    Image.fromarray(np.round(synthetic_digit() * 255).astype(np.uint8)).save(tmp_path / "d.png")
    script = [sys.executable, str(ROOT / "src" / "predict.py"), "--model", str(model_file)]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before predict writes its first line
    with os.fdopen(write, "wb") as stdout:
        done = subprocess.run(
            [*script, "d.png"], cwd=tmp_path, stdout=stdout, stderr=subprocess.PIPE, text=True
        )
    assert (done.returncode, done.stderr) == (1, "")


def test_the_way_to_a_model_fits_the_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a model: the quick experiment on a CPU, the defaults on a GPU, `dvc pull`
    once a DVC remote is configured (as `dvc remote add` writes it)."""
    monkeypatch.chdir(tmp_path)
    on_cpu = predict.how_to_get_a_model(torch.device("cpu"))
    assert on_cpu.startswith("for a first model in a minute or two on this CPU run the quick")
    assert f"`{predict.QUICK_EXPERIMENT}` (98.9% test accuracy)" in on_cpu
    assert (
        predict.how_to_get_a_model(torch.device("cuda"))
        == "`dvc repro` trains it: about a minute on a GPU"
    )
    run_cmd([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], tmp_path)
    assert not predict.has_dvc_remote()
    run_cmd([sys.executable, "-m", "dvc", "remote", "add", "-d", "team", "s3://b/p"], tmp_path)
    assert predict.how_to_get_a_model(torch.device("cpu")) == (
        "`dvc pull` fetches the team's trained model from the DVC remote"
    )


def test_predict_uses_the_evaluate_stage_s_test_time_augmentation(tmp_path: Path) -> None:
    """evaluate.tta from params.yaml where it has that section; 0 beside a params.yaml
    of paths alone, or none."""
    params = tmp_path / "params.yaml"
    assert predict.evaluate_tta(params) == 0
    params.write_text("paths:\n  model: m.pt\n")
    assert predict.evaluate_tta(params) == 0
    committed = yaml.safe_load(committed_params_text())
    params.write_text(yaml.safe_dump(committed | {"evaluate": committed["evaluate"] | {"tta": 3}}))
    assert predict.evaluate_tta(params) == 3

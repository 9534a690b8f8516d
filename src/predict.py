"""Predict the digit in image files with the trained model.

    python src/predict.py IMAGE... [--json] [--model models/model.pt] [--device auto]

Each image (PNG, JPEG or any format Pillow reads; any size; a dark digit on
light paper or a light one on dark; colour or grey) is prepared as MNIST's
digits were (LeCun et al. 1998): grey, made light-on-black, cropped to the
digit, scaled (anti-aliased) to fit 20x20 keeping its aspect ratio and placed
in 28x28 with its centre of mass at the centre. From there it goes exactly the
pipeline's way: preprocess.resize (28->32) and the normalisation stats saved
with the model. Inference follows the evaluate stage's `auto` rules (device,
bf16 and channels_last where they pay, batch size), so a digit gets the
prediction that stage gives it; predict reads no params but `paths.model` and
`evaluate.tta`.

Inputs:  the image files; the model at `paths.model` of params.yaml, or --model.
Outputs: stdout: one line per file, `FILE: 7 (99.8%); next 1 (0.1%), 9 (0.0%)`,
         or with --json one JSON list of {"file", "digit", "probability", "top3"}
         ({"file", "error"} for a file that could not be read).
         stderr: `error: FILE: reason` per such file; the others are still
         predicted, and the exit status is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from evaluate import TTA_SHIFTS, inference_logits
from pipeline.errors import ERROR_PREFIX, EXIT_ERROR, PipelineError
from pipeline.model import load_model
from pipeline.params import PARAMS_FILE, Device, load_paths, read_params_file, require
from pipeline.process import run
from pipeline.settings import Settings, inference_settings, pick_device
from preprocess import resize

MAX_SIDE = 512  # px: larger images are reduced first; a digit a tenth as tall keeps 51 px
BORDER = 1 / 32  # the border ring (mostly paper), as a share of the shorter side; >= 1 px
MIN_CONTRAST = 0.05  # of full scale: less between ink and paper is a blank image
BOX_LEVEL = 0.3  # the digit's box holds the pixels inked >= 30% as strongly as its strokes
DIGIT_BOX = 20  # MNIST: the digit scaled to fit a 20x20 box...
SIZE = 28  # ...placed in 28x28...
CENTRE = 14.0  # ...with its centre of mass at row/column index 14 (MNIST test set: 13.99, 14.01)
TOP = 3  # guesses shown per file


class ImageError(Exception):
    """A file that cannot be predicted: reported for that file, the others go on."""


# --------------------------------------------------------------------------- preparation


def load_image(path: str | Path) -> np.ndarray:
    """float32 grey (H, W) in [0, 1] from an image file: EXIF orientation applied,
    transparent parts composited onto white, 16-bit grey kept at full depth."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)  # phone photos are stored sideways + a tag
            if image.mode == "F":  # 32-bit float, taken as [0, 1]
                grey = np.asarray(image, dtype=np.float32)
            elif image.mode.startswith("I"):  # 16/32-bit integer
                grey = np.asarray(image, dtype=np.float32)
                grey /= integer_full_scale(float(grey.max(initial=0.0)))
            else:
                if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
                    white = Image.new("RGBA", image.size, "white")
                    image = Image.alpha_composite(white, image.convert("RGBA"))
                grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (no format that Pillow reads)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"cannot read the image ({error})") from None
    if grey.size == 0:
        raise ImageError("empty image (no pixels)")
    return np.clip(grey, 0.0, 1.0)


def integer_full_scale(brightest: float) -> float:
    """White of an integer image whose brightest pixel is `brightest`: 65535 for 16 bits,
    but 255 where no pixel passes 255, since some writers store 8-bit values in 16-bit
    files (a true 16-bit image that dark would be blank: under 0.4% of full scale)."""
    return 255.0 if brightest <= 255 else 65535.0 if brightest <= 65535 else brightest


def median3(image: np.ndarray) -> np.ndarray:
    """3x3 median filter (edges repeated): removes speckle and JPEG noise, keeps strokes."""
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(image, 1, mode="edge"), (3, 3))
    return np.median(windows, axis=(-2, -1))


def paper_of(smooth: np.ndarray, border: int) -> np.ndarray:
    """The paper's brightness at each pixel: a + bx + cy + dxy fitted to the image's
    border ring (least squares, refitted without outliers such as ink that reaches the
    edge), so light falling off across a photo is not taken for ink."""
    h, w = smooth.shape
    y, x = np.mgrid[0:h, 0:w]
    terms = np.stack([np.ones((h, w)), x / w, y / h, x * y / (h * w)])
    ring = np.ones((h, w), dtype=bool)
    ring[border : h - border, border : w - border] = False
    a, v = terms[:, ring].T, smooth[ring]
    keep = np.ones(len(v), dtype=bool)
    for _ in range(3):
        coef = np.linalg.lstsq(a[keep], v[keep], rcond=None)[0]
        residual = np.abs(a @ coef - v)
        keep = residual <= 3 * np.median(residual) + 1 / 255
    return np.tensordot(coef, terms, 1)


def resample(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 image resized with Pillow's Lanczos filter (anti-aliased when shrinking)."""
    image = Image.fromarray(image.astype(np.float32))  # mode F: no rounding to 8 bits
    return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS))


def to_mnist(grey: np.ndarray) -> np.ndarray:
    """uint8 (28, 28) digit, light on black and centred as in MNIST, from a grey image
    in [0, 1] of any size and polarity. Raises ImageError for an image without a digit."""
    h, w = grey.shape
    if max(h, w) > MAX_SIDE:
        scale = MAX_SIDE / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        grey = resample(grey, h, w)
    smooth = median3(grey)  # measures come from the denoised image, pixels from the real one
    paper = paper_of(smooth, max(1, round(min(h, w) * BORDER)))
    darker, lighter = float((paper - smooth).max()), float((smooth - paper).max())
    contrast = max(darker, lighter)
    if contrast < MIN_CONTRAST:
        raise ImageError(
            f"blank image: no digit (contrast {contrast:.1%}, below {MIN_CONTRAST:.0%})"
        )
    # Ink, 0 on the paper: on light paper the share of the light that a stroke takes (so
    # one in a photo's shade counts as one in full light), on dark paper its extra light.
    per = np.maximum(paper, 1 / 255) if darker > lighter else -1.0
    ink, ink_smooth = ((paper - image) / per for image in (grey, smooth))
    strength = float(ink_smooth.max())
    box = ink_smooth >= BOX_LEVEL * strength
    ink = np.clip(ink / strength, 0.0, 1.0)  # strokes 1
    rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    digit = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    dh, dw = digit.shape
    scale = DIGIT_BOX / max(dh, dw)
    digit = np.clip(resample(digit, max(1, round(dh * scale)), max(1, round(dw * scale))), 0, 1)
    digit /= max(float(digit.max()), 1e-6)  # strokes at full white, as in MNIST

    dh, dw = digit.shape
    mass = max(float(digit.sum()), 1e-6)
    row = float((digit.sum(1) * np.arange(dh)).sum()) / mass
    col = float((digit.sum(0) * np.arange(dw)).sum()) / mass
    top = min(max(round(CENTRE - row), 0), SIZE - dh)  # kept whole inside the 28x28
    left = min(max(round(CENTRE - col), 0), SIZE - dw)
    out = np.zeros((SIZE, SIZE), dtype=np.float32)
    out[top : top + dh, left : left + dw] = digit
    return np.round(out * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------- model


QUICK_EXPERIMENT = (
    "dvc exp run -S model.width=16 -S preprocess.train_limit=10000 -S train.epochs=3 "
    "-S train.batch_size=128 -S train.lr=0.05"
)


def has_dvc_remote(root: Path = Path()) -> bool:
    """Whether a DVC remote is configured (`dvc remote add`) in this repository."""
    configs = [root / ".dvc" / "config", root / ".dvc" / "config.local"]
    return any(f.is_file() and "['remote " in f.read_text() for f in configs)


def how_to_get_a_model(device: torch.device) -> str:
    """The fastest honest way to a trained model on this machine (README, "Results")."""
    if has_dvc_remote():
        return "`dvc pull` fetches the team's trained model from the DVC remote"
    if device.type == "cuda":
        return "`dvc repro` trains it: about a minute on a GPU"
    return (
        f"for a first model in a minute or two on this CPU run the quick experiment, "
        f"`{QUICK_EXPERIMENT}` (98.9% test accuracy); `dvc repro` trains the full "
        "model, which takes hours on a CPU; `dvc pull` fetches a trained one once a DVC "
        "remote is set (README)"
    )


def read_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The trained network on `device` and its normalisation stats {"mean", "std"}."""
    if not Path(path).exists():
        raise PipelineError(f"{path} not found: {how_to_get_a_model(device)}")
    net, saved = load_model(path, device)  # weights_only=True: nothing unpickled
    return net, {"mean": float(saved["stats"]["mean"]), "std": float(saved["stats"]["std"])}


def predict(
    net: torch.nn.Module, images: np.ndarray, stats: dict, s: Settings, tta: int = 0
) -> Tensor:
    """Probabilities (N, 10) for uint8 MNIST-style digits (N, 28, 28), in batches, as
    the evaluate stage's `auto` settings run them on the device, with its `tta`."""
    x = resize(torch.from_numpy(images))  # 28 -> 32 exactly as the preprocess stage
    return inference_logits(net, x, stats, s, tta).softmax(1)


def evaluate_tta(params_file: Path = PARAMS_FILE) -> int:
    """The evaluate stage's test-time augmentation (`evaluate.tta`) where params.yaml
    has an `evaluate` section (predict also runs outside the project, with --model, or
    beside a params.yaml of paths alone): 0 elsewhere."""
    section = (read_params_file(params_file) or {}) if params_file.exists() else {}
    tta = (section.get("evaluate") or {}).get("tta", 0)  # an older section has none
    require(tta in range(len(TTA_SHIFTS) + 1), "evaluate.tta", tta, f"0..{len(TTA_SHIFTS)}")
    return tta


def result(file: str, probabilities: Tensor) -> dict:
    """The JSON object of one file: its digit, probability and top three guesses."""
    top = probabilities.topk(TOP)
    guesses = [
        {"digit": int(d), "probability": round(float(p), 6)}
        for p, d in zip(top.values, top.indices, strict=True)
    ]
    return {"file": file, **guesses[0], "top3": guesses}


def describe(entry: dict) -> str:
    """`FILE: 7 (99.8%); next 1 (0.1%), 9 (0.0%)`."""
    best, *rest = (f"{g['digit']} ({g['probability']:.1%})" for g in entry["top3"])
    return f"{entry['file']}: {best}; next {', '.join(rest)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Predict the digit in each image file.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, ... files")
    parser.add_argument("--json", action="store_true", help="one JSON document, for programs")
    parser.add_argument("--model", help="trained model (default: paths.model of params.yaml)")
    parser.add_argument("--device", default="auto", choices=typing.get_args(Device))
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    net, stats = read_model(args.model or load_paths().model, device)

    entries, digits = [], []
    for file in args.images:
        try:
            digits.append(to_mnist(load_image(file)))
            entries.append({"file": file})
        except ImageError as error:
            entries.append({"file": file, "error": str(error)})
            print(f"{ERROR_PREFIX}{file}: {error}", file=sys.stderr)
    if digits:
        settings = inference_settings(device)
        probabilities = iter(predict(net, np.stack(digits), stats, settings, evaluate_tta()))
        entries = [e if "error" in e else result(e["file"], next(probabilities)) for e in entries]
    if args.json:
        print(json.dumps(entries, indent=2))
    else:
        for entry in entries:
            if "error" not in entry:
                print(describe(entry))
    if any("error" in e for e in entries):
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    try:
        run(main)
        sys.stdout.flush()
    except BrokenPipeError:  # `predict.py *.png | head`: the reader left; no traceback
        # Python's advice (docs, "Note on SIGPIPE"): stdout to devnull, so that the
        # flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_ERROR)

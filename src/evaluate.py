"""Evaluate stage: the trained model on the held-out MNIST test set.

Inputs:  `paths.model`; `paths.processed`/test.pt; params.yaml `evaluate`.
Outputs: `paths.eval_report`/
           metrics.json       test accuracy, loss (plain cross-entropy), macro F1, errors
           per_class.csv      precision, recall (= per-class accuracy), F1, support
           confusion.csv      one row per test image: actual, predicted (DVC `confusion`)
           misclassified.csv  index into test.pt, actual, predicted, confidence

Inference runs in batches with mixed precision and channels_last where `auto`
finds the device gains from them, by the train stage's rules; with `evaluate.tta`,
each image's logits are averaged with those of copies shifted by one pixel. bf16 can move a
prediction or two against fp32 (1 of 10,000 test images in docs/speed.md);
`evaluate.precision: fp32` gives exact fp32 metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.augment import shift
from pipeline.evaluate_params import TTA_SHIFTS, EvaluateParams
from pipeline.files import atomic_path, load_torch
from pipeline.gpus import claim_device
from pipeline.mnist import NUM_CLASSES
from pipeline.model import load_model, predict_logits
from pipeline.params import load_params, load_paths
from pipeline.process import run
from pipeline.settings import Settings, inference_settings, pick_device


def inference_logits(
    net: torch.nn.Module, images: Tensor, stats: dict, s: Settings, tta: int = 0
) -> Tensor:
    """Logits (float32, on the CPU) of `net` for the uint8 test `images`, run as `s`
    says; with `tta`, averaged with those of that many shifted copies (TTA_SHIFTS).
    Puts `net` on `s.device` in `s`'s memory layout, in place."""
    net = net.to(s.device, memory_format=s.memory_format)
    images = images.to(s.device)
    total = None
    for dy, dx in ((0, 0), *TTA_SHIFTS[:tta]):
        rows = torch.full((len(images), 1), 1 + dy, device=images.device)
        offsets = rows, torch.full((len(images), 1), 1 + dx, device=images.device)
        copies = images if (dy, dx) == (0, 0) else shift(images, offsets, 1)
        logits = predict_logits(
            net,
            copies,
            stats["mean"],
            stats["std"],
            s.eval_batch_size,
            s.autocast_dtype,
            s.memory_format,
        )
        total = logits if total is None else total + logits
    return (total / (1 + tta)).cpu() if tta else total.cpu()


def per_class_table(labels: Tensor, predictions: Tensor) -> pd.DataFrame:
    """Precision, recall and F1 per class (0 where undefined), with support."""
    confusion = torch.bincount(
        labels * NUM_CLASSES + predictions, minlength=NUM_CLASSES**2
    ).reshape(NUM_CLASSES, NUM_CLASSES)
    true_pos = confusion.diag().double()
    support, predicted = confusion.sum(1).double(), confusion.sum(0).double()
    precision = torch.where(predicted > 0, true_pos / predicted, 0.0)
    recall = torch.where(support > 0, true_pos / support, 0.0)
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator, 0.0)
    return pd.DataFrame(
        {
            "class": range(NUM_CLASSES),
            "precision": precision.numpy(),
            "recall": recall.numpy(),
            "f1": f1.numpy(),
            "support": support.long().numpy(),
        }
    )


def evaluate(logits: Tensor, labels: Tensor) -> dict[str, pd.DataFrame | dict]:
    """Every evaluation output from the test logits and labels."""
    probabilities = logits.softmax(1)
    confidence, predictions = probabilities.max(1)
    table = per_class_table(labels, predictions)
    wrong = (predictions != labels).nonzero().squeeze(1)
    metrics = {
        "test": {
            "accuracy": (predictions == labels).double().mean().item(),
            "loss": F.cross_entropy(logits, labels).item(),
            "macro_f1": float(table["f1"].mean()),
            "errors": len(wrong),
            "images": len(labels),
        }
    }
    return {
        "metrics": metrics,
        "per_class": table,
        "confusion": pd.DataFrame({"actual": labels.numpy(), "predicted": predictions.numpy()}),
        "misclassified": pd.DataFrame(
            {
                "index": wrong.numpy(),
                "actual": labels[wrong].numpy(),
                "predicted": predictions[wrong].numpy(),
                "confidence": confidence[wrong].numpy(),
            }
        ),
    }


def main() -> None:
    p = load_params(EvaluateParams)
    paths = load_paths()
    # one GPU that no other run of this project holds (dvc queue start -j N)
    device = claim_device(pick_device(p.device))
    settings = inference_settings(device, p.precision, p.channels_last, p.batch_size)
    print(f"evaluating: {settings.describe_inference()}" + (f", tta {p.tta}" if p.tta else ""))
    net, saved = load_model(paths.model, settings.device)
    test = load_torch(Path(paths.processed) / "test.pt")
    logits = inference_logits(net, test["images"], saved["stats"], settings, p.tta)
    results = evaluate(logits, test["labels"])

    with atomic_path(paths.eval_report) as tmp:
        tmp.mkdir()
        (tmp / "metrics.json").write_text(json.dumps(results["metrics"], indent=2) + "\n")
        for name in ("per_class", "confusion", "misclassified"):
            results[name].to_csv(tmp / f"{name}.csv", index=False, float_format="%.6f")
    test_metrics = results["metrics"]["test"]
    print(
        f"test accuracy {test_metrics['accuracy']:.4f}, loss {test_metrics['loss']:.4f}, "
        f"{test_metrics['errors']} errors of {test_metrics['images']}"
    )


if __name__ == "__main__":
    run(main, stage="evaluate")

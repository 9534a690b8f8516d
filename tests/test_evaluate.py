"""Evaluation outputs from known predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import committed_params_text, save_untrained_model, write_params

import evaluate
from pipeline.errors import PipelineError
from pipeline.files import save_torch
from pipeline.model import resnet18
from pipeline.params import load_paths, parse_section
from pipeline.settings import Settings


def test_per_class_table_from_known_predictions() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predictions = torch.tensor([0, 0, 1, 1, 1, 0])
    table = evaluate.per_class_table(labels, predictions).set_index("class")
    assert table.loc[0, "precision"] == pytest.approx(2 / 3)
    assert table.loc[0, "recall"] == pytest.approx(2 / 3)
    assert table.loc[1, "precision"] == pytest.approx(2 / 3)
    assert table.loc[1, "recall"] == pytest.approx(1.0)
    assert table.loc[1, "f1"] == pytest.approx(0.8)
    assert table.loc[2, ["precision", "recall", "f1"]].tolist() == [0, 0, 0]
    assert table.loc[9, "support"] == 0 and table["support"].sum() == 6


def test_evaluate_outputs() -> None:
    labels = torch.tensor([3, 7, 7, 1])
    logits = torch.full((4, 10), -5.0)
    logits[0, 3] = logits[1, 7] = logits[3, 1] = 5.0
    logits[2, 1] = 5.0  # a 7 taken for a 1
    results = evaluate.evaluate(logits, labels)
    test = results["metrics"]["test"]
    assert test["accuracy"] == 0.75 and test["errors"] == 1 and test["images"] == 4
    assert test["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    assert results["confusion"].to_dict("list") == {
        "actual": [3, 7, 7, 1],
        "predicted": [3, 7, 1, 1],
    }
    wrong = results["misclassified"].iloc[0]
    assert (wrong["index"], wrong["actual"], wrong["predicted"]) == (2, 7, 1)
    assert wrong["confidence"] == pytest.approx(logits[2].softmax(0)[1].item())


def test_macro_f1_is_the_mean_f1_over_the_classes() -> None:
    labels = torch.arange(10).repeat(2)
    predictions = labels.clone()
    predictions[7] = 1  # one 7 taken for a 1: F1 of 7 is 2/3, of 1 is 0.8, the rest 1
    logits = torch.nn.functional.one_hot(predictions, 10).float()
    test = evaluate.evaluate(logits, labels)["metrics"]["test"]
    assert test["macro_f1"] == pytest.approx((8 + 2 / 3 + 0.8) / 10)
    assert (test["accuracy"], test["errors"]) == (0.95, 1)


CPU = torch.device("cpu")
EVALUATE_RAW = {
    "batch_size": "auto",
    "device": "cpu",
    "precision": "auto",
    "channels_last": "auto",
    "tta": 0,
}


def test_inference_in_each_precision_and_layout_agrees_with_plain_fp32() -> None:
    torch.manual_seed(0)
    net = resnet18(width=4).eval()
    for module in net.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    images = torch.randint(0, 256, (37, 1, 32, 32), dtype=torch.uint8)  # a short last batch
    stats = {"mean": 0.13, "std": 0.31}
    layer1_inputs = []

    def record_layout(module: torch.nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        layer1_inputs.append("nhwc" if nhwc else "nchw" if x.is_contiguous() else "other")

    net.layer1.register_forward_pre_hook(record_layout)
    plain = Settings(CPU, "fp32", False, 8)
    reference = evaluate.inference_logits(net, images, stats, plain)
    assert reference.dtype == torch.float32 and reference.shape == (37, 10)
    # the same as one plain forward pass: batching and normalisation change nothing
    with torch.no_grad():
        whole = net(((images.float() / 255) - stats["mean"]) / stats["std"])
    torch.testing.assert_close(reference, whole, rtol=1e-4, atol=1e-4)
    for precision, channels_last, tolerance in (
        ("fp32", True, 1e-4),
        ("bf16", False, 0.1),  # bf16 keeps 8 bits of mantissa: logits agree to ~1%
        ("bf16", True, 0.1),
    ):
        settings = Settings(CPU, precision, channels_last, 8)
        logits = evaluate.inference_logits(net, images, stats, settings)
        assert logits.dtype == torch.float32 and logits.device == CPU
        scale = reference.abs().max().item()
        assert (logits - reference).abs().max().item() <= tolerance * scale, settings
        if precision == "fp32":
            torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
        else:  # bf16 really ran: its rounding shows
            assert not torch.equal(logits, reference)
        # the activations ran in the layout asked for (NHWC is only visible past the
        # one-channel input, so look at what enters layer1)
        assert layer1_inputs[-1] == ("nhwc" if channels_last else "nchw"), settings


def test_main_evaluates_the_saved_model_on_the_test_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "params.yaml").write_text(committed_params_text())
    settings = {"device": "cpu", "precision": "fp32", "channels_last": False, "batch_size": 16}
    settings["tta"] = 2  # passed on to the logits: compared with tta=2's below
    write_params(tmp_path, {"evaluate": settings})
    paths = load_paths(tmp_path / "params.yaml")
    net = save_untrained_model(tmp_path / paths.model)
    stats = {"mean": 0.13, "std": 0.31}
    processed = tmp_path / paths.processed
    processed.mkdir(parents=True)
    split = {
        name: {
            "images": torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8),
            "labels": torch.randint(0, 10, (n,)),
        }
        for name, n in (("test", 30), ("val", 20), ("train", 20))
    }
    for name, tensors in split.items():
        save_torch(tensors, processed / f"{name}.pt")
    monkeypatch.chdir(tmp_path)
    evaluate.main()

    plain = Settings(CPU, "fp32", False, 16)
    test = split["test"]
    expected = evaluate.evaluate(
        evaluate.inference_logits(net, test["images"], stats, plain, tta=2), test["labels"]
    )
    report = tmp_path / paths.eval_report
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["test"]["images"] == 30
    assert metrics["test"] == pytest.approx(expected["metrics"]["test"])
    for name in ("per_class", "confusion", "misclassified"):
        written = pd.read_csv(report / f"{name}.csv")
        pd.testing.assert_frame_equal(written, expected[name], check_dtype=False, atol=1e-6)


def test_test_time_augmentation_averages_the_logits_of_shifted_copies() -> None:
    """evaluate.tta = 2: the mean of the logits of the images and of two copies shifted by
    one pixel (right, then left), black filling the edge; 0 leaves them alone."""
    torch.manual_seed(0)
    net = resnet18(width=4).eval()
    images = torch.randint(0, 256, (9, 1, 32, 32), dtype=torch.uint8)
    stats = {"mean": 0.13, "std": 0.31}
    plain = Settings(CPU, "fp32", False, 4)
    alone = evaluate.inference_logits(net, images, stats, plain)
    right, left = torch.zeros_like(images), torch.zeros_like(images)
    right[..., 1:], left[..., :-1] = images[..., :-1], images[..., 1:]
    expected = sum(evaluate.inference_logits(net, x, stats, plain) for x in (images, right, left))
    averaged = evaluate.inference_logits(net, images, stats, plain, tta=2)
    torch.testing.assert_close(averaged, expected / 3)
    assert not torch.allclose(averaged, alone)
    with pytest.raises(PipelineError, match=r"evaluate.tta = 9 is not allowed: 0..8 copies"):
        parse_section(evaluate.EvaluateParams, EVALUATE_RAW | {"tta": 9})

"""Evaluation outputs from known predictions."""

from __future__ import annotations

import pytest
import torch

import evaluate


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

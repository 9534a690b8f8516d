"""The benchmark runs end to end on CPU at a tiny width and prints every figure
(no timing assertions: machines are noisy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import run_cmd, write_params

from common import cpu_has_amx


def test_bench_prints_every_figure(project: Path, synthetic_files: dict) -> None:
    raw = project / "data/raw"
    raw.mkdir(parents=True)
    for name, data in synthetic_files.items():
        (raw / name).write_bytes(data)
    write_params(
        project,
        {"preprocess": {"train_limit": 0, "test_limit": 0}, "evaluate": {"batch_size": "auto"}},
    )
    run_cmd([sys.executable, "src/preprocess.py"], cwd=project)
    result = run_cmd(
        [
            sys.executable,
            "src/bench.py",
            "--device",
            "cpu",
            "--width",
            "2",
            "--batch-size",
            "16",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--seed-workers",
            "0",
            "--ablate",
            "channels_last,precision",
            "--profile",
        ],
        cwd=project,
    )
    other_precision = "precision fp32" if cpu_has_amx() else "precision bf16"
    lines = result.stdout.strip().splitlines()
    json_lines = [ln for ln in lines if ln.startswith('{"bench": ')]
    assert len(json_lines) == 1
    table = result.stdout  # the table, the JSON line, then --profile's op table
    for row in (
        "ours ",
        "seed-style",
        "ceiling",
        "ours, channels_last False",
        f"ours, {other_precision}",
        "evaluate",
        "evaluate, batch 1024",  # the evaluation batch flipped from auto's 64 on a CPU
        f"evaluate, {other_precision}",  # --ablate's options flip in evaluate too
        "evaluate, channels_last False",
        "ours/seed-style",
        "ours/ceiling",
        "GFLOP per training image",
        "TFLOP/s",
        "torch 2.",
        "Self CPU time total",  # --profile: the op table of one epoch of ours
        "aten::convolution",
    ):
        assert row in table, row
    rows = {ln[:34].strip(): ln[34:].split() for ln in lines if ln[:1].isalpha()}
    # vs auto: training rows against ours, evaluate rows against the evaluate stage as is
    assert rows["ours"][1] == rows["evaluate"][1] == "1.000"
    summary = json.loads(json_lines[0])["bench"]
    ratio = summary["images_per_s"]["evaluate, batch 1024"] / summary["images_per_s"]["evaluate"]
    assert float(rows["evaluate, batch 1024"][1]) == pytest.approx(ratio, abs=0.002)
    assert set(summary["images_per_s"]) == {
        "ours",
        "seed-style",
        "ceiling",
        "evaluate",
        "evaluate, batch 1024",
        f"evaluate, {other_precision}",
        "evaluate, channels_last False",
        "ours, channels_last False",
        f"ours, {other_precision}",
    }
    assert all(v > 0 for v in summary["images_per_s"].values())
    assert summary["ours_over_seed_style"] > 0 and summary["ours_over_ceiling"] > 0
    assert summary["train_gflop_per_image"] > 0 and summary["device"] == "cpu"
    precision = "bf16" if cpu_has_amx() else "fp32"  # evaluate's auto, as train's
    assert summary["evaluate_settings"] == (
        f"device cpu, precision {precision}, channels_last True, batch_size 64"
    )
    assert summary["fraction_of_peak"] is None  # no GPU peak for a CPU
    assert set(summary["peak_memory_mib"]) == set(summary["images_per_s"])
    assert summary["repeats"] == 2  # the default: each figure is the best of two
    assert set(summary["min_over_max"]) == set(summary["images_per_s"])
    assert all(0 < v <= 1 for v in summary["min_over_max"].values())


def test_flop_count_of_resnet18() -> None:
    import bench

    # about 3.3 GFLOP per training image at width 64 (forward ~1.1, backward ~2x that)
    assert 3.0e9 < bench.training_flops_per_image(64) < 3.6e9

"""The benchmark runs end to end on CPU at a tiny width and prints every figure,
the table and the JSON agreeing and each ratio the ratio of its figures (no
assertions on the timings themselves: machines are noisy)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cmd, tiny_train_params, write_params

import bench
import preprocess
from pipeline import ablation, bench_report
from pipeline.measure import training_flops_per_image
from pipeline.settings import training_settings


def test_bench_prints_every_figure(project: Path, synthetic_files: dict) -> None:
    raw = project / "data/raw"
    raw.mkdir(parents=True)
    for name, data in synthetic_files.items():
        (raw / name).write_bytes(data)
    write_params(
        project,
        {"preprocess": {"train_limit": 0, "test_limit": 0}, "evaluate": {"batch_size": "auto"}},
    )
    with pytest.MonkeyPatch.context() as patch:  # the stage, in this process
        patch.chdir(project)
        preprocess.main()
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
            "channels_last,precision,augment",
            "--profile",
        ],
        cwd=project,
    )
    lines = result.stdout.strip().splitlines()
    json_lines = [ln for ln in lines if ln.startswith('{"bench": ')]
    assert len(json_lines) == 1
    summary = json.loads(json_lines[0])["bench"]
    # what `auto` chose here (bf16 with AMX, else fp32), as the run says; --ablate flips it
    auto = re.fullmatch(r"device cpu, precision (fp32|bf16), .*", summary["settings"])[1]
    other_precision = "precision fp32" if auto == "bf16" else "precision bf16"
    output = result.stdout  # the table, the JSON line, then --profile's op table
    train_params = yaml.safe_load((project / "params.yaml").read_text())["train"]
    augmented = any(train_params[key] for key in ablation.AUGMENT)
    augment_flip = "augment " + ("off" if augmented else "on")
    augment_row = f"ours, {augment_flip}"
    for row in (
        "ours ",
        "seed-style",
        "ceiling",
        "ours, channels_last False",
        f"ours, {other_precision}",
        augment_row,
        "data path",  # --ablate augment: the data path alone, with and without it
        f"data path, {augment_flip}",
        "augmentation: ",
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
        assert row in output, row
    speed = summary["images_per_s"]
    assert set(speed) == {
        "ours",
        "seed-style",
        "ceiling",
        "evaluate",
        "evaluate, batch 1024",
        f"evaluate, {other_precision}",
        "evaluate, channels_last False",
        "ours, channels_last False",
        f"ours, {other_precision}",
        augment_row,
        "data path",
        f"data path, {augment_flip}",
    }
    # the table: one row per figure of the JSON, each with the same numbers; "vs auto" is
    # a training row over ours, an evaluate row over the evaluate stage as auto runs it,
    # a data path row over ours' data path
    start = next(i for i, ln in enumerate(lines) if ln.startswith("measurement")) + 1
    end = next(i for i, ln in enumerate(lines) if ln.startswith("ours/seed-style"))
    table = {ln[:34].strip(): [float(v) for v in ln[34:].split()] for ln in lines[start:end]}
    assert list(table) == list(speed)
    for name, (images, vs_auto, memory, min_over_max) in table.items():
        reference = speed[next((r for r in ("evaluate", "data path") if r in name), "ours")]
        assert images == pytest.approx(speed[name], abs=0.051), name
        assert vs_auto == pytest.approx(speed[name] / reference, rel=1e-3, abs=1e-3), name
        assert memory == pytest.approx(summary["peak_memory_mib"][name], abs=0.51), name
        assert min_over_max == summary["min_over_max"][name], name
    # the summary line and the JSON: ratios of the measured figures, FLOPs of this width
    ratios = re.search(r"ours/seed-style ([\d.]+), ours/ceiling ([\d.]+)", lines[end])
    assert ratios, lines[end]
    seed_style, ceiling = (float(v) for v in ratios.groups())
    assert seed_style == summary["ours_over_seed_style"]
    assert ceiling == summary["ours_over_ceiling"]
    # the JSON's speeds are rounded to 0.01 images/s, its ratios (from the unrounded
    # speeds) to 0.001: a slow figure (a loaded machine) moves the ratio by more than that
    for ratio, slower in ((seed_style, "seed-style"), (ceiling, "ceiling")):
        rounding = (0.005 / speed["ours"] + 0.005 / speed[slower]) * ratio + 5e-4
        assert ratio == pytest.approx(speed["ours"] / speed[slower], abs=rounding), slower
    # the augmentation's share of a step, from the unrounded speeds: as its line says
    with_it, without = ("data path", "data path, augment off")[:: 1 if augmented else -1]
    step = speed["ours" if augmented else "ours, augment on"]
    share = (1 / speed[with_it] - 1 / speed[without]) * step
    assert summary["augment_share_of_step"] == pytest.approx(share, rel=1e-3, abs=1e-4)
    printed = re.search(r"augmentation: (-?[\d.]+)% of a training step", output)
    assert float(printed[1]) == pytest.approx(100 * summary["augment_share_of_step"], abs=0.006)
    flops = training_flops_per_image(2)
    assert summary["train_gflop_per_image"] == round(flops / 1e9, 3)
    assert summary["ours_tflops"] == pytest.approx(speed["ours"] * flops / 1e12, abs=6e-5)
    assert summary["device"] == "cpu" and summary["width"] == 2 and summary["batch_size"] == 16
    assert summary["evaluate_settings"] == (  # evaluate's auto is train's
        f"device cpu, precision {auto}, channels_last True, batch_size 64"
    )
    assert summary["fraction_of_peak"] is None  # no GPU peak for a CPU
    assert set(summary["peak_memory_mib"]) == set(summary["images_per_s"])
    assert summary["repeats"] == 2  # the default: each figure is the best of two
    assert set(summary["min_over_max"]) == set(summary["images_per_s"])
    assert all(0 < v <= 1 for v in summary["min_over_max"].values())


def test_augment_flips_the_rotation_scaling_elastic_and_cutout_off_or_the_defaults_on() -> None:
    p = tiny_train_params()  # the committed train section: whatever augmentation it has
    nothing = {"max_rotate": 0.0, "max_scale": 0.0, "cutout": 0, "elastic_alpha": 0.0}
    off = dataclasses.replace(p, **nothing)
    settings = training_settings(off, torch.device("cpu"))
    label, on = ablation.flipped(off, settings, "augment")
    assert label == "augment on"
    recipe = (on.max_rotate, on.max_scale, on.cutout, on.elastic_alpha)
    assert recipe == (10.0, 0.1, 0, 0.0)  # the defaults'
    assert dataclasses.replace(on, **nothing) == off  # only those
    changes = [{"cutout": 4}, {"max_scale": 0.2}, {"elastic_alpha": 9.0}]
    for partly in (dataclasses.replace(off, **change) for change in changes):
        label, back = ablation.flipped(partly, settings, "augment")
        assert label == "augment off" and back == off


def test_augment_share_is_the_data_paths_difference_over_a_step() -> None:
    # a step of 0.1 s per image; the data path 0.002 s per image with, 0.001 without
    step, with_it, without = 10.0, 500.0, 1000.0  # images/s
    ours_augments = {"ours": step, "data path": with_it, "data path, augment off": without}
    assert bench_report.augment_share(ours_augments) == pytest.approx(0.01)
    ours_does_not = {
        "ours": 99.0,  # ours without augmentation: not the step the share is of
        "ours, augment on": step,
        "data path": without,
        "data path, augment on": with_it,
    }
    assert bench_report.augment_share(ours_does_not) == pytest.approx(0.01)
    assert bench_report.augment_share({"ours": step, "data path": with_it}) is None


@pytest.mark.parametrize("augmented", [True, False])
def test_the_data_path_rows_time_ours_and_its_augment_flip(
    augmented: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    nothing = {"max_rotate": 0.0, "max_scale": 0.0, "cutout": 0, "elastic_alpha": 0.0}
    p = tiny_train_params(**({} if augmented else nothing))
    assert any(getattr(p, key) for key in ablation.AUGMENT) == augmented
    timed_params = {}
    monkeypatch.setattr(
        bench,
        "bench_data_path",
        lambda data, q, steps: timed_params.setdefault(len(timed_params), q),
    )
    images = torch.zeros(64, 1, 32, 32, dtype=torch.uint8)
    data = bench.Data(images, torch.zeros(64).long(), images, torch.zeros(64).long(), 0.1, 0.3)
    args = argparse.Namespace(width=2, steps=1, warmup=1, seed_workers=0, ablate="augment")
    rows = bench.measurements(args, data, p, {})
    flip = "data path, augment " + ("off" if augmented else "on")
    assert [k for k in rows if k.startswith("data path")] == ["data path", flip]
    rows["data path"](), rows[flip]()
    assert timed_params[0] == p
    _, flipped = ablation.flipped(p, training_settings(p, torch.device("cpu")), "augment")
    assert timed_params[1] == flipped != p


def test_flop_count_of_resnet18() -> None:
    # about 3.3 GFLOP per training image at width 64 (forward ~1.1, backward ~2x that)
    assert 3.0e9 < training_flops_per_image(64) < 3.6e9


def test_bench_scaling_runs_the_train_stage_with_each_number_of_processes(
    project: Path, synthetic_files: dict, capsys: pytest.CaptureFixture
) -> None:
    raw = project / "data/raw"
    raw.mkdir(parents=True)
    for name, data in synthetic_files.items():
        (raw / name).write_bytes(data)
    write_params(project, {"preprocess": {"train_limit": 0, "test_limit": 0}})
    with pytest.MonkeyPatch.context() as patch:  # the stage and the command, in this process
        patch.chdir(project)
        preprocess.main()
        patch.setattr(sys, "argv", ["bench.py", "--device", "cpu", "--width", "2", "--scaling"])
        bench.main()
    stdout = capsys.readouterr().out
    assert "on the CPU (Gloo)" in stdout
    rows = [ln.split() for ln in stdout.splitlines() if re.match(r"\s+\d+\s+[\d.]+\s", ln)]
    assert [row[0] for row in rows] == ["1", "2"]
    scaling = json.loads(stdout.strip().splitlines()[-1])["scaling"]["images_per_s"]
    assert [float(row[1]) for row in rows] == pytest.approx([scaling["1"], scaling["2"]], abs=0.1)
    assert float(rows[1][2]) == pytest.approx(scaling["2"] / scaling["1"], abs=0.001)

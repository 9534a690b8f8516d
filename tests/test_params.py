"""params.yaml validation: unknown, misspelt, mistyped and out-of-range keys give one
clear line; dvc.yaml declares exactly the keys each stage reads."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, committed_params_text, run_cmd, write_params

from download import DataParams
from evaluate import EvaluateParams
from pipeline import params as common
from pipeline.errors import PipelineError
from pipeline.identity import stage_code
from pipeline.params import Paths, load_params, parse_section
from plot import PlotParams
from preprocess import PreprocessParams
from train import ModelParams, TrainParams

DEFAULTS = yaml.safe_load(committed_params_text())
STAGE_PARAMS = {
    "download": [DataParams],
    "preprocess": [PreprocessParams],
    "train": [ModelParams, TrainParams],
    "evaluate": [EvaluateParams],
    "plot": [PlotParams],
}


EVALUATE = {
    "batch_size": "auto",
    "device": "cpu",
    "precision": "auto",
    "channels_last": "auto",
    "tta": 0,
}


def train_with(**changes: object) -> dict:
    return DEFAULTS["train"] | changes


@pytest.mark.parametrize(
    "cls",
    [Paths, DataParams, PreprocessParams, ModelParams, TrainParams, EvaluateParams, PlotParams],
)
def test_committed_defaults_are_valid(cls: type) -> None:
    params = load_params(cls, ROOT / "params.yaml")
    assert dataclasses.is_dataclass(params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(params, dataclasses.fields(cls)[0].name, None)


def test_defaults_are_the_real_run() -> None:
    assert DEFAULTS["model"]["width"] == 64
    assert DEFAULTS["preprocess"] == {
        "val_size": 5000,
        "train_limit": 0,
        "test_limit": 0,
        "seed": 0,
    }


def test_every_key_in_params_yaml_has_a_comment() -> None:
    lines = (ROOT / "params.yaml").read_text().splitlines()
    keys = [line for line in lines if re.match(r"^\s+\w+:\s*\S", line)]
    assert keys, "no keys found"
    assert [line for line in keys if "#" not in line] == []


def test_dvc_yaml_lists_exactly_the_keys_each_stage_reads() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, classes in STAGE_PARAMS.items():
        read = {f"{c.SECTION}.{f.name}" for c in classes for f in dataclasses.fields(c)}
        assert set(stages[stage]["params"]) == read, stage
        assert f"src/{stage}.py" in stages[stage]["deps"]


def test_each_stage_depends_on_exactly_the_code_it_runs() -> None:
    """So that a change to code a stage does not run never reruns it (a benchmark or a
    test helper, say), and a change to code it runs always does."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        script = stage["cmd"].split()[-1]
        code = {dep for dep in stage["deps"] if dep.startswith("src/")}
        imported = {str(path.relative_to(ROOT)) for path in stage_code(ROOT / script)}
        assert code == imported, name


def test_the_code_a_script_runs_is_found_through_its_imports() -> None:
    """stage_code (the run identity and this file's dvc.yaml check) follows `from a
    import b`, `from package import module` and `from package.module import name`
    through the modules found, leaves out what is imported only for type hints, and
    nothing outside src/."""
    script = ROOT / "src/train.py"
    found = {path.name for path in stage_code(script)}
    assert {"train.py", "__init__.py", "loop.py", "model.py", "files.py", "errors.py"} <= found
    assert "evaluate.py" not in found and "bench.py" not in found  # not imported by train
    evaluate = {p.name for p in stage_code(ROOT / "src/evaluate.py")}
    assert evaluate >= {"evaluate.py", "locks.py", "augment.py"}
    # settings.py names TrainParams for its type hints only: train.py is not evaluate's code
    assert "train.py" not in evaluate and "loop.py" not in evaluate


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(PipelineError) as error:
        parse_section(TrainParams, train_with(learning_rate=0.1))
    assert "unknown key 'train.learning_rate' (did you mean 'train.lr'?)" in str(error.value)
    with pytest.raises(PipelineError, match=r"'train.epoch' \(did you mean 'train.epochs'"):
        parse_section(TrainParams, train_with(epoch=3))


def test_missing_key_and_missing_section() -> None:
    params = train_with()
    del params["seed"]
    with pytest.raises(PipelineError, match="missing key.*train.seed"):
        parse_section(TrainParams, params)
    with pytest.raises(PipelineError, match="section 'train' is missing"):
        parse_section(TrainParams, None)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": "ten"}, "train.epochs = 'ten' is not allowed: an integer"),
        ({"epochs": 2.5}, "train.epochs = 2.5 is not allowed: an integer"),
        ({"epochs": True}, "train.epochs = True is not allowed: an integer"),
        ({"lr": "fast"}, "train.lr = 'fast' is not allowed: a finite number"),
        ({"nesterov": "yes"}, "train.nesterov = 'yes' is not allowed: true or false"),
        ({"device": "tpu"}, "train.device = 'tpu' is not allowed: one of auto, cpu, cuda, mps"),
        ({"compile": 1}, "train.compile = 1 is not allowed: one of auto, true, false"),
        ({"lr": 0}, "train.lr = 0.0 is not allowed: a number > 0"),
        ({"lr": -0.1}, "train.lr = -0.1 is not allowed: a number > 0"),
        ({"batch_size": 0}, "train.batch_size = 0 is not allowed: an integer >= 1"),
        (
            {"eval_batch_size": "max"},
            "train.eval_batch_size = 'max' is not allowed: an integer or auto",
        ),
        (
            {"eval_batch_size": 0},
            "train.eval_batch_size = 0 is not allowed: an integer >= 1 or auto",
        ),
        (
            {"eval_batch_size": True},
            "train.eval_batch_size = True is not allowed: an integer or auto",
        ),
        ({"momentum": 1.0}, "train.momentum = 1.0 is not allowed"),
        ({"label_smoothing": 1}, "train.label_smoothing = 1.0 is not allowed"),
        ({"warmup_epochs": 99}, "train.warmup_epochs = 99.0 is not allowed"),
        ({"elastic_alpha": -1}, "train.elastic_alpha = -1.0 is not allowed: 0..100 pixels"),
        ({"elastic_sigma": 0}, "train.elastic_sigma = 0.0 is not allowed: 1..16 pixels"),
        (
            {"unaugmented_epochs": 9},
            "train.unaugmented_epochs = 9 is not allowed: 0..train.epochs = 8",
        ),
        (
            {"zero_init_residual": "yes"},
            "train.zero_init_residual = 'yes' is not allowed: true or false",
        ),
        ({"momentum": 0}, "train.nesterov = True is not allowed: false when train.momentum is 0"),
    ],
)
def test_wrong_type_or_range_names_key_value_and_allowed(changes: dict, message: str) -> None:
    with pytest.raises(PipelineError) as error:
        parse_section(TrainParams, train_with(**changes))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("cls", "raw", "message"),
    [
        (ModelParams, {"width": 0}, "model.width = 0"),
        (
            PreprocessParams,
            {"val_size": 5, "train_limit": 0, "test_limit": 0, "seed": 0},
            "preprocess.val_size = 5",
        ),
        (
            PreprocessParams,
            {"val_size": 50, "train_limit": 3, "test_limit": 0, "seed": 0},
            "preprocess.train_limit = 3",
        ),
        (DataParams, {"mirrors": [], "timeout_s": 3}, "data.mirrors = []"),
        (DataParams, {"mirrors": "http://x/", "timeout_s": 3}, "a list of str"),
        (DataParams, {"mirrors": ["http://x/"], "timeout_s": 0}, "data.timeout_s = 0.0"),
        (EvaluateParams, EVALUATE | {"batch_size": -1}, "evaluate.batch_size = -1"),
        (
            EvaluateParams,
            EVALUATE | {"batch_size": 2.0},
            "evaluate.batch_size = 2.0 is not allowed: an integer or auto",
        ),
        (
            EvaluateParams,
            EVALUATE | {"precision": "fp8"},
            "evaluate.precision = 'fp8' is not allowed: one of auto, fp32, bf16, fp16",
        ),
        (
            EvaluateParams,
            EVALUATE | {"channels_last": "yes"},
            "evaluate.channels_last = 'yes' is not allowed: one of auto, true, false",
        ),
        (PlotParams, {"max_misclassified": 0, "dpi": 100}, "plot.max_misclassified = 0"),
    ],
)
def test_other_sections_are_range_checked(cls: type, raw: dict, message: str) -> None:
    with pytest.raises(PipelineError, match=re.escape(message)):
        parse_section(cls, raw)


def test_numbers_that_dvc_set_writes_as_strings_are_floats() -> None:
    # `dvc exp run -S train.lr=1e-06` writes `lr: 1e-06`, which PyYAML reads as a string
    assert yaml.safe_load("lr: 1e-06") == {"lr": "1e-06"}
    params = parse_section(TrainParams, train_with(lr="1e-06", weight_decay="5e-4"))
    assert params.lr == 1e-06 and params.weight_decay == 5e-4
    assert isinstance(params.lr, float)


def test_stage_stops_before_any_work_with_one_line(project: Path) -> None:
    write_params(project, {"train": {"lr": -1}})
    result = run_cmd([sys.executable, "src/train.py"], cwd=project, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: train.lr = -1.0 is not allowed: a number > 0"
    ]
    # nothing written but the stage's lock (git-ignored scratch)
    assert [str(p.relative_to(project)) for p in (project / "models").rglob("*")] == [
        "models/checkpoints",
        "models/checkpoints/train.lock",
    ]
    assert not (project / "reports").exists()


def test_missing_device_is_an_error_not_a_fallback(project: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    write_params(project, {"train": {"device": "cuda"}})
    result = run_cmd([sys.executable, "src/train.py"], cwd=project, check=False)
    assert result.returncode == 1
    assert "error: device 'cuda' was asked for but torch sees none" in result.stderr
    # and the first stage refuses it before DVC deletes any output (tests/test_check_params.py)


def test_a_param_type_the_parser_does_not_know_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="not supported"):
        common._coerce("section.key", 5, int | None)  # even where int would match
    with pytest.raises(TypeError, match="not supported"):
        common._coerce("section.key", [1], list)

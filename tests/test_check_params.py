"""The check_params stage: the whole params.yaml is checked before any stage runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import committed_params_text, run_cmd

import check_params
from check_params import CHECKED, check_document
from pipeline import settings
from pipeline.errors import PipelineError

DEFAULTS = yaml.safe_load(committed_params_text())


def with_changes(section: str, **changes: object) -> dict:
    return DEFAULTS | {section: DEFAULTS[section] | changes}


def test_the_committed_params_pass() -> None:
    parsed = check_document(DEFAULTS)
    assert parsed["train"].lr == DEFAULTS["train"]["lr"]
    assert set(parsed) == set(DEFAULTS)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (with_changes("train", lr="abc"), "train.lr = 'abc' is not allowed: a finite number"),
        (
            with_changes("train", learnign_rate=0.1),
            "unknown key 'train.learnign_rate' (did you mean 'train.lr'?)",
        ),
        (with_changes("evaluate", precision="fp8"), "evaluate.precision = 'fp8' is not allowed"),
        (with_changes("plot", dpi=5), "plot.dpi = 5 is not allowed"),
        (DEFAULTS | {"trian": {"lr": 0.1}}, "unknown section 'trian'; valid sections: paths,"),
        (
            {k: v for k, v in DEFAULTS.items() if k != "model"},
            "section 'model' is missing or not a mapping",
        ),
        (
            with_changes("train", batch_size=56_000),
            "train.batch_size = 56000 is not allowed: at most the 55000 training images",
        ),
        (
            DEFAULTS
            | {"preprocess": DEFAULTS["preprocess"] | {"train_limit": 1000}}
            | {"train": DEFAULTS["train"] | {"batch_size": 1001}},
            "train.batch_size = 1001 is not allowed: at most the 1000 training images",
        ),
        (
            with_changes("preprocess", train_limit=55_001),
            "preprocess.train_limit = 55001 is not allowed: 0 or at most the 55000",
        ),
        (
            with_changes("preprocess", test_limit=10_001),
            "preprocess.test_limit = 10001 is not allowed",
        ),
        (
            with_changes("preprocess", val_size=59_995),
            "preprocess.val_size = 59995 is not allowed",
        ),
        ([1, 2], "not a mapping of sections"),
    ],
)
def test_every_bad_value_is_named(document: object, message: str) -> None:
    with pytest.raises(PipelineError) as error:
        check_document(document)
    assert message in str(error.value)


def test_the_stage_writes_its_fixed_text_or_nothing(project: Path) -> None:
    output = project / "data/params_check.txt"
    with pytest.MonkeyPatch.context() as patch:  # the valid case in this process
        patch.chdir(project)
        check_params.main()
    assert output.read_text() == CHECKED
    output.unlink()
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("lr: 0.2", "lr: -1"))
    failed = run_cmd([sys.executable, "src/check_params.py"], cwd=project, check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        "error: params.yaml: train.lr = -1.0 is not allowed: a number > 0"
    ]
    assert not output.exists()


def test_the_stage_imports_no_heavy_library(project: Path) -> None:
    """It runs before every stage of every `dvc exp run`: its whole job is reading a YAML
    file, so it must not pay for importing torch, matplotlib or pandas (each of which
    the stage scripts import), unless params.yaml asks for a GPU (docs/speed.md)."""
    probe = (
        "import runpy, sys\n"
        "sys.path.insert(0, 'src')\n"
        "runpy.run_path('src/check_params.py', run_name='__main__')\n"
        "heavy = ('torch', 'matplotlib', 'pandas', 'dvclive')\n"
        "print(sorted(name for name in heavy if name in sys.modules))\n"
    )
    ran = run_cmd([sys.executable, "-c", probe], cwd=project)
    assert ran.stdout.splitlines() == [CHECKED.strip(), "[]"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["device"] = "cuda"  # only torch can say whether this machine has one
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    asked = run_cmd([sys.executable, "-c", probe], cwd=project, check=False)
    assert "'torch'" in asked.stdout or "train.device = 'cuda'" in asked.stderr


@pytest.mark.parametrize("key", ["train.device", "evaluate.device"])
@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_device_this_machine_lacks_is_refused(
    key: str, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused here, before DVC deletes the train or evaluate stage's outputs, naming
    the key and what torch sees (a machine without CUDA or MPS is faked)."""
    monkeypatch.setattr(settings, "available_devices", lambda: {"cuda": False, "mps": False})
    section, name = key.split(".")
    with pytest.raises(PipelineError) as error:
        check_document(with_changes(section, **{name: device}))
    assert str(error.value) == (
        f"params.yaml: {key} = '{device}' is not allowed: torch {torch.__version__} sees no "
        f"{device.upper()} device on this machine; use auto or cpu"
    )
    monkeypatch.setattr(settings, "available_devices", lambda: {"cuda": True, "mps": True})
    assert getattr(check_document(with_changes(section, **{name: device}))[section], name) == device

"""Resume state: which run a checkpoint belongs to, one file per run, other runs' files
kept within a bound, an unreadable file set aside."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_params

import train
from pipeline.checkpoint import KEEP_OTHER_RUNS, Checkpoint
from pipeline.errors import PipelineError
from pipeline.identity import SCHEDULING, run_id, training_recipe
from pipeline.settings import training_settings

CPU = torch.device("cpu")


def recipe(**changes: object) -> dict:
    p = tiny_train_params(**changes)
    sections = {"model": train.ModelParams(width=4), "train": p}
    return training_recipe(sections, training_settings(p, CPU), processes=1)


def test_a_run_is_its_params_settings_data_and_code(tmp_path: Path) -> None:
    data = tmp_path / "train.pt"
    data.write_bytes(b"images")
    base = run_id(recipe(), [data])
    assert run_id(recipe(), [data]) == base
    assert run_id(recipe(lr=0.01), [data]) != base  # another param
    assert run_id(recipe(precision="bf16"), [data]) != base  # another setting
    on_gpu = recipe() | {"settings": recipe()["settings"] | {"device": "cuda"}}
    assert run_id(on_gpu, [data]) != base  # another kind of device
    for key in SCHEDULING:  # how it is scheduled is not what it computes
        changed = {"processes": 2, "checkpoint_every": 3, "checkpoint_minutes": 1.5}[key]
        assert run_id(recipe(**{key: changed}), [data]) == base, key
    data.write_bytes(b"other images")
    assert run_id(recipe(), [data]) != base  # other data (or code: its bytes, likewise)
    assert Checkpoint.of_run(tmp_path, base).path == tmp_path / f"{base[:16]}.pt"


def test_every_train_param_but_the_scheduling_ones_identifies_a_run() -> None:
    """A new key in TrainParams is part of the identity unless named in SCHEDULING."""
    fields = {f.name for f in dataclasses.fields(train.TrainParams)}
    assert set(recipe()["train"]) == fields - set(SCHEDULING)
    assert set(SCHEDULING) <= fields


def test_other_runs_checkpoints_are_kept_up_to_the_bound(tmp_path: Path) -> None:
    own = Checkpoint.of_run(tmp_path, "0" * 64)
    own.path.write_bytes(b"")
    others = []
    for age in range(KEEP_OTHER_RUNS + 2):  # the oldest last
        path = tmp_path / f"{age + 1:016x}.pt"
        path.write_bytes(b"state")
        os.utime(path, (1_000_000 - age, 1_000_000 - age))
        others.append(path)
    os.utime(own.path, (1, 1))  # the oldest of all, and never removed
    kept = [tmp_path / "train.lock", tmp_path / "mine.pt"]  # not checkpoints: never removed
    for path in kept:
        path.write_text("1\n")
        os.utime(path, (0, 0))
    removed = own.prune_other_runs()
    assert removed == others[KEEP_OTHER_RUNS:]
    assert sorted(tmp_path.iterdir()) == sorted([own.path, *kept, *others[:3]])
    assert own.prune_other_runs() == []  # within the bound: nothing more goes


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"lr: 0.1\n"])
def test_an_unreadable_checkpoint_is_set_aside_and_named(
    tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = Checkpoint.of_run(tmp_path, "a" * 64)
    checkpoint.path.write_bytes(content)
    assert checkpoint.read() is None
    aside = tmp_path / f"{'a' * 16}.unreadable.pt"
    assert aside.read_bytes() == content and not checkpoint.path.exists()
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{checkpoint.path} could not be read (")
    assert line.endswith(f"set aside as {aside} (delete it when you like); training starts over")
    assert checkpoint.read() is None  # and the next try starts over without a word
    assert capsys.readouterr().out == ""


def test_a_checkpoint_that_the_disk_fails_to_give_is_not_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read error of the disk or the network says so and stops: the file may be good,
    and training from nothing would throw away hours."""
    checkpoint = Checkpoint.of_run(tmp_path, "b" * 64)
    checkpoint.path.write_bytes(b"a good checkpoint")

    def failing(path: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("pipeline.checkpoint.load_torch", failing)
    with pytest.raises(PipelineError, match=r"cannot read .*\.pt \(Input/output error\)"):
        checkpoint.read()
    assert checkpoint.path.read_bytes() == b"a good checkpoint"


def test_processes_change_the_run_only_through_batchnorm(tmp_path: Path) -> None:
    """Two CPU processes normalise half a batch each: another run. Two GPU processes with
    SyncBatchNorm normalise the whole batch, as one does: the same run."""
    p = tiny_train_params()
    sections = {"model": train.ModelParams(width=4), "train": p}
    cpu = training_settings(p, CPU)
    one = training_recipe(sections, cpu, processes=1)
    assert training_recipe(sections, cpu, processes=2) != one
    synced = dataclasses.replace(cpu, sync_batchnorm=True)
    assert training_recipe(sections, synced, processes=2) == one


def test_a_real_checkpoint_cut_short_is_set_aside(tmp_path: Path) -> None:
    """As a full disk leaves it: torch reads such a zip as an OSError (EINVAL), which is
    the file's fault, not the disk's."""
    checkpoint = Checkpoint.of_run(tmp_path, "c" * 64)
    torch.save({"run_id": "c" * 64, "model": {"w": torch.zeros(20_000)}}, checkpoint.path)
    checkpoint.path.write_bytes(checkpoint.path.read_bytes()[:5000])
    assert checkpoint.read() is None
    assert (tmp_path / f"{'c' * 16}.unreadable.pt").exists() and not checkpoint.path.exists()

"""Atomic writes, safe loading, and how a stage reports errors."""

from __future__ import annotations

import pickle
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY, write_params

import train
from pipeline import process
from pipeline.errors import PipelineError
from pipeline.files import atomic_path, load_torch, save_torch


class Payload:
    def __reduce__(self) -> tuple:
        return (print, ("this must never run",))


def test_atomic_write_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with atomic_path(target) as tmp:
        tmp.write_text('{"a": 1}')
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half-writ")
        raise RuntimeError("crash while writing")
    assert target.read_text() == '{"a": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp left


def test_temp_folders_of_a_killed_run_are_cleaned_up(tmp_path: Path) -> None:
    stale = tmp_path / ".raw.abc123.tmp"
    (stale / "raw").mkdir(parents=True)  # what a SIGKILL during the download leaves
    with atomic_path(tmp_path / "raw") as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_atomic_folder(tmp_path: Path) -> None:
    folder = tmp_path / "processed"
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "old").write_text("1")
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("2")
    assert [p.name for p in folder.iterdir()] == ["new"]


def test_load_torch_is_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Payload()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_torch(path)
    save_torch({"w": torch.ones(2), "meta": {"epoch": 3}}, tmp_path / "ok.pt")
    assert load_torch(tmp_path / "ok.pt")["meta"] == {"epoch": 3}
    with pytest.raises(PipelineError, match="missing.pt not found"):
        load_torch(tmp_path / "missing.pt")


def test_out_of_memory_suggests_a_smaller_batch(
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    interrupt_handlers: None,  # run() installs them; put back after
) -> None:
    processed = project / "data/processed"
    processed.mkdir(parents=True)
    for split in ("train", "val"):
        torch.save(
            {
                "images": torch.zeros(8, 1, 32, 32, dtype=torch.uint8),
                "labels": torch.zeros(8, dtype=torch.long),
            },
            processed / f"{split}.pt",
        )
    (processed / "stats.json").write_text('{"mean": 0.1, "std": 0.3}')
    write_params(project, TINY)

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield

    monkeypatch.chdir(project)
    monkeypatch.setattr(train, "fit", out_of_memory)
    # in-process: pytest's own process must not stop with its parent after this test
    monkeypatch.setattr(process, "stop_with_parent", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        process.run(train.main)
    assert exit_info.value.code == 1
    assert (
        "error: out of memory on cpu with train.batch_size = 50 (train.eval_batch_size = 256):"
        " try smaller ones"
    ) in capsys.readouterr().err
    assert not (project / "models/model.pt").exists()
    assert not (project / "reports/train").exists()  # no partial training report either


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_interrupts_deferred_waits_for_the_outer_block_to_end(
    interrupt_handlers: None, signum: int
) -> None:
    done = []
    with pytest.raises(KeyboardInterrupt, match=f"signal {int(signum)}"):  # noqa: SIM117
        with process.interrupts_deferred():
            with process.interrupts_deferred():  # nested: held until the outer block ends
                signal.raise_signal(signum)
                done.append("inner block")
            done.append("outer block")
    assert done == ["inner block", "outer block"]
    with process.interrupts_deferred():  # nothing pending: nothing raised
        pass
    process.install_interrupt_handlers()  # a new run: not stopping (as after the one above)
    with pytest.raises(KeyboardInterrupt):  # outside a block: at once
        signal.raise_signal(signum)


def test_once_stopping_only_a_ctrl_c_interrupts_again(interrupt_handlers: None) -> None:
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGTERM)  # the clean-up goes on
    signal.raise_signal(signal.SIGHUP)
    with process.interrupts_deferred():  # nor is one held for a block's end
        signal.raise_signal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="signal 2"):  # a second Ctrl-C: the user's
        signal.raise_signal(signal.SIGINT)


def test_a_sigint_the_parent_ignores_stays_ignored(interrupt_handlers: None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a background job
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    process.install_interrupt_handlers()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is process._on_interrupt

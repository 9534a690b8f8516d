"""The training loop on tiny synthetic data: augmentation, schedule, learning,
non-finite losses, checkpoints and exact resume after an interruption, at an epoch's
end or inside one."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, synthetic_digits, tiny_train_params, wait_until, write_params

import train
from pipeline import loop, optim, process
from pipeline.checkpoint import Checkpoint, TrainingState
from pipeline.ema import WeightAverage, unreached_note
from pipeline.errors import PipelineError
from pipeline.files import load_torch
from pipeline.loop import Data, Run
from pipeline.model import normalise, predict_logits, resnet18
from pipeline.settings import training_settings
from preprocess import normalisation_stats, resize

CPU = torch.device("cpu")
tiny_params = tiny_train_params


def tiny_data(n_train: int = 256, n_val: int = 64) -> Data:
    x, y = synthetic_digits(n_train + n_val, seed=5)
    images, labels = resize(torch.from_numpy(x)), torch.from_numpy(y).long()
    mean, std = normalisation_stats(images[:n_train])
    return Data(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], mean, std)


def tiny_run(params: train.TrainParams, checkpoint: Path | None, run_id: str = "run-a") -> Run:
    saved = Checkpoint(checkpoint, run_id) if checkpoint else None
    return Run(params, training_settings(params, CPU), saved)


def run_fit(
    params: train.TrainParams,
    checkpoint: Path | None,
    data: Data | None = None,
    stop_after: int | None = None,
) -> tuple[torch.nn.Module, list[dict]]:
    torch.manual_seed(params.seed)
    net = resnet18(width=4)
    records = []
    for record in loop.fit(net, data or tiny_data(), tiny_run(params, checkpoint)):
        records.append(record)
        if record["epoch"] == stop_after:
            break  # as if interrupted right after this epoch's checkpoint
    return net, records


def test_an_epoch_takes_full_batches_of_a_fresh_permutation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """100 images in batches of 32: 3 full batches of distinct images per epoch (the
    remainder dropped, so every step has one shape), in a new order each epoch."""
    taken: list[list[int]] = []
    real_batch = loop.batch

    def batch(data: Data, indices: torch.Tensor, *args: object) -> object:
        taken.append(indices.tolist())
        return real_batch(data, indices, *args)

    monkeypatch.setattr(loop, "batch", batch)
    run_fit(tiny_params(epochs=2), None, tiny_data(n_train=100))
    assert [len(b) for b in taken] == [32] * 6
    first, second = ([i for b in taken[k : k + 3] for i in b] for k in (0, 3))
    assert len(set(first)) == len(set(second)) == 96
    assert first != second
    with pytest.raises(PipelineError, match="train.batch_size = 32 .* at most the 20 training"):
        run_fit(tiny_params(), None, tiny_data(n_train=20))


def test_the_last_unaugmented_epochs_train_on_the_images_as_they_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3 epochs, the last 2 unaugmented: epoch 1's batches are shifted, rotated and
    scaled; epochs 2 and 3 take each image exactly as it is, normalised."""
    seen: dict[int, list[bool]] = {1: [], 2: [], 3: []}
    real_batch = loop.batch
    data = tiny_data(n_train=96)  # 3 steps an epoch

    def batch(
        data: Data, indices: torch.Tensor, run: Run, generator: object, how: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = real_batch(data, indices, run, generator, how)
        plain = normalise(data.train_x[indices], data.mean, data.std)
        epoch = 1 + sum(map(len, seen.values())) // 3
        seen[epoch].append(torch.equal(x, plain))
        return x, y

    monkeypatch.setattr(loop, "batch", batch)
    augmented = {"max_shift": 2, "max_rotate": 10.0, "max_scale": 0.1}
    run_fit(tiny_params(epochs=3, unaugmented_epochs=2, **augmented), None, data)
    assert seen == {1: [False] * 3, 2: [True] * 3, 3: [True] * 3}


@pytest.mark.parametrize("shape", optim.SCHEDULES)
def test_lr_warms_up_linearly_then_decays_to_zero(shape: str) -> None:
    factors = [optim.lr_factor(step, 10, 100, shape) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] < 0.02
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert optim.lr_factor(55, 10, 100, shape) == pytest.approx(0.5)  # half-way: half
    quarter = optim.lr_factor(32.5, 10, 100, shape)  # a quarter of the decay done
    assert quarter == pytest.approx({"cosine": 0.8536, "linear": 0.75}[shape], abs=1e-4)


def test_the_weights_average_follows_the_weights() -> None:
    """One update: average <- rate * average + (1 - rate) * weights, the rate small at
    first ((1 + 0) / (10 + 0) = 0.1); BatchNorm's statistics averaged, its count copied."""
    torch.manual_seed(0)
    net = resnet18(width=4)
    average = WeightAverage(net, decay=0.999)
    before = {k: v.clone() for k, v in average.net.state_dict().items()}
    with torch.no_grad():
        for t in net.state_dict().values():
            t.add_(1) if t.is_floating_point() else t.fill_(7)
    assert average.rate() == pytest.approx(0.1)
    average.update(net)
    for key, value in average.net.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, before[key] + 0.9, msg=key)
        else:
            assert value.item() == 7, key
    assert average.steps == 1 and average.rate() == pytest.approx(2 / 11)
    average.steps = 10_000
    assert average.rate() == 0.999  # later: the decay itself


def test_a_decay_the_run_never_reaches_is_named() -> None:
    """The warm-up (1 + t) / (10 + t) reaches 0.995 at step 1,790: the default 856 steps
    average at the warm-up's rate throughout, so 0.995 and 0.998 train the same."""
    note = unreached_note(0.995, 856)
    assert note is not None and "train.ema_decay 0.995" in note and "856 steps" in note
    assert "0.9896 at the last step" in note  # 856 / 865, the rate of step 855
    assert unreached_note(0.995, 1791) is None  # its last step, 1,790, reaches it
    assert unreached_note(0.995, 1790) is not None
    for decay, steps in ((0.995, 856), (0.998, 856), (0.995, 1791), (0.9, 100)):
        average = WeightAverage(resnet18(width=2), decay)
        average.steps = steps - 1  # the last update's
        assert (unreached_note(decay, steps) is None) == (average.rate() == decay)


@pytest.mark.parametrize("decay, said", [(0.5, True), (0.2, False), (0.0, False)])
def test_the_train_stage_says_when_its_average_never_reaches_the_decay(
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    interrupt_handlers: None,  # run() installs them; put back after
    decay: float,
    said: bool,
) -> None:
    processed = project / "data/processed"
    processed.mkdir(parents=True)
    for split, n in (("train", 100), ("val", 8)):  # 2 epochs of 2 steps of 50: steps 0-3
        images, labels = torch.zeros(n, 1, 32, 32, dtype=torch.uint8), torch.zeros(n).long()
        torch.save({"images": images, "labels": labels}, processed / f"{split}.pt")
    (processed / "stats.json").write_text('{"mean": 0.1, "std": 0.3}')
    write_params(project, TINY | {"train": TINY["train"] | {"ema_decay": decay}})

    def stop(*args: object, **kwargs: object) -> None:  # the note comes before training
        raise PipelineError("stopped here")
        yield

    monkeypatch.chdir(project)
    monkeypatch.setattr(train, "fit", stop)
    monkeypatch.setattr(process, "stop_with_parent", lambda: None)  # pytest's process
    with pytest.raises(SystemExit):
        process.run(train.main)
    out = capsys.readouterr().out
    # at step 3 the warm-up's rate is 4 / 13 = 0.3077: below 0.5, above 0.2
    expected = "note: train.ema_decay 0.5 is not reached in this run's 4 steps"
    assert (expected in out) == said and ("0.3077 at the last step" in out) == said
    assert ("note: train.ema_decay" in out) == said


def test_with_an_average_it_is_validated_saved_and_resumed(tmp_path: Path) -> None:
    """train.ema_decay: the epoch's validation and the model fit leaves are the average
    (not the last weights), and a run interrupted after an epoch resumes to the same."""
    params = tiny_params(ema_decay=0.9, checkpoint_every=1)
    torch.manual_seed(params.seed)
    net = resnet18(width=4)
    run = tiny_run(params, None)
    state = loop.new_state(net, run, 8)
    assert state.ema is not None and loop.evaluated(state) is state.ema.net
    straight, records = run_fit(params, None)
    last_weights = run_fit(dataclasses.replace(params, ema_decay=0.0), None)[0]
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            straight.state_dict().values(), last_weights.state_dict().values(), strict=True
        )
    )
    data = tiny_data()
    logits = predict_logits(straight, data.val_x, data.mean, data.std, batch_size=64)
    val_acc = (logits.argmax(1) == data.val_y).double().mean().item()
    assert records[-1]["val/acc"] == pytest.approx(val_acc)  # validated: what is kept
    run_fit(params, tmp_path / "ckpt.pt", stop_after=1)
    assert load_torch(tmp_path / "ckpt.pt")["history"][-1]["epoch"] == 1
    resumed, _ = run_fit(params, tmp_path / "ckpt.pt")
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_batchnorm_momentum_is_set_on_every_batchnorm() -> None:
    net = train.build_model(4, bn_momentum=0.02, sync_batchnorm=False)
    momenta = {m.momentum for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.02}


def test_zero_init_residual_starts_each_block_as_the_identity() -> None:
    """Every BasicBlock's last BatchNorm scale at 0, so a block adds nothing to its
    shortcut; every other tensor exactly as drawn without it, and the random state left
    as it leaves it (the same seed's weights, then batches)."""
    torch.manual_seed(5)
    plain = train.build_model(4, bn_momentum=0.1, sync_batchnorm=False)
    drawn_after_plain = torch.get_rng_state()
    torch.manual_seed(5)
    zeroed = train.build_model(4, 0.1, False, zero_init_residual=True)
    assert torch.equal(torch.get_rng_state(), drawn_after_plain)  # the same draws after it
    changed = {
        name
        for name, value in zeroed.state_dict().items()
        if not torch.equal(value, plain.state_dict()[name])
    }
    blocks = [f"layer{i}.{j}" for i in (1, 2, 3, 4) for j in (0, 1)]
    assert changed == {f"{block}.bn2.weight" for block in blocks}
    assert all(not zeroed.get_submodule(block).bn2.weight.any() for block in blocks)
    block = zeroed.layer1[1].eval()  # no downsample: its output is relu(x) exactly
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(block(x), torch.relu(x))


def test_training_learns(tmp_path: Path) -> None:
    """Four epochs on the synthetic digits reach (near) perfect validation accuracy,
    improving epoch by epoch. Without shifts: a digit's class is the row of its bar, and
    neighbouring classes' bars lie 2.3 pixels apart at 32x32, so shifts of up to 2 pixels
    (train.max_shift) make classes ambiguous (this run then stood at 0.06 validation
    accuracy after one epoch and 0.53 after three)."""
    _, records = run_fit(tiny_params(epochs=4, max_shift=0), tmp_path / "ckpt.pt")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    train_loss = [r["train/loss"] for r in records]
    val_acc = [r["val/acc"] for r in records]
    assert all(a > b for a, b in itertools.pairwise(train_loss))
    assert all(b >= a - 0.05 for a, b in itertools.pairwise(val_acc))
    assert val_acc[-1] >= 0.95  # chance is 0.1
    assert records[-1]["val/loss"] < records[0]["val/loss"] / 3
    assert all(r["images_per_s"] > 0 and r["epoch_time_s"] > 0 for r in records)


def test_label_smoothing_is_the_target_training_aims_for(tmp_path: Path) -> None:
    """Cross-entropy against targets smoothed by e is lowest at a softmax of
    1 - e + e/10 on the true class: 0.19 for e = 0.9. So training with it learns the
    digits but never grows confident: its top softmax stayed under 0.21 for train.seed
    0..7 (accuracy 0.72 to 1.0), where the same run unsmoothed averages 0.87."""
    data = tiny_data()
    params = tiny_params(epochs=4, max_shift=0, label_smoothing=0.9)
    net, _ = run_fit(params, tmp_path / "ckpt.pt", data)
    logits = predict_logits(net, data.val_x, data.mean, data.std, batch_size=64)
    confidence, predicted = logits.softmax(1).max(1)
    assert (predicted == data.val_y).double().mean().item() >= 0.5  # learnt: chance is 0.1
    assert confidence.max().item() < 0.3


def test_weight_decay_applies_to_conv_and_linear_weights_only() -> None:
    """One SGD step (no momentum) with every gradient 1: each parameter moves by -lr,
    and conv and linear weights, not BatchNorm weights or any bias, also shrink by
    lr * weight_decay of themselves ("no bias decay")."""
    lr, decay = 0.5, 0.1
    params = tiny_params(lr=lr, weight_decay=decay, momentum=0.0, nesterov=False)
    torch.manual_seed(0)
    net = resnet18(width=4)
    decayed = {
        f"{name}.weight"
        for name, module in net.named_modules()
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear)
    }
    assert "fc.weight" in decayed and "bn1.weight" not in decayed
    for fused in (False, True):
        before = {name: t.detach().clone() for name, t in net.named_parameters()}
        optimizer = optim.make_optimizer(net, params, fused)
        for t in net.parameters():
            t.grad = torch.ones_like(t)
        optimizer.step()
        for name, t in net.named_parameters():
            shrink = 1 - lr * decay if name in decayed else 1.0
            torch.testing.assert_close(t.detach(), before[name] * shrink - lr, msg=name)


def test_sgd_steps_with_nesterov_momentum() -> None:
    """Two steps with every gradient 1: Nesterov momentum m moves each parameter by
    lr * (1 + m), then lr * (1 + m + m^2); heavy-ball momentum would move it by lr, then
    lr * (1 + m)."""
    lr, m = 0.5, 0.9
    params = tiny_params(lr=lr, momentum=m, nesterov=True, weight_decay=0.0)
    net = resnet18(width=4)
    before = [t.detach().clone() for t in net.parameters()]
    optimizer = optim.make_optimizer(net, params, fused=False)
    for _ in range(2):
        for t in net.parameters():
            t.grad = torch.ones_like(t)
        optimizer.step()
    for old, new in zip(before, net.parameters(), strict=True):
        torch.testing.assert_close(new.detach(), old - lr * ((1 + m) + (1 + m + m * m)))


def test_batch_larger_than_the_data_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="train.batch_size = 512 .* at most the 256"):
        run_fit(tiny_params(batch_size=512), tmp_path / "ckpt.pt")


def test_non_finite_loss_stops_naming_epoch_and_step(tmp_path: Path) -> None:
    data = dataclasses.replace(tiny_data(), std=0.0)  # normalising divides by zero
    with pytest.raises(PipelineError, match=r"loss became nan at epoch 1, step 1 of 8"):
        run_fit(tiny_params(), tmp_path / "ckpt.pt", data)
    assert not (tmp_path / "ckpt.pt").exists()


def test_checkpoint_is_complete_and_loads_weights_only(tmp_path: Path) -> None:
    run_fit(tiny_params(ema_decay=0, checkpoint_every=1), tmp_path / "ckpt.pt", stop_after=1)
    state = load_torch(tmp_path / "ckpt.pt")  # weights_only=True
    assert set(state) == {
        "run_id",
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "history",
        "in_progress",
        "ema",
    }
    assert set(state["rng"]) >= {"torch", "data", "python"}
    assert [r["epoch"] for r in state["history"]] == [1] and state["in_progress"] is None
    assert state["ema"] is None  # train.ema_decay 0: no average kept
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temp left


def interrupted_at(monkeypatch: pytest.MonkeyPatch, epoch: int, step: int) -> None:
    """Make the next run save its checkpoint once, with `step` steps of `epoch` done,
    and stop there as Ctrl-C stops it (checkpoints due at every step, none written
    before: each would cost a write)."""
    real_save = Checkpoint.save

    def save(self: Checkpoint, state: object) -> None:
        partial = state.in_progress
        if partial and (partial.epoch, partial.step) == (epoch, step):
            real_save(self, state)
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save)


def without_timings(records: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s")} for r in records
    ]


@pytest.mark.parametrize("where", ["after epoch 1", "inside epoch 2"])
def test_resume_after_interruption_gives_identical_weights_and_figures(
    tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """An interrupted run, resumed, ends with the weights and per-epoch figures of one
    never interrupted: stopped after an epoch's checkpoint, or inside an epoch at step
    3 of 8 (checkpoint_minutes tiny: due at every step). Resumed with the default
    checkpoint_minutes: a scheduling param, so the same run."""
    params = tiny_params(checkpoint_every=1)
    straight, straight_records = run_fit(params, None)
    checkpoint = tmp_path / "ckpt.pt"
    if where == "after epoch 1":
        run_fit(params, checkpoint, stop_after=1)
        expected = f"resuming from {checkpoint} at epoch 2/3, step 0/8"
    else:
        with monkeypatch.context() as patch:
            interrupted_at(patch, epoch=2, step=3)
            with pytest.raises(KeyboardInterrupt):
                run_fit(dataclasses.replace(params, checkpoint_minutes=1e-9), checkpoint)
        assert load_torch(checkpoint)["in_progress"]["step"] == 3
        expected = f"resuming from {checkpoint} at epoch 2/3, step 3/8"
    capsys.readouterr()
    resumed, resumed_records = run_fit(params, checkpoint)  # the same run: other minutes
    assert expected in capsys.readouterr().out.splitlines()
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert without_timings(resumed_records) == without_timings(straight_records)


def test_a_run_without_a_checkpoint_says_it_starts_from_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_fit(tiny_params(epochs=1), tmp_path / "ckpt.pt")
    assert "training from the start: 1 epochs of 8 steps" in capsys.readouterr().out


def test_checkpoint_of_another_run_is_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_fit(tiny_params(checkpoint_every=1), tmp_path / "ckpt.pt", stop_after=1)
    torch.manual_seed(0)
    another = tiny_run(tiny_params(), tmp_path / "ckpt.pt", run_id="run-b")
    records = list(loop.fit(resnet18(width=4), tiny_data(), another))
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert "belongs to another run" in capsys.readouterr().out


def test_lr_logged_per_epoch_is_the_mean_of_its_steps(tmp_path: Path) -> None:
    """Cosine decay without warm-up over 2 epochs of 8 steps: step s runs at
    lr * (1 + cos(pi * s / 16)) / 2, and each epoch logs the mean of its steps."""
    p = tiny_params(epochs=2, warmup_epochs=0, schedule="cosine")
    _, records = run_fit(p, tmp_path / "c.pt")
    per_step = [0.05 * 0.5 * (1 + math.cos(math.pi * s / 16)) for s in range(16)]
    assert records[0]["lr"] == pytest.approx(sum(per_step[:8]) / 8)
    assert records[1]["lr"] == pytest.approx(sum(per_step[8:]) / 8)


def test_ctrl_c_while_dvclive_queues_a_step_does_not_hang_its_end(
    tmp_path: Path, interrupt_handlers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live.next_step() puts each step on a queue that Live.end() joins (a DVCLive
    internal: treeverse/dvclive#827). Ctrl-C between that put and its notify once left
    an item no worker thread takes, and the stage hung on exit."""
    from dvclive import Live

    names = ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_time_s")
    record = {"epoch": 1, "images_per_s": 100.0} | dict.fromkeys(names, 0.5) | {"val/acc": 0.9}
    with Live(dir=str(tmp_path), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        train.log_epoch(live, record, epochs=2)
        steps = live._studio_queue
        wait_until(lambda: steps.unfinished_tasks == 0)
        time.sleep(0.1)  # the worker is waiting for the next item

        def put_interrupted(item: object, block: bool = True, timeout: object = None) -> None:
            monkeypatch.undo()  # once only: Live.end() must not meet it whatever happens
            with steps.not_full:  # Queue.put, with the signal before its notify
                steps._put(item)
                steps.unfinished_tasks += 1
                signal.raise_signal(signal.SIGINT)
                steps.not_empty.notify()

        monkeypatch.setattr(steps, "put", put_interrupted)
        with pytest.raises(KeyboardInterrupt):
            train.log_epoch(live, record | {"epoch": 2}, epochs=2)
        wait_until(lambda: steps.unfinished_tasks == 0)
        lost = steps.unfinished_tasks
        steps.unfinished_tasks = 0  # so that leaving `with` cannot hang this test
        assert lost == 0, "a step no worker takes: Live.end() would wait forever"
        assert live.step == 3  # epoch 2 was logged whole before the interrupt
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["step"] == 2 and summary["val"]["acc"] == 0.9


def checkpoints_written(
    params: train.TrainParams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: Data
) -> list[tuple[float, str]]:
    """(clock, where) of each checkpoint a run writes, under a clock that moves 10 s at
    each training step and stands still otherwise: `where` is "epoch E step S" inside an
    epoch (S steps done), "end E" at the end of epoch E."""
    now = [0.0]
    step_done = loop.Progress.update

    def step_of_10_s(self: loop.Progress) -> None:
        now[0] += 10
        step_done(self)

    def save(self: Checkpoint, state: TrainingState) -> None:
        part = state.in_progress
        where = f"epoch {part.epoch} step {part.step}" if part else f"end {len(state.history)}"
        written.append((now[0], where))

    written: list[tuple[float, str]] = []
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(loop.Progress, "update", step_of_10_s)
    monkeypatch.setattr(Checkpoint, "save", save)
    run_fit(params, tmp_path / "ckpt.pt", data)
    return written


def test_checkpoints_inside_epochs_come_every_interval_across_epoch_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """checkpoint_minutes counts from the last checkpoint written, not from the epoch's
    start: epochs of 8 steps (80 s), none by count (checkpoint_every 0), one every 90 s:
    after step 9 of the run, then step 18, inside epochs 2 and 3 (at their ends the
    interval has not passed)."""
    params = tiny_params(checkpoint_every=0, checkpoint_minutes=1.5)
    written = checkpoints_written(params, tmp_path, monkeypatch, tiny_data())
    assert written == [(90.0, "epoch 2 step 1"), (180.0, "epoch 3 step 2")]


def test_checkpoints_at_epoch_ends_come_every_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Epochs of one step (10 s) leave no room inside one: the checkpoints come at epoch
    ends once 30 s have passed since the last, after epochs 3 and 6, not after every
    epoch (as several processes have them, and as a GPU run would, its epochs taking
    seconds), and never after the last one (8: the model is written then)."""
    params = tiny_params(epochs=8, checkpoint_every=0, checkpoint_minutes=0.5)
    written = checkpoints_written(params, tmp_path, monkeypatch, tiny_data(n_train=32))
    assert written == [(30.0, "end 3"), (60.0, "end 6")]


def test_a_run_shorter_than_the_interval_writes_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defaults (checkpoint_every 0, checkpoint_minutes 10): a run of seconds, as
    every run is on a GPU, spends nothing on checkpoints, at epoch ends or inside."""
    written: list[Checkpoint] = []
    monkeypatch.setattr(Checkpoint, "save", lambda self, state: written.append(self))
    params = tiny_params()
    assert (params.checkpoint_every, params.checkpoint_minutes) == (0, 10)
    _, records = run_fit(params, tmp_path / "ckpt.pt")
    assert len(records) == 3 and written == []


@pytest.mark.parametrize(
    ("every", "minutes", "epoch", "since_s", "rank", "due"),
    [
        (0, 10, 1, 599.0, 0, False),  # not yet
        (0, 10, 1, 600.0, 0, True),  # the interval has passed
        (0, 10, 3, 900.0, 0, False),  # the last epoch: the model is written instead
        (0, 10, 1, 900.0, 1, False),  # only the main process writes
        (0, 0, 1, 9e9, 0, False),  # neither rule
        (2, 0, 2, 0.0, 0, True),  # every 2 epochs
        (2, 0, 1, 0.0, 0, False),
    ],
)
def test_when_a_checkpoint_is_due_at_an_epoch_end(
    tmp_path: Path, every: int, minutes: float, epoch: int, since_s: float, rank: int, due: bool
) -> None:
    params = tiny_params(checkpoint_every=every, checkpoint_minutes=minutes)  # 3 epochs
    world = loop.World(rank=rank, size=2, local_rank=rank, local_size=2)
    run = dataclasses.replace(tiny_run(params, tmp_path / "c.pt"), world=world)
    assert loop.due_at_epoch_end(run, epoch, since_s) is due
    keeps_none = dataclasses.replace(run, checkpoint=None)  # as bench's runs
    assert loop.due_at_epoch_end(keeps_none, epoch, since_s) is False


def test_a_checkpoint_from_one_process_resumed_by_two_counts_each_figure_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On GPUs with SyncBatchNorm a run checkpointed inside an epoch by one process may be
    resumed by several (the same run). Each is handed the main process's checkpoint:
    the losses so far stay on every process (they are averaged over the processes at
    the epoch's end), the correct counts only on the main one (they are summed)."""
    params = tiny_params()
    with monkeypatch.context() as patch:
        interrupted_at(patch, epoch=2, step=3)
        with pytest.raises(KeyboardInterrupt):
            run_fit(dataclasses.replace(params, checkpoint_minutes=1e-9), tmp_path / "c.pt")
    saved = Checkpoint(tmp_path / "c.pt", "run-a").read()
    # each process unpickles its own copy of what the main process broadcasts
    monkeypatch.setattr(loop.distributed, "from_main", lambda obj: copy.deepcopy(saved))
    second = loop.World(rank=1, size=2, local_rank=1, local_size=2)
    run = dataclasses.replace(tiny_run(params, tmp_path / "c.pt"), world=second)
    torch.manual_seed(0)
    state = loop.new_state(resnet18(width=4), run, 8)
    loop.resume(state, run, 8)
    partial = state.in_progress
    assert (partial.epoch, partial.step) == (2, 3)
    assert torch.equal(partial.losses, saved["in_progress"]["losses"])
    assert partial.correct.sum() == 0 and saved["in_progress"]["correct"].sum() > 0

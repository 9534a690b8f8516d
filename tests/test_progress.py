"""Training progress where no terminal shows a bar: a line with speed and ETA."""

from __future__ import annotations

import pytest

import train


def test_without_a_terminal_progress_is_a_line_with_speed_and_eta(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(train, "PROGRESS_EVERY_S", 0.0)  # a line at every step
    progress = train.Progress(total=10, done=4, images_per_step=100)  # resumed after 4
    progress.set_epoch("epoch 3/5")
    progress.update()
    progress.update()
    progress.close()
    lines = capsys.readouterr().out.splitlines()  # captured: not a terminal
    assert len(lines) == 2
    assert lines[0].startswith("epoch 3/5: step 5/10 of the run, ")
    assert lines[1].startswith("epoch 3/5: step 6/10 of the run, ")
    assert " img/s, ETA " in lines[1]


def test_no_line_before_the_interval(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(train, "PROGRESS_EVERY_S", 3600.0)
    progress = train.Progress(total=10, done=0, images_per_step=100)
    for _ in range(10):
        progress.update()
    progress.close()
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0 min 00 s"), (59.6, "1 min 00 s"), (3725, "1 h 02 min")]
)
def test_durations_read_as_minutes_or_hours(seconds: float, shown: str) -> None:
    assert train.format_duration(seconds) == shown

"""What a run shows while it trains: on a terminal a bar over the run's steps with the
epoch beside it and lines printed cleanly above it; elsewhere a line with speed and ETA
every interval; once the first steps are timed, how long the run will take."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
from conftest import ROOT

from pipeline import process
from pipeline import progress as progress_module
from pipeline.progress import Progress, format_duration


def test_without_a_terminal_progress_is_a_line_with_speed_and_eta(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 0.0)  # a line at every step
    monkeypatch.setattr(progress_module, "ESTIMATE_AFTER_S", 3600.0)  # no estimate here
    with Progress(total=10, done=4, images_per_step=100) as progress:  # resumed after 4
        progress.set_epoch("epoch 3/5")
        for _ in range(3):
            progress.update()
    lines = capsys.readouterr().out.splitlines()  # captured: not a terminal
    # the first step only starts the clock (it warms up: allocation, autotuning)
    assert [line.split(",")[0] for line in lines] == [
        "epoch 3/5: step 6/10 of the run",
        "epoch 3/5: step 7/10 of the run",
    ]
    assert re.search(r" \d+ img/s, ETA 0 min 0\d s$", lines[1])


def test_no_line_before_the_interval(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 3600.0)
    monkeypatch.setattr(progress_module, "ESTIMATE_AFTER_S", 3600.0)
    with Progress(total=10, done=0, images_per_step=100) as progress:
        for _ in range(10):
            progress.update()
    assert capsys.readouterr().out == ""


def test_the_run_length_is_estimated_once_from_the_first_timed_steps(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 3600.0)
    monkeypatch.setattr(progress_module, "ESTIMATE_AFTER_S", 0.0)
    clock = iter(range(0, 1000, 2))  # every step takes 2 s
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: float(next(clock)))
    with Progress(total=7205, done=5, images_per_step=512) as progress:
        for _ in range(20):
            progress.update()
    [line] = capsys.readouterr().out.splitlines()
    # after step 6 starts the clock, 5 timed steps of 2 s: 7,194 steps left at 0.5 steps/s
    assert line == (
        "7194 training steps to go: about 3 h 59 min on this machine, at 256 images/s so far"
    )


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0 min 00 s"), (59.6, "1 min 00 s"), (3725, "1 h 02 min")]
)
def test_durations_read_as_minutes_or_hours(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


ON_A_TERMINAL = """
import sys, time
sys.path.insert(0, "src")
from pipeline.progress import Progress, say
with Progress(total=4, done=0, images_per_step=8) as progress:
    progress.set_epoch("epoch 1/2")
    for step in range(4):
        progress.update()
        time.sleep(0.15)
        if step == 1:
            say("epoch 1/2: train loss 0.5")
print("interrupted", file=sys.stderr)
"""


def test_on_a_terminal_lines_appear_above_the_bar_never_on_its_line() -> None:
    """The bar (stderr) and the lines (stdout) share the terminal: a line printed while
    the bar shows starts on a line of its own, as does `interrupted` after the bar."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    child = subprocess.Popen(
        [sys.executable, "-c", ON_A_TERMINAL],
        cwd=ROOT,
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    output = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    child.wait(timeout=30)
    os.close(leader)
    text = output.decode(errors="replace")
    assert "training steps:" in text and "epoch 1/2" in text  # what the bar counts, and where
    for line in ("epoch 1/2: train loss 0.5", "interrupted"):
        start = text.index(line)
        assert text[start - 1] in "\r\n", repr(text[max(0, start - 40) : start + len(line)])


def test_a_stop_signal_while_a_line_is_written_waits_for_the_write(
    interrupt_handlers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM inside tqdm.write would break tqdm's lock (RuntimeError, not the
    stage's interrupted message): say() lets the write finish, then raises it."""
    written = []

    def write(line: str) -> None:
        signal.raise_signal(signal.SIGTERM)
        written.append(line)

    process.install_interrupt_handlers()
    monkeypatch.setattr(progress_module.tqdm, "write", write)
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        progress_module.say("epoch 1/2: ...")
    assert written == ["epoch 1/2: ..."]

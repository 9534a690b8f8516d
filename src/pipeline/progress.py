"""What a training run shows while it runs: a bar over the run's steps on a
terminal, a line with speed and time left every PROGRESS_EVERY_S elsewhere (a log,
CI, `dvc queue logs`, where a bar would stay silent), and once the first steps are
timed, how long the rest of the run will take on this machine. Lines printed through
say() appear cleanly above the bar, never on its line.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from tqdm import tqdm

from pipeline.process import interrupts_deferred

PROGRESS_EVERY_S = 60.0  # seconds between progress lines where no bar is shown
ESTIMATE_AFTER_S = 20.0  # seconds of timed steps before the run's length is estimated
ESTIMATE_AFTER_STEPS = 5


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def say(line: str) -> None:
    """Print a line on stdout above any progress bar (which is on stderr). Whole: a
    stop signal raised inside tqdm.write would leave its lock half-taken, and the stage
    would die of tqdm's RuntimeError instead of saying it was interrupted."""
    with interrupts_deferred():
        tqdm.write(line)
        sys.stdout.flush()


class Progress:
    """Progress over the `total` steps of a run of which `done` are done (a resumed
    run), with `images_per_step` images each; silent where `shown` is False (the
    processes other than the main one)."""

    def __init__(self, total: int, done: int, images_per_step: int, shown: bool = True) -> None:
        self.bar = tqdm(
            total=total,
            initial=done,
            desc="training steps",
            unit="step",
            disable=None if shown else True,  # None: shown on a terminal only
            dynamic_ncols=True,
        )
        self.shown = shown
        self.total, self.done = total, done
        self.images_per_step = images_per_step
        self.label = ""
        self.timed_from: tuple[int, float] | None = None  # (steps, time) after the first step
        self.estimated = False
        self.last_line = time.perf_counter()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.bar.close()  # on a terminal the bar's line is ended: what follows starts anew

    def set_epoch(self, label: str) -> None:
        self.label = label
        self.bar.set_postfix_str(label)

    def update(self) -> None:
        self.bar.update()
        self.done += 1
        now = time.perf_counter()
        if self.timed_from is None:  # the first step warms up (allocation, autotuning)
            self.timed_from = (self.done, now)
            return
        steps, since = self.done - self.timed_from[0], now - self.timed_from[1]
        if not self.shown or steps == 0:
            return
        steps_per_s = steps / since
        if not self.estimated and since >= ESTIMATE_AFTER_S and steps >= ESTIMATE_AFTER_STEPS:
            self.estimated = True
            say(
                f"{self.total - self.done} training steps to go: about "
                f"{format_duration((self.total - self.done) / steps_per_s)} on this machine, "
                f"at {steps_per_s * self.images_per_step:.0f} images/s so far"
            )
        if self.bar.disable and now - self.last_line >= PROGRESS_EVERY_S:
            self.last_line = now
            say(
                f"{self.label}: step {self.done}/{self.total} of the run, "
                f"{steps_per_s * self.images_per_step:.0f} img/s, "
                f"ETA {format_duration((self.total - self.done) / steps_per_s)}"
            )

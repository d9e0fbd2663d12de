"""A wall-clock budget for training: how many epochs fit, decided from measured times alone.

Pure arithmetic on the numbers it is given (no clock of its own), so it is unit-tested
without training anything.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class TimeBudget:
    seconds: float  # the whole run's budget, set-up included
    max_epochs: int  # never more than this, however much time is left
    epoch_seconds: list[float] = field(default_factory=list)  # measured whole epochs, validation included
    held: bool = False  # the last refit kept a shorter length than fits (the late-growth rule)
    cap_note: str | None = None  # why max_epochs is what it is, when the recipe chose it

    @staticmethod
    def epoch_guess(step_seconds: float, steps_per_epoch: int, val_share: float) -> float:
        """Seconds per epoch from the first few training steps. Validation is guessed at 35% of
        a training pass over as many images (``val_share`` = val images / train images)."""
        return step_seconds * steps_per_epoch * (1 + 0.35 * val_share)

    def first_estimate(self, step_seconds: float, steps_per_epoch: int, val_share: float, elapsed: float) -> int:
        """Epochs that fit, from the first few training steps (``epoch_guess``)."""
        per_epoch = self.epoch_guess(step_seconds, steps_per_epoch, val_share)
        return max(1, min(self.max_epochs, int((self.seconds - elapsed) / max(per_epoch, 1e-9))))

    def after_epoch(self, epoch_seconds: float, done: int, planned: int, elapsed: float) -> int:
        """The run's new length after an epoch ended. Measured epochs replace the first estimate,
        which runs long because the first steps are slow: the median of the later half of them
        (at least ``RECENT``), so one slow epoch does not decide, the length does not wobble with
        each epoch's time, and a machine whose speed changes for good is followed.
        In the first half of the run the length may grow or shrink. After that it may shrink, so
        a machine that slows down does not overrun the budget, and grow only when at least
        ``LATE_GROWTH`` more fit (``held`` says it did not grow): a run whose start was slowed
        (by another job, say) still spends its budget, while the ordinary wobble of epoch times
        does not stretch the learning-rate schedule late in the run."""
        self.epoch_seconds.append(epoch_seconds)
        fits = min(self.max_epochs, done + int(max(0.0, self.seconds - elapsed) / max(self.per_epoch(), 1e-9)))
        self.held = done >= planned / 2 and planned < fits < planned * (1 + self.LATE_GROWTH)
        return planned if self.held else max(done, fits)

    RECENT = 5  # the fewest epochs whose median time is taken for the run's speed
    LATE_GROWTH = 0.2  # after half the run, grow only when this much longer a run fits

    def per_epoch(self) -> float:
        """Seconds per epoch as the run's length is fitted: the median of the later half of the
        measured epochs, at least the last ``RECENT`` (0 before any)."""
        recent = self.epoch_seconds[-max(self.RECENT, len(self.epoch_seconds) // 2) :]
        return statistics.median(recent) if recent else 0.0

    def unspent(self, elapsed: float) -> bool:
        """Whether a run that ended after ``elapsed`` seconds left more than 10% of the budget and
        time for at least one more epoch."""
        left = self.seconds - elapsed
        return left > 0.1 * self.seconds and left >= self.per_epoch()

    @staticmethod
    def worth_saying(epochs: int, said: int | None) -> bool:
        """Whether a new length is news: the first one, or one at least 10% (and 2 epochs) away
        from the last one said. The length is refitted after every epoch and moves by an epoch
        or two as the measured times settle; saying each of those drowns the log."""
        return said is None or abs(epochs - said) >= max(2, 0.1 * said)

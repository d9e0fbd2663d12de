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
        """The run's new length after an epoch ended. Measured epochs (their median, so one slow
        epoch does not decide) replace the first estimate, which runs long because the first
        steps are slow. In the first half of the run the length may grow or shrink; after that
        it may only shrink, so a machine that slows down does not overrun the budget."""
        self.epoch_seconds.append(epoch_seconds)
        per_epoch = statistics.median(self.epoch_seconds)
        fits = done + int(max(0.0, self.seconds - elapsed) / max(per_epoch, 1e-9))
        epochs = min(self.max_epochs, fits) if done < planned / 2 else min(planned, fits)
        return max(done, epochs)

    @staticmethod
    def worth_saying(epochs: int, said: int | None) -> bool:
        """Whether a new length is news: the first one, or one at least 10% (and 2 epochs) away
        from the last one said. The length is refitted after every epoch and moves by an epoch
        or two as the measured times settle; saying each of those drowns the log."""
        return said is None or abs(epochs - said) >= max(2, 0.1 * said)

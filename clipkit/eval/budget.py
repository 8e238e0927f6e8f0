"""The eval budget of a training run: each eval's time split per set, and one warning when evals
take more than `eval.budget_share` of the training time.

`EvalSuite.run` measures, per set, decode (reading, decoding and preprocessing the set),
image tower, text tower (the zero-shot head included) and search and ranks; `EvalBudget.record`
turns them into logged metrics (`eval_time/<set>/<part>_s`) and an INFO line, and compares the
evals' running total with the training time between them.
"""

from __future__ import annotations

import logging
import time

from clipkit.errors import ClipkitConfigError
from clipkit.eval.suite import TIME_PART_NAMES, TIME_PARTS

log = logging.getLogger("clipkit.eval")


class EvalBudget:
    """Tracks eval time against training time; `record` after each eval."""

    def __init__(self, share: float, clock=time.monotonic):
        if not share > 0:
            raise ClipkitConfigError(f"eval.budget_share must be > 0, got {share}")
        self.share = share
        self.clock = clock
        self.started: float | None = None   # when training started in this process
        self.eval_seconds = 0.0
        self.warned = False

    def start_training(self) -> None:
        self.started = self.clock()

    def record(self, step: int, timings: dict[str, dict[str, float]], seconds: float, *,
               in_training: bool = True) -> dict[str, float]:
        """Logs one eval's split; returns its metrics. Warns once when the evals so far exceed
        `share` of the training time so far (only for evals during training: a run's final eval
        after a few steps says nothing about its cadence).

        Args:
            timings: {set: {part: seconds}} (`EvalSuite.last_timings`).
            seconds: the eval's wall time (all sets, with what the parts do not cover).
        """
        metrics = {f"eval_time/{name}/{part}_s": round(parts.get(part, 0.0), 4)
                   for name, parts in timings.items() for part in TIME_PARTS}
        metrics["eval_time/total_s"] = round(seconds, 4)
        split = "; ".join(f"{name} " + ", ".join(f"{TIME_PART_NAMES[p]} {parts.get(p, 0.0):.2f}" for p in TIME_PARTS)
                          for name, parts in timings.items())
        log.info("eval at step %d took %.2f s (%s)", step, seconds, split or "no sets")
        if self.started is None or not in_training:
            return metrics
        self.eval_seconds += seconds
        training = self.clock() - self.started - self.eval_seconds
        if not self.warned and training > 0 and self.eval_seconds > self.share * training and timings:
            self.warned = True
            name, part = max(((n, p) for n, parts in timings.items() for p in TIME_PARTS),
                             key=lambda np_: timings[np_[0]].get(np_[1], 0.0))
            log.warning("evals so far took %.1f s, %.0f%% of the %.1f s of training (eval.budget_share=%g); the "
                        "slowest part is %s of set %s (%.2f s in the eval at step %d). Evaluate less often "
                        "(eval.every_n_steps), on fewer sets, or raise eval.budget_share to silence this",
                        self.eval_seconds, 100 * self.eval_seconds / training, training, self.share,
                        TIME_PART_NAMES[part], name, timings[name].get(part, 0.0), step)
        return metrics

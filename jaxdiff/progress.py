"""Progress lines of long stages: which stage runs, the time so far and what is left.

`Stages` is the one formatter of the post-training stages (held-out analysis, the analysis, the
study; absl INFO, in the style of the final scoring's lines), silent with `enabled=False`:

    heldout: c_scores done in 0.4 s (0.6 s elapsed); left: memorisation, oos_probs
    analysis: reliability 12/40 (3.1 s in the stage); about ~7 s left in it

The final scoring's lines (recording.py) have the same form ("final scoring of ...", "final
scoring: point done in ...", "final scoring: prediction_depth layer 1/3 probed ...").
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

from absl import logging


class Stages:
  """Wall time of consecutive named stages, logged as each one ends (with `enabled`).

  Attributes:
    times: stage -> seconds (recorded whether or not the lines are logged).
    planned: the stages announced, in order; those not yet done are listed as what is left.
  """

  def __init__(self, task: str, planned: Sequence[str] = (), enabled: bool = True,
               min_interval: float = 5.0):
    """Args:
      task: what the lines start with ("analysis", "heldout", "study").
      planned: the stages to come, in order.
      enabled: log the lines (False: only record `times`).
      min_interval: seconds between two `step` lines of one stage (its last step always logs).
    """
    self.task, self.planned, self.enabled = task, list(planned), enabled
    self.min_interval = min_interval
    self.times = {}
    self.t = self.start = self._last_step = time.perf_counter()
    self._lock = threading.Lock()  # `step` may be called from worker threads

  def _log(self, fmt: str, *args) -> None:
    if self.enabled:
      logging.info("%s: " + fmt, self.task, *args)

  def plan(self, what: str) -> None:
    """Logs `<task> of <what>: <planned stages>` (the first line)."""
    if self.enabled:
      logging.info("%s of %s: %s", self.task, what, ", ".join(self.planned) or "nothing")

  def begin(self) -> None:
    """The next stage starts now (what ran since the last one ended counts in no stage)."""
    self.t = self._last_step = time.perf_counter()

  def done(self, name: str) -> float:
    """Ends stage `name` (timed from the previous stage's end); returns its seconds."""
    now = time.perf_counter()
    self.times[name] = round(now - self.t, 4)
    self.t = self._last_step = now
    left = [s for s in self.planned if s not in self.times]
    self._log("%s done in %.1f s (%.1f s elapsed); left: %s", name, self.times[name],
              now - self.start, ", ".join(left) or "nothing")
    return self.times[name]

  def step(self, name: str, done: int, total: int, *, part: str = "", verb: str = "",
           upper_bound: bool = False) -> None:
    """Within stage `name`: `done` of `total` equal parts finished; logs the time in the stage
    and what is left at this pace (at most every `min_interval` seconds, and at the last part).

    `part`/`verb` name the parts ("layer", "probed": "prediction_depth layer 2/3 probed");
    `upper_bound`: later parts are cheaper (e.g. prediction depth's lower layers)."""
    what = " ".join(x for x in (name, part, f"{done}/{total}", verb) if x)
    self.fraction(what, done / total if total else 1.0, upper_bound=upper_bound)

  def fraction(self, what: str, done: float, *, upper_bound: bool = False,
               min_interval: float | None = None) -> None:
    """Within the current stage: a fraction `done` in [0, 1] of it finished (`what` names the
    point reached); logs `what`, the time in the stage and what is left at this pace, at most
    every `min_interval` seconds (default: the instance's) unless `done` is 1."""
    with self._lock:
      now = time.perf_counter()
      interval = self.min_interval if min_interval is None else min_interval
      if done < 1.0 and now - self._last_step < interval:
        return
      self._last_step = now
      spent = now - self.t
      if done <= 0.0:  # nothing to extrapolate from yet
        self._log("%s (%.1f s in the stage)", what, spent)
        return
      self._log("%s (%.1f s in the stage); %s ~%.0f s left in it", what, spent,
                "at most" if upper_bound else "about", spent / done * (1.0 - done))

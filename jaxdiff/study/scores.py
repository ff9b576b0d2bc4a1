"""Which scores the study analyses: those every architecture recorded and the statistics can use,
and the primary score of the figures, sensitivity, fingerprint and pruning."""

from __future__ import annotations

from typing import Mapping, Sequence

from jaxdiff import store
from jaxdiff.analysis import report as analysis_report
from jaxdiff.study.config import StudyError

# Score used for figures, sensitivity, fingerprint and pruning when the config names none: the first
# of these that the runs recorded. EL2N is the pruning score of Paul et al. (2021); AUM, the mean
# training loss and the final loss are the fallbacks as the recorded set grows or shrinks.
PRIMARY_PREFERENCE = ("el2n", "aum", "mean_loss", "loss")
# Files in a score folder that are bookkeeping, not difficulty scores.
NOT_SCORES = analysis_report.NOT_SCORES


def usable_scores(sets: Mapping[str, store.ScoreSet],
                  requested: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
  """Scores that every architecture recorded and that the statistics can use.

  Dropped (with the reason): bookkeeping files (`NOT_SCORES`), scores missing in an architecture,
  scores with non-finite values in a valid run (e.g. the `*_inf` variants), and scores whose
  run-averaged value is constant over examples in some architecture (no ranking to measure).

  Args:
    sets: arch -> ScoreSet.
    requested: restrict to these names (each must be recorded by every architecture).

  Returns:
    (kept names in sorted order, {dropped name: reason}).
  """
  all_names = sorted(set().union(*(s.scores for s in sets.values())))
  if requested:
    missing = {n: [a for a, s in sets.items() if n not in s.scores] for n in requested}
    missing = {n: a for n, a in missing.items() if a}
    if missing:
      raise StudyError(f"requested scores are not recorded by every architecture: {missing}; "
                       f"recorded: {all_names}")
    all_names = sorted(requested)
  dropped = {n: f"not recorded by {[a for a, s in sets.items() if n not in s.scores]}"
             for n in all_names if any(n not in s.scores for s in sets.values())}
  dropped.update(analysis_report.score_problems(sets, [n for n in all_names if n not in dropped]))
  kept = [n for n in all_names if n not in dropped]
  if not kept:
    raise StudyError(f"no usable score: {dropped}")
  return kept, dropped


def choose_score(names: Sequence[str], requested: str = "",
                 preference: Sequence[str] = PRIMARY_PREFERENCE) -> str:
  """`requested` if given (must be in `names`), else the first of `preference` in `names`, else
  the first name in sorted order."""
  if requested:
    if requested not in names:
      raise StudyError(f"score {requested!r} is not usable here; valid choices: {sorted(names)}")
    return requested
  for p in preference:
    if p in names:
      return p
  return sorted(names)[0]

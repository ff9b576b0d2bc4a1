"""AUROC of a difficulty score for finding defective (e.g. label-flipped) examples.

Mann-Whitney statistic from average ranks, so tied scores count one half.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats


def auroc(score: Any, is_noisy: Any) -> float | np.ndarray:
  """P(score of a noisy example > score of a clean one) + 0.5 P(tie).

  Computed as (sum of the noisy examples' average ranks - n1 (n1 + 1) / 2) / (n1 n0), the
  Mann-Whitney U statistic divided by n1 n0; +inf scores are ranked like any value (highest).

  Args:
    score: `[N]` or `[..., N]` (one AUROC per leading index), higher = more suspicious.
    is_noisy: bool `[N]`.

  Returns:
    float (1-D score) or float64 array `[...]`.
  """
  s = np.asarray(score, np.float64)
  noisy = np.asarray(is_noisy)
  if noisy.ndim != 1 or s.ndim < 1 or s.shape[-1] != noisy.shape[0]:
    raise ValueError(f"need score [..., N] and is_noisy [N]; got {s.shape} and {noisy.shape}")
  if noisy.dtype != bool:
    if not np.isin(noisy, (0, 1)).all():
      raise ValueError(f"is_noisy must be boolean (or 0/1), got values {np.unique(noisy)[:5]}")
    noisy = noisy.astype(bool)
  n1 = int(noisy.sum())
  n0 = noisy.size - n1
  if n1 == 0 or n0 == 0:
    raise ValueError(f"AUROC needs both noisy and clean examples; got {n1} noisy, {n0} clean")
  if np.isnan(s).any():
    raise ValueError(f"score has {int(np.isnan(s).sum())} NaN values; AUROC is undefined")
  ranks = stats.rankdata(s, axis=-1)  # average ranks for ties
  result = (ranks[..., noisy].sum(-1) - n1 * (n1 + 1) / 2.0) / (n1 * n0)
  return float(result) if s.ndim == 1 else result


def auroc_table(scores: dict, is_noisy: Any) -> list[dict]:
  """AUROC of each score for finding the flipped labels, single runs and the run average.

  Args:
    scores: name -> `[R, N]` (higher = harder, NaN rows = diverged members, dropped).
    is_noisy: bool `[N]`.

  Returns:
    rows sorted by run-average AUROC: {"score", "auroc_mean_score" (AUROC of the score averaged
    over runs), "auroc_single_mean", "auroc_single_std" (over single runs), "runs"}.
  """
  rows = []
  for name, s in scores.items():
    s = np.asarray(s, np.float64)
    s = s[~np.isnan(s).any(axis=1)]
    if s.shape[0] == 0 or np.all(s == s[:, :1]):
      continue  # constant score (e.g. no forgetting at all): uninformative
    single = auroc(s, is_noisy)
    rows.append({"score": name, "auroc_mean_score": auroc(s.mean(0), is_noisy),
                 "auroc_single_mean": float(np.mean(single)),
                 "auroc_single_std": float(np.std(single)), "runs": int(s.shape[0])})
  return sorted(rows, key=lambda r: -r["auroc_mean_score"])

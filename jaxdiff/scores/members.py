"""Scores across the members of an ensemble: dichotomous difficulty and member disagreement.

Inputs are every member's predictive distribution `[R, N, C]`; outputs are one value per example.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import special


def ensemble_scores(probs: Any, labels: Any, member_mask: Any = None) -> dict[str, np.ndarray]:
  """Per-example scores of an ensemble's predictions, each higher = harder.

    dichotomous_difficulty: +1 if every member is wrong ("impossible"), -1 if every member
                    classifies the example correctly ("trivial"), 0 if mixed: the dichotomous data
                    difficulty of Meding et al. 2022 ("Trivial or Impossible -- dichotomous data
                    difficulty masks model differences"), signed so that higher is harder.
                    Correct = argmax_c p_c == y (ties -> lowest class).
    js_divergence:  generalised Jensen-Shannon divergence of the members' distributions with equal
                    weights, H(mean_r p_r) - mean_r H(p_r), in nats (in [0, log R]).
    frac_incorrect: fraction of members that misclassify the example (1 - fraction correct).

  These are written to `<workdir>/ensemble_scores.npz` as they are, so every score file of a run
  follows the one convention. Runs before this change wrote `dichotomous` (+1 trivial) and
  `frac_correct` instead, higher = easier; `jaxdiff.scores.NEGATED` still lists those two names so
  that readers orienting an old file (`scores.orient`) negate them.

  Args:
    probs: `[R, N, C]` probabilities (e.g. `jax.nn.softmax(logits)`), rows summing to 1.
    labels: int `[N]`.
    member_mask: optional bool `[R]`; members set to False (e.g. diverged) are left out.

  Returns:
    name -> float32 `[N]`, higher = harder.
  """
  p = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  if p.ndim != 3 or labels.shape != p.shape[1:2]:
    raise ValueError(f"need probs [R, N, C] and labels [N]; got {p.shape} and {labels.shape}")
  if member_mask is not None:
    mask = np.asarray(member_mask, bool)
    if mask.shape != p.shape[:1]:
      raise ValueError(f"member_mask has shape {mask.shape}, expected ({p.shape[0]},)")
    if not mask.any():
      raise ValueError("member_mask leaves no member")
    p = p[mask]
  correct = p.argmax(-1) == labels[None, :]  # [R', N]
  dichotomous = np.where(~correct.any(0), 1.0, np.where(correct.all(0), -1.0, 0.0))
  entropy = lambda q: special.entr(q).sum(-1)  # entr(0) = 0
  js = entropy(p.mean(0)) - entropy(p).mean(0)
  return {"dichotomous_difficulty": dichotomous.astype(np.float32),
          "js_divergence": np.maximum(js, 0.0).astype(np.float32),
          "frac_incorrect": (~correct).mean(0).astype(np.float32)}

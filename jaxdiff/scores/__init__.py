"""Difficulty scores of training examples: kernels, accumulators and the registry of score names.

Every score is a float `[R, N]` (members x examples); `registry` holds one entry per score, from
which `SCORES` (name -> definition) and `NEGATED` are derived, and `orient` turns the natural
values into the stored convention "higher means harder".

Modules: `registry` (the score entries and families), `probs` (numpy softmax, p_y, margins of
stored logits), `point` (loss, margins, EL2N, ... + the chunked driver), `grand` (GraNd),
`input_grad` (VoG's input gradients), `trajectory` (online epoch / minibatch / VoG accumulators),
`representation` (prediction depth, prototypes), `members` (across-member scores), `auroc`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from jaxdiff.scores import (grand, input_grad, members, point, probs, registry,
                            representation, trajectory)
from jaxdiff.scores.auroc import auroc, auroc_table
from jaxdiff.scores.grand import grand_scores
from jaxdiff.scores.input_grad import input_grad_py
from jaxdiff.scores.members import ensemble_scores
from jaxdiff.scores.point import compute_point_scores, point_scores
from jaxdiff.scores.representation import (prediction_depth, prediction_depth_scores,
                                            prototype_scores)
from jaxdiff.scores.trajectory import EpochAccumulator, MinibatchForgetting, VoGAccumulator

# name -> definition, per family, derived from the registry (natural orientation; `NEGATED` lists
# the names whose natural value is higher-is-easier and which `orient` negates for storage).
POINT_SCORES = registry.descriptions("point", "grand")
TRAJECTORY_SCORES = registry.descriptions("trajectory", "vog")
MINIBATCH_SCORES = registry.descriptions("minibatch")
REPRESENTATION_SCORES = registry.descriptions("representation")
ENSEMBLE_SCORES = registry.descriptions("ensemble")
# Names of ensemble_scores.npz arrays written before they were oriented higher = harder (natural
# orientation, higher = easier); kept in NEGATED so that `orient` turns an old file around.
LEGACY_ENSEMBLE_SCORES = registry.descriptions("legacy")
# Every score that training writes (scores/ and ensemble_scores.npz).
SCORES = registry.descriptions(*registry.TRAINING_FAMILIES)
# Natural value is higher-is-easier: stored negated so that higher means harder.
NEGATED = frozenset(s.name for s in registry.REGISTRY
                    if s.negated and s.family in (*registry.TRAINING_FAMILIES, "legacy"))
# Files of the score store that are not difficulty scores.
BOOKKEEPING = frozenset(s.name for s in registry.REGISTRY if s.bookkeeping)


def validate_names(names: str | Iterable[str],
                   valid: Mapping[str, str] | Iterable[str] = SCORES) -> list[str]:
  """Returns `names` as a list, or raises ValueError naming the unknown ones and the valid ones."""
  names = [names] if isinstance(names, str) else list(names)
  valid = list(valid)
  unknown = [n for n in names if n not in valid]
  if unknown:
    raise ValueError(f"unknown score name(s) {unknown}; valid names: {sorted(valid)}")
  return names


def orient(scores: Mapping[str, Any], strict: bool = True) -> dict[str, np.ndarray]:
  """Stored convention: negates the scores in `NEGATED` so that every score is higher-is-harder.

  Args:
    scores: name -> array in its natural orientation.
    strict: raise ValueError on names outside `SCORES` (else pass them through unchanged).

  Returns:
    name -> float32 array, same names.
  """
  if strict:
    validate_names(scores)
  return {k: np.asarray(-np.asarray(v) if k in NEGATED else v, np.float32)
          for k, v in scores.items()}


__all__ = [
    "BOOKKEEPING", "ENSEMBLE_SCORES", "EpochAccumulator", "LEGACY_ENSEMBLE_SCORES",
    "MINIBATCH_SCORES", "MinibatchForgetting", "NEGATED", "POINT_SCORES", "REPRESENTATION_SCORES",
    "SCORES", "TRAJECTORY_SCORES", "VoGAccumulator", "auroc", "auroc_table",
    "compute_point_scores", "ensemble_scores", "grand", "grand_scores", "input_grad",
    "input_grad_py", "members", "orient", "point", "point_scores", "prediction_depth",
    "prediction_depth_scores", "probs", "prototype_scores", "registry", "representation",
    "trajectory", "validate_names",
]

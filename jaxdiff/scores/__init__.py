"""Difficulty scores of training examples: kernels, accumulators and the registry of score names.

Every score is a float `[R, N]` (members x examples); `SCORES` names and defines each one, and
`orient` turns the natural values into the stored convention "higher means harder".

Modules: `point` (loss, margins, EL2N, ... + the chunked driver), `grand` (GraNd),
`input_grad` (VoG's input gradients), `trajectory` (online epoch / minibatch / VoG accumulators),
`representation` (prediction depth, prototypes), `members` (across-member scores), `auroc`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from jaxdiff.scores import grand, input_grad, members, point, representation, trajectory
from jaxdiff.scores.auroc import auroc, auroc_table
from jaxdiff.scores.grand import grand_scores
from jaxdiff.scores.input_grad import input_grad_py
from jaxdiff.scores.members import ensemble_scores
from jaxdiff.scores.point import compute_point_scores, point_scores
from jaxdiff.scores.representation import (prediction_depth, prediction_depth_scores,
                                            prototype_scores)
from jaxdiff.scores.trajectory import EpochAccumulator, MinibatchForgetting, VoGAccumulator

# name -> definition (paper + formula). Natural orientation; `NEGATED` lists the names whose
# natural value is higher-is-easier and which `orient` negates for storage.
POINT_SCORES = {
    "loss": "cross-entropy -log p_y of the member's softmax p at this step",
    "correct": "0-1 correctness 1[argmax_c z_c = y] (ties -> lowest class)",
    "p_y": "confidence in the label, softmax probability p_y",
    "max_p": "maximum softmax probability max_c p_c",
    "entropy": "predictive entropy -sum_c p_c log p_c (nats)",
    "margin_prob": "margin on probabilities p_y - max_{c != y} p_c",
    "margin_logit": "margin on logits z_y - max_{c != y} z_c (the margin of AUM, Pleiss et al. "
                    "2020)",
    "el2n": "EL2N ||softmax(z) - onehot(y)||_2 (Paul et al. 2021, Deep Learning on a Data Diet)",
    "grand": "GraNd ||grad_theta CE(f_theta(x), y)||_2 over all params (Paul et al. 2021)",
}
TRAJECTORY_SCORES = {
    "mean_loss": "mean over recorded evaluations of the cross-entropy loss",
    "mean_p_y": "cartography confidence: mean over evaluations of p_y (Swayamdipta et al. 2020)",
    "variability": "cartography variability: population std (ddof=0) over evaluations of p_y "
                   "(Swayamdipta et al. 2020); non-monotone in difficulty (high = ambiguous)",
    "mean_correct": "cartography correctness: fraction of evaluations classified correctly",
    "aum": "area under the margin: mean over evaluations of z_y - max_{c!=y} z_c (Pleiss et al. "
           "2020; their average is over minibatch passes)",
    "aum_prob": "mean over evaluations of p_y - max_{c!=y} p_c",
    "forgetting_events": "number of correct->incorrect transitions between consecutive evaluations "
                         "(Toneva et al. 2019); never-learned examples get T // 2 + 1 for T "
                         "evaluations, above any learned example's count (they rank hardest)",
    "forgetting_events_inf": "forgetting_events with +inf for never-learned examples (Toneva et "
                             "al.'s convention when sorting)",
    "never_learned": "1 if never correct at any evaluation",
    "learning_time": "first evaluation step at which correct; never learned -> last step + 1",
    "learning_time_inf": "learning_time with +inf for never learned",
    "consistent_learning_time": "first evaluation step from which the example is correct at every "
                                "later evaluation; not correct at the end -> last step + 1",
    "consistent_learning_time_inf": "consistent_learning_time with +inf if not correct at the end",
    "unforgettable": "1 if learned and never forgotten (Toneva et al. 2019)",
    "vog": "VoG: mean over pixels of the std over checkpoints of d p_y / d x, normalised per class "
           "(x - mean_class) / std_class (Agarwal, D'souza & Hooker 2022)",
    "vog_raw": "VoG before class normalisation",
}
MINIBATCH_SCORES = {
    "mb_forgetting_events": "forgetting events counted over the member's own minibatch "
                            "presentations (Toneva et al. 2019's protocol); never learned -> "
                            "P // 2 + 1, P the member's most presentations of any example",
    "mb_forgetting_events_inf": "mb_forgetting_events with +inf for never learned",
    "mb_never_learned": "1 if never correct at any presentation (or never presented)",
    "mb_learning_time": "first training step at which a presentation was correct; never -> last "
                        "step + 1",
    "mb_learning_time_inf": "mb_learning_time with +inf for never learned",
    "mb_consistent_learning_time": "step of the first presentation from which every presentation "
                                   "is correct; not correct at the last one -> last step + 1",
    "mb_consistent_learning_time_inf": "mb_consistent_learning_time with +inf",
    "mb_unforgettable": "1 if learned and never forgotten over presentations",
    "mb_presentations": "number of presentations (bookkeeping, not a difficulty score)",
}
REPRESENTATION_SCORES = {
    "prediction_depth": "prediction depth: first layer from which every k-NN probe (k=30) agrees "
                        "with the final prediction; input = layer 0 (Baldock et al. 2021)",
    "proto_supervised": "distance of penultimate features to their class centroid "
                        "(supervised prototype, Sorscher et al. 2022)",
    "proto_selfsup": "distance of penultimate features to the nearest k-means centroid "
                     "(self-supervised prototype, Sorscher et al. 2022)",
}
ENSEMBLE_SCORES = {
    "dichotomous_difficulty": "+1 all members wrong, 0 mixed, -1 all correct (Meding et al. "
                              "2022's dichotomous difficulty, signed higher = harder)",
    "js_divergence": "generalised Jensen-Shannon divergence across members H(mean p) - mean H(p)",
    "frac_incorrect": "fraction of members misclassifying the example",
}
# Names of ensemble_scores.npz arrays written before they were oriented higher = harder (natural
# orientation, higher = easier); kept in NEGATED so that `orient` turns an old file around.
LEGACY_ENSEMBLE_SCORES = {
    "dichotomous": "+1 all members correct, 0 mixed, -1 all wrong (higher = easier)",
    "frac_correct": "fraction of members classifying the example correctly (higher = easier)",
}
SCORES = {**POINT_SCORES, **TRAJECTORY_SCORES, **MINIBATCH_SCORES, **REPRESENTATION_SCORES,
          **ENSEMBLE_SCORES}

# Natural value is higher-is-easier: stored negated so that higher means harder.
NEGATED = frozenset({
    "correct", "p_y", "max_p", "margin_prob", "margin_logit", "mean_p_y", "mean_correct", "aum",
    "aum_prob", "unforgettable", "mb_unforgettable", *LEGACY_ENSEMBLE_SCORES})


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
    "ENSEMBLE_SCORES", "EpochAccumulator", "LEGACY_ENSEMBLE_SCORES", "MINIBATCH_SCORES",
    "MinibatchForgetting", "NEGATED",
    "POINT_SCORES", "REPRESENTATION_SCORES", "SCORES", "TRAJECTORY_SCORES", "VoGAccumulator",
    "auroc", "auroc_table", "compute_point_scores", "ensemble_scores", "grand", "grand_scores", "input_grad",
    "input_grad_py", "members", "orient", "point", "point_scores", "prediction_depth",
    "prediction_depth_scores", "prototype_scores", "representation", "trajectory",
    "validate_names",
]

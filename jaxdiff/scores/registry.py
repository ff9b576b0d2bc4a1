"""The score registry: one entry per score, from which every list of score names is derived.

`REGISTRY` holds one `Score` per score (its family, one-line definition, paper, orientation, the
test that checks it against a reference); `FAMILIES` says which code produces a family and which
`scores` config option switches it on. Names, descriptions, the negated list, the recorder's score
groups and the held-out tables' names are computed from them, never listed by hand.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Family:
  """Scores computed together by one piece of code.

  Attributes:
    name: the family's name (also a recorder / `experiments/score.py` group where it is one).
    stage: when it is computed: "epoch" (accumulated over training, fixed once trained), "final"
      (from the final state; recomputable from a checkpoint), "ensemble" (across members,
      ensemble_scores.npz), "heldout" (across subset members, jaxdiff.heldout), "posthoc" (from a
      checkpoint by experiments/score.py only) or "legacy" (names of old files, read back only).
    producer: the function (or accumulator) that returns the family's names.
    options: `scores` config options that change the family's values; the first one, when it is
      a bool-like switch, turns the family on ("" = always on).
    in_store: its scores are per-member `[R, N]` files of the score store (scores/).
  """
  name: str
  stage: str
  producer: str
  options: tuple[str, ...] = ()
  in_store: bool = True

  @property
  def switch(self) -> str | None:
    """The config option that turns the family on, or None when it is always computed."""
    return self.options[0] if self.options else None


FAMILIES = {f.name: f for f in (
    Family("point", "final", "jaxdiff.scores.point.point_scores"),
    Family("grand", "final", "jaxdiff.scores.grand.grand_scores", ("grand", "grand_method")),
    Family("trajectory", "epoch", "jaxdiff.scores.trajectory.EpochAccumulator.finalize"),
    Family("minibatch", "epoch", "jaxdiff.scores.trajectory.MinibatchForgetting.finalize",
           ("minibatch",)),
    Family("vog", "epoch", "jaxdiff.scores.trajectory.VoGAccumulator.finalize", ("vog",)),
    Family("representation", "final", "jaxdiff.scores.representation.prediction_depth and "
           "prototype_scores", ("representation", "knn_k", "knn_reference", "num_prototypes")),
    Family("ensemble", "ensemble", "jaxdiff.scores.members.ensemble_scores", in_store=False),
    Family("input_grad", "posthoc", "jaxdiff.posthoc.input_grad_norms"),
    Family("heldout", "heldout", "jaxdiff.heldout.heldout_difficulty (held-out members)",
           in_store=False),
    Family("insample", "heldout", "jaxdiff.heldout.heldout_difficulty (trained-on members)",
           in_store=False),
    Family("legacy", "legacy", "ensemble_scores.npz of runs before the registry", in_store=False),
)}

HARDER, EASIER, NEITHER = "harder", "easier", "neither"
BOOKKEEPING = "bookkeeping"  # `paper` of an entry that is not a difficulty score
STANDARD = "standard quantity"  # `paper` of a textbook quantity no one paper defines


@dataclasses.dataclass(frozen=True)
class Score:
  """One score.

  Attributes:
    name: its file / column name.
    family: a key of `FAMILIES`.
    definition: one line (formula, paper); the text of `SCORES[name]` and of meta "definitions".
    paper: the paper that defines it as a difficulty score, `STANDARD`, or `BOOKKEEPING`.
    higher: what a higher natural value means: `HARDER`, `EASIER` (stored negated so that higher
      is harder) or `NEITHER` (not monotone in difficulty, or bookkeeping: stored as it is).
    test: "tests/<file>.py::<test function>" comparing it with a reference.
    kernel: for a point score, `kernel(parts) -> [...]` of `point.Parts` (the softmax, p_y,
      margins, ... of one prediction; pure jnp); None for scores computed by their family's
      producer.
  """
  name: str
  family: str
  definition: str
  paper: str
  higher: str
  test: str
  kernel: Callable[[Any], Any] | None = None

  @property
  def negated(self) -> bool:
    return self.higher == EASIER

  @property
  def bookkeeping(self) -> bool:
    return self.paper == BOOKKEEPING


_T = "tests/test_scores_trajectory.py::"
_PT = "tests/test_scores_point.py::test_point_scores_match_numpy_loop"
_EPOCH = _T + "test_epoch_accumulator_hand_worked_sequences"
_MB = _T + "test_minibatch_forgetting_matches_python_loop"
_HELD = "tests/test_registry.py::test_heldout_difficulty_matches_a_loop"
_FAMILIES_TEST = "tests/test_registry.py::test_every_family_is_produced_by_its_code_path"
_TONEVA = "Toneva et al. 2019, An Empirical Study of Example Forgetting"
_TONEVA_EPOCH, _TONEVA_MB = (_TONEVA, HARDER, _EPOCH), (_TONEVA, HARDER, _MB)
_CARTO = "Swayamdipta et al. 2020, Dataset Cartography"
_AUM = "Pleiss et al. 2020, Identifying Mislabeled Data using the Area Under the Margin Ranking"
_DIET = "Paul et al. 2021, Deep Learning on a Data Diet"
_VOG = "Agarwal, D'souza & Hooker 2022, Estimating Example Difficulty using Variance of Gradients"
_PROTO = "Sorscher et al. 2022, Beyond neural scaling laws"
_CSCORE = "Jiang et al. 2021, Characterizing Structural Regularities of Labeled Data"
_CL = "Northcutt, Jiang & Chuang 2021, Confident Learning"


def _entries(family: str, rows) -> tuple[Score, ...]:
  return tuple(Score(row[0], family, *row[1:]) for row in rows)


REGISTRY: tuple[Score, ...] = (
    *_entries("point", (
        ("loss", "cross-entropy -log p_y of the member's softmax p at this step", STANDARD,
         HARDER, _PT, lambda q: -q.logp_y),
        ("correct", "0-1 correctness 1[argmax_c z_c = y] (ties -> lowest class)", STANDARD,
         EASIER, _PT, lambda q: (jnp.argmax(q.z, axis=-1) == q.labels).astype(jnp.float32)),
        ("p_y", "confidence in the label, softmax probability p_y", _CARTO, EASIER, _PT,
         lambda q: q.p_y),
        ("max_p", "maximum softmax probability max_c p_c", STANDARD, EASIER, _PT,
         lambda q: jnp.max(q.p, axis=-1)),
        # p * logp is 0 where p underflows to 0 (logp stays finite from log_softmax).
        ("entropy", "predictive entropy -sum_c p_c log p_c (nats)", STANDARD, HARDER, _PT,
         lambda q: -jnp.sum(jnp.where(q.p > 0, q.p * q.logp, 0.0), axis=-1)),
        ("margin_prob", "margin on probabilities p_y - max_{c != y} p_c", _TONEVA, EASIER, _PT,
         lambda q: q.p_y - q.p_other),
        ("margin_logit", "margin on logits z_y - max_{c != y} z_c (the margin of AUM, Pleiss et "
         "al. 2020)", _AUM, EASIER, _PT, lambda q: q.z_y - q.z_other),
        ("el2n", "EL2N ||softmax(z) - onehot(y)||_2 (Paul et al. 2021, Deep Learning on a Data "
         "Diet)", _DIET, HARDER, _PT,
         lambda q: jnp.sqrt(jnp.sum(jnp.square(q.p - q.onehot.astype(jnp.float32)), axis=-1))),
    )),
    *_entries("grand", (
        ("grand", "GraNd ||grad_theta CE(f_theta(x), y)||_2 over all params (Paul et al. 2021)",
         _DIET, HARDER, "tests/test_scores_grand.py::test_grand_vmap_matches_per_example_loop"),
    )),
    *_entries("trajectory", (
        ("mean_loss", "mean over recorded evaluations of the cross-entropy loss", STANDARD,
         HARDER, _EPOCH),
        ("mean_p_y", "cartography confidence: mean over evaluations of p_y (Swayamdipta et al. "
         "2020)", _CARTO, EASIER, _EPOCH),
        ("variability", "cartography variability: population std (ddof=0) over evaluations of "
         "p_y (Swayamdipta et al. 2020); non-monotone in difficulty (high = ambiguous)", _CARTO,
         NEITHER, _EPOCH),
        ("mean_correct", "cartography correctness: fraction of evaluations classified correctly",
         _CARTO, EASIER, _EPOCH),
        ("aum", "area under the margin: mean over evaluations of z_y - max_{c!=y} z_c (Pleiss et "
         "al. 2020; their average is over minibatch passes)", _AUM, EASIER, _EPOCH),
        ("aum_prob", "mean over evaluations of p_y - max_{c!=y} p_c", _AUM, EASIER, _EPOCH),
        ("forgetting_events", "number of correct->incorrect transitions between consecutive "
         "evaluations (Toneva et al. 2019); never-learned examples get T // 2 + 1 for T "
         "evaluations, above any learned example's count (they rank hardest)", *_TONEVA_EPOCH),
        ("forgetting_events_inf", "forgetting_events with +inf for never-learned examples "
         "(Toneva et al.'s convention when sorting)", *_TONEVA_EPOCH),
        ("never_learned", "1 if never correct at any evaluation", *_TONEVA_EPOCH),
        ("learning_time", "first evaluation step at which correct; never learned -> last step + "
         "1", *_TONEVA_EPOCH),
        ("learning_time_inf", "learning_time with +inf for never learned", *_TONEVA_EPOCH),
        ("consistent_learning_time", "first evaluation step from which the example is correct "
         "at every later evaluation; not correct at the end -> last step + 1", *_TONEVA_EPOCH),
        ("consistent_learning_time_inf", "consistent_learning_time with +inf if not correct at "
         "the end", *_TONEVA_EPOCH),
        ("unforgettable", "1 if learned and never forgotten (Toneva et al. 2019)", _TONEVA,
         EASIER, _EPOCH),
    )),
    *_entries("vog", (
        ("vog", "VoG: mean over pixels of the std over checkpoints of d p_y / d x, normalised "
         "per class (x - mean_class) / std_class (Agarwal, D'souza & Hooker 2022)", _VOG, HARDER,
         _T + "test_vog_matches_authors_formula"),
        ("vog_raw", "VoG before class normalisation", _VOG, HARDER,
         _T + "test_vog_matches_authors_formula"),
    )),
    *_entries("minibatch", (
        ("mb_forgetting_events", "forgetting events counted over the member's own minibatch "
         "presentations (Toneva et al. 2019's protocol); never learned -> P // 2 + 1, P the "
         "member's most presentations of any example", *_TONEVA_MB),
        ("mb_forgetting_events_inf", "mb_forgetting_events with +inf for never learned",
         *_TONEVA_MB),
        ("mb_never_learned", "1 if never correct at any presentation (or never presented)",
         *_TONEVA_MB),
        ("mb_learning_time", "first training step at which a presentation was correct; never -> "
         "last step + 1", *_TONEVA_MB),
        ("mb_learning_time_inf", "mb_learning_time with +inf for never learned", *_TONEVA_MB),
        ("mb_consistent_learning_time", "step of the first presentation from which every "
         "presentation is correct; not correct at the last one -> last step + 1", *_TONEVA_MB),
        ("mb_consistent_learning_time_inf", "mb_consistent_learning_time with +inf", *_TONEVA_MB),
        ("mb_unforgettable", "1 if learned and never forgotten over presentations", _TONEVA,
         EASIER, _MB),
        ("mb_presentations", "number of presentations (bookkeeping, not a difficulty score)",
         BOOKKEEPING, NEITHER, _MB),
    )),
    *_entries("representation", (
        ("prediction_depth", "prediction depth: first layer from which every k-NN probe (k=30) "
         "agrees with the final prediction; input = layer 0 (Baldock et al. 2021)",
         "Baldock, Maennel & Neyshabur 2021, Deep Learning Through the Lens of Example "
         "Difficulty", HARDER,
         "tests/test_scores_representation.py::test_prediction_depth_matches_brute_force"),
        ("proto_supervised", "distance of penultimate features to their class centroid "
         "(supervised prototype, Sorscher et al. 2022)", _PROTO, HARDER,
         "tests/test_scores_representation.py::test_prototype_scores_match_numpy"),
        ("proto_selfsup", "distance of penultimate features to the nearest k-means centroid "
         "(self-supervised prototype, Sorscher et al. 2022)", _PROTO, HARDER,
         "tests/test_scores_representation.py::test_prototype_scores_match_numpy"),
    )),
    *_entries("ensemble", (
        ("dichotomous_difficulty", "+1 all members wrong, 0 mixed, -1 all correct (Meding et al. "
         "2022's dichotomous difficulty, signed higher = harder)", "Meding et al. 2022, Trivial "
         "or Impossible -- dichotomous data difficulty masks model differences", HARDER,
         "tests/test_scores_members.py::test_ensemble_scores_match_scipy"),
        ("js_divergence", "generalised Jensen-Shannon divergence across members H(mean p) - "
         "mean H(p)", STANDARD, HARDER,
         "tests/test_scores_members.py::test_ensemble_scores_match_scipy"),
        ("frac_incorrect", "fraction of members misclassifying the example", STANDARD, HARDER,
         "tests/test_scores_members.py::test_ensemble_scores_match_scipy"),
    )),
    *_entries("input_grad", (
        ("input_grad_norm", "input_grad_norm: ||d p_y / d x||_2 over the input's entries, the "
         "input gradient of VoG (Agarwal, D'souza & Hooker 2022) at one checkpoint; not monotone "
         "in difficulty (p_y saturates near 0 and 1): Spearman with mean loss +0.82 after 100 "
         "epochs of the default config, -0.76 with the loss early in training", _VOG, NEITHER,
         "tests/test_posthoc.py::test_score_script_final_epoch_equals_the_training_run"),
    )),
    *_entries("heldout", (
        ("c_score", "integrated C-score: mean over subset fractions of the held-out members' "
         "mean 0-1 correctness (Jiang et al. 2021)", _CSCORE, EASIER, _HELD),
        ("c_score_soft", "integrated C-score with the held-out members' p_y in place of "
         "correctness", _CSCORE, EASIER, _HELD),
        ("oos_p_y", "p_y of the out-of-sample probabilities (mean softmax of the held-out "
         "members)", _CL, EASIER, _HELD),
        ("oos_margin", "max_{c != y} p_c - p_y of the out-of-sample probabilities", _CL, HARDER,
         _HELD),
        ("memorisation", "acc_in - acc_out, mean over subset fractions (Feldman & Zhang 2020); "
         "high = right only when trained on", "Feldman & Zhang 2020, What Neural Networks "
         "Memorize and Why", HARDER, _HELD),
    )),
    *_entries("insample", (
        ("in_p_y", "p_y of the mean softmax of the members that trained on the example", STANDARD,
         EASIER, _HELD),
        ("in_margin", "max_{c != y} p_c - p_y of the mean softmax of the members that trained on "
         "the example", STANDARD, HARDER, _HELD),
    )),
    *_entries("legacy", (
        ("dichotomous", "+1 all members correct, 0 mixed, -1 all wrong (higher = easier)",
         "Meding et al. 2022 (old sign)", EASIER, _FAMILIES_TEST),
        ("frac_correct", "fraction of members classifying the example correctly (higher = "
         "easier)", STANDARD, EASIER, _FAMILIES_TEST),
    )),
)
ENTRIES = {s.name: s for s in REGISTRY}
# The families whose scores are written by training (scores/ and ensemble_scores.npz).
TRAINING_FAMILIES = ("point", "grand", "trajectory", "minibatch", "vog", "representation",
                     "ensemble")


def names(*families: str) -> tuple[str, ...]:
  """The score names of `families` (every family when none is given), in registry order."""
  unknown = [f for f in families if f not in FAMILIES]
  if unknown:
    raise ValueError(f"unknown score family(ies) {unknown}; valid: {list(FAMILIES)}")
  return tuple(s.name for s in REGISTRY if not families or s.family in families)


def descriptions(*families: str) -> dict[str, str]:
  """name -> one-line definition of the scores of `families`."""
  return {n: ENTRIES[n].definition for n in names(*families)}


def base_name(name: str) -> str:
  """The registry name behind a stored name: a score at another epoch (`loss_e10`, posthoc and
  snapshots) or a per-fraction C-score (`c_score_s0.5`, export.tidy_table) -> its score."""
  head, sep, tail = name.rpartition("_e")
  if sep and head in ENTRIES and tail.isdigit():
    return head
  head, sep, tail = name.rpartition("_s")
  if sep and head in ENTRIES:
    try:
      float(tail)
      return head
    except ValueError:
      pass
  return name


def is_negated(name: str) -> bool:
  """True when `name` (or the score behind a suffixed name) is stored negated."""
  entry = ENTRIES.get(base_name(name))
  return entry is not None and entry.negated


def heldout_name(name: str) -> str:
  """The held-out tables' column name: `neg_<name>` for a negated score (the names of
  heldout.heldout_difficulty and the committed noise-AUROC results), else `name`."""
  return f"neg_{name}" if ENTRIES[name].negated else name


def oriented(values: Mapping[str, Any], rename=None) -> dict[str, np.ndarray]:
  """Natural values -> higher-is-harder, dtype kept; `rename(name)` gives the output name."""
  return {(rename(k) if rename else k): (-np.asarray(v) if is_negated(k) else np.asarray(v))
          for k, v in values.items()}

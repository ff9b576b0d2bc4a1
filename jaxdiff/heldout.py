"""Held-out ensemble estimators: C-scores, out-of-sample probabilities and memorisation.

Members trained on their own random subsets (config `subset_fraction` < 1) make the ensemble a
hold-out estimator: an example's held-out members are the ones whose subset left it out.

Inputs are per-member arrays over every training example (`[R, N]` values, `[R, N, C]`
probabilities) and the subset mask `[R, N]` (True where member r trained on example n), as
written to a workdir (`subset_mask.npy`, `logits.npy`; `read_workdir` loads them). Every
estimator averages over each example's members with masked sums (vectorised over examples); a
member enters an example's held-out estimate only where its mask is False, so values of members
that trained on the example (even NaN or inf) never reach it. Diverged members are excluded.

Why one module of ~510 lines: the estimators share the held-out masks and the reading of a
workdir's subsets; the figures and tables are in report/heldout.py.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from jaxdiff import progress as progress_lib
from jaxdiff import store
from jaxdiff import workdir as workdir_lib
# A workdir's arrays, read back (re-exported: the estimators' input).
from jaxdiff.workdir import WorkdirArrays, read_workdir  # pylint: disable=unused-import
from jaxdiff.scores import registry
from jaxdiff.scores.probs import correctness, label_prob, margins, softmax

SIDES = ("out", "in")


@dataclasses.dataclass
class HoldoutEstimate:
  """A mean over each example's held-out (or trained-on) members, with its uncertainty.

  Attributes:
    mean: float64 `[..., N]` mean over the members; NaN where `enough` is False.
    stderr: float64 `[..., N]` standard error of the mean, sample std (ddof=1) / sqrt(count); NaN
      where count < 2 or `enough` is False.
    count: int64 `[..., N]` number of members behind each estimate.
    enough: bool `[..., N]` count >= min_holdout (estimates below it are flagged, not guessed).
  """
  mean: np.ndarray
  stderr: np.ndarray
  count: np.ndarray
  enough: np.ndarray


@dataclasses.dataclass
class CScores:
  """Consistency scores per subset fraction (Jiang et al. 2021).

  Attributes:
    fractions: float64 `[F]` the subset fractions (< 1) present in the ensemble, ascending.
    estimate: HoldoutEstimate with leading axis F: `estimate.mean[f, n]` is the C-score of example
      n estimated from the held-out members of fraction `fractions[f]`.
    integrated: float64 `[N]` mean of the per-fraction C-scores over the fractions (the C-score
      integrated over subset sizes); NaN unless every fraction has an estimate.
  """
  fractions: np.ndarray
  estimate: HoldoutEstimate
  integrated: np.ndarray


@dataclasses.dataclass
class Memorisation:
  """Memorisation estimates per subset fraction (Feldman & Zhang 2020).

  Attributes:
    fractions: float64 `[F]`.
    value: float64 `[F, N]` acc_in - acc_out; NaN where `enough` is False.
    stderr: float64 `[F, N]` sqrt(se_in^2 + se_out^2) (independent members).
    acc_in: HoldoutEstimate `[F, N]` over members that trained on the example.
    acc_out: HoldoutEstimate `[F, N]` over members that held it out.
    enough: bool `[F, N]` both sides have at least min_holdout members.
  """
  fractions: np.ndarray
  value: np.ndarray
  stderr: np.ndarray
  acc_in: HoldoutEstimate
  acc_out: HoldoutEstimate
  enough: np.ndarray


def _check(values: Any, mask: Any, valid: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  values = np.asarray(values)
  mask = np.asarray(mask)
  if mask.ndim != 2:
    raise ValueError(f"mask must be bool [R, N] (True = member trained on the example); got shape "
                     f"{mask.shape}")
  if mask.dtype != bool:
    if not np.isin(mask, (0, 1)).all():
      raise ValueError(f"mask must be boolean (or 0/1); got values {np.unique(mask)[:5]}")
    mask = mask.astype(bool)
  if values.shape[:2] != mask.shape:
    raise ValueError(f"values have shape {values.shape} but mask has {mask.shape}; need values "
                     "[R, N, ...] matching the mask [R, N]")
  if valid is None:
    valid = np.ones(mask.shape[0], bool)
  valid = np.asarray(valid, bool)
  if valid.shape != mask.shape[:1]:
    raise ValueError(f"valid (non-diverged members) has shape {valid.shape}, expected "
                     f"({mask.shape[0]},)")
  return values, mask, valid


def _min_count(min_holdout: int, name: str = "min_holdout") -> int:
  if isinstance(min_holdout, bool) or int(min_holdout) != min_holdout or min_holdout < 1:
    raise ValueError(f"{name}={min_holdout!r}: must be an integer >= 1")
  return int(min_holdout)


def member_mean(values: Any, mask: Any, valid: Any = None, *, side: str = "out",
                members: Any = None, min_holdout: int = 2) -> HoldoutEstimate:
  """Mean of `values` over each example's held-out (side="out") or trained-on ("in") members.

  For example n the members used are {r : valid[r], members[r], mask[r, n] == (side == "in")};
  the mean is sum_r v[r, n] / count[n] with a masked sum (other members' values, NaN or inf
  included, never enter) and the standard error is the sample std (ddof=1) / sqrt(count).

  Args:
    values: float `[R, N]` per-member values (e.g. 0/1 correctness, p_y).
    mask: bool `[R, N]`, True where member r trained on example n.
    valid: optional bool `[R]`, False for diverged members (left out).
    side: "out" (held-out members) or "in" (members that trained on the example).
    members: optional bool `[R]` restricting the members (e.g. those of one subset fraction).
    min_holdout: examples with fewer members get NaN and `enough=False`.

  Returns:
    HoldoutEstimate over `[N]`.
  """
  values, mask, valid = _check(values, mask, valid)
  if side not in SIDES:
    raise ValueError(f"side={side!r}; valid: {', '.join(SIDES)}")
  if values.ndim != 2:
    raise ValueError(f"values must be [R, N]; got {values.shape}")
  k_min = _min_count(min_holdout)
  use = valid if members is None else valid & np.asarray(members, bool)
  sel = (mask if side == "in" else ~mask) & use[:, None]  # [R, N]
  v = np.where(sel, values.astype(np.float64), 0.0)
  count = sel.sum(0)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = v.sum(0) / count
    sq = np.where(sel, (values.astype(np.float64) - mean) ** 2, 0.0).sum(0)
    stderr = np.sqrt(sq / (count - 1) / count)
  enough = count >= k_min
  mean = np.where(enough, mean, np.nan)
  stderr = np.where(enough & (count >= 2), stderr, np.nan)
  return HoldoutEstimate(mean=mean, stderr=stderr, count=count.astype(np.int64), enough=enough)


def _stack(estimates: Sequence[HoldoutEstimate]) -> HoldoutEstimate:
  return HoldoutEstimate(*(np.stack([getattr(e, f.name) for e in estimates])
                           for f in dataclasses.fields(HoldoutEstimate)))


def _fraction_groups(fractions: Any, num_members: int) -> np.ndarray:
  f = np.ones(num_members) if fractions is None else np.asarray(fractions, np.float64)
  if f.shape != (num_members,):
    raise ValueError(f"fractions has shape {f.shape}, expected ({num_members},): one subset "
                     "fraction per member")
  return f


def _holdout_groups(correct, mask, fractions, valid, purpose):
  """Checked arrays, each member's fraction `[R]` and the fractions that hold examples out."""
  correct, mask, valid = _check(correct, mask, valid)
  f = _fraction_groups(fractions, mask.shape[0])
  groups = np.unique(f[(f < 1.0) | (~mask).any(1)])
  if groups.size == 0 or mask[valid].all():
    raise ValueError("no valid member held out any example (every subset mask is all True): "
                     f"train with subset_fraction < 1 to {purpose}")
  return correct, mask, valid, f, groups


def c_scores(correct: Any, mask: Any, fractions: Any = None, valid: Any = None, *,
             min_holdout: int = 2) -> CScores:
  """Consistency score per subset fraction, from held-out members.

  Jiang, Zhang, Talwar & Mozer 2021, "Characterizing Structural Regularities of Labeled Data in
  Overparameterized Models": C_{P,n}(x, y) = E_{D ~ P^n, (x,y) not in D}[P(f(x; D) = y)], the
  expected accuracy on (x, y) of models trained on n other examples; estimated here, for each
  subset fraction s = n / N, by the mean 0-1 correctness on example n of the valid members of
  fraction s whose subset left it out. Their integrated score averages C_{P,n} over subset sizes;
  `integrated` averages the per-fraction estimates (equal weights, fractions present).

  Members of fraction 1.0 hold nothing out and contribute no fraction.

  Args:
    correct: `[R, N]` 0/1 correctness of each member's final prediction (any per-member value
      works: p_y gives a soft, confidence-based variant).
    mask: bool `[R, N]`, True where member r trained on example n.
    fractions: `[R]` each member's subset fraction (None: one group).
    valid: optional bool `[R]`, False for diverged members.
    min_holdout: examples with fewer held-out members get NaN and `enough=False`.

  Returns:
    CScores with `estimate` of shape `[F, N]`.

  Raises:
    ValueError when no member holds out any example (train with subset_fraction < 1).
  """
  correct, mask, valid, f, groups = _holdout_groups(correct, mask, fractions, valid,
                                                     "get held-out estimates")
  est = _stack([member_mean(correct, mask, valid, side="out", members=f == g,
                            min_holdout=min_holdout) for g in groups])
  integrated = est.mean.mean(0)  # NaN if any fraction lacks an estimate
  return CScores(fractions=groups, estimate=est, integrated=integrated)


def memorisation(correct: Any, mask: Any, fractions: Any = None, valid: Any = None, *,
                 min_holdout: int = 2) -> Memorisation:
  """Memorisation estimate per subset fraction.

  Feldman & Zhang 2020, "What Neural Networks Memorize and Why: Discovering the Long Tail via
  Influence Estimation":
  mem(A, S, i) = P_{h ~ A(S)}[h(x_i) = y_i] - P_{h ~ A(S \\ i)}[h(x_i) = y_i],
  estimated from models trained on random subsets as (accuracy on example i of the members that
  trained on it) - (accuracy of the members that did not), here within each subset fraction.

  Args:
    correct: `[R, N]` 0/1 correctness.
    mask: bool `[R, N]`, True where member r trained on example n.
    fractions: `[R]` subset fraction per member (None: one group).
    valid: optional bool `[R]`, False for diverged members.
    min_holdout: minimum members on each side; below it the value is NaN and flagged.

  Returns:
    Memorisation with arrays `[F, N]` over the fractions < 1.
  """
  correct, mask, valid, f, groups = _holdout_groups(correct, mask, fractions, valid,
                                                     "estimate memorisation")
  acc_in = _stack([member_mean(correct, mask, valid, side="in", members=f == g,
                               min_holdout=min_holdout) for g in groups])
  acc_out = _stack([member_mean(correct, mask, valid, side="out", members=f == g,
                                min_holdout=min_holdout) for g in groups])
  enough = acc_in.enough & acc_out.enough
  value = np.where(enough, acc_in.mean - acc_out.mean, np.nan)
  stderr = np.where(enough, np.sqrt(acc_in.stderr ** 2 + acc_out.stderr ** 2), np.nan)
  return Memorisation(fractions=groups, value=value, stderr=stderr, acc_in=acc_in,
                      acc_out=acc_out, enough=enough)


def oos_probs(probs: Any, mask: Any, valid: Any = None, *, min_holdout: int = 1
              ) -> tuple[np.ndarray, np.ndarray]:
  """Out-of-sample predicted probabilities: each example's mean prediction over held-out members.

  p_oos[n] = mean over {r : valid[r], not mask[r, n]} of p_r[n], the cross-validated `pred_probs`
  that cleanlab's `find_label_issues` expects (Northcutt, Jiang & Chuang 2021, "Confident
  Learning"),
  with random subsets in place of K folds.

  Args:
    probs: float `[R, N, C]` every member's predicted probabilities on every training example.
    mask: bool `[R, N]`, True where member r trained on example n.
    valid: optional bool `[R]`, False for diverged members.
    min_holdout: rows with fewer held-out members are NaN.

  Returns:
    (float64 `[N, C]` probabilities, rows summing to 1, NaN rows where too few members held the
     example out; int64 `[N]` number of held-out members).
  """
  probs, mask, valid = _check(probs, mask, valid)
  if probs.ndim != 3:
    raise ValueError(f"probs must be [R, N, C]; got {probs.shape}")
  k_min = _min_count(min_holdout)
  sel = ~mask & valid[:, None]
  count = sel.sum(0)
  total = np.where(sel[..., None], probs.astype(np.float64), 0.0).sum(0)
  with np.errstate(invalid="ignore", divide="ignore"):
    p = total / count[:, None]
  p = np.where((count >= k_min)[:, None], p, np.nan)
  return p, count.astype(np.int64)


# ----------------------------------------------------------------------------- analysis


@dataclasses.dataclass
class HeldoutResult:
  """Everything `analyze` estimates from one workdir (see the functions for definitions).

  Attributes:
    c: CScores `[F, N]` from 0/1 correctness.
    c_soft: CScores `[F, N]` from p_y (held-out confidence per fraction).
    mem: Memorisation `[F, N]`.
    oos_probs: float64 `[N, C]` out-of-sample probabilities (NaN rows: no held-out member).
    oos_count: int64 `[N]`.
    in_probs: float64 `[N, C]` mean over the members that trained on each example (in-sample).
    labels: int `[N]`.
  """
  c: CScores
  c_soft: CScores
  mem: Memorisation
  oos_probs: np.ndarray
  oos_count: np.ndarray
  in_probs: np.ndarray
  labels: np.ndarray


# The stages of `analyze`, in order (the progress lines name them).
STAGES = ("probabilities", "c_scores", "c_scores_soft", "memorisation", "oos_probs")


def analyze(w: WorkdirArrays, *, min_holdout: int = 2, progress: bool = True,
            stages: progress_lib.Stages | None = None) -> HeldoutResult:
  """C-scores, memorisation and out-of-sample probabilities of a workdir's final members.

  Args:
    w: the workdir's arrays (`read_workdir`).
    min_holdout: fewer held-out members than this: NaN (flagged).
    progress: log each stage (`STAGES`) as it ends, with the time so far and the stages left
      (absl INFO, `jaxdiff.progress`); False: silent.
    stages: log to these stages instead (`load_report`'s, which also times the reading).
  """
  prog = stages or progress_lib.Stages("heldout", STAGES, progress)
  if stages is None:
    prog.plan(f"{w.mask.shape[1]} examples x {w.mask.shape[0]} members")
  probs = softmax(w.logits)
  correct = correctness(w.logits, w.labels)
  py = label_prob(probs, w.labels)
  prog.done("probabilities")
  c = c_scores(correct, w.mask, w.fractions, w.valid, min_holdout=min_holdout)
  prog.done("c_scores")
  c_soft = c_scores(py, w.mask, w.fractions, w.valid, min_holdout=min_holdout)
  prog.done("c_scores_soft")
  mem = memorisation(correct, w.mask, w.fractions, w.valid, min_holdout=min_holdout)
  prog.done("memorisation")
  p_oos, count = oos_probs(probs, w.mask, w.valid, min_holdout=1)
  p_in, _ = oos_probs(probs, ~w.mask, w.valid, min_holdout=1)  # "held out" of ~mask = trained on
  prog.done("oos_probs")
  return HeldoutResult(c=c, c_soft=c_soft, mem=mem, oos_probs=p_oos, oos_count=count,
                       in_probs=p_in, labels=np.asarray(w.labels))


def heldout_difficulty(result: HeldoutResult) -> tuple[dict[str, np.ndarray],
                                                       dict[str, np.ndarray]]:
  """Per-example held-out scores and their in-sample counterparts, oriented higher-is-harder.

  The registry's "heldout" and "insample" families (`scores.registry`), negated ones named
  `neg_<name>`. Held-out: `neg_c_score` (-integrated C-score), `neg_c_score_soft` (-integrated
  held-out p_y), `neg_oos_p_y` (-p_y of the out-of-sample probabilities), `oos_margin`
  (max_{c != y} p_c - p_y of the out-of-sample probabilities), `memorisation` (mean over
  fractions; high = the example is only right when trained on: suspicious). In-sample (members
  that trained on the example): `neg_in_p_y`, `in_margin`.

  Returns:
    (held-out name -> float64 `[N]`, in-sample name -> float64 `[N]`); NaN where undefined.
  """
  y = result.labels
  oos, ins = margins(result.oos_probs, y), margins(result.in_probs, y)
  held = {"c_score": result.c.integrated, "c_score_soft": result.c_soft.integrated,
          "oos_p_y": oos["target"], "oos_margin": -oos["margin"],
          "memorisation": result.mem.value.mean(0)}
  insample = {"in_p_y": ins["target"], "in_margin": -ins["margin"]}
  return (registry.oriented(held, registry.heldout_name),
          registry.oriented(insample, registry.heldout_name))


def noise_auroc_rows(heldout_scores: dict[str, np.ndarray], insample_scores: dict[str, np.ndarray],
                     stored_scores: dict[str, np.ndarray], noise_mask: Any, *,
                     full_data_scores: dict[str, np.ndarray] | None = None
                     ) -> tuple[list[dict], np.ndarray]:
  """AUROC for finding flipped labels: held-out scores next to in-sample ones.

  Every score is oriented higher-is-harder (a flipped label should score high) and evaluated with
  `scores.auroc` on common examples: those where every held-out and in-sample score defined on
  at least half of the examples is defined. A score defined on fewer (e.g. memorisation with few
  members) is evaluated on its own examples; each row says how many it used. Subset masks are
  drawn independently of the labels, so dropping undefined examples does not bias an AUROC.

  Args:
    heldout_scores: name -> `[N]` (from `heldout_difficulty`), kind "held-out".
    insample_scores: name -> `[N]` over the members that trained on each example, kind
      "in-sample".
    stored_scores: name -> `[R, N]` per-member scores (scores/; rows with NaN, the diverged
      members, are dropped); the run-averaged score, kind "stored".
    noise_mask: bool `[N]`.
    full_data_scores: optional name -> `[R', N]` stored scores of another ensemble trained on
      every example (same data and flipped labels): purely in-sample, kind "full-data".

  Returns:
    (rows {"score", "kind", "auroc", "examples"} sorted by AUROC, bool `[N]` the common examples).
  """
  from jaxdiff.scores import auroc  # pylint: disable=g-import-not-at-top
  noisy = np.asarray(noise_mask, bool)
  per_example = {(kind, name): ~np.isnan(np.asarray(v, np.float64))
                 for kind, group in (("held-out", heldout_scores), ("in-sample", insample_scores))
                 for name, v in group.items()}
  keep = np.ones(noisy.shape, bool)
  for ok in per_example.values():
    if ok.mean() >= 0.5:
      keep &= ok

  def row(name, kind, v, sel):
    if noisy[sel].all() or not noisy[sel].any():
      return None  # AUROC undefined without both flipped and clean examples
    return {"score": name, "kind": kind, "auroc": auroc(v[sel], noisy[sel]),
            "examples": int(sel.sum())}

  rows = []
  for kind, group in (("held-out", heldout_scores), ("in-sample", insample_scores)):
    for name, v in group.items():
      v = np.asarray(v, np.float64)
      ok = per_example[(kind, name)]
      rows.append(row(name, kind, v, keep if ok.mean() >= 0.5 else ok))
  for kind, group in (("stored", stored_scores), ("full-data", full_data_scores or {})):
    for name, s in group.items():
      s = np.asarray(s, np.float64)
      s = s[~np.isnan(s).any(axis=1)]
      if s.shape[0] == 0:
        continue
      m = s.mean(0)
      if np.isnan(m[keep]).any() or np.all(m[keep] == m[keep][0]):
        continue  # undefined somewhere, or constant: uninformative
      rows.append(row(name, kind, m, keep))
  return sorted((r for r in rows if r), key=lambda r: -r["auroc"]), keep


def save_result(result: HeldoutResult, out_dir: str, example_ids: Any = None) -> list[str]:
  """Writes the arrays of `result` as .npy files under `out_dir` (atomically).

  Files: fractions [F]; c_score, c_score_stderr, c_score_count, c_score_enough [F, N];
  c_score_integrated [N]; c_score_soft [F, N] (held-out p_y); memorisation, memorisation_stderr,
  memorisation_enough [F, N]; oos_probs [N, C], oos_count [N]; in_probs [N, C]; labels [N];
  example_ids [N] (when given).

  Returns:
    the paths written.
  """
  arrays = {"fractions": result.c.fractions, "c_score": result.c.estimate.mean,
            "c_score_stderr": result.c.estimate.stderr, "c_score_count": result.c.estimate.count,
            "c_score_enough": result.c.estimate.enough, "c_score_integrated": result.c.integrated,
            "c_score_soft": result.c_soft.estimate.mean, "memorisation": result.mem.value,
            "memorisation_stderr": result.mem.stderr, "memorisation_enough": result.mem.enough,
            "oos_probs": result.oos_probs, "oos_count": result.oos_count,
            "in_probs": result.in_probs, "labels": result.labels}
  if example_ids is not None:
    arrays["example_ids"] = np.asarray(example_ids, np.int64)
  paths = []
  for name, a in arrays.items():
    path = os.path.join(out_dir, f"{name}.npy")
    store.atomic_save_npy(path, np.asarray(a))
    paths.append(path)
  return paths


@dataclasses.dataclass
class HeldoutReport:
  """What the held-out report of a workdir shows (`load_report`; written by
  `jaxdiff.report.heldout.write_report`).

  Attributes:
    workdir: the workdir's arrays.
    result: its C-scores, memorisation and out-of-sample probabilities.
    auroc_rows: the label-noise AUROC rows (`noise_auroc_rows`), None without label noise.
    min_holdout: the fewest held-out members an estimate needs.
  """
  workdir: WorkdirArrays
  result: HeldoutResult
  auroc_rows: list[dict] | None
  min_holdout: int


def load_report(workdir: str, *, min_holdout: int = 2, full_data_workdir: str | None = None,
                progress: bool = True) -> HeldoutReport:
  """Reads and checks every input of the held-out report of a workdir trained on subsets, and
  computes it; nothing is written. With `progress`, logs each stage (reading, `STAGES`, the
  label-noise AUROC) as it ends, with the time so far and what is left.

  With label noise, `full_data_workdir` (an ensemble trained on every example of the same data)
  adds its stored scores as the "full-data" rows of the AUROC table.

  Raises:
    ValueError (store.StoreError for files): a workdir without subsets, a missing, corrupt or
      truncated file (named), a full-data workdir trained on other data (naming the difference)
      or given for a workdir without label noise.
  """
  prog = progress_lib.Stages("heldout", ("read", *STAGES), progress)
  w = read_workdir(workdir)
  if not w.has_subsets:
    raise ValueError(f"{workdir} was trained without subsets (every member saw every example): "
                     "retrain with --config.subset_fraction=0.5")
  prog.plan(workdir)  # once the workdir is known to be one (bad input stays one error line)
  noisy = w.noise_mask is not None and bool(w.noise_mask.any())
  full = None
  if full_data_workdir:
    if not noisy:
      raise ValueError(f"full_data_workdir={full_data_workdir!r} only adds rows to the label-noise "
                       f"AUROC table, and {workdir!r} has no flipped labels (train both with "
                       "--config.data.label_noise > 0)")
    store.check_distinct_paths([workdir, full_data_workdir])
    f = read_workdir(full_data_workdir)
    fs = workdir_lib.load_scores(full_data_workdir)
    store.check_compatible({workdir: workdir_lib.load_scores(workdir),
                            full_data_workdir: fs})
    if f.noise_mask is None or not np.array_equal(f.noise_mask, w.noise_mask):
      raise store.StoreError(f"{full_data_workdir!r} flipped other labels than {workdir!r}: "
                             "train it with the same data.label_noise and data.noise_seed")
    full = {k: fs.get(k) for k in fs.scores if k != "mb_presentations"}
  if noisy:
    prog.planned.append("auroc")
  prog.done("read")
  res = analyze(w, min_holdout=min_holdout, stages=prog)
  rows = None
  if noisy:
    s = workdir_lib.load_scores(workdir)
    held, insample = heldout_difficulty(res)
    rows, _ = noise_auroc_rows(held, insample,
                               {k: s.get(k) for k in s.scores if k != "mb_presentations"},
                               w.noise_mask, full_data_scores=full)
    prog.done("auroc")
  return HeldoutReport(w, res, rows, min_holdout)

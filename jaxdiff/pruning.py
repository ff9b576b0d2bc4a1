"""Dataset pruning by difficulty scores: which examples to keep, and fresh ensembles trained on it.

Prunes a fraction of the training set by one run's score, by the score averaged over runs, or at
random; keeps the hardest or the easiest examples; retrains seeds on what is kept and reports their
test accuracy (the practical use of difficulty scores; Paul et al. 2021, Sorscher et al. 2022).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np
import pandas as pd
import scipy.stats

from jaxdiff import data as data_lib
from jaxdiff import store
from jaxdiff import workdir as workdir_lib

# How the ranking is made: one run's score ("single"), the mean over all valid runs ("mean"),
# or no score ("random"); and which side of the ranking is kept.
METHODS = ("single", "mean", "random")
KEEP = ("hardest", "easiest")


@dataclasses.dataclass(frozen=True)
class Condition:
  """One pruned training set.

  Attributes:
    method: "full" (no pruning) or one of `METHODS`.
    keep: "all" (full), "random", or one of `KEEP` (the side of the ranking that is kept).
    fraction: fraction of the training set pruned (0 for "full").
  """
  method: str
  keep: str
  fraction: float

  @property
  def name(self) -> str:
    if self.method == "full":
      return "full"
    if self.method == "random":
      return f"random_p{round(100 * self.fraction):02d}"
    return f"{self.method}_{self.keep}_p{round(100 * self.fraction):02d}"


def check_fraction(fraction: float) -> float:
  if not 0.0 < float(fraction) < 1.0:
    raise ValueError(f"pruned fraction {fraction!r} must be in (0, 1)")
  return float(fraction)


def conditions(fractions: Sequence[float], methods: Sequence[str] = METHODS,
               keep: Sequence[str] = KEEP, include_full: bool = True) -> list[Condition]:
  """All pruning conditions: the full set, then per fraction every (method, kept side).

  Random pruning has no side, so it appears once per fraction.

  Raises:
    ValueError naming an unknown method or side, or a fraction outside (0, 1).
  """
  for m in methods:
    if m not in METHODS:
      raise ValueError(f"unknown pruning method {m!r}; valid choices: {METHODS}")
  for k in keep:
    if k not in KEEP:
      raise ValueError(f"unknown kept side {k!r}; valid choices: {KEEP}")
  out = [Condition("full", "all", 0.0)] if include_full else []
  for f in fractions:
    f = check_fraction(f)
    for m in methods:
      if m == "random":
        out.append(Condition("random", "random", f))
      else:
        out += [Condition(m, k, f) for k in keep]
  return out


def num_kept(num_examples: int, fraction: float) -> int:
  """Examples left after pruning `fraction` of `num_examples`: N - round(fraction N)."""
  return int(num_examples - round(fraction * num_examples))


def ranking_score(scores: np.ndarray, method: str, single_run: int = 0) -> np.ndarray:
  """The per-example score a method ranks by (higher = harder), float64 `[N]`.

  Args:
    scores: `[R, N]` one score over the valid runs of the scoring ensemble.
    method: "single" (row `single_run`) or "mean" (mean over the R runs, the averaged score Kwok
      et al. 2024 recommend over single-run scores).
  """
  s = np.asarray(scores)
  if s.ndim != 2:
    raise ValueError(f"scores must have shape [runs, examples], got {s.shape}")
  if method == "single":
    if not 0 <= single_run < s.shape[0]:
      raise ValueError(f"single_run={single_run} is out of range for {s.shape[0]} runs")
    out = s[single_run].astype(np.float64)
  elif method == "mean":
    out = s.mean(axis=0, dtype=np.float64)
  else:
    raise ValueError(f"method {method!r} ranks by no score; valid choices: ('single', 'mean')")
  if not np.isfinite(out).all():
    raise ValueError(f"the {method} score has non-finite values; drop diverged runs "
                     "(ScoreSet.get does) or choose a finite score")
  return out


def kept_indices(scores: np.ndarray | None, condition: Condition, *, single_run: int = 0,
                 seed: int = 0, num_examples: int | None = None) -> np.ndarray:
  """Positions (sorted, int64 `[K]`) of the examples kept under `condition`.

  K = N - round(fraction N). "hardest" keeps the K highest scores (prunes the easiest, as Paul et
  al. 2021 do), "easiest" the K lowest; ties are broken by a permutation seeded by `seed` and the
  fraction (uniformly random among the tied examples at the cut), so a discrete score (forgetting
  events, 0/1 correctness) is not pruned by example order. "random" keeps a seeded uniform subset
  of size K.

  Args:
    scores: `[R, N]` (may be None for "full" and "random" when `num_examples` is given).
    condition: a `Condition`.
    single_run: the run used by "single".
    seed: seeds the tie-break and the random subset.
    num_examples: N when `scores` is None.
  """
  n = np.shape(scores)[1] if scores is not None else num_examples
  if n is None:
    raise ValueError("give scores or num_examples")
  if condition.method == "full":
    return np.arange(n, dtype=np.int64)
  k = num_kept(n, check_fraction(condition.fraction))
  rng = np.random.default_rng([seed, round(1e6 * condition.fraction)])
  if condition.method == "random":
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
  if condition.keep not in KEEP:
    raise ValueError(f"unknown kept side {condition.keep!r}; valid choices: {KEEP}")
  s = ranking_score(scores, condition.method, single_run)
  key = -s if condition.keep == "hardest" else s
  order = np.lexsort((rng.permutation(n), key))  # by key, then the random tie-break
  return np.sort(order[:k]).astype(np.int64)


def ids_digest(ids: np.ndarray) -> str:
  """Short SHA-256 of an id array: names a kept subset in the training config, so a workdir
  trained on another subset is refused on resume (`train.check_workdir`)."""
  return hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes()).hexdigest()[:12]


def condition_config(base: ml_collections.ConfigDict, ds: data_lib.Dataset, kept: np.ndarray,
                     label: str) -> ml_collections.ConfigDict:
  """The training config of one condition: `base` with the kept examples as "arrays" data.

  Labels are taken as they are in `ds` (after any label noise), so no noise is added again.
  """
  cfg = ml_collections.ConfigDict(base.to_dict())
  cfg.data = ml_collections.ConfigDict(dict(
      name="arrays", label=f"{ds.name}:{label}:{len(kept)}:{ids_digest(kept)}",
      num_classes=ds.num_classes, num_train=0, label_noise=0.0, noise_seed=0))
  return cfg


def read_test_accuracy(workdir: str) -> pd.DataFrame:
  """Final-epoch test accuracy per member from `<workdir>/metrics.jsonl` (columns member, epoch,
  test_acc, diverged)."""
  recs = workdir_lib.read_metrics(workdir)
  if not recs:
    raise ValueError(f"{workdir_lib.path(workdir, 'metrics')} is empty")
  last = max(r["epoch"] for r in recs)
  rows = [dict(member=r["member"], epoch=r["epoch"], test_acc=r["test_acc"],
               diverged=bool(r["diverged"])) for r in recs if r["epoch"] == last]
  return pd.DataFrame(rows).sort_values("member", ignore_index=True)


def run_pruning(train_config: ml_collections.ConfigDict, ds: data_lib.Dataset,
                scores: np.ndarray, example_ids: np.ndarray, workdir: str, *,
                fractions: Sequence[float] = (0.1, 0.3, 0.5), methods: Sequence[str] = METHODS,
                keep: Sequence[str] = KEEP, single_run: int = 0, seed: int = 0,
                train_fn: Callable[..., Any] | None = None,
                on_condition: Callable[[str, int, int], None] | None = None,
                on_trained: Callable[[str, float], None] | None = None) -> pd.DataFrame:
  """Trains one fresh ensemble per condition on the kept examples; resumable.

  Every condition's ensemble uses the same config and seeds (`train_config.seed`, members
  0..num_runs-1), so conditions are compared seed by seed. A condition whose
  `<workdir>/<name>/scores/meta.json` exists is not retrained; an interrupted one resumes.

  Args:
    train_config: jaxdiff training config (model, optimiser, epochs, num_runs = seeds).
    ds: the training set the scores were computed on.
    scores: `[R, N]` one score over the scoring ensemble's valid runs, columns in `example_ids`
      order.
    example_ids: `[N]` ids of the score columns; must equal `ds.example_ids`.
    workdir: folder of the condition workdirs.
    fractions, methods, keep: see `conditions`.
    single_run: the run whose score "single" uses.
    seed: seeds random subsets and tie-breaks.
    train_fn: `train.train_and_evaluate` (replaceable in tests).
    on_condition: called with (name, index, total) before each condition (progress).
    on_trained: called with (name, seconds) after a condition was trained (not when skipped).

  Returns:
    One row per (condition, seed): condition, method, keep, fraction, kept, seed, test_acc,
    diverged.
  """
  if train_fn is None:
    from jaxdiff import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  example_ids = np.asarray(example_ids)
  if example_ids.shape != ds.example_ids.shape or not np.array_equal(example_ids, ds.example_ids):
    raise ValueError(f"the scores cover {example_ids.size} example ids that do not match the "
                     f"dataset's {ds.example_ids.size}; score and prune the same training set")
  conds = conditions(fractions, methods, keep)
  rows = []
  for i, cond in enumerate(conds):
    if on_condition is not None:
      on_condition(cond.name, i, len(conds))
    kept = kept_indices(scores, cond, single_run=single_run, seed=seed)
    wd = os.path.join(workdir, cond.name)
    done = workdir_lib.scores_complete(wd)
    if not done:
      cfg = condition_config(train_config, ds, kept, cond.name)
      arrays = dict(x_train=ds.x_train[kept], y_train=ds.y_train[kept], x_test=ds.x_test,
                    y_test=ds.y_test)
      # The kept subset's digest is in cfg.data.label, so resuming a workdir trained on another
      # subset is refused by train.check_workdir before kept_ids.npy is rewritten.
      t0 = time.perf_counter()
      train_fn(cfg, wd, arrays=arrays)
      store.atomic_save_npy(workdir_lib.path(wd, "kept_ids"), ds.example_ids[kept])
      if on_trained is not None:
        on_trained(cond.name, time.perf_counter() - t0)
    else:
      saved = np.load(workdir_lib.path(wd, "kept_ids"))
      if not np.array_equal(saved, ds.example_ids[kept]):
        raise ValueError(f"{wd} was trained on another kept subset ({saved.size} ids) than "
                         f"condition {cond.name} selects now ({kept.size}); the scores changed. "
                         "Remove the pruning folder to retrain.")
    acc = read_test_accuracy(wd)
    for r in acc.itertuples(index=False):
      rows.append(dict(condition=cond.name, method=cond.method, keep=cond.keep,
                       fraction=cond.fraction, kept=int(kept.size), seed=int(r.member),
                       test_acc=float(r.test_acc), diverged=bool(r.diverged)))
  return pd.DataFrame(rows)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
  """Per condition: test accuracy mean, std (ddof=1), min, max over the non-diverged seeds, and
  the mean difference to the full-data ensemble (paired by seed)."""
  ok = results[~results.diverged]
  full = ok[ok.method == "full"].set_index("seed").test_acc
  rows = []
  for name, g in ok.groupby("condition", sort=False):
    acc = g.test_acc.to_numpy()
    diff = (g.set_index("seed").test_acc - full).dropna()
    rows.append(dict(condition=name, method=g.method.iloc[0], keep=g.keep.iloc[0],
                     fraction=float(g.fraction.iloc[0]), kept=int(g.kept.iloc[0]),
                     seeds=int(acc.size), mean=float(acc.mean()),
                     std=float(acc.std(ddof=1)) if acc.size > 1 else float("nan"),
                     min=float(acc.min()), max=float(acc.max()),
                     vs_full=float(diff.mean()) if diff.size else float("nan")))
  return pd.DataFrame(rows)


def averaging_effect(results: pd.DataFrame) -> pd.DataFrame:
  """Does averaging the score over runs change the pruned model's accuracy?

  For each (fraction, kept side): the mean over seeds of acc(mean-score subset) - acc(single-run
  subset), its std, and the two-sided paired t-test p-value over seeds (`scipy.stats.ttest_rel`;
  the seeds share initialisations and data orders across conditions, so they pair).
  """
  ok = results[~results.diverged]
  rows = []
  for (f, k), g in ok[ok.method.isin(["single", "mean"])].groupby(["fraction", "keep"]):
    piv = g.pivot_table(index="seed", columns="method", values="test_acc").dropna()
    if not {"single", "mean"} <= set(piv.columns) or len(piv) == 0:
      continue
    d = (piv["mean"] - piv["single"]).to_numpy()
    p = (float(scipy.stats.ttest_rel(piv["mean"], piv["single"]).pvalue)
         if len(d) > 1 and np.ptp(d) > 1e-6 else float("nan"))  # constant d: t undefined
    rows.append(dict(fraction=float(f), keep=k, seeds=int(len(d)),
                     mean_minus_single=float(d.mean()),
                     std=float(d.std(ddof=1)) if len(d) > 1 else float("nan"), p_value=p))
  return pd.DataFrame(rows, columns=["fraction", "keep", "seeds", "mean_minus_single", "std",
                                     "p_value"])


def subset_overlap(scores: np.ndarray, fractions: Sequence[float], keep: Sequence[str] = KEEP, *,
                   single_run: int = 0, seed: int = 0) -> pd.DataFrame:
  """E|kept(single) & kept(mean)| / K per fraction and side: how much the single-run choice of
  examples differs from the averaged one (random subsets of the same size overlap K / N).

  The expectation is over independent uniformly random tie-breaks of the two rankings
  (`analysis.agreement.selection_probabilities`), so a tied score does not agree with itself only
  through a shared tie order; without ties it is the overlap of the two kept sets. `seed` is
  unused (kept for callers).
  """
  from jaxdiff.analysis import agreement  # pylint: disable=g-import-not-at-top
  del seed
  rows = []
  n = np.shape(scores)[1]
  for f in fractions:
    size = num_kept(n, check_fraction(f))
    for k in keep:
      pa, pb = (agreement.selection_probabilities(ranking_score(scores, m, single_run), size, k)
                for m in ("single", "mean"))
      rows.append(dict(fraction=float(f), keep=k, kept=size,
                       overlap=float(agreement.expected_overlap(pa, pb, size)),
                       chance=float(size / n)))
  return pd.DataFrame(rows)


def training_config(base: ml_collections.ConfigDict, model: Mapping[str, Any], *, num_seeds: int,
                    num_epochs: int, seed: int, scores: Mapping[str, Any] | None = None,
                    label: str = "") -> ml_collections.ConfigDict:
  """The config pruned ensembles train with: `base` with the scoring architecture's `model`,
  `num_seeds` members, `num_epochs`, a fresh `seed`, and the (cheaper) recording options `scores`
  (the pruning study needs test accuracy only)."""
  if int(num_seeds) < 1 or int(num_epochs) < 1:
    raise ValueError(f"pruning needs num_seeds >= 1 and num_epochs >= 1; got {num_seeds}, "
                     f"{num_epochs}")
  cfg = ml_collections.ConfigDict(base.to_dict())
  cfg.model = ml_collections.ConfigDict(dict(model))
  cfg.num_runs = int(num_seeds)
  cfg.num_epochs = int(num_epochs)
  cfg.seed = int(seed)
  cfg.first_member = 0
  cfg.arch_label = label
  if scores:
    merged = dict(cfg.scores.to_dict()) if "scores" in cfg else {}
    merged.update(dict(scores))
    cfg.scores = ml_collections.ConfigDict(merged)
  return cfg

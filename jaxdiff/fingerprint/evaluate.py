"""Evaluation of architecture fingerprints: run splits, accuracy vs k and vs runs, hold-one-out.

`run_report` returns a `Report`; `jaxdiff.report.fingerprint` writes it (markdown, CSV, figure).

Protocol: each architecture's runs are split once, seeded, into fit and test runs. Example
selection, z-scoring, the L2 strength (cross-validated), k-means and the "none of these" threshold
all see the fit runs only; test accuracy is measured on the test runs only.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from jaxdiff import store
from jaxdiff.workdir import load_workdirs  # pylint: disable=unused-import (re-exported)
from jaxdiff.fingerprint import classify, model, selection

DEFAULT_KS = (1, 10, 100, 1000)
BASELINE = "mean_score"  # the dataset-mean score of each run as its only feature(s)


@dataclasses.dataclass
class RunScores:
  """The runs of several architectures stacked together.

  Attributes:
    x: float `[R, S, N]` scores (R runs over all architectures, S score names, N examples).
    y: int `[R]` architecture index of each run.
    arch_names: `[C]`; score_names: `[S]`; example_ids: `[N]`; dataset: the shared dataset name.
  """
  x: np.ndarray
  y: np.ndarray
  arch_names: list[str]
  score_names: list[str]
  example_ids: np.ndarray
  dataset: str | None = None

  @property
  def num_classes(self) -> int:
    return len(self.arch_names)


def collect_runs(sets: Mapping[str, store.ScoreSet], score_names: Sequence[str]) -> RunScores:
  """Stacks the valid (non-diverged) runs of each architecture's score set.

  Args:
    sets: architecture name -> its `ScoreSet`; `store.check_compatible` is applied (its StoreError
      propagates: sets on other datasets or example ids are refused).
    score_names: the scores to use as features.
  """
  store.check_compatible(sets)
  if not score_names:
    raise ValueError("give at least one score name")
  xs, ys = [], []
  for c, (name, s) in enumerate(sets.items()):
    missing = [n for n in score_names if n not in s.scores]
    if missing:
      raise ValueError(f"architecture {name!r} lacks scores {missing}; it has {sorted(s.scores)}")
    x = np.stack([s.get(n) for n in score_names], axis=1)  # [R_c, S, N]
    if x.shape[0] < 2:
      raise ValueError(f"architecture {name!r} has {x.shape[0]} valid runs; need >= 2 (fit + test)")
    if not np.isfinite(x).all():
      raise ValueError(f"architecture {name!r} has non-finite scores in non-diverged runs")
    xs.append(x)
    ys.append(np.full(x.shape[0], c, np.int64))
  first = next(iter(sets.values()))
  return RunScores(x=np.concatenate(xs).astype(np.float64), y=np.concatenate(ys),
                   arch_names=list(sets), score_names=list(score_names),
                   example_ids=np.asarray(first.example_ids), dataset=first.meta.get("dataset"))


def split_runs(y: np.ndarray, fit_fraction: float = 0.5,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Seeded stratified split of runs into disjoint fit and test runs.

  Each architecture's runs are shuffled; the first round(fit_fraction * n) (at least 1, at most
  n - 1) are fit runs. Fit runs are returned architecture by architecture in their shuffled order,
  so taking the first m of each gives nested subsets (`accuracy_vs_fit_runs`).

  Returns:
    `(fit_idx, test_idx)` int arrays into the runs.
  """
  if not 0.0 < fit_fraction < 1.0:
    raise ValueError(f"fit_fraction must be in (0, 1); got {fit_fraction}")
  y = np.asarray(y)
  rng = np.random.default_rng([seed, 1])
  fit, test = [], []
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    if len(idx) < 2:
      raise ValueError(f"architecture {c} has {len(idx)} runs; need >= 2 to split")
    m = int(np.clip(round(fit_fraction * len(idx)), 1, len(idx) - 1))
    fit.append(idx[:m])
    test.append(idx[m:])
  return np.concatenate(fit), np.sort(np.concatenate(test))


def _ks(ks: Sequence[int], n: int) -> list[int]:
  if any(int(k) < 1 for k in ks):
    raise ValueError(f"every k must be >= 1; got {list(ks)}")
  return sorted({min(int(k), n) for k in ks})


def _fit_eval(data: RunScores, fit_idx, test_idx, *, k, ranking, method, classifiers, opts):
  """Trains on fit runs with the ranking's top k; returns ({classifier: accuracy}, n_selected)."""
  fp = model.fit_fingerprint(data.x[fit_idx], data.y[fit_idx], arch_names=data.arch_names,
                             score_names=data.score_names, example_ids=data.example_ids, k=k,
                             method=method, ranking=ranking, calibrate=False,
                             dataset=data.dataset, **opts)
  f_test = _features(data.x[test_idx], ranking.top(k))
  acc = {c: float(np.mean(fp.classifier.predict(f_test, c) == data.y[test_idx]))
         for c in classifiers}
  return acc, len(fp.example_ids)


def _features(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
  return x[:, :, idx].reshape(x.shape[0], -1)


def _baseline(data: RunScores, fit_idx, test_idx, classifiers, opts) -> dict[str, float]:
  mean_f = data.x.mean(2)  # [R, S]
  clf = classify.train_classifier(mean_f[fit_idx], data.y[fit_idx], data.num_classes,
                                  l2_grid=opts["l2_grid"], cv_folds=opts["cv_folds"],
                                  seed=opts["seed"], kmeans_restarts=opts["kmeans_restarts"])
  return {c: float(np.mean(clf.predict(mean_f[test_idx], c) == data.y[test_idx]))
          for c in classifiers}


def _opts(seed, l2_grid, cv_folds, kmeans_restarts, test, alpha):
  return dict(seed=seed, l2_grid=l2_grid, cv_folds=cv_folds, kmeans_restarts=kmeans_restarts,
              test=test, alpha=alpha)


def accuracy_vs_k(data: RunScores, fit_idx: np.ndarray, test_idx: np.ndarray, *,
                  ks: Sequence[int] = DEFAULT_KS,
                  methods: Sequence[str] = selection.SELECTION_METHODS,
                  classifiers: Sequence[str] = classify.CLASSIFIERS, test: str = "anova",
                  alpha: float = 0.05, seed: int = 0, random_repeats: int = 5,
                  l2_grid=classify.DEFAULT_L2_GRID, cv_folds: int = 5,
                  kmeans_restarts: int = 10) -> pd.DataFrame:
  """Test accuracy of each (selection method, classifier) for each k, plus the mean-score baseline.

  Args:
    data: all runs; fit_idx / test_idx: disjoint run indices (`split_runs`).
    ks: numbers of examples (capped at N, deduplicated).
    methods: selection methods (`selection.SELECTION_METHODS`); "random" is averaged over
      `random_repeats` seeded draws.
    classifiers: subset of `classify.CLASSIFIERS`.
    test, alpha: the per-example test and the Bonferroni level.

  Returns:
    Long table, one row per (method, classifier, k): columns method, classifier, k, n_selected,
    accuracy (mean over repeats), accuracy_sd (over repeats; 0 if one), repeats, n_fit, n_test,
    chance (1 / C). Method `BASELINE` rows repeat one k-independent accuracy at every k.
  """
  _check_split(data, fit_idx, test_idx)
  for m in methods:
    if m not in selection.SELECTION_METHODS:
      raise ValueError(f"unknown selection method {m!r}; "
                       f"valid choices: {selection.SELECTION_METHODS}")
  opts = _opts(seed, l2_grid, cv_folds, kmeans_restarts, test, alpha)
  ks = _ks(ks, data.x.shape[2])
  xf, yf = data.x[fit_idx], data.y[fit_idx]
  rows = []
  common = dict(n_fit=len(fit_idx), n_test=len(test_idx), chance=1.0 / data.num_classes)
  for method in methods:
    repeats = random_repeats if method == "random" else 1
    rankings = [selection.rank_examples(xf, yf, method, test=test, alpha=alpha,
                                        seed=seed + 1000 * rep, l2_grid=l2_grid, cv_folds=cv_folds)
                for rep in range(repeats)]
    for k in ks:
      accs = {c: [] for c in classifiers}
      n_sel = None
      for ranking in rankings:
        acc, n_sel = _fit_eval(data, fit_idx, test_idx, k=k, ranking=ranking, method=method,
                               classifiers=classifiers, opts=opts)
        for c in classifiers:
          accs[c].append(acc[c])
      for c in classifiers:
        rows.append(dict(method=method, classifier=c, k=k, n_selected=n_sel,
                         accuracy=float(np.mean(accs[c])), accuracy_sd=float(np.std(accs[c])),
                         repeats=repeats, **common))
  base = _baseline(data, fit_idx, test_idx, classifiers, opts)
  for k in ks:
    for c in classifiers:
      rows.append(dict(method=BASELINE, classifier=c, k=k, n_selected=0, accuracy=base[c],
                       accuracy_sd=0.0, repeats=1, **common))
  return pd.DataFrame(rows)


def _check_split(data: RunScores, fit_idx, test_idx) -> None:
  fit_idx, test_idx = np.asarray(fit_idx), np.asarray(test_idx)
  if np.intersect1d(fit_idx, test_idx).size:
    raise ValueError("fit and test runs overlap; a run must never be used for both")
  for name, idx in (("fit", fit_idx), ("test", test_idx)):
    counts = np.bincount(data.y[idx], minlength=data.num_classes)
    if counts.min() < 1:
      raise ValueError(f"every architecture needs {name} runs; got {counts.tolist()}")


def accuracy_vs_fit_runs(data: RunScores, fit_idx: np.ndarray, test_idx: np.ndarray, *,
                         fit_runs: Sequence[int] | None = None, k: int = 10,
                         methods: Sequence[str] = ("pvalue", "random"),
                         classifiers: Sequence[str] = ("logreg",), **kwargs) -> pd.DataFrame:
  """Test accuracy when only the first m fit runs of each architecture are used.

  The test runs stay the same; subsets are nested (see `split_runs`).

  Args:
    fit_runs: values of m (default 2, 4, 8, ... and the maximum), capped at the smallest
      architecture's fit-run count.
    k, methods, classifiers, kwargs: as in `accuracy_vs_k` (at one k).

  Returns:
    The `accuracy_vs_k` table for each m, with a column fit_runs_per_arch.
  """
  fit_idx = np.asarray(fit_idx)
  per = [fit_idx[data.y[fit_idx] == c] for c in range(data.num_classes)]
  most = min(len(p) for p in per)
  if fit_runs is None:
    fit_runs = [m for m in (2 ** np.arange(1, 12)) if m < most] + [most]
  grid = sorted({min(int(m), most) for m in fit_runs if int(m) >= 1})
  tables = []
  for m in grid:
    sub = np.concatenate([p[:m] for p in per])
    t = accuracy_vs_k(data, sub, test_idx, ks=[k], methods=methods, classifiers=classifiers,
                      **kwargs)
    tables.append(t.assign(fit_runs_per_arch=m))
  return pd.concat(tables, ignore_index=True)


def holdout(data: RunScores, fit_idx: np.ndarray, test_idx: np.ndarray, *, k: int = 10,
            method: str = "pvalue", test: str = "anova", alpha: float = 0.05, seed: int = 0,
            l2_grid=classify.DEFAULT_L2_GRID, cv_folds: int = 5, kmeans_restarts: int = 10,
            none_quantile: float = 0.99) -> pd.DataFrame:
  """Hold one architecture out: where do its runs go, and does "none of these" flag them?

  For each architecture h: select and train on the fit runs of the others only; then classify every
  run of h (none was seen) and the test runs of the others. The "none of these" rule flags a run
  whose distance to the nearest known class centroid (`classify.centroid_distance`) exceeds the
  `none_quantile` quantile of out-of-fold distances of the fit runs (`model.calibrate_threshold`).

  As an independent reference for "nearest relative", nearest_by_mean_scores is the known
  architecture whose per-example mean score vector (over fit runs, all N examples, all scores) is
  closest in RMS to h's.

  Returns:
    One row per held-out architecture: held_out, assigned_to (most frequent prediction),
    assigned_fractions ("name:fraction; ..."), nearest_by_mean_scores, flagged_fraction (of h's
    runs), known_false_flag (fraction of the others' test runs flagged), known_accuracy,
    mean_max_proba (held-out runs) and known_mean_max_proba, n_held_out, n_known_test, k, method.
  """
  if data.num_classes < 3:
    raise ValueError(f"hold-one-out needs >= 3 architectures (2 left to train on); "
                     f"got {data.num_classes}")
  _check_split(data, fit_idx, test_idx)
  rows = []
  fit_idx, test_idx = np.asarray(fit_idx), np.asarray(test_idx)
  profile = np.stack([data.x[fit_idx[data.y[fit_idx] == c]].mean(0)
                      for c in range(data.num_classes)])  # [C, S, N]
  for h, held in enumerate(data.arch_names):
    known = [c for c in range(data.num_classes) if c != h]
    relabel = np.full(data.num_classes, -1)
    relabel[known] = np.arange(len(known))
    fit_k = fit_idx[data.y[fit_idx] != h]
    test_k = test_idx[data.y[test_idx] != h]
    held_runs = np.flatnonzero(data.y == h)
    names = [data.arch_names[c] for c in known]
    fp = model.fit_fingerprint(data.x[fit_k], relabel[data.y[fit_k]], arch_names=names,
                               score_names=data.score_names, example_ids=data.example_ids, k=k,
                               method=method, test=test, alpha=alpha, seed=seed, l2_grid=l2_grid,
                               cv_folds=cv_folds, kmeans_restarts=kmeans_restarts,
                               none_quantile=none_quantile, dataset=data.dataset)
    ph = fp.predict(data.x[held_runs], data.example_ids)  # held-out architecture's runs
    pk = fp.predict(data.x[test_k], data.example_ids)
    frac = np.bincount(ph.label, minlength=len(known)) / len(held_runs)
    rms = np.sqrt(((profile[known] - profile[h]) ** 2).mean((1, 2)))
    rows.append(dict(
        held_out=held, assigned_to=names[int(frac.argmax())],
        assigned_fractions="; ".join(f"{n}:{f:.2f}" for n, f in zip(names, frac)),
        nearest_by_mean_scores=names[int(rms.argmin())],
        flagged_fraction=float(ph.none_of_these.mean()),
        known_false_flag=float(pk.none_of_these.mean()),
        known_accuracy=float(np.mean(pk.label == relabel[data.y[test_k]])),
        mean_max_proba=float(ph.proba.max(1).mean()),
        known_mean_max_proba=float(pk.proba.max(1).mean()),
        n_held_out=len(held_runs), n_known_test=len(test_k), k=len(fp.example_ids), method=method))
  return pd.DataFrame(rows)


@dataclasses.dataclass
class Report:
  """All results of `run_report`."""
  accuracy_vs_k: pd.DataFrame
  accuracy_vs_fit_runs: pd.DataFrame
  holdout: pd.DataFrame | None
  fingerprint: model.Fingerprint
  header: str
  title: str = ""


def run_report(data: RunScores, *, ks: Sequence[int] = DEFAULT_KS,
               methods: Sequence[str] = selection.SELECTION_METHODS, test: str = "anova",
               alpha: float = 0.05, fit_fraction: float = 0.5, seed: int = 0,
               random_repeats: int = 5, fingerprint_k: int = 10,
               fingerprint_method: str = "pvalue", holdout_k: int = 10,
               fit_runs_k: int = 10, l2_grid=classify.DEFAULT_L2_GRID, cv_folds: int = 5,
               kmeans_restarts: int = 10, none_quantile: float = 0.99) -> Report:
  """The whole study: split, accuracy vs k, vs fit runs, hold-one-out, and the saved fingerprint.

  The fingerprint is trained on the fit runs only, so the reported test accuracy applies to it.
  """
  fit_idx, test_idx = split_runs(data.y, fit_fraction, seed)
  opts = dict(test=test, alpha=alpha, seed=seed, l2_grid=l2_grid, cv_folds=cv_folds,
              kmeans_restarts=kmeans_restarts)
  acc_k = accuracy_vs_k(data, fit_idx, test_idx, ks=ks, methods=methods,
                        random_repeats=random_repeats, **opts)
  acc_r = accuracy_vs_fit_runs(data, fit_idx, test_idx, k=min(fit_runs_k, data.x.shape[2]),
                               random_repeats=random_repeats, **opts)
  hold = (holdout(data, fit_idx, test_idx, k=holdout_k, method=fingerprint_method,
                  none_quantile=none_quantile, **opts) if data.num_classes >= 3 else None)
  fp = model.fit_fingerprint(data.x[fit_idx], data.y[fit_idx], arch_names=data.arch_names,
                             score_names=data.score_names, example_ids=data.example_ids,
                             k=fingerprint_k, method=fingerprint_method,
                             none_quantile=none_quantile, dataset=data.dataset, **opts)
  counts = {n: int((data.y == c).sum()) for c, n in enumerate(data.arch_names)}
  header = (f"dataset {data.dataset!r}, scores {data.score_names}, {data.x.shape[2]} examples; "
            f"runs per architecture {counts}; fit/test split {len(fit_idx)}/{len(test_idx)} runs "
            f"(fit_fraction={fit_fraction}, seed={seed}); per-example test: {test}; "
            f"chance = {1 / data.num_classes:.3f}")
  title = (f"{'+'.join(data.score_names)} on {data.dataset}: {', '.join(data.arch_names)}; "
           f"{len(test_idx)} test runs")
  return Report(acc_k, acc_r, hold, fp, header, title)

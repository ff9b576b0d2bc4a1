"""A saved architecture fingerprint: selected example ids, normalisation and classifiers.

`fit_fingerprint` builds one from fit runs; `Fingerprint.save` / `load_fingerprint` store it as
plain numpy + json; `Fingerprint.predict` answers "which architecture trained this?" for new runs.

Layout of a fingerprint directory (readable with numpy/json alone)::

    <dir>/fingerprint.json     {"arch_names", "score_names", "k", "method", "test", "l2",
                                "threshold", "dataset", "format_version", ...}
    <dir>/example_ids.npy      int64 [k]        the selected examples' stable ids
    <dir>/mean.npy, std.npy    float64 [D]      z-scoring of the fit runs (D = S * k, score-major)
    <dir>/weights.npy          float64 [D, C]   logistic regression on the z-scored features
    <dir>/bias.npy             float64 [C]
    <dir>/kmeans_centroids.npy float64 [C, D]   k-means centroids, row c matched to architecture c
    <dir>/centroids.npy        float64 [C, D]   class means for the "none of these" distance
    <dir>/within_std.npy       float64 [D]      pooled within-class std

Each file is written atomically and fingerprint.json last, so a directory with it is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from jaxdiff import store
from jaxdiff.fingerprint import classify, selection

FORMAT_VERSION = 1
META = "fingerprint.json"
_ARRAYS = ("example_ids", "mean", "std", "weights", "bias", "kmeans_centroids", "centroids",
           "within_std")


@dataclasses.dataclass
class Prediction:
  """Answers for R runs.

  Attributes:
    arch: `[R]` predicted architecture names (the most probable known one).
    label: int `[R]` their indices into `arch_names`.
    proba: `[R, C]` logistic-regression probabilities.
    distance: `[R]` distance to the nearest class centroid.
    none_of_these: bool `[R]`: farther from every known architecture than fit runs ever were.
  """
  arch: list[str]
  label: np.ndarray
  proba: np.ndarray
  distance: np.ndarray
  none_of_these: np.ndarray

  @property
  def answer(self) -> list[str]:
    """Per run the predicted architecture, or "none of these" where the distance rule flags it."""
    return ["none of these" if f else a for a, f in zip(self.arch, self.none_of_these)]


@dataclasses.dataclass
class Fingerprint:
  """Selected examples plus a trained `classify.Classifier`.

  Attributes:
    arch_names: `[C]` architecture names (class c is `arch_names[c]`).
    score_names: `[S]` score names; features are score-major: feature s * k + i is score s at
      example `example_ids[i]`.
    example_ids: int `[k]` selected example ids.
    classifier: the trained classifiers on the `S * k` features.
    info: method, test, k requested, dataset, number of fit runs, ...
  """
  arch_names: list[str]
  score_names: list[str]
  example_ids: np.ndarray
  classifier: classify.Classifier
  info: dict

  @property
  def dataset(self):
    return self.info.get("dataset")

  def gather(self, scores: Any, example_ids: np.ndarray | None = None) -> np.ndarray:
    """Raw features `[R, S * k]` of new runs.

    Args:
      scores: a `store.ScoreSet` (diverged runs dropped, dataset checked); or, with `example_ids`
        `[N]`, a mapping score name -> `[R, N]`, an array `[R, S, N]`, or (S = 1) `[R, N]`; or, with
        `example_ids=None`, an array already holding the fingerprint's examples in its order,
        `[R, S, k]` (or `[R, k]` when S = 1).
      example_ids: `[N]` ids of the columns of `scores` (not for a ScoreSet).

    Raises:
      ValueError: missing scores or example ids, another dataset, or bad shapes.
    """
    names, k = self.score_names, len(self.example_ids)
    if isinstance(scores, store.ScoreSet):
      if example_ids is not None:
        raise ValueError("example_ids come from the ScoreSet; do not pass them too")
      ds = scores.meta.get("dataset")
      if self.dataset is not None and ds is not None and ds != self.dataset:
        raise ValueError(f"score set is on dataset {ds!r} but the fingerprint was fit on "
                         f"{self.dataset!r}")
      missing = [s for s in names if s not in scores.scores]
      if missing:
        raise ValueError(f"score set lacks scores {missing}; it has {sorted(scores.scores)}")
      arrays, example_ids = [scores.get(s) for s in names], scores.example_ids
    elif isinstance(scores, Mapping):
      missing = [s for s in names if s not in scores]
      if missing:
        raise ValueError(f"scores lack {missing}; got {sorted(scores)}")
      arrays = [np.asarray(scores[s]) for s in names]
    else:
      a = np.asarray(scores)
      if example_ids is None:
        if a.ndim == 2 and len(names) == 1 and a.shape[1] == k:
          return a.astype(np.float64)
        if a.ndim == 3 and a.shape[1:] == (len(names), k):
          return a.reshape(a.shape[0], -1).astype(np.float64)
        alt = f" or [runs, {k}]" if len(names) == 1 else ""
        raise ValueError(f"without example_ids, scores must already be the fingerprint's examples: "
                         f"[runs, {len(names)}, {k}]{alt}; got shape {a.shape}. Pass example_ids "
                         "to select them from [runs, N].")
      if a.ndim == 3 and a.shape[1] == len(names):
        arrays = [a[:, i] for i in range(len(names))]
      elif len(names) == 1:
        arrays = [a]
      else:
        raise ValueError(f"fingerprint uses scores {names}; pass [runs, {len(names)}, N] or a "
                         f"mapping name -> [runs, N]; got shape {a.shape}")
    if example_ids is None:
      raise ValueError("example_ids [N] are required with a mapping of [runs, N] score arrays")
    ids = np.asarray(example_ids)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[1] != ids.shape[0]:
      raise ValueError(f"score arrays must all be [runs, {ids.shape[0]}] (N = len(example_ids)); "
                       f"got {sorted(shapes)}")
    pos = _positions(ids, self.example_ids)
    return np.concatenate([a[:, pos] for a in arrays], axis=1).astype(np.float64)

  def predict(self, scores: Any, example_ids: np.ndarray | None = None, *,
              classifier: str = "logreg") -> Prediction:
    """Which architecture trained each run? See `gather` for the accepted inputs.

    Args:
      classifier: "logreg" (default; also gives probabilities) or "kmeans" (nearest matched
        k-means centroid).
    """
    f = self.gather(scores, example_ids)
    clf = self.classifier
    label = clf.predict(f, classifier)
    return Prediction(arch=[self.arch_names[i] for i in label], label=label,
                      proba=np.exp(clf.log_proba(f)), distance=clf.distance(f),
                      none_of_these=clf.none_of_these(f))

  def save(self, directory: str) -> None:
    """Writes the fingerprint directory (see the module docstring), each file atomically."""
    os.makedirs(directory, exist_ok=True)
    meta_path = os.path.join(directory, META)
    if os.path.exists(meta_path):  # mark incomplete while rewriting
      os.unlink(meta_path)
    c = self.classifier
    arrays = dict(example_ids=np.asarray(self.example_ids, np.int64), mean=c.mean, std=c.std,
                  weights=c.weights, bias=c.bias, kmeans_centroids=c.kmeans_centroids,
                  centroids=c.centroids, within_std=c.within_std)
    for name, value in arrays.items():
      store.atomic_save_npy(os.path.join(directory, f"{name}.npy"), value)
    meta = dict(self.info, arch_names=list(self.arch_names), score_names=list(self.score_names),
                num_selected=int(len(self.example_ids)), l2=float(c.l2),
                threshold=float(c.threshold), format_version=FORMAT_VERSION)
    store.atomic_write_json(meta_path, meta)


def _positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
  """Column positions of `wanted` ids within `ids`, vectorised; refuses missing or repeated ids."""
  if np.unique(ids).shape[0] != ids.shape[0]:
    raise ValueError("example_ids of the scores contain duplicates")
  sorter = np.argsort(ids, kind="stable")
  pos = np.searchsorted(ids[sorter], wanted)
  pos = np.minimum(pos, max(len(ids) - 1, 0))
  found = (ids[sorter][pos] == wanted) if len(ids) else np.zeros(len(wanted), bool)
  if not found.all():
    miss = np.asarray(wanted)[~found]
    raise ValueError(f"the scores lack {miss.size} of the fingerprint's {len(wanted)} example ids "
                     f"(e.g. {miss[:5].tolist()}); score the same training set")
  return sorter[pos]


def fit_fingerprint(x: np.ndarray, y: np.ndarray, *, arch_names: Sequence[str],
                    score_names: Sequence[str], example_ids: np.ndarray, k: int,
                    method: str = "pvalue", test: str = "anova", alpha: float = 0.05,
                    seed: int = 0, l2_grid=classify.DEFAULT_L2_GRID, cv_folds: int = 5,
                    kmeans_restarts: int = 10, none_quantile: float = 0.99,
                    ranking: selection.Ranking | None = None, calibrate: bool = True,
                    dataset: str | None = None) -> Fingerprint:
  """Selects k examples and trains the classifiers, all on the runs given (pass FIT runs only).

  The "none of these" threshold is calibrated out of fold (`calibrate_threshold`): examples chosen
  on the same runs that the centroids come from look tighter than they are for new runs (selection
  bias), which a leave-one-out distance alone misses when runs are few.

  Args:
    x: `[R, S, N]` fit-run scores; y: `[R]` architecture labels 0..C-1.
    arch_names: `[C]`; score_names: `[S]`; example_ids: `[N]` ids of the N columns.
    k: examples to select (fewer for "bonferroni" when fewer pass).
    method, test, alpha: see `selection.rank_examples`.
    seed, l2_grid, cv_folds, kmeans_restarts, none_quantile: see `classify.train_classifier`.
    ranking: a precomputed `selection.Ranking` of these same runs (reused across k); else computed.
    calibrate: calibrate the "none of these" threshold out of fold (else the cheaper, optimistic
      leave-one-out quantile of `classify.train_classifier`).
    dataset: recorded and checked against score sets at prediction time.

  Returns:
    A `Fingerprint`.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 3:
    raise ValueError(f"scores must be [runs, scores, examples]; got shape {x.shape}")
  r, s, n = x.shape
  if len(score_names) != s or len(example_ids) != n:
    raise ValueError(f"{len(score_names)} score names / {len(example_ids)} example ids do not "
                     f"match scores of shape {x.shape}")
  if k < 1:
    raise ValueError(f"k must be >= 1; got {k}")
  if ranking is None:
    ranking = selection.rank_examples(x, y, method, test=test, alpha=alpha, seed=seed,
                                      l2_grid=l2_grid, cv_folds=cv_folds)
  idx = ranking.top(min(k, n))
  clf = classify.train_classifier(x[:, :, idx].reshape(r, -1), y, len(arch_names),
                                  l2_grid=l2_grid, cv_folds=cv_folds, seed=seed,
                                  kmeans_restarts=kmeans_restarts, none_quantile=none_quantile)
  calibration = "leave-one-out"
  if calibrate:
    thr = calibrate_threshold(x, y, len(arch_names), k=len(idx), method=method, test=test,
                              alpha=alpha, seed=seed, l2_grid=l2_grid, cv_folds=cv_folds,
                              none_quantile=none_quantile)
    if thr is not None:
      clf.threshold, calibration = thr, "out-of-fold"
  info = dict(method=method, test=test, alpha=alpha, k=int(k), seed=seed, dataset=dataset,
              num_fit_runs=int(r), none_quantile=none_quantile, threshold_calibration=calibration)
  return Fingerprint(arch_names=list(arch_names), score_names=list(score_names),
                     example_ids=np.asarray(example_ids)[idx].astype(np.int64), classifier=clf,
                     info=info)


def calibrate_threshold(x: np.ndarray, y: np.ndarray, num_classes: int, *, k: int, method: str,
                        test: str = "anova", alpha: float = 0.05, seed: int = 0,
                        l2_grid=classify.DEFAULT_L2_GRID, cv_folds: int = 5,
                        none_quantile: float = 0.99) -> float | None:
  """Out-of-fold "none of these" threshold: the distance a known run has when it was not fit.

  Stratified folds of the runs given: on each training part, rank examples again (same method;
  Bonferroni as its p-value order, so that k examples are kept), take the top k, z-score and compute
  class centroids and within-class std there, and measure the held-out part's distance to the
  nearest centroid (`classify.centroid_distance`). The threshold is the `none_quantile` quantile of
  these distances, so about 1 - none_quantile of new runs of known architectures are flagged; fewer
  training runs per fold make it slightly conservative.

  Args:
    x: `[R, S, N]` fit-run scores; y: `[R]` labels; num_classes: C; k: examples per fold.

  Returns:
    The threshold, or None when some class has fewer than 2 runs (no fold possible).
  """
  counts = np.bincount(np.asarray(y), minlength=num_classes)
  folds = min(int(cv_folds), int(counts.min()))
  if folds < 2 or k < 1:
    return None
  fold_method = "pvalue" if method == "bonferroni" else method
  dist = np.empty(len(y))
  for tr, va in classify.stratified_folds(y, folds, seed + 7):
    ranking = selection.rank_examples(x[tr], y[tr], fold_method, test=test, alpha=alpha, seed=seed,
                                      l2_grid=l2_grid, cv_folds=cv_folds)
    idx = ranking.top(k)
    f_tr, f_va = x[tr][:, :, idx].reshape(len(tr), -1), x[va][:, :, idx].reshape(len(va), -1)
    mean, std = classify.zscore_stats(f_tr)
    centroids, within = classify.class_centroids((f_tr - mean) / std, y[tr], num_classes)
    dist[va] = classify.centroid_distance((f_va - mean) / std, centroids, within).min(1)
  return float(np.quantile(dist, none_quantile))


def load_fingerprint(directory: str) -> Fingerprint:
  """Loads a directory written by `Fingerprint.save`, checking it is complete and consistent."""
  meta_path = os.path.join(directory, META)
  if not os.path.exists(meta_path):
    raise ValueError(f"{directory!r} has no {META}: not a fingerprint, or its write was "
                     "interrupted")
  with open(meta_path) as f:
    meta = json.load(f)
  arrays = {}
  for name in _ARRAYS:
    path = os.path.join(directory, f"{name}.npy")
    if not os.path.exists(path):
      raise ValueError(f"fingerprint file {path!r} is missing")
    arrays[name] = np.load(path, allow_pickle=False)
  c, d = len(meta["arch_names"]), len(meta["score_names"]) * arrays["example_ids"].shape[0]
  expected = dict(example_ids=(d // max(len(meta["score_names"]), 1),), mean=(d,), std=(d,),
                  weights=(d, c), bias=(c,), kmeans_centroids=(c, d), centroids=(c, d),
                  within_std=(d,))
  for name, shape in expected.items():
    if arrays[name].shape != shape:
      raise ValueError(f"{name}.npy in {directory!r} has shape {arrays[name].shape}, "
                       f"expected {shape}")
  clf = classify.Classifier(mean=arrays["mean"], std=arrays["std"], weights=arrays["weights"],
                            bias=arrays["bias"], l2=float(meta["l2"]),
                            kmeans_centroids=arrays["kmeans_centroids"],
                            centroids=arrays["centroids"], within_std=arrays["within_std"],
                            threshold=float(meta["threshold"]))
  info = {key: v for key, v in meta.items() if key not in ("arch_names", "score_names")}
  return Fingerprint(arch_names=list(meta["arch_names"]), score_names=list(meta["score_names"]),
                     example_ids=arrays["example_ids"], classifier=clf, info=info)

"""Classifiers of runs from their fingerprint features: L2 logistic regression, k-means, distances.

Multinomial L2 logistic regression (scikit-learn's `LogisticRegression`, L-BFGS) with its strength
chosen over stratified folds (`StratifiedKFold`); k-means (`KMeans`) with clusters matched to
architectures by the Hungarian algorithm; the "none of these" rule.

Shapes: `R` runs, `D` features (selected examples x scores), `C` architectures (classes).
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import sklearn
import threadpoolctl  # a dependency of scikit-learn
from scipy import optimize, special
from sklearn import cluster, linear_model, model_selection

DEFAULT_L2_GRID = tuple(float(v) for v in np.logspace(-3, 2, 6))
CLASSIFIERS = ("logreg", "kmeans")


_THREADPOOLS = None


@contextlib.contextmanager
def _sklearn_settings():
  """One OpenMP thread, and no re-validation of the inputs checked here (thousands of tiny fits).

  The problems are tiny (tens of runs): scikit-learn's OpenMP threads cost more than they save, and
  on a loaded 2-core machine they stalled (k-means of 24 runs x 10 features: 508 ms with OpenMP
  threads vs 3.5 ms on one; the hand-written k-means took 4.2 ms). The controller is made once:
  `threadpool_limits` inspects the loaded libraries at every call (~15 ms).
  """
  global _THREADPOOLS
  if _THREADPOOLS is None:  # threadpoolctl < 3 (allowed by scikit-learn 1.3) has no controller
    _THREADPOOLS = getattr(threadpoolctl, "ThreadpoolController", lambda: threadpoolctl)()
  limit = getattr(_THREADPOOLS, "limit", None) or _THREADPOOLS.threadpool_limits
  with limit(limits=1, user_api="openmp"), sklearn.config_context(
      assume_finite=True, skip_parameter_validation=True):
    yield


def zscore_stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and std `[D]` over runs of features `[R, D]`; a constant feature gets std 1."""
  f = np.asarray(f, np.float64)
  mean, std = f.mean(0), f.std(0)
  return mean, np.where(std > 1e-12 * np.maximum(np.abs(mean), 1.0), std, 1.0)


def logreg_loss_and_grad(params: np.ndarray, x: np.ndarray, onehot: np.ndarray,
                         l2: float) -> tuple[float, np.ndarray]:
  """The objective `fit_logreg` minimises, and its analytic gradient (the reference of its tests).

  L(W, b) = -(1/R) sum_r sum_c Y_rc log softmax(x_r W + b)_c + (l2 / 2) ||W||_F^2 (multinomial
  logistic regression; the bias is not penalised). dL/dZ = (P - Y) / R with Z = X W + b, so
  dL/dW = X^T (P - Y) / R + l2 W and dL/db = sum_r (P - Y)_r / R.

  Args:
    params: flat `[D * C + C]`, W (row-major `[D, C]`) then b `[C]`.
    x: `[R, D]` features.
    onehot: `[R, C]` one-hot labels.
    l2: penalty strength (>= 0).

  Returns:
    `(loss, grad [D * C + C])`.
  """
  r, d = x.shape
  c = onehot.shape[1]
  w, b = params[:d * c].reshape(d, c), params[d * c:]
  z = x @ w + b
  log_p = special.log_softmax(z, axis=1)
  loss = -(onehot * log_p).sum() / r + 0.5 * l2 * (w ** 2).sum()
  dz = (np.exp(log_p) - onehot) / r
  grad = np.concatenate([(x.T @ dz + l2 * w).ravel(), dz.sum(0)])
  return float(loss), grad


def sklearn_c(l2: float, num_runs: int, num_classes: int) -> float:
  """scikit-learn's `C` for which `LogisticRegression` minimises `logreg_loss_and_grad`.

  scikit-learn minimises C sum_r CE_r + ||W||^2 / 2 (a sum over runs, not a mean); dividing ours
  by l2 gives C = 1 / (R l2). With two classes scikit-learn fits one vector v (binary logistic
  regression) where ours has two columns; ours is smallest at W = [-v/2, v/2], whose penalty
  (l2 / 2) ||W||^2 = (l2 / 4) ||v||^2, so there C = 2 / (R l2). l2 = 0 is C = inf (no penalty).
  """
  if l2 < 0:
    raise ValueError(f"l2 must be >= 0; got {l2}")
  if l2 == 0:
    return np.inf
  return (2.0 if num_classes == 2 else 1.0) / (num_runs * float(l2))


def _logreg(max_iter: int, gtol: float) -> linear_model.LogisticRegression:
  # tol is L-BFGS's gtol on the mean-scaled objective, the scale of `logreg_loss_and_grad`.
  # warm_start: a refit with a new C starts from the last solution (a regularisation path).
  return linear_model.LogisticRegression(solver="lbfgs", max_iter=max_iter, tol=gtol,
                                         warm_start=True)


def _fit(est: linear_model.LogisticRegression, x: np.ndarray, y: np.ndarray, num_classes: int,
         l2: float) -> tuple[np.ndarray, np.ndarray]:
  """Fits `est` with the C of `l2`; returns `(W [D, C], b [C])` in `logreg_loss_and_grad`'s form."""
  r, d = x.shape
  counts = np.bincount(y, minlength=num_classes)
  if counts.shape[0] != num_classes or counts.min() < 1:
    raise ValueError(f"logistic regression needs runs of every one of {num_classes} classes; "
                     f"got counts {counts.tolist()}")
  if d == 0:  # scikit-learn refuses 0 features; the optimum is the class frequencies
    b = np.log(counts / r)
    return np.zeros((0, num_classes)), b - b.mean()
  est.set_params(C=sklearn_c(l2, r, num_classes))
  est.fit(x, y)
  if num_classes == 2:
    v, c = est.coef_[0], est.intercept_[0]
    return np.stack([-v / 2, v / 2], axis=1), np.array([-c / 2, c / 2])
  # The biases are defined up to a shared constant; ours sum to zero (as the gradient keeps them).
  return est.coef_.T.copy(), est.intercept_ - est.intercept_.mean()


def fit_logreg(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, *,
               max_iter: int = 500, gtol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
  """Fits multinomial L2 logistic regression (minimises `logreg_loss_and_grad`) with scikit-learn.

  The objective is strictly convex in W for l2 > 0: the solution does not depend on the solver.

  Args:
    x: `[R, D]` features (z-scored: the penalty assumes comparable scales).
    y: `[R]` int labels in [0, num_classes), every class present.
    num_classes: C.
    l2: penalty strength (`sklearn_c` maps it to scikit-learn's C).
    max_iter, gtol: L-BFGS iterations and gradient tolerance.

  Returns:
    `(W [D, C], b [C])`, b summing to zero.
  """
  if l2 < 0:
    raise ValueError(f"l2 must be >= 0; got {l2}")
  x = np.asarray(x, np.float64)
  with _sklearn_settings():
    return _fit(_logreg(max_iter, gtol), x, np.asarray(y), num_classes, l2)


def logreg_log_proba(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Log class probabilities `[R, C]` of features `[R, D]`."""
  return special.log_softmax(np.asarray(x, np.float64) @ w + b, axis=1)


def stratified_folds(y: np.ndarray, n_folds: int,
                     seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
  """Seeded stratified k-fold split (scikit-learn's `StratifiedKFold`, shuffled).

  Returns:
    `n_folds` pairs `(train_idx, val_idx)` partitioning `arange(R)`.
  """
  y = np.asarray(y)
  splitter = model_selection.StratifiedKFold(int(n_folds), shuffle=True, random_state=seed)
  return list(splitter.split(np.zeros((len(y), 1)), y))


def cv_logreg(x: np.ndarray, y: np.ndarray, num_classes: int, *, l2_grid=DEFAULT_L2_GRID,
              n_folds: int = 5, seed: int = 0) -> tuple[float, np.ndarray]:
  """Chooses the L2 strength by stratified k-fold cross-validated cross-entropy.

  Uses min(n_folds, smallest class count) folds; with fewer than 2 runs in some class there is no
  validation possible and the middle of the grid is returned. Ties go to the stronger penalty.
  The features are given already z-scored with statistics of all the runs passed in (these are
  the fit runs; the test runs never reach here), which makes the CV losses slightly optimistic but
  only their order is used. (Not `LogisticRegressionCV`: it keeps C fixed across folds of
  different sizes, where the strength fixed here is l2, the penalty per run.)

  Args:
    x: `[R, D]` features; y: `[R]` labels; num_classes: C.

  Returns:
    `(best l2, mean validation cross-entropy [len(l2_grid)])` (NaNs when no CV was possible).
  """
  grid = np.asarray(l2_grid, np.float64)
  if grid.ndim != 1 or grid.size == 0 or np.any(grid < 0):
    raise ValueError(f"l2_grid must be a non-empty list of values >= 0; got {l2_grid}")
  x = np.asarray(x, np.float64)
  y = np.asarray(y)
  counts = np.bincount(y, minlength=num_classes)
  folds = min(int(n_folds), int(counts[counts > 0].min()))
  if folds < 2 or grid.size == 1:
    return float(grid[len(grid) // 2]), np.full(grid.size, np.nan)
  losses = np.zeros(grid.size)
  with _sklearn_settings():
    for tr, va in stratified_folds(y, folds, seed):
      est = _logreg(500, 1e-6)
      for i in np.argsort(-grid, kind="stable"):  # strong to weak penalty, warm-started
        params = _fit(est, x[tr], y[tr], num_classes, grid[i])
        losses[i] -= logreg_log_proba(x[va], *params)[np.arange(len(va)), y[va]].sum()
  losses /= len(y)
  best = np.flatnonzero(losses <= losses.min() * (1 + 1e-9) + 1e-12).max()
  return float(grid[best]), losses


def _sq_dist(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
  d = (x ** 2).sum(1)[:, None] - 2 * x @ centers.T + (centers ** 2).sum(1)[None]
  return np.maximum(d, 0.0)


def kmeans(x: np.ndarray, n_clusters: int, *, seed: int = 0, restarts: int = 10,
           max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means with k-means++ seeding, best (lowest inertia) of `restarts` seeded starts.

  scikit-learn's `KMeans` (tol 0: iterates until the assignment stops changing, or `max_iter`).

  Args:
    x: `[R, D]` features, R >= n_clusters.

  Returns:
    `(centroids [K, D], assignment [R])`.
  """
  x = np.asarray(x, np.float64)
  r = x.shape[0]
  if n_clusters < 1 or r < n_clusters:
    raise ValueError(f"k-means needs 1 <= n_clusters <= runs; got {n_clusters} clusters, {r} runs")
  with _sklearn_settings():
    km = cluster.KMeans(n_clusters, init="k-means++", n_init=int(restarts), max_iter=max_iter,
                        tol=0.0, random_state=seed, algorithm="lloyd").fit(x)
  return km.cluster_centers_, km.labels_.astype(np.int64)


def hungarian_match(clusters: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
  """Maps clusters to classes one-to-one, maximising the runs whose class matches.

  The assignment problem on the `[K, C]` contingency table (Kuhn-Munkres, via
  `scipy.optimize.linear_sum_assignment`). Needs K == C.

  Returns:
    int `[K]`: `mapping[cluster] = class`.
  """
  table = np.zeros((num_classes, num_classes))
  np.add.at(table, (np.asarray(clusters), np.asarray(y)), 1.0)
  rows, cols = optimize.linear_sum_assignment(-table)
  mapping = np.empty(num_classes, np.int64)
  mapping[rows] = cols
  return mapping


def class_centroids(x: np.ndarray, y: np.ndarray,
                    num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """Class means `[C, D]` and pooled within-class std `[D]` (dof R - C, floored at 1e-6)."""
  x = np.asarray(x, np.float64)
  onehot = np.eye(num_classes)[np.asarray(y)]
  counts = np.maximum(onehot.sum(0), 1)
  means = onehot.T @ x / counts[:, None]
  dof = max(x.shape[0] - num_classes, 1)
  within = np.sqrt(((x - means[y]) ** 2).sum(0) / dof)
  return means, np.maximum(within, 1e-6)


def centroid_distance(x: np.ndarray, centroids: np.ndarray, within_std: np.ndarray) -> np.ndarray:
  """Root-mean-square z-distance of each run to each class centroid.

  d_rc = sqrt( (1/D) sum_j ((x_rj - mu_cj) / s_j)^2 ), s the pooled within-class std: a diagonal
  Mahalanobis distance averaged over features, so its scale does not grow with k.

  Returns:
    `[R, C]` (zeros when D = 0).
  """
  x = np.asarray(x, np.float64)
  if x.shape[1] == 0:
    return np.zeros((x.shape[0], centroids.shape[0]))
  return np.sqrt(_sq_dist(x / within_std, centroids / within_std) / x.shape[1])


def loo_own_distance(x: np.ndarray, y: np.ndarray, centroids: np.ndarray,
                     within_std: np.ndarray) -> np.ndarray:
  """Distance of each fit run to its own class centroid computed without that run.

  x_r - mean_{-r} = (n_c / (n_c - 1)) (x_r - mean_c), so the leave-one-out residual is a rescaling
  (the within-class std still includes the run; a small optimism). Calibrates "none of these".

  Returns:
    `[R]`.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y)
  if x.shape[1] == 0:
    return np.zeros(x.shape[0])
  n = np.bincount(y, minlength=centroids.shape[0])[y].astype(np.float64)
  scale = np.where(n > 1, n / np.maximum(n - 1, 1), 1.0)
  resid = (x - centroids[y]) * scale[:, None] / within_std
  return np.sqrt((resid ** 2).mean(1))


@dataclasses.dataclass
class Classifier:
  """Everything needed to classify raw feature vectors `[R, D]` into C architectures.

  Attributes:
    mean, std: `[D]` z-scoring statistics of the fit runs.
    weights: `[D, C]`, bias: `[C]`: the logistic regression (on z-scored features).
    l2: its cross-validated L2 strength.
    kmeans_centroids: `[C, D]` k-means centroids reordered so row c is matched to class c.
    centroids: `[C, D]` class means, within_std: `[D]` pooled within-class std (z-scored space).
    threshold: "none of these" when the distance to the nearest class centroid exceeds it.
  """
  mean: np.ndarray
  std: np.ndarray
  weights: np.ndarray
  bias: np.ndarray
  l2: float
  kmeans_centroids: np.ndarray
  centroids: np.ndarray
  within_std: np.ndarray
  threshold: float

  @property
  def num_classes(self) -> int:
    return int(self.bias.shape[0])

  def normalise(self, f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, np.float64)
    if f.ndim != 2 or f.shape[1] != self.mean.shape[0]:
      raise ValueError(f"features must be [runs, {self.mean.shape[0]}]; got shape {f.shape}")
    return (f - self.mean) / self.std

  def log_proba(self, f: np.ndarray) -> np.ndarray:
    """`[R, C]` logistic-regression log probabilities of raw features `[R, D]`."""
    return logreg_log_proba(self.normalise(f), self.weights, self.bias)

  def predict(self, f: np.ndarray, classifier: str = "logreg") -> np.ndarray:
    """`[R]` predicted class of raw features `[R, D]` by "logreg" or "kmeans" (nearest centroid)."""
    if classifier not in CLASSIFIERS:
      raise ValueError(f"unknown classifier {classifier!r}; valid choices: {CLASSIFIERS}")
    if classifier == "logreg":
      return self.log_proba(f).argmax(1)
    z = self.normalise(f)
    if z.shape[1] == 0:
      return np.zeros(z.shape[0], np.int64)
    return _sq_dist(z, self.kmeans_centroids).argmin(1)

  def distance(self, f: np.ndarray) -> np.ndarray:
    """`[R]` distance to the nearest class centroid (`centroid_distance`)."""
    return centroid_distance(self.normalise(f), self.centroids, self.within_std).min(1)

  def none_of_these(self, f: np.ndarray) -> np.ndarray:
    """`[R]` bool: runs farther from every known class than the fit runs' calibration allows."""
    return self.distance(f) > self.threshold


def train_classifier(f: np.ndarray, y: np.ndarray, num_classes: int, *, l2_grid=DEFAULT_L2_GRID,
                     cv_folds: int = 5, seed: int = 0, kmeans_restarts: int = 10,
                     none_quantile: float = 0.99) -> Classifier:
  """Trains both classifiers and calibrates "none of these" on fit-run features.

  Args:
    f: `[R, D]` raw fit-run features; y: `[R]` labels 0..C-1 (every class present).
    num_classes: C.
    l2_grid, cv_folds: for `cv_logreg`.
    seed: seeds the CV folds and k-means.
    kmeans_restarts: k-means restarts.
    none_quantile: the threshold is this quantile of the fit runs' leave-one-out distance to their
      own class centroid (`loo_own_distance`), so about 1 - none_quantile of known runs are flagged.

  Returns:
    A `Classifier`.
  """
  if not 0.0 < none_quantile <= 1.0:
    raise ValueError(f"none_quantile must be in (0, 1]; got {none_quantile}")
  y = np.asarray(y)
  counts = np.bincount(y, minlength=num_classes)
  if counts.shape[0] != num_classes or counts.min() < 1:
    raise ValueError(f"every one of {num_classes} classes needs fit runs; "
                     f"got counts {counts.tolist()}")
  mean, std = zscore_stats(f)
  z = (np.asarray(f, np.float64) - mean) / std
  l2, _ = cv_logreg(z, y, num_classes, l2_grid=l2_grid, n_folds=cv_folds, seed=seed)
  w, b = fit_logreg(z, y, num_classes, l2)
  if z.shape[1] == 0:
    km = np.zeros((num_classes, 0))
  else:
    centers, assign = kmeans(z, num_classes, seed=seed, restarts=kmeans_restarts)
    mapping = hungarian_match(assign, y, num_classes)
    km = np.empty_like(centers)
    km[mapping] = centers
  centroids, within = class_centroids(z, y, num_classes)
  thr = float(np.quantile(loo_own_distance(z, y, centroids, within), none_quantile))
  return Classifier(mean=mean, std=std, weights=w, bias=b, l2=l2, kmeans_centroids=km,
                    centroids=centroids, within_std=within, threshold=thr)

"""Rank and correlation kernels shared by the analysis modules.

Average ranks along an axis, and Pearson, Spearman and Kendall correlations between matching rows of two
arrays or between all rows of one array, vectorised over examples (the last axis).
"""

from __future__ import annotations

import numpy as np
import scipy.stats

METHODS = ("pearson", "spearman", "kendall")


def check_method(method: str) -> str:
  if method not in METHODS:
    raise ValueError(f"unknown correlation method {method!r}; valid choices are {METHODS}")
  return method


def rank_average(x: np.ndarray, axis: int = -1) -> np.ndarray:
  """Ranks 1..N along `axis`; tied values share the mean of their ranks.

  Same result as `scipy.stats.rankdata(x, method="average", axis=axis)` for finite input, but built on
  numpy's SIMD `argsort` (about 5x faster for 50,000 examples on this machine).

  Args:
    x: array `[..., N, ...]` of finite values.
    axis: the axis to rank along (the examples axis).

  Returns:
    float64 array of `x`'s shape.
  """
  x = np.moveaxis(np.asarray(x), axis, -1)
  n = x.shape[-1]
  order = np.argsort(x, axis=-1)
  xs = np.take_along_axis(x, order, axis=-1)
  tie = xs[..., 1:] == xs[..., :-1]
  if tie.any():
    # Each run of equal sorted values [start, end] gets rank (start + end) / 2 + 1.
    idx = np.arange(n)
    first = np.ones(xs.shape, bool)
    first[..., 1:] = ~tie
    last = np.ones(xs.shape, bool)
    last[..., :-1] = ~tie
    start = np.maximum.accumulate(np.where(first, idx, 0), axis=-1)
    end = np.flip(np.minimum.accumulate(np.flip(np.where(last, idx, n - 1), -1), axis=-1), -1)
    sorted_ranks = (start + end) / 2.0 + 1.0
  else:
    sorted_ranks = np.broadcast_to(np.arange(1.0, n + 1.0), xs.shape)
  ranks = np.empty(xs.shape, np.float64)
  np.put_along_axis(ranks, order, sorted_ranks, axis=-1)
  return np.moveaxis(ranks, -1, axis)


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Pearson correlation between matching rows: r = cov(x, y) / (sd(x) sd(y)) along the last axis.

  Args:
    x, y: arrays `[..., N]` (broadcastable).

  Returns:
    float64 `[...]`; NaN where a row is constant.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  x = x - x.mean(-1, keepdims=True)
  y = y - y.mean(-1, keepdims=True)
  num = np.sum(x * y, axis=-1)
  den = np.sqrt(np.sum(x * x, axis=-1) * np.sum(y * y, axis=-1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Spearman's rho between matching rows: the Pearson correlation of average ranks (Spearman 1904).

  Args:
    x, y: arrays `[..., N]` of the same shape.

  Returns:
    float64 `[...]`.
  """
  return pearson_rows(rank_average(x), rank_average(y))


def kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Kendall's tau-b between matching rows (Kendall 1945; ties corrected), via `scipy.stats.kendalltau`.

  scipy's implementation is O(N log N) (Knight 1966); the loop runs over rows, never over examples.

  Args:
    x, y: arrays `[..., N]` of the same shape.

  Returns:
    float64 `[...]`.
  """
  x = np.asarray(x)
  y = np.asarray(y)
  if x.shape != y.shape:
    raise ValueError(f"kendall_rows needs equal shapes, got {x.shape} and {y.shape}")
  xf = x.reshape(-1, x.shape[-1])
  yf = y.reshape(-1, y.shape[-1])
  out = np.array([scipy.stats.kendalltau(a, b).statistic for a, b in zip(xf, yf)], np.float64)
  return out.reshape(x.shape[:-1])


def correlate_rows(x: np.ndarray, y: np.ndarray, method: str) -> np.ndarray:
  """Correlation of matching rows of `x` and `y` `[..., N]` with `method` in `METHODS`."""
  fn = {"pearson": pearson_rows, "spearman": spearman_rows, "kendall": kendall_rows}
  return fn[check_method(method)](x, y)


def correlation_matrix(x: np.ndarray, method: str = "spearman") -> np.ndarray:
  """Correlations between all pairs of rows of `x`.

  Args:
    x: `[K, N]`, e.g. K run-averaged scores over N examples.
    method: "pearson", "spearman" (Pearson of average ranks) or "kendall" (tau-b).

  Returns:
    float64 `[K, K]` with ones on the diagonal (NaN rows/columns for constant rows).
  """
  check_method(method)
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"correlation_matrix needs [K, N], got shape {x.shape}")
  k = x.shape[0]
  if method == "kendall":
    out = np.eye(k)
    for i in range(k):
      for j in range(i + 1, k):
        out[i, j] = out[j, i] = scipy.stats.kendalltau(x[i], x[j]).statistic
    constant = np.ptp(x, axis=1) == 0
    out[constant, :] = np.nan
    out[:, constant] = np.nan
    return out
  if method == "spearman":
    x = rank_average(x, axis=1)
  z = x - x.mean(1, keepdims=True)
  norm = np.sqrt(np.sum(z * z, axis=1))
  with np.errstate(invalid="ignore", divide="ignore"):
    z = z / norm[:, None]
  out = z @ z.T
  np.fill_diagonal(out, 1.0)
  out[norm == 0, :] = np.nan
  out[:, norm == 0] = np.nan
  return np.clip(out, -1.0, 1.0)

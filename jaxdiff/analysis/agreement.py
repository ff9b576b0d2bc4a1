"""Agreement between difficulty scores and between runs: correlations, PCA, top-k overlap.

Is there a single notion of difficulty (Kwok et al. 2024, arXiv 2401.01867), and do two
scores or two runs select the same examples when a user prunes a fraction of the dataset?
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from jaxdiff.analysis import correlation
from jaxdiff.analysis.reliability import check_scores

SIDES = ("hardest", "easiest")
FRACTIONS = (0.1, 0.3, 0.5)


def check_side(side: str) -> str:
  if side not in SIDES:
    raise ValueError(f"unknown side {side!r}; valid choices are {SIDES}")
  return side


def check_fraction(fraction: float) -> float:
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"pruning fraction must be in (0, 1), got {fraction}")
  return float(fraction)


def stack_means(scores: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
  """Run-averaged scores: name -> `[runs, examples]` becomes (names, `[K, N]` float64)."""
  if not scores:
    raise ValueError("no scores given")
  names = list(scores)
  means = [check_scores(scores[k], name=k, min_runs=1).mean(axis=0, dtype=np.float64)
           for k in names]
  sizes = {k: m.size for k, m in zip(names, means)}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"scores cover different numbers of examples: {sizes}")
  return names, np.stack(means)


@dataclasses.dataclass
class Spectrum:
  """PCA of z-scored scores: eigenvalues of their correlation matrix, largest first.

  Attributes:
    eigenvalues: `[K']`; shares: `[K']` eigenvalue / trace (fraction of variance per component);
    loadings: `[K', K']` eigenvectors as rows; names: the K' scores used (constant scores, whose
    correlations are undefined, are left out).
  """
  eigenvalues: np.ndarray
  shares: np.ndarray
  loadings: np.ndarray
  names: list


def pca_spectrum(corr: np.ndarray, names: Sequence[str] | None = None) -> Spectrum:
  """PCA across scores from their correlation matrix `[K, K]` (PCA of z-scored variables,
  Jolliffe 2002, "Principal Component Analysis").

  The share of the first component, lambda_1 / K, measures how far one notion of difficulty explains
  all scores (1 / K if they are unrelated, 1 if they are identical up to scale and sign). Scores
  with NaN correlations (constant scores) are dropped.
  """
  corr = np.asarray(corr, np.float64)
  if corr.ndim != 2 or corr.shape[0] != corr.shape[1]:
    raise ValueError(f"corr must be square [K, K], got shape {corr.shape}")
  names = list(names) if names is not None else [str(i) for i in range(corr.shape[0])]
  keep = ~np.isnan(corr).all(axis=1) & ~np.isnan(np.diag(corr))
  c = corr[np.ix_(keep, keep)]
  if np.isnan(c).any():
    raise ValueError("corr has NaN entries outside whole NaN rows; cannot run PCA")
  values, vectors = np.linalg.eigh(c)
  order = np.argsort(values)[::-1]
  values = np.clip(values[order], 0.0, None)
  return Spectrum(eigenvalues=values, shares=values / max(values.sum(), 1e-300),
                  loadings=vectors[:, order].T, names=[n for n, k in zip(names, keep) if k])


def _k(fraction: float, n: int) -> int:
  return max(1, int(round(check_fraction(fraction) * n)))


def _mask(ranks: np.ndarray, fraction: float, side: str) -> np.ndarray:
  n = ranks.shape[-1]
  k = _k(fraction, n)
  return ranks >= n - k if check_side(side) == "hardest" else ranks < k


def top_fraction_mask(x: np.ndarray, fraction: float, side: str = "hardest") -> np.ndarray:
  """Bool mask of the k = max(1, round(fraction N)) hardest (largest) or easiest (smallest) ones.

  Uses the higher-is-harder sign convention of jaxdiff scores. Ties at the k-th value are broken
  arbitrarily (so exactly k examples are selected), as a pruning user's sort would.

  Args:
    x: `[..., N]`.
    fraction: in (0, 1).
    side: "hardest" or "easiest".

  Returns:
    bool `[..., N]` with exactly k True per row.
  """
  check_fraction(fraction)
  check_side(side)
  return _mask(correlation.ordinal_ranks(x), fraction, side)


def topk_overlap(x: np.ndarray, y: np.ndarray, fraction: float,
                 side: str = "hardest") -> np.ndarray:
  """|top_k(x) & top_k(y)| / k for matching rows of `x`, `y` `[..., N]`; chance is `fraction`."""
  mx = top_fraction_mask(x, fraction, side)
  my = top_fraction_mask(y, fraction, side)
  return (mx & my).sum(-1) / mx.sum(-1)


def overlap_matrix(x: np.ndarray, fraction: float, side: str = "hardest", *,
                   ranks: np.ndarray | None = None) -> np.ndarray:
  """Top-k overlap `[K, K]` between all pairs of rows of `x` `[K, N]` (e.g. averaged scores);
  `ranks` = `correlation.ordinal_ranks(x)` may be passed to reuse one sort for several fractions."""
  ranks = correlation.ordinal_ranks(x) if ranks is None else ranks
  m = _mask(ranks, fraction, side).astype(np.float32)
  return (m @ m.T).astype(np.float64) / _k(fraction, m.shape[-1])


def run_overlap(scores: np.ndarray, fractions: Sequence[float] = FRACTIONS, *, num_pairs: int = 20,
                seed: int = 0) -> list[dict]:
  """Top-k overlap between single runs: would two runs prune the same examples?

  Draws min(num_pairs, R // 2) disjoint pairs of runs and reports, per fraction and side, the mean,
  min and max overlap over the pairs, next to the chance level (= fraction).

  Args:
    scores: `[runs, examples]`.
    fractions: pruning fractions in (0, 1).
    num_pairs: pairs of runs drawn (disjoint, so independent).
    seed: seed of the pairing.

  Returns:
    rows {fraction, side, mean, min, max, pairs, chance}.
  """
  s = check_scores(scores)
  perm = np.random.default_rng(seed).permutation(s.shape[0])
  p = min(num_pairs, s.shape[0] // 2)
  # One sort per run serves every fraction and side.
  ra = correlation.ordinal_ranks(s[perm[0:2 * p:2]])
  rb = correlation.ordinal_ranks(s[perm[1:2 * p:2]])
  rows = []
  for f in fractions:
    for side in SIDES:
      v = (_mask(ra, f, side) & _mask(rb, f, side)).sum(-1) / _k(f, s.shape[1])
      rows.append(dict(fraction=float(f), side=side, mean=float(v.mean()), min=float(v.min()),
                       max=float(v.max()), pairs=int(p), chance=float(f)))
  return rows


def score_agreement(scores: Mapping[str, np.ndarray], *,
                    methods: Sequence[str] = correlation.METHODS,
                    fractions: Sequence[float] = FRACTIONS) -> dict:
  """Agreement between the run-averaged scores of one ensemble.

  Args:
    scores: name -> `[runs, examples]`.
    methods: correlation methods for the matrices.
    fractions: pruning fractions for the top-k overlaps.

  Returns:
    dict with "names", "corr" (method -> `[K, K]`), "pca" (method -> `Spectrum`, not for Kendall,
    whose matrix is not a covariance), "overlap" ((fraction, side) -> `[K, K]`).
  """
  names, means = stack_means(scores)
  corr = {m: correlation.correlation_matrix(means, m) for m in methods}
  pca = {m: pca_spectrum(c, names) for m, c in corr.items() if m != "kendall"}
  ranks = correlation.ordinal_ranks(means)
  overlap = {(float(f), side): overlap_matrix(means, f, side, ranks=ranks)
             for f in fractions for side in SIDES}
  return dict(names=names, corr=corr, pca=pca, overlap=overlap)

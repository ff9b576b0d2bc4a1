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


def selection_probabilities(x: np.ndarray, k: int, side: str = "hardest") -> np.ndarray:
  """Probability that each example is among the k hardest (largest) or easiest (smallest) of its row
  when ties are broken uniformly at random.

  Examples strictly beyond the k-th value are selected surely; the g examples tied at the k-th
  value share the s slots left, each with probability s / g; the others never. Discrete scores
  (forgetting events, learning time, prediction depth, correctness) tie heavily, and a fixed
  tie order (e.g. by example index) would make every run pick the same tied examples.

  Args:
    x: `[..., N]` finite scores (higher = harder).
    k: how many are selected, in [1, N].
    side: "hardest" or "easiest".

  Returns:
    float64 `[..., N]`, each row summing to k.
  """
  x = np.asarray(x, np.float64)  # exact for float32 and int scores: ties stay ties
  n = x.shape[-1]
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must be in [1, {n}]")
  if check_side(side) == "easiest":
    x = -x
  # The k-th largest value of each row (one O(N) partition per row, no full sort).
  v = np.partition(x, n - k, axis=-1)[..., n - k:n - k + 1]
  above = x > v
  tied = x == v
  slots = k - above.sum(-1, keepdims=True)
  return np.where(above, 1.0, np.where(tied, slots / tied.sum(-1, keepdims=True), 0.0))


def top_fraction_mask(x: np.ndarray, fraction: float, side: str = "hardest") -> np.ndarray:
  """Bool mask of the k = max(1, round(fraction N)) hardest (largest) or easiest (smallest) ones.

  Uses the higher-is-harder sign convention of jaxdiff scores. Ties at the k-th value are broken
  by the sort (so exactly k examples are selected), which is a fixed order, not a random one: to
  measure overlaps use `topk_overlap` / `selection_probabilities`, and to choose a subset with
  random tie-breaking `jaxdiff.pruning.kept_indices`.

  Args:
    x: `[..., N]`.
    fraction: in (0, 1).
    side: "hardest" or "easiest".

  Returns:
    bool `[..., N]` with exactly k True per row.
  """
  check_fraction(fraction)
  check_side(side)
  ranks = correlation.ordinal_ranks(x)
  n = ranks.shape[-1]
  k = _k(fraction, n)
  return ranks >= n - k if side == "hardest" else ranks < k


def expected_overlap(pa: np.ndarray, pb: np.ndarray, k: int) -> np.ndarray:
  """E|A & B| / k for selections drawn independently with probabilities `pa`, `pb` `[..., N]`
  (`selection_probabilities`): sum_i pa_i pb_i / k, as the two runs' tie-breaks are independent."""
  return np.einsum("...i,...i->...", pa, pb) / k


def topk_overlap(x: np.ndarray, y: np.ndarray, fraction: float,
                 side: str = "hardest") -> np.ndarray:
  """Expected |top_k(x) & top_k(y)| / k for matching rows of `x`, `y` `[..., N]`, ties broken
  uniformly at random and independently in x and y (exact, not sampled); chance is `fraction`.
  Without ties this is the plain overlap of the two top-k sets."""
  k = _k(fraction, np.shape(x)[-1])
  return expected_overlap(selection_probabilities(x, k, side),
                          selection_probabilities(y, k, side), k)


def overlap_matrix(x: np.ndarray, fraction: float, side: str = "hardest") -> np.ndarray:
  """Expected top-k overlap `[K, K]` (`topk_overlap`) between all pairs of rows of `x` `[K, N]`
  (e.g. averaged scores). The diagonal is a row's overlap with an independent tie-break of itself
  (1 without ties at the k-th value)."""
  x = np.asarray(x)
  k = _k(fraction, x.shape[-1])
  p = selection_probabilities(x, k, side)
  return (p @ p.T) / k


def run_overlap(scores: np.ndarray, fractions: Sequence[float] = FRACTIONS, *, num_pairs: int = 20,
                seed: int = 0) -> list[dict]:
  """Top-k overlap between single runs: would two runs prune the same examples?

  Draws min(num_pairs, R // 2) disjoint pairs of runs and reports, per fraction and side, the mean,
  min and max overlap over the pairs, next to the chance level (= fraction). Each overlap is the
  expectation under random tie-breaking (`topk_overlap`), so tied discrete scores do not agree
  merely through a shared tie order.

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
  a, b = s[perm[0:2 * p:2]], s[perm[1:2 * p:2]]
  rows = []
  for f in fractions:
    for side in SIDES:
      v = topk_overlap(a, b, f, side)
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
  overlap = {(float(f), side): overlap_matrix(means, f, side)
             for f in fractions for side in SIDES}
  return dict(names=names, corr=corr, pca=pca, overlap=overlap)


def order_random_ties(x: np.ndarray, *, descending: bool = False, seed: int = 0) -> np.ndarray:
  """Indices `[N]` sorting the 1-D `x` (ascending, or descending), equal values in a random order
  drawn from `seed`: a list of the k easiest or hardest examples of a tied score is then a uniform
  draw from the tied group at its end, not its lowest example indices."""
  x = np.asarray(x, np.float64)
  if x.ndim != 1:
    raise ValueError(f"order_random_ties needs a 1-D array, got shape {x.shape}")
  tiebreak = np.random.default_rng(seed).permutation(x.size)
  return np.lexsort((tiebreak, -x if descending else x))

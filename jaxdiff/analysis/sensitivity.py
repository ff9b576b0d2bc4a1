"""Sensitivity of per-example difficulty to the architecture: per-example tests between ensembles.

Welch t-tests and studentized permutation tests vectorised over examples, effect sizes, Bonferroni
and Benjamini-Hochberg corrections, and rankings of examples (Kwok et al. 2024, arXiv 2401.01867).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Mapping

import numpy as np
import scipy.special
import scipy.stats

from jaxdiff.analysis.reliability import check_scores, run_moments

LN10 = math.log(10.0)


def _pair(a, b):
  a = check_scores(a, "a", min_examples=1)
  b = check_scores(b, "b", min_examples=1)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"a and b must cover the same examples, got shapes {a.shape} and {b.shape}")
  return a, b


def log_t_sf(t: np.ndarray, df: np.ndarray) -> np.ndarray:
  """Natural log of the Student-t survival function P(T > t), finite far beyond float64's p range.

  scipy's `t.logsf` returns -inf once the p-value underflows (|t| of a few hundred); there the
  leading tail term is used: log sf(t) = log c + ((df + 1) / 2 - 1) log df - df log t, with
  c = Gamma((df + 1) / 2) / (sqrt(df pi) Gamma(df / 2)) (the t density integrated as a power law).
  """
  t = np.asarray(t, np.float64)
  df = np.broadcast_to(np.asarray(df, np.float64), t.shape)
  out = np.asarray(scipy.stats.t.logsf(t, df), np.float64)
  far = np.isneginf(out) & np.isfinite(t) & (t > 0)
  if far.any():
    out[far] = log_t_sf_tail(t[far], df[far])
  return out


def log_t_sf_tail(t: np.ndarray, df: np.ndarray) -> np.ndarray:
  """Leading term of log P(T > t) for large t (relative error O(df / t^2)); see `log_t_sf`."""
  t = np.asarray(t, np.float64)
  v = np.asarray(df, np.float64)
  log_c = (scipy.special.gammaln((v + 1) / 2) - scipy.special.gammaln(v / 2)
           - 0.5 * np.log(v * np.pi))
  return log_c + ((v + 1) / 2 - 1) * np.log(v) - v * np.log(t)


@dataclasses.dataclass
class WelchResult:
  """Per-example Welch t-test of a against b (a - b), all `[N]` float64.

  Attributes:
    t: Welch's t = (mean_a - mean_b) / sqrt(var_a / n_a + var_b / n_b) (Welch 1947).
    df: Welch-Satterthwaite degrees of freedom.
    log10_p: log10 of the two-sided p-value (kept in log space: p underflows for strong effects).
    mean_diff: mean_a - mean_b.
    hedges_g: Hedges' g, the bias-corrected standardized mean difference (`hedges_g`).
  Examples constant in both ensembles get t = 0, p = 1 if their means agree, else t = +-inf, p = 0
  (`welch_from_moments`).
  """
  t: np.ndarray
  df: np.ndarray
  log10_p: np.ndarray
  mean_diff: np.ndarray
  hedges_g: np.ndarray

  @property
  def p(self) -> np.ndarray:
    return 10.0**self.log10_p




def _effect(na, ma, va, nb, mb, vb, corrected):
  diff = ma - mb
  sp = np.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
  with np.errstate(divide="ignore", invalid="ignore"):
    d = np.where(sp > 0, diff / np.where(sp > 0, sp, 1.0),
                 np.where(diff == 0, 0.0, np.sign(diff) * np.inf))
  if corrected:
    d = d * (1.0 - 3.0 / (4.0 * (na + nb) - 9.0))
  return d


def cohens_d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Cohen's d per example: (mean_a - mean_b) / s_pooled, with s_pooled^2 = ((n_a-1) s_a^2 +
  (n_b-1) s_b^2) / (n_a + n_b - 2) (Cohen 1988). a: `[R_a, N]`, b: `[R_b, N]`; returns
  `[N]`."""
  a, b = _pair(a, b)
  return _effect(*run_moments(a), *run_moments(b), corrected=False)


def hedges_g(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Hedges' g per example: Cohen's d times J = 1 - 3 / (4 (n_a + n_b) - 9), the small-sample bias
  correction of Hedges (1981). a: `[R_a, N]`, b: `[R_b, N]`; returns `[N]`."""
  a, b = _pair(a, b)
  return _effect(*run_moments(a), *run_moments(b), corrected=True)


def welch_t_test(a: np.ndarray, b: np.ndarray) -> WelchResult:
  """Two-sided Welch t-test of equal means for every example at once (Welch 1947).

  Matches `scipy.stats.ttest_ind(a, b, equal_var=False)` where both are defined
  (`welch_from_moments` says what happens where scipy's is not).

  Args:
    a: `[R_a, N]` scores of ensemble A (R_a >= 2 runs).
    b: `[R_b, N]` scores of ensemble B.

  Returns:
    A `WelchResult` with `[N]` arrays.
  """
  a, b = _pair(a, b)
  return welch_from_moments(run_moments(a), run_moments(b))


def welch_from_moments(moments_a, moments_b) -> WelchResult:
  """The Welch t-test from each group's `(n, mean [N], unbiased variance [N])` (`run_moments`).

  The one Welch test of jaxdiff (the analysis' pairwise sensitivity and the fingerprint's example
  selection both call it). t = (m_a - m_b) / sqrt(v_a / n_a + v_b / n_b) with Welch-Satterthwaite
  df = 1 / (w_a^2 / (n_a - 1) + w_b^2 / (n_b - 1)), w = (v / n) / (v_a / n_a + v_b / n_b) (the usual
  formula divided through by its numerator, so it cannot overflow or underflow to 0 / 0).

  Degenerate examples: with no spread in either group (both groups constant) the statistic is
  infinite when the means differ (t = +-inf, p = 0: certain evidence) and undefined when they are
  equal (t = 0, p = 1: no evidence); df is then reported as n_a + n_b - 2, the pooled test's (any
  df gives the same p there). "No spread" and "equal" mean: within (n_a + n_b) eps (|m_a| + |m_b|),
  the rounding that averaging n_a + n_b float64 values can leave (`run_moments` of a float64
  constant is not always exactly constant), so rounding is never read as evidence while anything
  a float32 score can resolve is tested.

  Returns:
    A `WelchResult` with `[N]` arrays.
  """
  na, ma, va = moments_a
  nb, mb, vb = moments_b
  sa, sb = va / na, vb / nb
  se2 = sa + sb
  diff = ma - mb
  resolution = (na + nb) * np.finfo(np.float64).eps * (np.abs(ma) + np.abs(mb))
  spread = se2 > resolution**2
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    t = np.where(spread, diff / np.sqrt(np.where(spread, se2, 1.0)),
                 np.where(np.abs(diff) <= resolution, 0.0, np.sign(diff) * np.inf))
    wa, wb = sa / se2, sb / se2
    df = np.where(spread, 1.0 / (wa**2 / (na - 1) + wb**2 / (nb - 1)), float(na + nb - 2))
  log10_p = np.minimum((math.log(2.0) + log_t_sf(np.abs(t), df)) / LN10, 0.0)
  return WelchResult(t=t, df=df, log10_p=log10_p, mean_diff=diff,
                     hedges_g=_effect(na, ma, va, nb, mb, vb, corrected=True))


def check_labels(y: np.ndarray, min_per_class: int) -> tuple[np.ndarray, int]:
  """Run counts `[C]` and C of int group labels `[R]` 0..C-1, C >= 2, each >= min_per_class runs."""
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D int array [R]; got dtype {y.dtype} shape {y.shape}")
  num_classes = int(y.max()) + 1 if y.size else 0
  counts = np.bincount(y, minlength=num_classes)
  if num_classes < 2 or counts.min() < min_per_class:
    raise ValueError(f"need >= 2 architectures labelled 0..C-1 with >= {min_per_class} runs each; "
                     f"got runs per label {counts.tolist()}")
  return counts, num_classes


def anova_log_pvalues(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """One-way ANOVA F-test per example: do the architectures' mean scores differ?

  F = [SSB / (C - 1)] / [SSW / (R - C)] with SSB = sum_c n_c (mean_c - mean)^2 and
  SSW = sum_c sum_{r in c} (x_r - mean_c)^2; p = P(F_{C-1, R-C} > F) (Fisher's one-way ANOVA,
  the `scipy.stats.f_oneway` statistic, vectorised over examples). With C = 2 it is the pooled
  two-sample t-test (F = t^2). Degenerate examples follow `welch_from_moments`: no
  within-architecture spread gives F = inf (p = 0) if the means differ, else F = 0 (p = 1), where
  "no" and "equal" mean SSW, SSB <= (R eps)^2 sum_r x_r^2, the float64 rounding of averaging R
  values.

  Args:
    x: `[R, N]` scores.
    y: `[R]` int architecture labels 0..C-1 (each with >= 1 run, R > C).

  Returns:
    `(log_p [N], F [N])`: natural log of the p-value and the statistic.
  """
  x = np.asarray(x, np.float64)
  counts, c = check_labels(y, 1)
  r = x.shape[0]
  if r <= c:
    raise ValueError(f"ANOVA needs more runs than architectures; got {r} runs, {c} architectures")
  onehot = (np.asarray(y)[:, None] == np.arange(c)[None]).astype(np.float64)  # [R, C]
  means = (onehot.T @ x) / counts[:, None]  # [C, N]
  grand = x.mean(0)
  ssb = (counts[:, None] * (means - grand) ** 2).sum(0)
  ssw = ((x - means[y]) ** 2).sum(0)
  with np.errstate(divide="ignore", invalid="ignore"):
    f = (ssb / (c - 1)) / (ssw / (r - c))
  rounding = (r * np.finfo(np.float64).eps) ** 2 * (x ** 2).sum(0)
  f = np.where(ssw <= rounding, np.where(ssb <= rounding, 0.0, np.inf), f)
  return scipy.stats.f.logsf(f, c - 1, r - c), f


def permutation_groups(num_runs: int, size_a: int, num_permutations: int,
                       seed: int = 0) -> np.ndarray:
  """Group-A indicators `[P + 1, num_runs]` float32: row 0 the observed split (first size_a runs),
  rows 1..P uniform random relabellings (drawn with `numpy.random.default_rng(seed)`)."""
  rng = np.random.default_rng(seed)
  g = np.zeros((num_permutations + 1, num_runs), np.float32)
  g[0, :size_a] = 1.0
  if num_permutations:
    g[1:] = np.argsort(rng.random((num_permutations, num_runs)), axis=1) < size_a
  return g


def permutation_test(a: np.ndarray, b: np.ndarray, num_permutations: int = 1000, *, seed: int = 0,
                     chunk_size: int = 8192, rtol: float = 1e-4) -> np.ndarray:
  """Two-sided studentized permutation test of equal means, per example (vectorised over examples).

  The statistic is Welch's t, recomputed for P random relabellings of the R_a + R_b runs (the same
  relabellings for every example); the studentized statistic keeps the test valid asymptotically
  even when the variances differ (Janssen 1997), and exact under exchangeability. The p-value is
  (1 + #{|t_perm| >= |t_obs|}) / (P + 1) (Phipson & Smyth 2010), so it is never below 1 / (P + 1):
  reaching Bonferroni at level alpha over N examples needs P + 1 > N / alpha. Group sums come from
  one float32 matmul per chunk of examples; |t_perm| within a relative `rtol` of |t_obs| counts as
  reaching it (float32 rounding; conservative).

  Args:
    a: `[R_a, N]`; b: `[R_b, N]` (at least 2 runs each).
    num_permutations: P.
    seed: seed of the relabellings (`permutation_groups`).
    chunk_size: examples per matmul (memory ~ 3 (P + 1) chunk_size floats).
    rtol: tie tolerance.

  Returns:
    float64 `[N]` p-values.
  """
  a, b = _pair(a, b)
  if num_permutations < 1:
    raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
  na, nb = a.shape[0], b.shape[0]
  x = np.concatenate([a, b]).astype(np.float64)
  # Centring per example is invariant under relabelling and removes the cancellation in sum(x^2).
  x = (x - x.mean(axis=0)).astype(np.float32)
  g = permutation_groups(na + nb, na, num_permutations, seed)
  n = x.shape[1]
  count = np.empty(n, np.int64)
  thresh = (1.0 - rtol)**2
  for lo in range(0, n, chunk_size):
    xc = x[:, lo:lo + chunk_size]
    c = xc.shape[1]
    both = g @ np.concatenate([xc, xc * xc], axis=1)  # group-A sums of x and x^2, one matmul
    sa, sa2 = both[:, :c], both[:, c:]
    tot, tot2 = sa[0] + (xc[na:].sum(0)), sa2[0] + (xc[na:] * xc[na:]).sum(0)
    sb = tot - sa
    # Squared Welch t: (mean_a - mean_b)^2 / (var_a / n_a + var_b / n_b), in place to spare memory.
    diff = sa / na - sb / nb
    diff *= diff
    va = sa2 - sa * sa / na
    vb = (tot2 - sa2) - sb * sb / nb
    np.maximum(va, 0.0, out=va)
    np.maximum(vb, 0.0, out=vb)
    va *= 1.0 / (na * (na - 1))
    vb *= 1.0 / (nb * (nb - 1))
    va += vb
    with np.errstate(divide="ignore", invalid="ignore"):
      diff /= va
    np.nan_to_num(diff, copy=False, nan=0.0)
    count[lo:lo + chunk_size] = (diff[1:] >= diff[0] * thresh).sum(0)
  return (1.0 + count) / (num_permutations + 1.0)


def bonferroni_mask(p: np.ndarray, alpha: float = 0.05) -> np.ndarray:
  """Bool: p <= alpha / m, m = number of p-values along the last axis (Bonferroni; Dunn 1961)."""
  p = np.asarray(p, np.float64)
  return p <= _check_alpha(alpha) / p.shape[-1]


def bh_adjust(p: np.ndarray) -> np.ndarray:
  """Benjamini-Hochberg adjusted p-values along the last axis (Benjamini & Hochberg 1995).

  adj_(i) = min_{j >= i} min(1, m p_(j) / j) for sorted p; same as
  `scipy.stats.false_discovery_control(p, method="bh")`.
  """
  p = np.asarray(p, np.float64)
  m = p.shape[-1]
  order = np.argsort(p, axis=-1)
  adj = np.take_along_axis(p, order, axis=-1) * m / np.arange(1, m + 1)
  adj = np.minimum(np.flip(np.minimum.accumulate(np.flip(adj, -1), axis=-1), -1), 1.0)
  out = np.empty_like(adj)
  np.put_along_axis(out, order, adj, axis=-1)
  return out


def bh_mask(p: np.ndarray, alpha: float = 0.05) -> np.ndarray:
  """Bool: discoveries of the Benjamini-Hochberg step-up procedure at FDR `alpha` (last axis)."""
  return bh_adjust(p) <= _check_alpha(alpha)


def bh_threshold(p: np.ndarray, alpha: float = 0.05) -> float:
  """The BH critical p-value for a 1-D `p`: the largest p_(k) <= k alpha / m, or alpha / m (the
  smallest possible critical value, for drawing) when nothing is significant."""
  p = np.sort(np.asarray(p, np.float64).ravel())
  m = p.size
  ok = np.nonzero(p <= np.arange(1, m + 1) * _check_alpha(alpha) / m)[0]
  return float(p[ok[-1]]) if ok.size else alpha / m


def _check_alpha(alpha):
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  return alpha


@dataclasses.dataclass
class PairwiseSensitivity:
  """Per-example tests between every pair of architectures, for one score.

  Attributes:
    archs: architecture names; pairs: list of (arch_a, arch_b), a before b in `archs`.
    t, df, log10_p, mean_diff, hedges_g: `[P, N]` Welch results per pair (see `WelchResult`).
    perm_p: `[P, N]` permutation-test p-values, or None when not computed.
    num_permutations: P used for perm_p (0 if none).
    alpha: level for Bonferroni (family-wise, over the N examples of one pair) and BH (FDR, same
      family). Pairs are separate families.
  """
  archs: list
  pairs: list
  t: np.ndarray
  df: np.ndarray
  log10_p: np.ndarray
  mean_diff: np.ndarray
  hedges_g: np.ndarray
  perm_p: np.ndarray | None
  num_permutations: int
  alpha: float

  @property
  def num_examples(self) -> int:
    return self.t.shape[1]

  @property
  def neg_log10_p(self) -> np.ndarray:
    return -self.log10_p

  def bonferroni(self) -> np.ndarray:
    """`[P, N]` bool, p <= alpha / N, compared in log space (p may underflow)."""
    return self.log10_p <= math.log10(self.alpha) - math.log10(self.num_examples)

  def bh(self) -> np.ndarray:
    """`[P, N]` bool, Benjamini-Hochberg discoveries per pair at FDR alpha."""
    return bh_mask(10.0**self.log10_p, self.alpha)

  def counts(self) -> list[dict]:
    """Rows {arch_a, arch_b, examples, bonferroni, bh[, perm_bonferroni, perm_bh]}: numbers of
    examples significantly sensitive for each pair."""
    bonf, bh = self.bonferroni(), self.bh()
    rows = []
    for i, (x, y) in enumerate(self.pairs):
      row = dict(arch_a=x, arch_b=y, examples=self.num_examples, alpha=self.alpha,
                 bonferroni=int(bonf[i].sum()), bh=int(bh[i].sum()))
      if self.perm_p is not None:
        row.update(permutations=self.num_permutations,
                   perm_bonferroni=int(bonferroni_mask(self.perm_p[i], self.alpha).sum()),
                   perm_bh=int(bh_mask(self.perm_p[i], self.alpha).sum()))
      rows.append(row)
    return rows

  def example_sensitivity(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example: max over pairs of -log10 p `[N]`, max |Hedges' g| `[N]`, pair of the max."""
    nlp = self.neg_log10_p
    at = np.argmax(nlp, axis=0)
    return nlp.max(axis=0), np.abs(self.hedges_g).max(axis=0), at

  def ranking(self) -> np.ndarray:
    """Example indices `[N]`, most architecture-sensitive first: by max -log10 p over pairs, ties
    (e.g. p = 0 for several examples) broken by max |Hedges' g|."""
    nlp, g, _ = self.example_sensitivity()
    return np.lexsort((-g, -nlp))


def pairwise_sensitivity(scores_by_arch: Mapping[str, np.ndarray], *, alpha: float = 0.05,
                         num_permutations: int = 0, seed: int = 0) -> PairwiseSensitivity:
  """Welch t-tests (and optionally permutation tests) of one score between all architecture pairs.

  Args:
    scores_by_arch: arch -> `[R_arch, N]`, one score on the same examples (>= 2 archs).
    alpha: significance level for the corrections.
    num_permutations: P > 0 adds `permutation_test` p-values (cost ~ P (R_a + R_b) N per pair).
    seed: permutation seed.
  """
  _check_alpha(alpha)
  archs = list(scores_by_arch)
  if len(archs) < 2:
    raise ValueError(f"sensitivity needs at least 2 architectures, got {archs}")
  pairs = list(itertools.combinations(archs, 2))
  checked = {a: check_scores(scores_by_arch[a], a, min_examples=1) for a in archs}
  sizes = {a: s.shape[1] for a, s in checked.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"architectures cover different numbers of examples: {sizes}")
  moments = {a: run_moments(s) for a, s in checked.items()}  # once per arch, shared by its pairs
  res = [welch_from_moments(moments[x], moments[y]) for x, y in pairs]
  perm = None
  if num_permutations:
    perm = np.stack([permutation_test(checked[x], checked[y], num_permutations, seed=seed + i)
                     for i, (x, y) in enumerate(pairs)])
  stack = lambda f: np.stack([getattr(r, f) for r in res])
  return PairwiseSensitivity(archs=archs, pairs=pairs, t=stack("t"), df=stack("df"),
                             log10_p=stack("log10_p"), mean_diff=stack("mean_diff"),
                             hedges_g=stack("hedges_g"), perm_p=perm,
                             num_permutations=int(num_permutations), alpha=alpha)

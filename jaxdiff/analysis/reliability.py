"""Reliability of difficulty scores across runs: how noisy one run is and how many runs are needed.

Split-half correlations of disjoint n-run means, rank errors, Spearman-Brown prediction and
per-example spread, for score tensors `[runs, examples]` (Kwok et al. 2024, arXiv 2401.01867).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import scipy.optimize

from jaxdiff.analysis import correlation

TARGETS = (0.9, 0.95, 0.99)
# Spearman-Brown applies to Pearson (exactly, for truth + equal-variance noise) and approximately to
# Spearman's rho; Kendall's tau lives on another scale (tau = 2/pi arcsin(r) for normal data).
SB_METRICS = ("pearson", "spearman")


def check_scores(scores: np.ndarray, name: str = "scores", min_runs: int = 2,
                 min_examples: int = 2) -> np.ndarray:
  """Validates a score tensor `[runs, examples]`: 2-D, at least `min_runs` runs, all finite."""
  s = np.asarray(scores)
  if s.ndim != 2:
    raise ValueError(f"{name} must have shape [runs, examples], got shape {s.shape}")
  if s.shape[0] < min_runs or s.shape[1] < min_examples:
    raise ValueError(f"{name} has shape {s.shape}; need at least {min_runs} runs and "
                     f"{min_examples} examples")
  if not np.issubdtype(s.dtype, np.floating) and not np.issubdtype(s.dtype, np.integer):
    raise ValueError(f"{name} must be numeric, got dtype {s.dtype}")
  if not np.isfinite(s).all():
    bad = np.argwhere(~np.isfinite(s))[0]
    raise ValueError(f"{name} has a non-finite value {s[tuple(bad)]} at [run {bad[0]}, example "
                     f"{bad[1]}]; drop diverged runs first (ScoreSet.get does)")
  return s


def run_moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
  """(R, mean `[N]`, unbiased variance `[N]`) over the runs of `[R, N]`: float64 accumulators,
  deviations centred in x's own precision (no float64 copy of the whole tensor)."""
  n = x.shape[0]
  mean = x.sum(axis=0, dtype=np.float64) / n
  dev = x - mean.astype(x.dtype)
  return n, mean, np.einsum("ij,ij->j", dev, dev, dtype=np.float64) / (n - 1)


def default_ns(num_runs: int) -> np.ndarray:
  """n = 1, 2, 4, 8, ... up to num_runs // 2, and num_runs // 2 (two disjoint n-run sets fit)."""
  half = num_runs // 2
  if half < 1:
    raise ValueError(f"reliability needs at least 2 runs, got {num_runs}")
  ns = [2**i for i in range(int(math.log2(half)) + 1)]
  if ns[-1] != half:
    ns.append(half)
  return np.asarray(ns, np.int64)


def spearman_brown(rho1, n):
  """Spearman-Brown prophecy: reliability of a mean of n parallel runs, n rho1 / (1 + (n-1) rho1).

  Spearman (1910), Brown (1910). Exact for Pearson correlations when runs are truth + independent
  noise of equal variance; an approximation for rank correlations.
  """
  rho1 = np.asarray(rho1, np.float64)
  n = np.asarray(n, np.float64)
  return n * rho1 / (1.0 + (n - 1.0) * rho1)


def implied_single_run(rho_n, n):
  """Inverts Spearman-Brown: the single-run reliability rho_n / (n - (n-1) rho_n)."""
  rho_n = np.asarray(rho_n, np.float64)
  return rho_n / (n - (n - 1.0) * rho_n)


def runs_needed(rho1: float, target: float) -> float:
  """Smallest n with spearman_brown(rho1, n) >= t: ceil(t (1 - rho1) / (rho1 (1 - t))).

  Returns inf when rho1 <= 0 (more runs never help) and 1 when rho1 >= target.
  """
  if not 0.0 < target < 1.0:
    raise ValueError(f"target correlation must be in (0, 1), got {target}")
  if not np.isfinite(rho1) or rho1 <= 0.0:
    return math.inf
  if rho1 >= target:
    return 1.0
  return float(math.ceil(target * (1.0 - rho1) / (rho1 * (1.0 - target)) - 1e-9))


def fit_spearman_brown(ns: Sequence[int], rho: Sequence[float]) -> float:
  """Least-squares single-run reliability rho1 such that spearman_brown(rho1, ns) fits `rho`."""
  ns = np.asarray(ns, np.float64)
  rho = np.asarray(rho, np.float64)
  ok = np.isfinite(rho)
  if not ok.any():
    return math.nan
  res = scipy.optimize.minimize_scalar(
      lambda r: np.sum((spearman_brown(r, ns[ok]) - rho[ok])**2), bounds=(1e-9, 1.0 - 1e-12),
      method="bounded", options={"xatol": 1e-10})
  return float(res.x)


@dataclasses.dataclass
class ReliabilityCurve:
  """Correlations between n-run means, one value per random draw of runs.

  Attributes:
    ns: int `[K]`, the numbers of runs n.
    num_runs: R, runs available.
    num_examples: N.
    split: metric -> `[K, D]`: correlation between the means of two disjoint sets of n runs (the
      reliability of an n-run mean; what Spearman-Brown predicts).
    reference: metric -> `[K, D]`: correlation between an n-run mean and the reference, the mean of
      the last R // 2 runs of the draw's permutation (disjoint from every n-run set, so the
      agreement is not inflated by shared runs, and the same reference for every n).
    rank_error: quantile q -> `[K, D]`: the q-quantile over examples of |rank(n-run mean) -
      rank(reference)| / N, ranks being average ranks.
    Kendall (split only) has D = kendall_draws columns (it is the slow one).
    tie_share: mean over runs of the largest fraction of a run's examples that share one value
      (near 1 for a near-constant score such as prediction depth on easy data); NaN if unknown.
  """
  ns: np.ndarray
  num_runs: int
  num_examples: int
  split: dict
  reference: dict
  rank_error: dict
  tie_share: float = math.nan

  def rho1(self, metric: str = "spearman") -> float:
    """Measured single-run reliability: mean over draws of the split correlation at n = 1."""
    if self.ns[0] != 1:
      raise ValueError(f"the curve has no n = 1 (ns = {self.ns.tolist()})")
    return float(np.mean(self.split[metric][0]))

  def summary(self, ci: float = 0.95) -> list[dict]:
    """Rows {measure, metric, n, mean, lo, hi, draws}: mean and central `ci` percentile interval
    over the random choices of runs (the range a user with another n runs would see)."""
    lo_q, hi_q = 50 * (1 - ci), 50 * (1 + ci)
    rows = []
    groups = [("split", self.split), ("reference", self.reference),
              ("rank_error", {f"q{q:g}": v for q, v in self.rank_error.items()})]
    for measure, table in groups:
      for metric, values in table.items():
        mean = values.mean(axis=1)
        lo, hi = np.percentile(values, [lo_q, hi_q], axis=1)
        for i, n in enumerate(self.ns):
          rows.append(dict(measure=measure, metric=metric, n=int(n), mean=float(mean[i]),
                           lo=float(lo[i]), hi=float(hi[i]), draws=int(values.shape[1])))
    return rows


def _nested_sums(s: np.ndarray, order: np.ndarray, ns) -> np.ndarray:
  """`[len(ns), N]`: row i sums the runs order[:ns[i]] (ns ascending: each run is added once)."""
  out = np.empty((len(ns), s.shape[1]), s.dtype)
  acc = np.zeros(s.shape[1], s.dtype)
  prev = 0
  for i, n in enumerate(ns):
    acc += s[order[prev:n]].sum(axis=0)
    out[i] = acc
    prev = n
  return out


def reliability_curve(scores: np.ndarray, ns: Sequence[int] | None = None, *, num_draws: int = 20,
                      kendall_draws: int = 1, quantiles: Sequence[float] = (0.5, 0.9, 0.99),
                      seed: int = 0) -> ReliabilityCurve:
  """Measures how well the mean of n runs agrees with other runs, for several n.

  Each draw permutes the runs; the first n runs form set A, the last n runs set B and the last
  R // 2 runs the reference (both disjoint from A as 2n <= R; draw d's permutation is the d-th
  `numpy.random.default_rng(seed).permutation(R)`). Pearson, Spearman (Pearson of average ranks)
  and Kendall tau-b correlations are computed between mean(A) and mean(B) ("split", the split-half
  reliability of Kwok et al. 2024) and between mean(A) and mean(reference). All n share one
  permutation per draw, so a draw costs one pass over the runs and 2 len(ns) sorts of N values.

  Args:
    scores: `[runs, examples]`, finite.
    ns: numbers of runs, each in [1, R // 2]; default `default_ns(R)`.
    num_draws: random choices of runs D (the spread over draws gives the interval).
    kendall_draws: how many of the draws also get Kendall's tau for the split curve (O(N log N)
      each, the slowest part; not computed for the reference); 0 skips Kendall.
    quantiles: rank-error quantiles over examples.
    seed: seed of the run permutations.

  Returns:
    A `ReliabilityCurve`.
  """
  s = check_scores(scores)
  r, n_ex = s.shape
  ns = default_ns(r) if ns is None else np.asarray(sorted(set(int(n) for n in ns)), np.int64)
  if ns.size == 0 or ns[0] < 1 or 2 * ns[-1] > r:
    raise ValueError(f"ns must lie in [1, {r // 2}] for {r} runs, got {ns.tolist()}")
  if num_draws < 1 or not 0 <= kendall_draws <= num_draws:
    raise ValueError(f"need num_draws >= 1 and 0 <= kendall_draws <= num_draws, got {num_draws}, "
                     f"{kendall_draws}")
  for q in quantiles:
    if not 0.0 <= q <= 1.0:
      raise ValueError(f"rank-error quantile {q} is not in [0, 1]")
  rng = np.random.default_rng(seed)
  k = ns.size
  metrics = ("pearson", "spearman")
  split = {m: np.empty((k, num_draws)) for m in metrics}
  ref = {m: np.empty((k, num_draws)) for m in metrics}
  if kendall_draws:
    split["kendall"] = np.empty((k, kendall_draws))
  rank_err = {float(q): np.empty((k, num_draws)) for q in quantiles}
  # Sums in the scores' precision (at least float32; exact for integer-valued scores up to 2^24):
  # float32 scores carry no more digits than that.
  dtype = np.result_type(s.dtype, np.float32)
  s = np.ascontiguousarray(s, dtype)
  half = r // 2
  for d in range(num_draws):
    perm = rng.permutation(r)
    # A_n = first n runs, B_n = last n runs, reference = last R // 2 runs (sums, not means: every
    # statistic here ignores the scale).
    a = _nested_sums(s, perm, ns)
    b = _nested_sums(s, perm[::-1], ns)
    if ns[-1] == half:  # the reference is B_{R//2}: rank it once
      held = b[-1:]
      ranks = correlation.rank_average(np.concatenate([a, b]), axis=1)
      ra, rb, rh = ranks[:k], ranks[k:], ranks[-1:]
    else:
      held = _nested_sums(s, perm[::-1], [half])
      ranks = correlation.rank_average(np.concatenate([a, b, held]), axis=1)
      ra, rb, rh = ranks[:k], ranks[k:2 * k], ranks[2 * k:]
    # Standardize each row once; a correlation is then a dot product.
    za, zra = correlation.standardize_rows(a), correlation.standardize_rows(ra)
    split["pearson"][:, d] = correlation.dot_rows(za, correlation.standardize_rows(b))
    ref["pearson"][:, d] = correlation.dot_rows(za, correlation.standardize_rows(held))
    split["spearman"][:, d] = correlation.dot_rows(zra, correlation.standardize_rows(rb))
    ref["spearman"][:, d] = correlation.dot_rows(zra, correlation.standardize_rows(rh))
    err = correlation.half_integer_quantiles(np.abs(ra - rh), list(rank_err)) / n_ex
    for qi, q in enumerate(rank_err):
      rank_err[q][:, d] = err[qi]
    if d < kendall_draws:
      split["kendall"][:, d] = correlation.kendall_rows(a, b)
  return ReliabilityCurve(ns=ns, num_runs=r, num_examples=n_ex, split=split, reference=ref,
                          rank_error=rank_err, tie_share=tie_share(s))


def tie_share(scores: np.ndarray) -> float:
  """Mean over runs of the largest fraction of examples sharing one value in that run.

  Args:
    scores: `[runs, examples]`.
  """
  s = np.sort(np.asarray(scores), axis=1)  # one sort per run; equal values become runs of a row
  r, n = s.shape
  new = np.ones(s.shape, bool)
  new[:, 1:] = s[:, 1:] != s[:, :-1]
  # Length of the longest run of equal values per row: distance between consecutive starts.
  starts = np.flatnonzero(new.ravel())
  lengths = np.diff(np.append(starts, r * n))
  longest = np.maximum.reduceat(lengths, np.searchsorted(starts, np.arange(r) * n))
  return float(np.mean(longest / n))


# When the measured curve and Spearman-Brown part by more than this, or the measured correlation
# falls by more than this as runs are added, or more than MAX_TIE_SHARE of a run's examples share
# one value, the extrapolated runs are flagged instead of reported as a finding.
SB_TOLERANCE = 0.02
MAX_TIE_SHARE = 0.5


def reliability_flags(curve: ReliabilityCurve, metric: str = "spearman", *,
                      tolerance: float = SB_TOLERANCE,
                      max_tie_share: float = MAX_TIE_SHARE) -> list[str]:
  """Reasons why Spearman-Brown's extrapolation of `curve` is not to be trusted (empty if none).

  Spearman-Brown assumes runs are the truth plus independent noise; a near-constant or heavily
  tied score (e.g. prediction depth with most examples at depth 0) breaks it: its measured
  reliability can fall as runs are added, while the extrapolation from one run promises more.
  Checked: (a) the measured mean correlation falls by more than `tolerance` from some n to a
  larger n; (b) at the largest measured n, Spearman-Brown from the single-run value differs from
  the measured value by more than `tolerance`; (c) ties dominate: on average more than
  `max_tie_share` of a run's examples share one value.
  """
  measured = curve.split[metric].mean(axis=1)
  flags = []
  drop = np.max(np.maximum.accumulate(measured) - measured) if measured.size else 0.0
  if drop > tolerance:
    flags.append(f"measured {metric} falls as runs are added ({measured[0]:.3f} at n=1, "
                 f"{measured[-1]:.3f} at n={int(curve.ns[-1])})")
  if curve.ns[0] == 1 and curve.ns.size > 1:
    sb = float(spearman_brown(curve.rho1(metric), curve.ns[-1]))
    if abs(sb - measured[-1]) > tolerance:
      flags.append(f"Spearman-Brown predicts {sb:.3f} at n={int(curve.ns[-1])}, measured "
                   f"{measured[-1]:.3f}")
  if np.isfinite(curve.tie_share) and curve.tie_share > max_tie_share:
    flags.append(f"ties dominate: {curve.tie_share:.0%} of a run's examples share one value")
  return flags


def runs_needed_table(curve: ReliabilityCurve, targets: Sequence[float] = TARGETS, *,
                      tolerance: float = SB_TOLERANCE,
                      max_tie_share: float = MAX_TIE_SHARE) -> list[dict]:
  """For Pearson and Spearman and each target: runs needed by Spearman-Brown and as measured.

  Columns: rho1 (measured split correlation at n = 1); rho1_fit (Spearman-Brown fitted to the whole
  measured curve); sb_max_abs_error (max over n of |Spearman-Brown(rho1, n) - measured|);
  runs_needed (from rho1); runs_needed_fit (from rho1_fit); runs_measured (smallest measured n whose
  mean split correlation reaches the target, NaN if none does); runs_needed_truth (runs for the
  n-run mean to correlate `target` with the infinite-run mean: sqrt(rho_n) >= target in classical
  test theory, i.e. rho_n >= target**2); flag ("" if none: `reliability_flags`, joined by "; "),
  set when the measured curve contradicts the extrapolation or ties dominate, in which case the
  runs_needed* columns are not findings.
  """
  rows = []
  for metric, values in curve.split.items():
    if metric not in SB_METRICS:
      continue
    measured = values.mean(axis=1)
    rho1 = curve.rho1(metric)
    rho1_fit = fit_spearman_brown(curve.ns, measured)
    sb_err = float(np.max(np.abs(spearman_brown(rho1, curve.ns) - measured)))
    flag = "; ".join(reliability_flags(curve, metric, tolerance=tolerance,
                                       max_tie_share=max_tie_share))
    for t in targets:
      reach = curve.ns[measured >= t]
      rows.append(dict(metric=metric, rho1=rho1, rho1_fit=rho1_fit, sb_max_abs_error=sb_err,
                       target=float(t), runs_needed=runs_needed(rho1, t),
                       runs_needed_fit=runs_needed(rho1_fit, t),
                       runs_measured=float(reach[0]) if reach.size else math.nan,
                       runs_needed_truth=runs_needed(rho1, t * t), flag=flag))
  return rows


@dataclasses.dataclass
class Spread:
  """Per-example spread across runs against mean difficulty.

  Attributes:
    mean: `[N]` mean over runs; std: `[N]` standard deviation over runs (ddof=1).
    spearman, pearson: correlation between mean and std over examples (> 0: harder examples are
      noisier, with the higher-is-harder sign convention).
    bins: rows {bin, mean_difficulty, mean_std, median_std, count} for equal-count bins of mean.
  """
  mean: np.ndarray
  std: np.ndarray
  spearman: float
  pearson: float
  bins: list


def spread_vs_difficulty(scores: np.ndarray, num_bins: int = 10) -> Spread:
  """Are hard examples noisier? Std over runs against the run-averaged score, with binned summaries.

  Args:
    scores: `[runs, examples]`.
    num_bins: equal-count bins of the mean score (examples ordered by mean; ties split arbitrarily).
  """
  s = check_scores(scores)
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}")
  _, mean, var = run_moments(s)
  std = np.sqrt(var)
  n = mean.size
  num_bins = min(num_bins, n)
  order = np.argsort(mean, kind="stable")
  bin_of = np.empty(n, np.int64)
  bin_of[order] = np.arange(n) * num_bins // n
  counts = np.bincount(bin_of, minlength=num_bins)
  mean_by_bin = np.bincount(bin_of, mean, num_bins) / counts
  std_by_bin = np.bincount(bin_of, std, num_bins) / counts
  std_sorted = std[order]
  edges = np.concatenate([[0], np.cumsum(counts)])
  bins = [dict(bin=b, mean_difficulty=float(mean_by_bin[b]), mean_std=float(std_by_bin[b]),
               median_std=float(np.median(std_sorted[edges[b]:edges[b + 1]])), count=int(counts[b]))
          for b in range(num_bins)]
  return Spread(mean=mean, std=std, spearman=float(correlation.spearman_rows(mean, std)),
                pearson=float(correlation.pearson_rows(mean, std)), bins=bins)

"""Per-example architecture-sensitivity tests and the choice of the k fingerprint examples.

Ranks training examples by how strongly their difficulty score separates architectures (fit runs).

Following Kwok et al., "Dataset Difficulty and the Role of Inductive Bias" (arXiv 2401.01867), which
borrows from statistical genetics (association tests per locus, here per example): an example whose
score differs between architectures far more than between runs of one architecture is
*architecture-sensitive*, and the scores of a few such examples fingerprint the architecture.

Shapes: `R` runs (of all architectures together), `S` score names, `N` examples, `C` architectures.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from jaxdiff.analysis.reliability import run_moments
from jaxdiff.analysis.sensitivity import LN10, anova_log_pvalues, check_labels, welch_from_moments
from jaxdiff.fingerprint import classify

TESTS = ("anova", "welch")
SELECTION_METHODS = ("pvalue", "bonferroni", "logreg", "random")


def welch_log_pvalues(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Minimum over architecture pairs of the two-sided Welch t-test p-value, per example.

  Each pair is `analysis.sensitivity.welch_from_moments` (the one Welch test of jaxdiff: the
  `scipy.stats.ttest_ind(equal_var=False)` statistic, vectorised over examples, with its rule for
  examples constant in both architectures). For C = 2 it is the Welch test; for C > 2 the minimum
  over the C(C-1)/2 pairs picks examples that separate *any* two architectures (the ANOVA F-test
  favours examples that spread all of them). The minimum is not itself a calibrated p-value (it is
  anti-conservative by up to the number of pairs); Bonferroni selection multiplies by the pair
  count too.

  Args:
    x: `[R, N]` scores.
    y: `[R]` int architecture labels 0..C-1, each with >= 2 runs.

  Returns:
    `(log_p [N], max |t| [N])`, log_p the natural log (finite far below float64's smallest p).
  """
  x = np.asarray(x, np.float64)
  _, c = check_labels(y, 2)
  y = np.asarray(y)
  moments = [run_moments(x[y == a]) for a in range(c)]  # (loop over architectures)
  log_p = np.zeros(x.shape[1])
  t_max = np.zeros(x.shape[1])
  for a, b in itertools.combinations(range(c), 2):
    res = welch_from_moments(moments[a], moments[b])
    log_p = np.minimum(log_p, res.log10_p * LN10)
    t_max = np.maximum(t_max, np.abs(res.t))
  return log_p, t_max


def sensitivity(x: np.ndarray, y: np.ndarray, test: str = "anova") -> tuple[np.ndarray, np.ndarray]:
  """Per-example log p-value of the architecture effect, combined over scores.

  Args:
    x: `[R, S, N]` (or `[R, N]`) scores.
    y: `[R]` architecture labels.
    test: "anova" (one-way F-test, `anova_log_pvalues`) or "welch" (min pairwise Welch,
      `welch_log_pvalues`).

  Returns:
    `(log_p [N], stat [N])`, minimum log p and maximum statistic over the S scores.
  """
  if test not in TESTS:
    raise ValueError(f"unknown test {test!r}; valid choices: {TESTS}")
  x = np.asarray(x)
  if x.ndim == 2:
    x = x[:, None]
  fn = anova_log_pvalues if test == "anova" else welch_log_pvalues
  per_score = [fn(x[:, s], y) for s in range(x.shape[1])]
  log_p = np.min([lp for lp, _ in per_score], axis=0)
  stat = np.max([st for _, st in per_score], axis=0)
  return log_p, stat


def num_tests(num_examples: int, num_scores: int, num_classes: int, test: str) -> int:
  """How many p-values the Bonferroni correction divides alpha by."""
  pairs = 1 if test == "anova" else num_classes * (num_classes - 1) // 2
  return num_examples * num_scores * pairs


@dataclasses.dataclass
class Ranking:
  """Examples ordered from most to least architecture-sensitive (positions into the N examples).

  Attributes:
    order: int `[M]`, M <= N (Bonferroni keeps only examples that pass the corrected test).
    log_pvalues: `[N]` log p-values (tests only), else None.
    importance: `[N]` coefficient norms (logreg only), else None.
    l2: the cross-validated L2 strength (logreg only), else None.
  """
  order: np.ndarray
  log_pvalues: np.ndarray | None = None
  importance: np.ndarray | None = None
  l2: float | None = None

  def top(self, k: int) -> np.ndarray:
    return self.order[:k]


def rank_examples(x: np.ndarray, y: np.ndarray, method: str, *, test: str = "anova",
                  alpha: float = 0.05, seed: int = 0,
                  l2_grid=classify.DEFAULT_L2_GRID, cv_folds: int = 5) -> Ranking:
  """Ranks examples for selection; call it on FIT runs only.

  Methods (separately named options):
    "pvalue": ascending p-value of `test` (ties, e.g. p underflowing to 0, broken by the statistic).
    "bonferroni": the same order, keeping only examples with p * m < alpha, m = `num_tests(...)`
      (Bonferroni family-wise correction); may keep fewer than k examples, even none, when the
      architectures are indistinguishable.
    "logreg": descending L2 norm over scores and classes of the example's coefficients in a
      multinomial L2 logistic regression on all N examples (z-scored), its L2 strength chosen by
      cross-validation (`classify.cv_logreg`).
    "random": a seeded random permutation (the baseline).

  Args:
    x: `[R, S, N]` fit-run scores.
    y: `[R]` architecture labels 0..C-1.
    method: one of `SELECTION_METHODS`.
    test: one of `TESTS` (for "pvalue" and "bonferroni").
    alpha: family-wise error rate for "bonferroni".
    seed: seeds "random" and the CV folds of "logreg".
    l2_grid, cv_folds: passed to `classify.cv_logreg` for "logreg".

  Returns:
    A `Ranking`.
  """
  if method not in SELECTION_METHODS:
    raise ValueError(f"unknown selection method {method!r}; valid choices: {SELECTION_METHODS}")
  x = np.asarray(x, np.float64)
  if x.ndim == 2:
    x = x[:, None]
  r, s, n = x.shape
  if np.shape(y) != (r,):
    raise ValueError(f"labels shape {np.shape(y)} does not match {r} runs")
  if method == "random":
    return Ranking(order=np.random.default_rng(seed).permutation(n))
  if method in ("pvalue", "bonferroni"):
    log_p, stat = sensitivity(x, y, test)
    order = np.lexsort((-stat, log_p))
    if method == "bonferroni":
      m = num_tests(n, s, int(np.max(y)) + 1, test)
      order = order[log_p[order] + np.log(m) < np.log(alpha)]
    return Ranking(order=order, log_pvalues=log_p)
  feats = x.reshape(r, s * n)
  mean, std = classify.zscore_stats(feats)
  z = (feats - mean) / std
  num_classes = int(np.max(y)) + 1
  l2, _ = classify.cv_logreg(z, y, num_classes, l2_grid=l2_grid, n_folds=cv_folds, seed=seed)
  w, _ = classify.fit_logreg(z, y, num_classes, l2)
  importance = np.sqrt((w.reshape(s, n, num_classes) ** 2).sum((0, 2)))
  return Ranking(order=np.argsort(-importance, kind="stable"), importance=importance, l2=l2)

"""Tests of jaxdiff.analysis against scipy.stats, slow loops and closed-form known answers.

Also an end-to-end run of experiments/analyze.py on fake workdirs, checking the written numbers.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.stats as st

from experiments import analyze as analyze_script
from jaxdiff import analysis as A
from jaxdiff import store
from jaxdiff.analysis import correlation
from jaxdiff.analysis import sensitivity as S
from jaxdiff.report import analysis as analysis_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _truth_plus_noise(rng, runs, n, var_truth, var_noise):
  truth = rng.standard_normal(n) * math.sqrt(var_truth)
  return truth[None] + rng.standard_normal((runs, n)) * math.sqrt(var_noise)


# ----------------------------------------------------------------------------- correlation kernels


def test_rank_average_matches_scipy_with_ties():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 500))
  x[1] = np.round(x[1] * 2)  # many ties
  x[2] = 7.0  # all tied
  np.testing.assert_array_equal(A.rank_average(x, axis=1), st.rankdata(x, axis=1))
  np.testing.assert_array_equal(A.rank_average(x.T, axis=0), st.rankdata(x.T, axis=0))


def test_rank_average_float32_fast_path_matches_scipy():
  rng = np.random.default_rng(20)
  x = rng.standard_normal((3, 2000)).astype(np.float32)
  x[0, :500] = np.round(x[0, :500] * 4)  # ties, negative values
  x[1, :10] = -0.0  # -0.0 ties with +0.0
  x[1, 10:20] = 0.0
  x[2, :3] = [np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).tiny]
  x[2, 3:9] = [5.0, 5.0, 5.0, -2.0, -2.0, 7.5]  # a few tied groups: the sparse-ties path
  np.testing.assert_array_equal(A.rank_average(x, axis=1), st.rankdata(x, axis=1))


def test_row_correlations_match_scipy():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 400))
  y = x + rng.standard_normal((3, 400))
  y[2] = np.round(y[2])  # ties for the rank statistics
  for i in range(3):
    assert A.pearson_rows(x, y)[i] == pytest.approx(st.pearsonr(x[i], y[i]).statistic, abs=1e-12)
    assert A.spearman_rows(x, y)[i] == pytest.approx(st.spearmanr(x[i], y[i]).statistic, abs=1e-12)
    assert A.kendall_rows(x, y)[i] == pytest.approx(st.kendalltau(x[i], y[i]).statistic, abs=1e-12)


@pytest.mark.parametrize("method", ["pearson", "spearman", "kendall"])
def test_correlation_matrix_matches_pairwise_scipy(method):
  rng = np.random.default_rng(2)
  x = rng.standard_normal((4, 300))
  x[1] += x[0]
  x[3] = np.round(x[3])
  ref = {"pearson": st.pearsonr, "spearman": st.spearmanr, "kendall": st.kendalltau}[method]
  c = A.correlation_matrix(x, method)
  for i in range(4):
    for j in range(4):
      want = 1.0 if i == j else ref(x[i], x[j]).statistic
      assert c[i, j] == pytest.approx(want, abs=1e-12)


def test_correlation_matrix_constant_row_is_nan_and_bad_method_raises():
  x = np.vstack([np.arange(10.0), np.ones(10), np.arange(10.0)[::-1]])
  c = A.correlation_matrix(x, "spearman")
  assert np.isnan(c[1]).all() and np.isnan(c[:, 1]).all() and c[0, 2] == pytest.approx(-1)
  with pytest.raises(ValueError, match="unknown correlation method 'tau'"):
    A.correlation_matrix(x, "tau")


# ----------------------------------------------------------------------------- reliability


def test_reliability_curve_matches_slow_reference_for_its_draws():
  rng = np.random.default_rng(3)
  r, n = 9, 300
  s = _truth_plus_noise(rng, r, n, 1.0, 1.0)
  s[:, :50] = np.round(s[:, :50])  # some ties
  curve = A.reliability_curve(s, num_draws=3, kendall_draws=2, quantiles=(0.5, 0.9), seed=11)
  assert curve.ns.tolist() == [1, 2, 4]
  draws = np.random.default_rng(11)
  for d in range(3):
    perm = draws.permutation(r)
    for k, m in enumerate(curve.ns):
      a, b, held = s[perm[:m]].mean(0), s[perm[r - m:]].mean(0), s[perm[r - r // 2:]].mean(0)
      assert curve.split["pearson"][k, d] == pytest.approx(st.pearsonr(a, b).statistic, abs=1e-10)
      assert curve.split["spearman"][k, d] == pytest.approx(st.spearmanr(a, b).statistic, abs=1e-10)
      assert curve.reference["spearman"][k, d] == pytest.approx(
          st.spearmanr(a, held).statistic, abs=1e-10)
      if d < 2:
        assert curve.split["kendall"][k, d] == pytest.approx(st.kendalltau(a, b).statistic,
                                                             abs=1e-10)
      err = np.abs(st.rankdata(a) - st.rankdata(held)) / n
      assert curve.rank_error[0.9][k, d] == pytest.approx(np.quantile(err, 0.9), abs=1e-12)


def test_reliability_reference_when_half_is_not_in_ns():
  rng = np.random.default_rng(21)
  s = _truth_plus_noise(rng, 10, 200, 1.0, 1.0)
  curve = A.reliability_curve(s, ns=[1, 3], num_draws=2, kendall_draws=0, seed=5)
  draws = np.random.default_rng(5)
  for d in range(2):
    perm = draws.permutation(10)
    ref = s[perm[5:]].mean(0)
    for k, m in enumerate([1, 3]):
      a = s[perm[:m]].mean(0)
      assert curve.reference["pearson"][k, d] == pytest.approx(st.pearsonr(a, ref).statistic,
                                                               abs=1e-10)


def test_half_integer_quantiles_match_numpy():
  rng = np.random.default_rng(22)
  qs = [0.0, 0.13, 0.5, 0.9, 0.99, 1.0]
  for n in (1, 2, 5, 999):
    d = np.abs(A.rank_average(rng.integers(0, 20, (3, n)), 1) -
               A.rank_average(rng.integers(0, 20, (3, n)), 1))
    np.testing.assert_allclose(correlation.half_integer_quantiles(d, qs),
                               np.quantile(d, qs, axis=1), atol=1e-12)


def test_reliability_known_answer_truth_plus_noise():
  # Pearson reliability of an n-run mean: rho_n = n rho1 / (1 + (n-1) rho1), rho1 = vt / (vt + vn);
  # for bivariate normal data Spearman = 6/pi asin(r/2) and Kendall = 2/pi asin(r) (Kendall 1948).
  rng = np.random.default_rng(4)
  vt, vn, r = 1.0, 1.5, 16
  s = _truth_plus_noise(rng, r, 5000, vt, vn)
  curve = A.reliability_curve(s, num_draws=12, kendall_draws=2, seed=0)
  rho1 = vt / (vt + vn)
  rho_n = A.spearman_brown(rho1, curve.ns)
  np.testing.assert_allclose(curve.split["pearson"].mean(1), rho_n, atol=0.015)
  np.testing.assert_allclose(curve.split["spearman"].mean(1), 6 / np.pi * np.arcsin(rho_n / 2),
                             atol=0.015)
  np.testing.assert_allclose(curve.split["kendall"].mean(1), 2 / np.pi * np.arcsin(rho_n),
                             atol=0.02)
  # Against the reference, the mean of R // 2 other runs: corr = sqrt(rho_n rho_{R/2}).
  np.testing.assert_allclose(curve.reference["pearson"].mean(1),
                             np.sqrt(rho_n * A.spearman_brown(rho1, r // 2)), atol=0.015)
  table = {(row["metric"], row["target"]): row for row in A.runs_needed_table(curve)}
  row = table["pearson", 0.9]
  assert row["rho1"] == pytest.approx(rho1, abs=0.015)
  assert row["rho1_fit"] == pytest.approx(rho1, abs=0.01)
  assert row["sb_max_abs_error"] < 0.02
  assert row["runs_needed_fit"] == pytest.approx(A.runs_needed(rho1, 0.9), abs=1)
  assert math.isnan(row["runs_measured"])  # rho_8 = 0.84: no measured n reaches 0.9
  low = A.runs_needed_table(curve, targets=(0.7,))[0]
  assert low["metric"] == "pearson" and low["runs_measured"] == 4  # rho_2 = 0.57, rho_4 = 0.73
  assert ("kendall", 0.9) not in table  # Spearman-Brown does not apply to Kendall's tau


def test_runs_needed_is_the_smallest_n_reaching_the_target():
  for rho1 in (0.05, 0.3, 0.5, 0.77, 0.9):
    for target in (0.9, 0.95, 0.99):
      n = 1
      while A.spearman_brown(rho1, n) < target:
        n += 1
      assert A.runs_needed(rho1, target) == n, (rho1, target)
  assert A.runs_needed(-0.1, 0.9) == math.inf
  with pytest.raises(ValueError, match="target correlation must be in"):
    A.runs_needed(0.5, 1.0)


def test_spearman_brown_inverse_and_fit():
  ns = np.array([1, 2, 4, 8, 16])
  rho = A.spearman_brown(0.37, ns)
  np.testing.assert_allclose(A.implied_single_run(rho, ns), 0.37, atol=1e-12)
  assert A.fit_spearman_brown(ns, rho) == pytest.approx(0.37, abs=1e-6)


def test_reliability_identical_runs_is_perfect():
  s = np.tile(np.random.default_rng(5).standard_normal(200), (6, 1))
  curve = A.reliability_curve(s, num_draws=2)
  np.testing.assert_allclose(curve.split["spearman"], 1.0)
  np.testing.assert_allclose(curve.rank_error[0.99], 0.0)


def test_reliability_rejects_bad_input():
  with pytest.raises(ValueError, match="non-finite value nan at \\[run 1, example 2\\]"):
    s = np.zeros((3, 4))
    s[1, 2] = np.nan
    A.reliability_curve(s)
  with pytest.raises(ValueError, match="ns must lie in \\[1, 2\\]"):
    A.reliability_curve(np.random.default_rng(0).standard_normal((5, 10)), ns=[1, 3])
  with pytest.raises(ValueError, match="shape \\[runs, examples\\]"):
    A.reliability_curve(np.zeros(5))


def test_spread_vs_difficulty_finds_heteroscedastic_noise():
  rng = np.random.default_rng(6)
  truth = rng.standard_normal(3000)
  noise_sd = 0.2 + 0.5 * (truth > 0)  # harder (higher) examples are noisier
  s = truth[None] + rng.standard_normal((10, 3000)) * noise_sd
  sp = A.spread_vs_difficulty(s, num_bins=4)
  assert sp.spearman == pytest.approx(st.spearmanr(s.mean(0), s.std(0, ddof=1)).statistic,
                                      abs=1e-12)
  assert sp.spearman > 0.5
  order = np.argsort(s.mean(0), kind="stable")
  for b, idx in enumerate(np.array_split(order, 4)):
    assert sp.bins[b]["median_std"] == pytest.approx(np.median(s.std(0, ddof=1)[idx]))
    assert sp.bins[b]["count"] == idx.size


# ----------------------------------------------------------------------------- agreement


def test_topk_overlap_matches_set_reference():
  rng = np.random.default_rng(7)
  x, y = rng.standard_normal((2, 5, 200))
  for side in ("hardest", "easiest"):
    got = A.topk_overlap(x, y, 0.3, side)
    for i in range(5):
      key = (lambda v: -v) if side == "hardest" else (lambda v: v)
      a = set(np.argsort(key(x[i]))[:60])
      b = set(np.argsort(key(y[i]))[:60])
      assert got[i] == pytest.approx(len(a & b) / 60)
  m = A.overlap_matrix(x[:3], 0.1)
  ties = np.round(x.astype(np.float32))  # many ties at the boundary: still exactly k selected
  assert (A.top_fraction_mask(ties, 0.3, "easiest").sum(-1) == 60).all()
  r = correlation.ordinal_ranks(ties)
  assert (np.sort(r, axis=1) == np.arange(200)).all()
  order = np.argsort(r, axis=1)
  assert (np.diff(np.take_along_axis(ties, order, 1), axis=1) >= 0).all()  # ranks sort the values
  assert m[0, 1] == pytest.approx(A.topk_overlap(x[0], x[1], 0.1))
  with pytest.raises(ValueError, match="unknown side 'top'"):
    A.top_fraction_mask(x, 0.1, "top")
  with pytest.raises(ValueError, match="pruning fraction must be in \\(0, 1\\), got 1.5"):
    A.top_fraction_mask(x, 1.5)


def test_run_overlap_chance_and_perfect():
  rng = np.random.default_rng(8)
  noise = rng.standard_normal((20, 20000))
  rows = A.run_overlap(noise, (0.1, 0.5), num_pairs=5)
  for row in rows:
    assert row["mean"] == pytest.approx(row["fraction"], abs=0.02)  # independent runs: chance
  same = np.tile(noise[0], (4, 1))
  assert all(row["mean"] == 1.0 for row in A.run_overlap(same, (0.1,)))


def test_pca_one_factor_known_share_and_svd_reference():
  # K scores = common factor + independent noise, equal loadings: every correlation is
  # rho = 1 / (1 + v), so lambda_1 = 1 + (K - 1) rho and the PC1 share is lambda_1 / K.
  rng = np.random.default_rng(9)
  k, n, v = 5, 20000, 0.5
  x = rng.standard_normal(n)[None] + rng.standard_normal((k, n)) * math.sqrt(v)
  rho = 1 / (1 + v)
  spec = A.pca_spectrum(A.correlation_matrix(x, "pearson"))
  assert spec.shares[0] == pytest.approx((1 + (k - 1) * rho) / k, abs=0.01)
  z = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
  sv = np.linalg.svd(z, compute_uv=False)**2
  np.testing.assert_allclose(spec.shares, sv / sv.sum(), atol=1e-10)


def test_score_agreement_drops_constant_scores_from_pca():
  rng = np.random.default_rng(10)
  scores = {"a": rng.standard_normal((3, 50)), "b": rng.standard_normal((3, 50)),
            "c": np.ones((3, 50))}
  res = A.score_agreement(scores, methods=("spearman",))
  assert res["pca"]["spearman"].names == ["a", "b"]


# ----------------------------------------------------------------------------- sensitivity


def test_welch_matches_scipy():
  rng = np.random.default_rng(11)
  a = rng.standard_normal((7, 400)) * 2
  b = rng.standard_normal((12, 400)) + 0.5
  w = A.welch_t_test(a, b)
  ref = st.ttest_ind(a, b, equal_var=False)
  np.testing.assert_allclose(w.t, ref.statistic, rtol=1e-10)
  np.testing.assert_allclose(w.df, ref.df, rtol=1e-10)
  np.testing.assert_allclose(w.p, ref.pvalue, rtol=1e-8, atol=1e-300)
  np.testing.assert_allclose(w.log10_p, np.log10(ref.pvalue), rtol=1e-8)


def test_welch_keeps_tiny_p_values_and_handles_constant_examples():
  a = np.array([[0.0, 1.0, 5.0], [0.0, 1.0, 5.0], [0.0, 1.0, 5.0]])
  b = np.array([[0.0, 2.0, 5.001], [0.0, 2.0, 4.999], [0.0, 2.0, 5.0]])
  w = A.welch_t_test(a, b)
  assert w.t[0] == 0 and w.log10_p[0] == 0  # identical constant example: p = 1
  assert w.t[1] == -np.inf and w.log10_p[1] == -np.inf  # constant but different: p = 0
  rng = np.random.default_rng(12)
  x = rng.standard_normal((50, 1))
  w = A.welch_t_test(x + 1e4, x)  # t ~ 5e4: scipy's p underflows to 0
  assert st.ttest_ind(x + 1e4, x, equal_var=False).pvalue[0] == 0
  assert np.isfinite(w.log10_p[0]) and w.log10_p[0] < -300


def _float64_constant_with_rounding(n):
  """A float64 c whose mean over n copies (`run_moments`) is not exactly c."""
  for c in np.random.default_rng(13).normal(size=1000):
    if S.run_moments(np.full((n, 1), c))[2][0] > 0:
      return c
  raise AssertionError("no rounding constant found")


def test_welch_golden_against_scipy_and_hand_worked_degenerate_cases():
  # The one Welch test (analysis and fingerprint selection): scipy on normal data...
  rng = np.random.default_rng(14)
  a, b = rng.standard_normal((6, 300)) * 3 + 1, rng.standard_normal((9, 300))
  ref = st.ttest_ind(a, b, equal_var=False)
  for scale in (1.0, 1e-100, 1e100):  # t, df, p do not depend on the unit of the scores
    w = A.welch_t_test(a * scale, b * scale)
    np.testing.assert_allclose(w.t, ref.statistic, rtol=1e-10)
    np.testing.assert_allclose(w.df, ref.df, rtol=1e-10)
    np.testing.assert_allclose(w.log10_p, np.log10(ref.pvalue), rtol=1e-8)
  # ...and by hand where scipy has no answer. Columns: both constant and equal (no evidence:
  # t = 0, p = 1, df = n_a + n_b - 2); both constant, different (t = -inf, p = 0); a constant and
  # b not (t = (m_a - m_b) / sqrt(v_b / n_b), df = n_b - 1); a float64 constant whose mean over 3
  # and over 5 copies differ by rounding only (no evidence).
  c = _float64_constant_with_rounding(3)
  a = np.array([[2.0, 1.0, 4.0, c]] * 3)
  b = np.array([[2.0, 3.0, 1.0, c], [2.0, 3.0, 2.0, c], [2.0, 3.0, 3.0, c], [2.0, 3.0, 4.0, c],
                [2.0, 3.0, 5.0, c]])
  w = A.welch_t_test(a, b)
  np.testing.assert_array_equal(w.t[[0, 1, 3]], [0.0, -np.inf, 0.0])
  np.testing.assert_array_equal(w.log10_p[[0, 1, 3]], [0.0, -np.inf, 0.0])
  np.testing.assert_array_equal(w.df[[0, 1, 3]], [6.0, 6.0, 6.0])
  # Column 2: m_a - m_b = 1, v_b / n_b = 2.5 / 5, df = 4: p = 2 P(T_4 > sqrt(2)).
  np.testing.assert_allclose(w.t[2], 1 / math.sqrt(0.5), rtol=1e-12)
  np.testing.assert_allclose(w.df[2], 4.0, rtol=1e-12)
  np.testing.assert_allclose(w.p[2], 2 * st.t.sf(math.sqrt(2), 4), rtol=1e-10)


def test_anova_degenerate_rule_is_the_welch_rule():
  # Spread a float32 score can resolve (relative 1e-8) is tested as scipy tests it; spread of
  # float64 rounding only is none: F = 0 (equal means, p = 1) or F = inf (different means, p = 0).
  rng = np.random.default_rng(15)
  y = np.repeat(np.arange(3), [4, 5, 6])
  x = 1.0 + 1e-8 * (rng.standard_normal((15, 3)) + y[:, None])
  c = _float64_constant_with_rounding(5)
  x[:, 1] = c  # rounding-only spread, equal means
  x[:, 2] = np.where(y == 0, c, 2 * c)  # rounding-only spread, different means
  log_p, f = S.anova_log_pvalues(x, y)
  ref = st.f_oneway(*[x[y == k, 0] for k in range(3)])
  np.testing.assert_allclose(f[0], ref.statistic, rtol=1e-6)
  np.testing.assert_allclose(np.exp(log_p[0]), ref.pvalue, rtol=1e-5)
  np.testing.assert_array_equal(f[1:], [0.0, np.inf])
  np.testing.assert_array_equal(log_p[1:], [0.0, -np.inf])


def test_log_t_sf_tail_agrees_with_scipy_where_scipy_is_finite():
  t = np.array([300.0, 1000.0])
  for df in (3.0, 40.0):
    np.testing.assert_allclose(S.log_t_sf_tail(t, df), st.t.logsf(t, df), rtol=1e-3)
  assert np.isfinite(A.log_t_sf(np.array([1e6]), 150.0)).all()


def test_effect_sizes_hand_worked():
  a = np.array([[1.0], [2.0], [3.0]])
  b = np.array([[4.0], [5.0], [6.0]])
  assert A.cohens_d(a, b)[0] == pytest.approx(-3.0)  # diff -3, pooled sd 1
  assert A.hedges_g(a, b)[0] == pytest.approx(-3.0 * (1 - 3 / (4 * 6 - 9)))


def test_multiple_testing_corrections_match_scipy_and_definitions():
  rng = np.random.default_rng(13)
  p = np.concatenate([rng.uniform(size=300), rng.uniform(0, 1e-4, size=20)])
  np.testing.assert_allclose(A.bh_adjust(p), st.false_discovery_control(p, method="bh"),
                             rtol=1e-12)
  ps = np.sort(p)
  k = np.nonzero(ps <= np.arange(1, p.size + 1) * 0.05 / p.size)[0].max()
  np.testing.assert_array_equal(A.bh_mask(p, 0.05), p <= ps[k])
  assert A.bh_threshold(p, 0.05) == ps[k]
  np.testing.assert_array_equal(A.bonferroni_mask(p, 0.05), p <= 0.05 / p.size)
  with pytest.raises(ValueError, match="alpha must be in"):
    A.bh_mask(p, 5)


def test_planted_sensitive_examples_found_and_ranked_first():
  rng = np.random.default_rng(14)
  n, planted = 3000, np.arange(100, 130)
  truth = rng.standard_normal(n)
  sets = {}
  for k, arch in enumerate(["mlp", "cnn", "resnet"]):
    shift = np.zeros(n)
    shift[planted] = 1.5 * k
    sets[arch] = truth + shift + rng.standard_normal((20, n))
  res = A.pairwise_sensitivity(sets)
  assert res.pairs == [("mlp", "cnn"), ("mlp", "resnet"), ("cnn", "resnet")]
  bh = res.bh()
  is_planted = np.isin(np.arange(n), planted)
  assert bh[1, planted].all()  # shift 3 sd: every planted example found
  assert (bh[:, ~is_planted].sum(1) / bh.sum(1) <= 0.25).all()  # one draw; the mean is tested below
  assert set(res.ranking()[:30]) == set(planted)
  counts = res.counts()
  assert [c["bh"] for c in counts] == bh.sum(1).tolist()
  bonferroni = (res.neg_log10_p >= -np.log10(0.05 / n)).sum(1)
  assert [c["bonferroni"] for c in counts] == bonferroni.tolist()


def test_bh_false_discovery_proportion_averages_below_alpha():
  # BH: E[false discoveries / discoveries] <= alpha * N_null / N (Benjamini & Hochberg 1995).
  rng = np.random.default_rng(19)
  fdp = []
  for _ in range(30):
    a = rng.standard_normal((15, 1000))
    b = rng.standard_normal((15, 1000))
    b[:, :50] += 1.5
    found = A.bh_mask(A.welch_t_test(a, b).p, 0.05)
    fdp.append(found[50:].sum() / max(found.sum(), 1))
  assert np.mean(fdp) < 0.075  # 0.0475 expected; the mean of 30 draws has s.e. ~0.01


def test_null_data_gives_no_discoveries_beyond_fdr_level():
  # Under the complete null BH controls the family-wise error at alpha: P(any discovery) <= 0.05.
  rng = np.random.default_rng(15)
  any_disc, frac_small = 0, []
  for _ in range(20):
    w = A.welch_t_test(rng.standard_normal((10, 2000)), rng.standard_normal((10, 2000)))
    any_disc += A.bh_mask(w.p).any()
    frac_small.append(np.mean(w.p < 0.05))
  assert any_disc <= 4  # Binomial(20, 0.05): P(>= 5) = 0.003
  assert np.mean(frac_small) == pytest.approx(0.05, abs=0.005)  # p-values uniform under the null


def test_permutation_test_matches_slow_loop():
  rng = np.random.default_rng(16)
  a = rng.standard_normal((6, 40))
  b = rng.standard_normal((8, 40)) * 2 + 0.3
  p = A.permutation_test(a, b, 200, seed=3, chunk_size=16)
  groups = A.permutation_groups(14, 6, 200, seed=3).astype(bool)
  x = np.concatenate([a, b])
  t_obs = np.abs(st.ttest_ind(a, b, equal_var=False).statistic)
  count = np.zeros(40)
  for g in groups[1:]:
    count += np.abs(st.ttest_ind(x[g], x[~g], equal_var=False).statistic) >= t_obs
  np.testing.assert_array_equal(p, (1 + count) / 201)


def test_permutation_test_null_is_uniform_and_planted_is_extreme():
  rng = np.random.default_rng(17)
  a = rng.standard_normal((10, 2000))
  b = rng.standard_normal((10, 2000))
  b[:, :20] += 4.0
  p = A.permutation_test(a, b, 199, seed=1)
  assert p[:20].max() == pytest.approx(1 / 200)
  assert np.mean(p[20:]) == pytest.approx(0.5, abs=0.03)
  assert np.mean(p[20:] <= 0.05) == pytest.approx(0.05, abs=0.015)


# ----------------------------------------------------------------------------- end to end


def _fake_workdirs(tmp_path, archs, n=600, runs=8, id_offset=5, data_config=None):
  rng = np.random.default_rng(18)
  truth = rng.standard_normal(n)
  labels = rng.integers(0, 10, n)
  wds = []
  for k, arch in enumerate(archs):
    shift = np.zeros(n)
    shift[:15] = 2.0 * k
    scores = {name: (truth * (1 + 0.2 * j) + shift)[None] + rng.standard_normal((runs, n)) * (1 + j)
              for j, name in enumerate(["loss", "el2n", "margin"])}
    wd = tmp_path / arch
    diverged = [False] * runs
    diverged[-1] = k == 0  # one diverged run, dropped by the analysis
    store.save_scores(str(wd / "scores"), scores, example_ids=np.arange(n) + id_offset,
                      labels=labels,
                      meta=dict(dataset="mnist1d", arch=arch, diverged=diverged))
    data = data_config or {"name": "no-such-dataset"}
    (wd / "config.json").write_text(json.dumps({"data": data}))
    wds.append(str(wd))
  return wds


def _run_script(wds, out, *extra):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "analyze.py"),
         "--workdirs=" + ",".join(wds), f"--out={out}", "--num_draws=4", "--gallery=false", *extra]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_analyze_script_end_to_end(tmp_path):
  wds = _fake_workdirs(tmp_path, ["mlp", "cnn", "resnet"])
  out = tmp_path / "report"
  _run_script(wds, out, "--num_permutations=50", "--figures=false")
  md = (out / "report.md").read_text()
  assert "## Sensitivity to architecture" in md and "PC1 share" in md
  sets = {a: store.load_scores(os.path.join(wd, "scores"))
          for a, wd in zip(["mlp", "cnn", "resnet"], wds)}
  data = {a: {n: s.get(n) for n in sorted(s.scores)} for a, s in sets.items()}
  assert data["mlp"]["loss"].shape[0] == 7  # diverged run dropped

  # Sensitivity counts equal the library's Welch + BH on the same arrays.
  counts = pd.read_csv(out / "tables" / "sensitivity_counts.csv")
  for _, row in counts.iterrows():
    w = A.welch_t_test(data[row.arch_a][row.score], data[row.arch_b][row.score])
    assert row.bh == A.bh_mask(w.p).sum()
    assert row.bonferroni == A.bonferroni_mask(w.p).sum()
  records = json.loads((out / "tables" / "sensitivity_counts.json").read_text())
  assert [r["bh"] for r in records] == counts.bh.tolist()
  npz = np.load(out / "per_example" / "sensitivity_loss.npz")
  w = A.welch_t_test(data["mlp"]["loss"], data["cnn"]["loss"])
  np.testing.assert_allclose(npz["neg_log10_p"][0], -w.log10_p)
  np.testing.assert_array_equal(npz["example_ids"], np.arange(600) + 5)

  # Correlations and PCA of run-averaged scores.
  corr = pd.read_csv(out / "tables" / "correlation.csv")
  names, means = A.stack_means(data["cnn"])
  c = A.correlation_matrix(means, "kendall")
  got = corr[(corr.arch == "cnn") & (corr.method == "kendall") & (corr.score_a == "el2n") &
             (corr.score_b == "margin")].value.item()
  assert got == pytest.approx(c[names.index("el2n"), names.index("margin")], abs=1e-12)
  pca = pd.read_csv(out / "tables" / "pca.csv")
  share = pca[(pca.arch == "mlp") & (pca.method == "spearman") & (pca.component == 1)].share.item()
  assert share == pytest.approx(
      A.pca_spectrum(A.correlation_matrix(A.stack_means(data["mlp"])[1], "spearman")).shares[0])

  # Reliability of (arch i, score j in sorted order) uses seed 1000 i + j (documented in analyze).
  rel = pd.read_csv(out / "tables" / "reliability.csv")
  curve = A.reliability_curve(data["cnn"]["margin"], num_draws=4, kendall_draws=1,
                              seed=1000 * 1 + 2)
  rows = rel[(rel.arch == "cnn") & (rel.score == "margin") & (rel.measure == "split") &
             (rel.metric == "spearman")].sort_values("n")
  np.testing.assert_allclose(rows["mean"], curve.split["spearman"].mean(1), atol=1e-12)
  need = pd.read_csv(out / "tables" / "runs_needed.csv")
  row = need[(need.arch == "cnn") & (need.score == "margin") & (need.metric == "spearman") &
             (need.target == 0.95)]
  assert row.runs_needed.item() == A.runs_needed(curve.rho1("spearman"), 0.95)

  # The planted examples (ids 5..19) are the most sensitive ones listed.
  se = pd.read_csv(out / "tables" / "sensitive_examples.csv")
  most = se[(se.score == "loss") & (se.group == "most")].example_id.tolist()
  assert set(most[:15]) == set(range(5, 20))


def test_analyze_script_single_workdir_with_figures(tmp_path):
  wds = _fake_workdirs(tmp_path, ["mlp"])
  out = tmp_path / "report"
  _run_script(wds, out)
  md = (out / "report.md").read_text()
  assert "(skipped: needs two or more architectures" in md
  counts = pd.read_csv(out / "tables" / "sensitivity_counts.csv")
  assert counts.empty and "bh" in counts.columns
  for fig in ("reliability_mlp.png", "correlation_mlp.png", "pca_scree.png", "spread_mlp.png"):
    assert (out / "figures" / fig).stat().st_size > 1000
  assert not (out / "figures" / "gallery.png").exists()


def test_load_workdirs_refuses_different_datasets(tmp_path):
  wds = _fake_workdirs(tmp_path, ["mlp", "cnn"])
  meta_path = os.path.join(wds[1], "scores", "meta.json")
  meta = json.loads(open(meta_path).read())
  meta["dataset"] = "cifar10"
  store.atomic_write_json(meta_path, meta)
  with pytest.raises(ValueError, match="dataset 'cifar10'"):
    A.load_workdirs(wds)


def test_gallery_skipped_when_dataset_cannot_load(tmp_path):
  wds = _fake_workdirs(tmp_path, ["mlp"])
  assert analyze_script.load_inputs(wds[0]) is None


def test_gallery_drawn_from_the_workdir_dataset(tmp_path):
  # MNIST-1D with 500 samples: 400 training signals of length 40 (jaxdiff.data).
  cfg = dict(name="mnist1d", num_samples=500, train_split=0.8, seed=42)
  wds = _fake_workdirs(tmp_path, ["mlp", "cnn"], n=400, runs=4, id_offset=0, data_config=cfg)
  x, kind = analyze_script.load_inputs(wds[0])
  assert x.shape == (400, 40) and kind == "signal"
  result = A.analyze(A.load_workdirs(wds), num_draws=2, kendall_draws=0, methods=("spearman",))
  analysis_report.write_report(result, str(tmp_path / "report"), x=x, kind=kind)
  assert (tmp_path / "report" / "figures" / "gallery.png").stat().st_size > 1000
  assert "![gallery](figures/gallery.png)" in (tmp_path / "report" / "report.md").read_text()
  with pytest.raises(ValueError, match="example ids reach 399 but the inputs have 300 rows"):
    analysis_report.write_report(result, str(tmp_path / "report2"), x=x[:300], kind=kind)


# ----------------------------------------------------------------------------- issue 17: ties


def _mc_overlap(x, y, k, side, trials, seed=0):
  """Monte-Carlo reference: mean |A & B| / k over independent uniformly random tie-breaks."""
  rng = np.random.default_rng(seed)
  n = x.shape[-1]
  key = (lambda v: -v) if side == "hardest" else (lambda v: v)
  total = 0.0
  for _ in range(trials):
    a = set(np.lexsort((rng.permutation(n), key(x)))[:k])
    b = set(np.lexsort((rng.permutation(n), key(y)))[:k])
    total += len(a & b) / k
  return total / trials


def test_topk_overlap_of_tied_scores_is_the_random_tie_break_expectation():
  # Two independent runs of a forgetting-like count: ~74% of examples tie at 0. Index tie-breaking
  # (the old behaviour) made both runs pick the same lowest-index zeros (overlap ~1).
  rng = np.random.default_rng(20)
  n = 2000
  x, y = rng.poisson(0.3, size=(2, n)).astype(np.float32)
  for side in ("easiest", "hardest"):
    got = float(A.topk_overlap(x, y, 0.1, side))
    ref = _mc_overlap(x, y, 200, side, trials=300)
    assert got == pytest.approx(ref, abs=0.006), side
    assert got == pytest.approx(0.1, abs=0.03), side  # independent runs: near chance
  # The same through run_overlap and the score-by-score matrix.
  runs = rng.poisson(0.3, size=(8, n)).astype(np.float32)
  for row in A.run_overlap(runs, (0.1, 0.3)):
    assert row["mean"] == pytest.approx(row["fraction"], abs=0.03), row
  m = A.overlap_matrix(runs[:3], 0.1, "easiest")
  assert m[0, 1] == pytest.approx(A.topk_overlap(runs[0], runs[1], 0.1, "easiest"))
  assert m[0, 1] == pytest.approx(0.1, abs=0.03)


def test_topk_overlap_hand_worked_with_and_without_ties():
  x = np.array([5.0, 4, 3, 2, 1])
  y = np.array([5.0, 3, 4, 1, 2])
  # k = 2: hardest {0, 1} vs {0, 2}; easiest {3, 4} vs {3, 4}.
  assert A.topk_overlap(x, y, 0.4, "hardest") == pytest.approx(0.5)
  assert A.topk_overlap(x, y, 0.4, "easiest") == pytest.approx(1.0)
  # k = 2 of [1, 1, 1, 0]: each of the three 1s is picked with probability 2/3; of [1, 0, 0, 0]:
  # example 0 surely, each 0 with 1/3. E|A & B| = 2/3 * 1 + 2/3 * 1/3 + 2/3 * 1/3 = 10/9.
  a = np.array([1.0, 1, 1, 0])
  b = np.array([1.0, 0, 0, 0])
  assert A.topk_overlap(a, b, 0.5, "hardest") == pytest.approx(5 / 9)
  np.testing.assert_allclose(A.selection_probabilities(a, 2, "hardest"), [2 / 3, 2 / 3, 2 / 3, 0])
  np.testing.assert_allclose(A.selection_probabilities(b, 2, "hardest"), [1, 1 / 3, 1 / 3, 1 / 3])
  np.testing.assert_allclose(A.selection_probabilities(b, 1, "easiest"), [0, 1 / 3, 1 / 3, 1 / 3])


def test_difficulty_extremes_break_ties_at_random(tmp_path):
  # A primary score where 90% of examples tie at the easiest value: the easiest list must be drawn
  # from the whole tied group, not be its first ids.
  rng = np.random.default_rng(21)
  n = 400
  s = np.zeros((4, n), np.float32)
  s[:, :40] = rng.integers(1, 5, size=(4, 40))
  s = s[:, rng.permutation(n)]
  loss = rng.standard_normal((4, n)).astype(np.float32)
  ss = store.ScoreSet(scores=dict(forgetting_events=s, loss=loss), example_ids=np.arange(n),
                      labels=np.zeros(n, int), meta=dict(num_runs=4))
  res = A.analyze({"mlp": ss}, primary_score="forgetting_events", num_draws=2, kendall_draws=0,
                  methods=("spearman",), top_m=20)
  ext = res.tables["difficulty_extremes"]
  easy = ext[ext.group == "easiest"]["index"].to_numpy()
  assert (s.mean(0)[easy] == 0).all()
  tied = np.flatnonzero(s.mean(0) == 0)
  assert not np.array_equal(np.sort(easy), tied[:20])  # not the lowest indices of the tie


# ----------------------------------------------------------------------------- issue 17: reliability


def _near_constant(seed=0, runs=16, n=3000):
  # ~97% of examples are 0 in every run (as prediction depth on digits); a 2% set is always
  # non-zero and 1% of the rest are 1 at random in each run.
  rng = np.random.default_rng(seed)
  s = np.zeros((runs, n), np.float32)
  hard = rng.uniform(size=n) < 0.02
  s[:, hard] = rng.integers(1, 4, size=(runs, hard.sum()))
  s[rng.uniform(size=(runs, n)) < 0.01] = 1
  return s


def test_runs_needed_flags_a_near_constant_score():
  s = _near_constant()
  curve = A.reliability_curve(s, num_draws=10, kendall_draws=0)
  measured = curve.split["spearman"].mean(1)
  assert measured[-1] < measured[0]  # the premise: measured reliability falls with n
  rows = [r for r in A.runs_needed_table(curve) if r["metric"] == "spearman"]
  for r in rows:
    assert "falls as runs are added" in r["flag"]
    assert "Spearman-Brown" in r["flag"]
    assert "share one value" in r["flag"]
  # The tie share is the mean over runs of the largest share of examples with one value.
  ref = np.mean([np.unique(row, return_counts=True)[1].max() / row.size for row in s])
  assert curve.tie_share == pytest.approx(ref)
  # A well-behaved score is not flagged.
  rng = np.random.default_rng(1)
  ok = A.reliability_curve(_truth_plus_noise(rng, 16, 2000, 1.0, 1.0), num_draws=10,
                           kendall_draws=0)
  assert all(r["flag"] == "" for r in A.runs_needed_table(ok))


def test_report_flags_a_near_constant_score_instead_of_extrapolating(tmp_path):
  rng = np.random.default_rng(22)
  n = 3000
  ss = store.ScoreSet(scores=dict(prediction_depth=_near_constant(n=n),
                                  loss=_truth_plus_noise(rng, 16, n, 1.0, 1.0)),
                      example_ids=np.arange(n), labels=np.zeros(n, int), meta=dict(num_runs=16))
  res = A.analyze({"mlp": ss}, num_draws=4, kendall_draws=0, methods=("spearman",))
  need = res.tables["runs_needed"]
  assert (need[need.score == "prediction_depth"].flag != "").all()
  assert (need[need.score == "loss"].flag == "").all()
  analysis_report.write_report(res, str(tmp_path / "r"), figures=False)
  md = (tmp_path / "r" / "report.md").read_text()
  line = next(l for l in md.splitlines() if l.startswith("| mlp | prediction_depth"))
  assert "flagged" in line
  assert "Flagged: `prediction_depth` (mlp)" in md


# ----------------------------------------------------------------------------- issue 17: dropped


def test_analyze_reports_the_scores_it_drops(tmp_path):
  rng = np.random.default_rng(23)
  n = 300
  good = rng.standard_normal((4, n)).astype(np.float32)
  inf = good.copy()
  inf[:, :5] = np.inf
  ss = store.ScoreSet(scores=dict(loss=good, el2n=good + 1, forgetting_events_inf=inf,
                                  mb_presentations=np.ones((4, n), np.float32),
                                  const=np.ones((4, n), np.float32)),
                      example_ids=np.arange(n), labels=np.zeros(n, int), meta=dict(num_runs=4))
  res = A.analyze({"mlp": ss}, num_draws=2, kendall_draws=0, methods=("spearman",))
  assert set(res.dropped) == {"forgetting_events_inf", "mb_presentations", "const"}
  assert "non-finite" in res.dropped["forgetting_events_inf"]
  assert set(res.tables["reliability"].score) == {"el2n", "loss"}
  analysis_report.write_report(res, str(tmp_path / "r"), figures=False)
  md = (tmp_path / "r" / "report.md").read_text()
  assert "Scores left out" in md and "`forgetting_events_inf` (non-finite values in mlp" in md
  # A caller that chose the scores itself passes its reasons on.
  res = A.analyze({"mlp": ss}, scores=["loss", "el2n"], dropped={"x": "why"}, num_draws=2,
                  kendall_draws=0, methods=("spearman",))
  assert res.dropped == {"x": "why"}
  with pytest.raises(ValueError, match=r"forgetting_events_inf.*non-finite"):
    A.analyze({"mlp": ss}, scores=["loss", "forgetting_events_inf"], num_draws=2)


# ----------------------------------------------------------------------------- issue 16: validation


@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=2.0), r"alpha=2.0.*\(0, 1\)"),
    (dict(alpha=0.0), r"alpha=0.0.*\(0, 1\)"),
    (dict(top_m=-1), r"top_m=-1.*>= 1"),
    (dict(num_draws=0), r"num_draws=0.*>= 1"),
    (dict(num_permutations=-3), r"num_permutations=-3.*>= 0"),
])
def test_analyze_refuses_bad_settings(kwargs, match):
  ss = store.ScoreSet(scores=dict(loss=np.random.default_rng(0).standard_normal((4, 50))),
                      example_ids=np.arange(50), labels=np.zeros(50, int), meta=dict(num_runs=4))
  with pytest.raises(ValueError, match=match):
    A.analyze({"mlp": ss}, **kwargs)


def test_analyze_script_refuses_bad_alpha_and_top_m(tmp_path):
  wds = _fake_workdirs(tmp_path, ["mlp"], n=100, runs=4)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for flag, text in (("--alpha=2", "alpha=2.0"), ("--top_m=-1", "top_m=-1")):
    out = tmp_path / ("r" + flag[2:5])
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "analyze.py"), f"--workdirs={wds[0]}",
           f"--out={out}", "--num_draws=2", "--gallery=false", flag]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and text in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()  # refused before anything is written


def test_gallery_row_says_which_test_ranks_it(tmp_path, monkeypatch):
  from jaxdiff.report import analysis as report  # pylint: disable=g-import-not-at-top
  from jaxdiff.report import figures as plots  # pylint: disable=g-import-not-at-top
  wds = _fake_workdirs(tmp_path, ["mlp", "cnn"], n=100, runs=4, id_offset=0)
  res = A.analyze(A.load_workdirs(wds), num_draws=2, kendall_draws=0, methods=("spearman",))
  seen = {}
  monkeypatch.setattr(plots, "gallery", lambda x, kind, groups, path, **kw: seen.update(groups))
  report.write_figures(res, str(tmp_path / "r"), x=np.zeros((100, 40)), kind="signal")
  row = [k for k in seen if k.startswith("most arch-sensitive")]
  assert row and "pairwise Welch" in row[0]
  se = res.tables["sensitive_examples"]
  assert seen[row[0]] == se[(se.score == "loss") & (se.group == "most")].example_id.tolist()[:8]

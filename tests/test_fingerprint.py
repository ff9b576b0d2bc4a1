"""Tests of jaxdiff.fingerprint on synthetic score tensors whose answer is known.

References: scipy.stats tests per example, finite differences, a hand-solved logistic regression,
brute-force assignment, binomial tolerances for chance accuracy, and spies for test-run leakage.
"""

import itertools
import json
import os
import subprocess
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # many tiny L-BFGS steps; see the script

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from jaxdiff import store
from jaxdiff.fingerprint import classify, evaluate, model, selection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(l2_grid=(0.01, 1.0, 100.0), cv_folds=3, kmeans_restarts=3)


def planted_scores(seed=0, num_classes=4, runs=12, n=300, num_planted=6, shift=3.0):
  """Gaussian noise scores `[R, 1, N]` plus architecture-specific shifts on planted examples."""
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(num_classes), runs)
  x = rng.normal(size=(len(y), 1, n))
  planted = np.sort(rng.choice(n, num_planted, replace=False))
  # Each planted example orders the architectures differently; levels 0..C-1 times `shift`.
  levels = np.stack([rng.permutation(num_classes) for _ in range(num_planted)], axis=1)  # [C, P]
  x[:, 0, planted] += shift * levels[y]
  return x, y, planted


def run_scores(x, y, names=None, ids=None):
  c = int(y.max()) + 1
  ids = np.arange(x.shape[2]) + 1000 if ids is None else ids
  return evaluate.RunScores(x=x, y=y, arch_names=list(names or "abcdefgh"[:c]),
                            score_names=["loss"], example_ids=ids, dataset="synthetic")


# ------------------------------------------------------------------------------------------------
# Per-example tests against scipy.stats, one example at a time.


def _groups_data(seed=0):
  rng = np.random.default_rng(seed)
  y = np.array([0] * 5 + [1] * 4 + [2] * 6)
  x = rng.normal(size=(15, 20)) * (1 + y[:, None]) + 0.5 * y[:, None] * rng.normal(size=20)
  return x, y


def test_anova_matches_scipy_f_oneway():
  x, y = _groups_data()
  x[:, 3] = 2.0  # constant: no evidence, p = 1
  x[:, 4] = y  # no within-architecture spread but different means: p = 0
  log_p, f = selection.anova_log_pvalues(x, y)
  for j in range(x.shape[1]):
    if j in (3, 4):
      continue
    ref = stats.f_oneway(*[x[y == c, j] for c in range(3)])
    np.testing.assert_allclose(f[j], ref.statistic, rtol=1e-10)
    np.testing.assert_allclose(np.exp(log_p[j]), ref.pvalue, rtol=1e-8)
  assert log_p[3] == 0.0 and f[3] == 0.0
  assert log_p[4] == -np.inf and f[4] == np.inf


def test_welch_min_pvalue_matches_scipy_ttest_ind():
  x, y = _groups_data(1)
  log_p, t = selection.welch_log_pvalues(x, y)
  for j in range(x.shape[1]):
    refs = [stats.ttest_ind(x[y == a, j], x[y == b, j], equal_var=False)
            for a, b in itertools.combinations(range(3), 2)]
    np.testing.assert_allclose(np.exp(log_p[j]), min(r.pvalue for r in refs), rtol=1e-8)
    np.testing.assert_allclose(t[j], max(abs(r.statistic) for r in refs), rtol=1e-10)


def test_welch_selection_is_the_analysis_welch_test_including_degenerate_examples():
  # One Welch test: selection's min over pairs is analysis.welch_t_test's p of the best pair, also
  # where scipy has none (constant examples) and at any scale.
  from jaxdiff import analysis
  x, y = _groups_data(3)
  x[:, 0] = 2.0  # constant everywhere: no evidence, p = 1
  x[:, 1] = y  # constant within architectures, different means: p = 0
  x[:, 2] = 0.1 + 1e-17 * np.arange(15)  # constant but for float64 rounding: p = 1
  x[:, 3] = x[:, 4] * 1e-100  # column 4's data in another unit: the same p
  log_p, t = selection.welch_log_pvalues(x, y)
  pairs = [analysis.welch_t_test(x[y == a], x[y == b])
           for a, b in itertools.combinations(range(3), 2)]
  np.testing.assert_allclose(log_p, np.min([w.log10_p for w in pairs], 0) * np.log(10), rtol=1e-12)
  np.testing.assert_allclose(t, np.max([np.abs(w.t) for w in pairs], 0), rtol=1e-12)
  assert log_p[0] == 0 and log_p[1] == -np.inf and log_p[2] == 0
  np.testing.assert_allclose(log_p[3], log_p[4], rtol=1e-10)


def test_sensitivity_combines_scores_by_min_p():
  x, y = _groups_data(2)
  x2 = np.stack([x, x[:, ::-1]], axis=1)  # [R, 2, N]
  log_p, _ = selection.sensitivity(x2, y, "anova")
  a, _ = selection.anova_log_pvalues(x, y)
  np.testing.assert_allclose(log_p, np.minimum(a, a[::-1]))
  with pytest.raises(ValueError, match="valid choices"):
    selection.sensitivity(x2, y, "t-test")


# ------------------------------------------------------------------------------------------------
# Selection.


@pytest.mark.parametrize("test", selection.TESTS)
def test_planted_examples_are_selected(test):
  x, y, planted = planted_scores()
  ranked = selection.rank_examples(x, y, "pvalue", test=test)
  assert set(ranked.top(len(planted))) == set(planted)
  bonf = selection.rank_examples(x, y, "bonferroni", test=test, alpha=0.05)
  # All planted pass; a null example passes the family-wise 5% level rarely (at most one here).
  assert set(planted) <= set(bonf.order) and len(bonf.order) <= len(planted) + 1
  np.testing.assert_array_equal(bonf.order[:len(planted)], ranked.top(len(planted)))


def test_logreg_coefficients_select_planted_examples():
  x, y, planted = planted_scores()
  ranked = selection.rank_examples(x, y, "logreg", l2_grid=FAST["l2_grid"], cv_folds=3)
  assert set(ranked.top(len(planted))) == set(planted)
  assert ranked.l2 in FAST["l2_grid"]


def test_bonferroni_selects_nothing_without_signal():
  rng = np.random.default_rng(3)
  y = np.repeat(np.arange(4), 10)
  x = rng.normal(size=(40, 1, 500))
  for test in selection.TESTS:
    assert len(selection.rank_examples(x, y, "bonferroni", test=test).order) == 0
  # ...while the raw p-value ranking still returns every example.
  assert len(selection.rank_examples(x, y, "pvalue").order) == 500


def test_random_selection_is_seeded_and_uniform():
  x, y, _ = planted_scores(n=50)
  a = selection.rank_examples(x, y, "random", seed=5).order
  np.testing.assert_array_equal(a, selection.rank_examples(x, y, "random", seed=5).order)
  assert sorted(a) == list(range(50))
  assert not np.array_equal(a, selection.rank_examples(x, y, "random", seed=6).order)
  with pytest.raises(ValueError, match="valid choices"):
    selection.rank_examples(x, y, "lasso")


# ------------------------------------------------------------------------------------------------
# Logistic regression.


def test_logreg_gradient_matches_finite_differences():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(7, 3)), rng.integers(0, 4, 7)
  onehot = np.eye(4)[y]
  p = rng.normal(size=3 * 4 + 4)
  _, g = classify.logreg_loss_and_grad(p, x, onehot, 0.3)
  eps = 1e-6
  fd = np.array([(classify.logreg_loss_and_grad(p + eps * e, x, onehot, 0.3)[0]
                  - classify.logreg_loss_and_grad(p - eps * e, x, onehot, 0.3)[0]) / (2 * eps)
                 for e in np.eye(p.size)])
  np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def test_logreg_hand_solved_case():
  # x = +1 (class 1), x = -1 (class 0); by symmetry W = [[-a, a]], b = 0 and the loss is
  # log(1 + exp(-2a)) + l2 a^2, stationary where sigmoid(-2a) = l2 a.
  l2 = 0.5
  a = optimize.brentq(lambda a: 1 / (1 + np.exp(2 * a)) - l2 * a, 0, 10)
  w, b = classify.fit_logreg(np.array([[1.0], [-1.0]]), np.array([1, 0]), 2, l2, gtol=1e-10)
  np.testing.assert_allclose(w, [[-a, a]], atol=1e-6)
  np.testing.assert_allclose(b, [0, 0], atol=1e-6)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_sklearn_logreg_minimises_our_objective_as_scipy_does(num_classes):
  # fit_logreg is scikit-learn with C mapped from l2 (`classify.sklearn_c`: a sum, not a mean, of
  # the loss; one binary vector for two classes). The reference minimises the same objective,
  # `logreg_loss_and_grad` (checked by finite differences above), with scipy's L-BFGS.
  from sklearn.datasets import make_classification
  x, y = make_classification(n_samples=40, n_features=4, n_informative=3, n_redundant=0,
                             n_classes=num_classes, n_clusters_per_class=1, random_state=0)
  onehot = np.eye(num_classes)[y]
  d = x.shape[1] * num_classes
  for l2 in (0.01, 0.3, 3.0):
    ref = optimize.minimize(classify.logreg_loss_and_grad, np.zeros(d + num_classes),
                            args=(x, onehot, l2), jac=True, method="L-BFGS-B",
                            options=dict(maxiter=10000, gtol=1e-12, ftol=1e-15))
    w, b = classify.fit_logreg(x, y, num_classes, l2, gtol=1e-10)
    np.testing.assert_allclose(w, ref.x[:d].reshape(-1, num_classes), atol=1e-5)
    np.testing.assert_allclose(b, ref.x[d:] - ref.x[d:].mean(), atol=1e-5)
    ours = classify.logreg_loss_and_grad(np.concatenate([w.ravel(), b]), x, onehot, l2)[0]
    assert ours <= ref.fun + 1e-9


def test_logreg_separable_data_and_cv():
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(3, 5)) * 4

  def draw(m):
    y = np.repeat(np.arange(3), m)
    return centers[y] + rng.normal(size=(len(y), 5)), y

  (xf, yf), (xt, yt) = draw(15), draw(50)
  clf = classify.train_classifier(xf, yf, 3, **FAST)
  assert np.mean(clf.predict(xt) == yt) == 1.0
  # Pure noise features: CV must prefer the strongest penalty over the weakest.
  xn = rng.normal(size=(45, 20))
  best, losses = classify.cv_logreg(xn, yf, 3, l2_grid=(1e-3, 1e3), n_folds=3)
  assert best == 1e3 and losses[1] < losses[0]


def test_stratified_folds_partition_and_stratify():
  y = np.repeat(np.arange(3), [5, 6, 7])
  folds = classify.stratified_folds(y, 5, seed=0)
  val = np.concatenate([v for _, v in folds])
  assert sorted(val) == list(range(len(y)))
  for tr, va in folds:
    assert np.intersect1d(tr, va).size == 0 and len(tr) + len(va) == len(y)
    assert set(y[va]) == {0, 1, 2}  # every class in every validation fold


# ------------------------------------------------------------------------------------------------
# k-means + Hungarian.


def test_hungarian_matches_brute_force():
  rng = np.random.default_rng(2)
  for _ in range(5):
    clusters, y = rng.integers(0, 4, 40), rng.integers(0, 4, 40)
    mapping = classify.hungarian_match(clusters, y, 4)
    best = max(itertools.permutations(range(4)),
               key=lambda p: np.sum(np.asarray(p)[clusters] == y))
    assert np.sum(mapping[clusters] == y) == np.sum(np.asarray(best)[clusters] == y)


def test_kmeans_hungarian_recovers_permuted_clusters():
  rng = np.random.default_rng(4)
  centers = rng.normal(size=(4, 6)) * 10
  perm = np.array([2, 0, 3, 1])  # class of blob i is perm[i]: labels unrelated to blob order

  def draw(m):
    blob = np.repeat(np.arange(4), m)
    return centers[blob] + rng.normal(size=(len(blob), 6)), perm[blob]

  (xf, yf), (xt, yt) = draw(10), draw(25)
  clf = classify.train_classifier(xf, yf, 4, **FAST)
  assert np.mean(clf.predict(xt, "kmeans") == yt) == 1.0
  # The raw k-means labels are a permutation of the classes, and matching undoes it.
  _, assign = classify.kmeans(xf, 4, seed=0)
  mapping = classify.hungarian_match(assign, yf, 4)
  np.testing.assert_array_equal(mapping[assign], yf)


# ------------------------------------------------------------------------------------------------
# Evaluation: chance without signal, and no test-run leakage.


def test_split_runs_disjoint_stratified_seeded():
  y = np.repeat(np.arange(3), [4, 5, 6])
  fit, test = evaluate.split_runs(y, 0.5, seed=0)
  assert np.intersect1d(fit, test).size == 0 and len(fit) + len(test) == len(y)
  assert np.bincount(y[fit]).tolist() == [2, 2, 3] or np.bincount(y[fit]).tolist() == [2, 3, 3]
  f2, _ = evaluate.split_runs(y, 0.5, seed=0)
  np.testing.assert_array_equal(fit, f2)
  with pytest.raises(ValueError, match="fit_fraction"):
    evaluate.split_runs(y, 1.0)


def test_accuracy_is_chance_when_nothing_distinguishes_architectures():
  rng = np.random.default_rng(5)
  y = np.repeat(np.arange(4), 60)
  data = run_scores(rng.normal(size=(240, 1, 60)), y)
  fit, test = evaluate.split_runs(y, 0.5, seed=0)
  df = evaluate.accuracy_vs_k(data, fit, test, ks=(1, 10), random_repeats=1, **FAST)
  n = len(test)
  sd = np.sqrt(0.25 * 0.75 / n)
  assert (df["n_test"] == n).all() and n == 120
  # Each accuracy within 4 binomial sds of 1/4; their mean (not independent) within 2.5 sds.
  assert (np.abs(df["accuracy"] - 0.25) < 4 * sd).all(), df
  assert abs(df["accuracy"].mean() - 0.25) < 2.5 * sd, df


def test_accuracy_is_high_with_planted_signal():
  # The positive control of the chance test: the same machinery finds real signal.
  x, y, _ = planted_scores(runs=20, n=200, shift=1.5)
  data = run_scores(x, y)
  fit, test = evaluate.split_runs(y, 0.5, seed=0)
  df = evaluate.accuracy_vs_k(data, fit, test, ks=(6,), methods=("pvalue", "random"),
                              random_repeats=2, **FAST)
  acc = df.set_index(["method", "classifier"])["accuracy"]
  assert acc["pvalue", "logreg"] >= 0.95 and acc["pvalue", "kmeans"] >= 0.9
  assert acc["random", "logreg"] < 0.6 and acc[evaluate.BASELINE, "logreg"] < 0.6


def test_signal_only_in_test_runs_is_not_found():
  x, y, planted = planted_scores(runs=20, n=200, shift=3.0)
  fit, test = evaluate.split_runs(y, 0.5, seed=0)
  rng = np.random.default_rng(9)
  x[fit] = rng.normal(size=x[fit].shape)  # fit runs: pure noise; the signal is in test runs only
  data = run_scores(x, y)
  df = evaluate.accuracy_vs_k(data, fit, test, ks=(6,), methods=("pvalue", "bonferroni"),
                              classifiers=("logreg",), **FAST)
  sd = np.sqrt(0.25 * 0.75 / len(test))
  assert (np.abs(df["accuracy"] - 0.25) < 4 * sd).all(), df
  fp = model.fit_fingerprint(x[fit], y[fit], arch_names=data.arch_names, score_names=["loss"],
                             example_ids=data.example_ids, k=6, **FAST)
  assert not set(fp.example_ids - 1000) & set(planted)


def test_selection_and_training_never_see_test_runs(monkeypatch):
  x, y, _ = planted_scores(runs=8, n=40)
  fit, test = evaluate.split_runs(y, 0.5, seed=0)
  marked = x.copy()
  marked[test] += 1e6  # anything selected or trained on a test run would carry this offset
  data = run_scores(marked, y)
  seen = []
  rank, train = selection.rank_examples, classify.train_classifier
  monkeypatch.setattr(selection, "rank_examples",
                      lambda x, y, *a, **k: seen.append(("rank", x)) or rank(x, y, *a, **k))
  monkeypatch.setattr(classify, "train_classifier",
                      lambda f, y, *a, **k: seen.append(("train", f)) or train(f, y, *a, **k))
  evaluate.accuracy_vs_k(data, fit, test, ks=(1, 5), random_repeats=1, **FAST)
  evaluate.accuracy_vs_fit_runs(data, fit, test, k=5, random_repeats=1, **FAST)
  evaluate.holdout(data, fit, test, k=5, **FAST)
  assert {kind for kind, _ in seen} == {"rank", "train"} and len(seen) > 20
  assert max(np.abs(a).max() for _, a in seen) < 1e3


def test_fit_is_unchanged_when_test_runs_are_altered():
  x, y, _ = planted_scores(runs=8, n=40)
  fit, test = evaluate.split_runs(y, 0.5, seed=0)

  def fitted(d):
    r = evaluate.run_report(d, ks=(1, 5), random_repeats=1, fingerprint_k=5, holdout_k=5,
                            fit_runs_k=5, seed=0, **FAST)
    c = r.fingerprint.classifier
    return r.fingerprint.example_ids, c.weights, c.mean, c.threshold, c.kmeans_centroids

  before = fitted(run_scores(x, y))
  x2 = x.copy()
  x2[test] = np.random.default_rng(0).normal(size=x2[test].shape) * 100
  after = fitted(run_scores(x2, y))
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, b)


def test_test_runs_are_classified_one_at_a_time_by_the_fit_fingerprint():
  # A test run's prediction may depend on nothing but itself and the fit runs (no normalising or
  # clustering the test set): the reported accuracy equals the fingerprint's per-run answers.
  x, y, _ = planted_scores(runs=10, n=60)
  fit, test = evaluate.split_runs(y, 0.5, seed=0)
  x[test] += 10.0  # a shift of every test score, which test-set statistics would hide (and did,
  # in a mutant that z-scored test features with test-run statistics: 1.0 vs 0.9 here)
  data = run_scores(x, y)
  df = evaluate.accuracy_vs_k(data, fit, test, ks=(6,), methods=("pvalue",), **FAST)
  fp = model.fit_fingerprint(x[fit], y[fit], arch_names=data.arch_names, score_names=["loss"],
                             example_ids=data.example_ids, k=6, **FAST)
  acc = df.set_index(["method", "classifier"])["accuracy"]
  for clf in classify.CLASSIFIERS:
    one_by_one = [fp.predict(x[[i]], data.example_ids, classifier=clf).label[0] for i in test]
    assert acc["pvalue", clf] == np.mean(np.asarray(one_by_one) == y[test])


# ------------------------------------------------------------------------------------------------
# Hold one architecture out.


def test_holdout_assigns_relative_and_flags_stranger():
  rng = np.random.default_rng(6)
  n, runs = 100, 16
  means = {name: np.zeros(n) for name in ("a", "b", "c", "a2", "z")}
  sens = rng.choice(n, 8, replace=False)
  means["b"][sens] = 3.0
  means["c"][sens[:4]] = -3.0
  means["a2"] = means["a"].copy()  # a2 is a re-implementation of a: same distribution
  means["z"][sens] = 8.0  # z is unlike anything known
  names = list(means)
  y = np.repeat(np.arange(len(names)), runs)
  x = np.stack([means[names[c]] for c in y])[:, None] + rng.normal(size=(len(y), 1, n))
  data = run_scores(x, y, names=names)
  fit, test = evaluate.split_runs(y, 0.5, seed=0)
  df = evaluate.holdout(data, fit, test, k=8, **FAST).set_index("held_out")
  assert df.loc["a2", "assigned_to"] == "a" and df.loc["a2", "nearest_by_mean_scores"] == "a"
  assert df.loc["a2", "flagged_fraction"] <= 0.2
  assert df.loc["z", "flagged_fraction"] == 1.0
  assert (df["known_false_flag"] <= 0.2).all() and (df["known_accuracy"] >= 0.45).all()


# ------------------------------------------------------------------------------------------------
# Saved fingerprint.


def _scoreset(x, y_arch, ids, dataset="synthetic", arch="a"):
  return store.ScoreSet(scores={"loss": x[:, 0]}, example_ids=ids,
                        labels=np.zeros(len(ids), np.int32),
                        meta={"dataset": dataset, "arch": arch, "num_runs": x.shape[0],
                              "diverged": [False] * x.shape[0]})


def test_fingerprint_round_trip_and_refusals(tmp_path):
  x, y, _ = planted_scores(n=80)
  ids = np.arange(80) * 3 + 7
  fit, test = evaluate.split_runs(y, 0.5, seed=0)
  fp = model.fit_fingerprint(x[fit], y[fit], arch_names=list("abcd"), score_names=["loss"],
                             example_ids=ids, k=6, dataset="synthetic", **FAST)
  fp.save(str(tmp_path / "fp"))
  loaded = model.load_fingerprint(str(tmp_path / "fp"))
  new = _scoreset(x[test], y[test], ids)
  p0, p1 = fp.predict(new), loaded.predict(new)
  np.testing.assert_array_equal(p0.label, p1.label)
  np.testing.assert_array_equal(p0.proba, p1.proba)
  np.testing.assert_array_equal(p0.distance, p1.distance)
  assert p0.arch == [fp.arch_names[i] for i in y[test]]  # which architecture trained each run
  np.testing.assert_array_equal(loaded.predict(new, classifier="kmeans").label, y[test])
  # Example order does not matter; only ids do.
  perm = np.random.default_rng(0).permutation(80)
  shuffled = _scoreset(x[test][:, :, perm], None, ids[perm])
  np.testing.assert_array_equal(loaded.predict(shuffled).proba, p1.proba)
  # An already-gathered array gives the same answer.
  pos = [int(np.flatnonzero(ids == i)[0]) for i in loaded.example_ids]
  np.testing.assert_array_equal(loaded.predict(x[test][:, 0, pos]).proba, p1.proba)
  # Plain numpy/json can read it.
  meta = json.loads((tmp_path / "fp" / "fingerprint.json").read_text())
  assert meta["arch_names"] == list("abcd") and meta["k"] == 6 and meta["method"] == "pvalue"
  assert np.load(tmp_path / "fp" / "weights.npy").shape == (6, 4)
  # Refusals.
  keep = ~np.isin(ids, loaded.example_ids[:1])
  with pytest.raises(ValueError, match="lack 1 of the fingerprint's 6 example ids"):
    loaded.predict(_scoreset(x[test][:, :, keep], None, ids[keep]))
  with pytest.raises(ValueError, match="dataset"):
    loaded.predict(_scoreset(x[test], None, ids, dataset="cifar10"))
  with pytest.raises(ValueError, match="already be the fingerprint's examples"):
    loaded.predict(x[test][:, 0])
  os.unlink(tmp_path / "fp" / "fingerprint.json")
  with pytest.raises(ValueError, match="interrupted"):
    model.load_fingerprint(str(tmp_path / "fp"))


def test_two_score_fingerprint_features_are_score_major():
  x, y, planted = planted_scores(n=50)
  rng = np.random.default_rng(8)
  x2 = np.concatenate([x, -x + rng.normal(size=x.shape)], axis=1)  # [R, 2, N]
  ids = np.arange(50) + 5
  fp = model.fit_fingerprint(x2, y, arch_names=list("abcd"), score_names=["loss", "margin"],
                             example_ids=ids, k=4, **FAST)
  pos = fp.example_ids - 5
  manual = np.concatenate([x2[:, 0, pos], x2[:, 1, pos]], axis=1)
  np.testing.assert_array_equal(fp.gather(x2, ids), manual)
  np.testing.assert_array_equal(fp.gather({"loss": x2[:, 0], "margin": x2[:, 1]}, ids), manual)
  np.testing.assert_array_equal(fp.gather(x2[:, :, pos]), manual)
  assert set(pos) <= set(planted)
  with pytest.raises(ValueError, match="lack"):
    fp.gather({"loss": x2[:, 0]}, ids)


# ------------------------------------------------------------------------------------------------
# Loading workdirs and the script end to end.


def _write_workdir(path, x, ids, arch, dataset="synthetic", diverged=None):
  store.save_scores(os.path.join(path, "scores"), {"loss": x[:, 0]}, example_ids=ids,
                    labels=np.zeros(len(ids), np.int32),
                    meta={"dataset": dataset, "arch": arch, "seeds": list(range(len(x))),
                          "diverged": diverged or [False] * len(x)})


def test_collect_runs_drops_diverged_and_refuses_incompatible(tmp_path):
  x, y, _ = planted_scores(num_classes=2, runs=6, n=30)
  ids = np.arange(30)
  _write_workdir(tmp_path / "a", x[y == 0], ids, "mlp", diverged=[True] + [False] * 5)
  _write_workdir(tmp_path / "b", x[y == 1], ids, "cnn")
  _write_workdir(tmp_path / "c", x[y == 1], ids, "cnn", dataset="cifar10")
  sets = evaluate.load_workdirs([str(tmp_path / "a"), str(tmp_path / "b")])
  data = evaluate.collect_runs(sets, ["loss"])
  assert data.arch_names == ["mlp", "cnn"] and np.bincount(data.y).tolist() == [5, 6]
  np.testing.assert_allclose(data.x[:5], x[y == 0][1:], rtol=1e-6)
  _write_workdir(tmp_path / "d", x[y == 1], ids, "cnn")
  sets = evaluate.load_workdirs([str(tmp_path / "b"), str(tmp_path / "d")])
  assert list(sets) == ["cnn@b", "cnn@d"]  # repeated meta arch: <arch>@<folder>
  with pytest.raises(store.StoreError, match="dataset"):
    evaluate.collect_runs(evaluate.load_workdirs([str(tmp_path / "b"), str(tmp_path / "c")]),
                          ["loss"])


def test_script_end_to_end(tmp_path):
  x, y, _ = planted_scores(num_classes=3, runs=10, n=60, shift=2.0)
  ids = np.arange(60)
  workdirs = []
  for c, arch in enumerate(["mlp", "cnn", "resnet"]):
    workdirs.append(str(tmp_path / arch))
    _write_workdir(workdirs[-1], x[y == c][:8], ids, arch)
  out = tmp_path / "report"
  cmd = [sys.executable, os.path.join(REPO, "experiments", "fingerprint.py"),
         f"--workdirs={','.join(workdirs)}", "--score=loss", f"--out={out}", "--ks=1,6,1000",
         "--random_repeats=1", "--cv_folds=2", "--fingerprint_k=6", "--holdout_k=6",
         "--fit_runs_k=6"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
  assert res.returncode == 0, res.stderr[-3000:]
  df = pd.read_csv(out / "accuracy_vs_k.csv")
  assert sorted(df["k"].unique()) == [1, 6, 60]  # 1000 capped at the 60 examples
  assert set(df["method"]) == set(selection.SELECTION_METHODS) | {evaluate.BASELINE}
  acc = df.set_index(["method", "classifier", "k"])["accuracy"]
  assert acc["pvalue", "logreg", 6] >= 0.9
  assert "| pvalue | logreg |" in (out / "accuracy_vs_k.md").read_text()
  assert (out / "accuracy_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(pd.read_csv(out / "holdout.csv")) == 3
  assert "Hold one architecture out" in (out / "report.md").read_text()
  # The saved fingerprint answers for the two runs of each architecture no one trained on.
  fp = model.load_fingerprint(str(out / "fingerprint"))
  for c, arch in enumerate(["mlp", "cnn", "resnet"]):
    new = _scoreset(x[y == c][8:], None, ids, arch=arch)
    assert fp.predict(new).arch == [arch, arch]

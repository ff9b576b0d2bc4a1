"""Across-member scores, AUROC and the score registry."""

import numpy as np
import pytest
from scipy import special, stats

import jaxdiff.scores as scores
from jaxdiff.scores import members
from jaxdiff.scores.auroc import auroc


def test_ensemble_scores_match_scipy():
  rng = np.random.default_rng(0)
  probs = special.softmax(rng.normal(size=(4, 30, 5)) * 2, axis=-1)
  probs[:, 0] = np.eye(5)[1]  # every member puts all mass on class 1: zeros in p
  labels = rng.integers(0, 5, 30)
  labels[0] = 1
  out = members.ensemble_scores(probs, labels)
  for i in range(30):
    js = stats.entropy(probs[:, i].mean(0)) - np.mean([stats.entropy(p) for p in probs[:, i]])
    np.testing.assert_allclose(out["js_divergence"][i], js, rtol=1e-5, atol=1e-7)
    right = [np.argmax(p) == labels[i] for p in probs[:, i]]
    # Higher = harder: +1 every member wrong ("impossible"), -1 every member right ("trivial").
    assert out["dichotomous_difficulty"][i] == (-1 if all(right) else 1 if not any(right) else 0)
    assert out["frac_incorrect"][i] == np.float32(1 - np.mean(right))
  assert out["dichotomous_difficulty"][0] == -1 and out["js_divergence"][0] == 0
  assert set(np.unique(out["dichotomous_difficulty"])) == {-1.0, 0.0, 1.0}
  assert set(out) == {"dichotomous_difficulty", "js_divergence", "frac_incorrect"}


def test_ensemble_scores_member_mask():
  probs = np.array([[[0.9, 0.1]], [[0.2, 0.8]], [[0.6, 0.4]]])
  labels = np.array([0])
  assert members.ensemble_scores(probs, labels)["dichotomous_difficulty"][0] == 0
  masked = members.ensemble_scores(probs, labels, member_mask=[True, False, True])
  assert masked["dichotomous_difficulty"][0] == -1
  np.testing.assert_allclose(masked["js_divergence"][0],
                             stats.entropy([0.75, 0.25]) - np.mean([stats.entropy([0.9, 0.1]),
                                                                    stats.entropy([0.6, 0.4])]),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="member_mask has shape"):
    members.ensemble_scores(probs, labels, member_mask=[True])


def brute_auroc(score, noisy):
  pos, neg = score[noisy], score[~noisy]
  wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
  return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_count_with_ties():
  rng = np.random.default_rng(1)
  score = rng.integers(0, 5, size=(3, 40)).astype(float)  # many ties
  score[2, :3] = np.inf
  noisy = rng.uniform(size=40) < 0.3
  got = auroc(score, noisy)
  for j in range(3):
    np.testing.assert_allclose(got[j], brute_auroc(score[j], noisy), rtol=1e-12)
  assert isinstance(auroc(score[0], noisy), float)
  assert auroc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 1, 0, 0])) == 1.0
  assert auroc(np.ones(4), np.array([True, False, True, False])) == 0.5


def test_auroc_rejects_bad_input():
  with pytest.raises(ValueError, match="both noisy and clean"):
    auroc(np.arange(3.0), np.zeros(3, bool))
  with pytest.raises(ValueError, match="NaN"):
    auroc(np.array([1.0, np.nan]), np.array([True, False]))
  with pytest.raises(ValueError, match="boolean"):
    auroc(np.arange(3.0), np.array([0, 2, 1]))


def test_registry_names_every_output_and_validates():
  rng = np.random.default_rng(2)
  point = scores.point_scores(rng.normal(size=(2, 4, 3)), rng.integers(0, 3, (2, 4)))
  state = scores.EpochAccumulator.update(scores.EpochAccumulator.init(2, 4), point, 0)
  mb = scores.MinibatchForgetting.init(2, 4)
  vog = scores.VoGAccumulator.update(scores.VoGAccumulator.init(2, 4), rng.normal(size=(2, 4, 3)))
  names = (set(point) | {"grand"} | set(scores.EpochAccumulator.finalize(state))
           | set(scores.VoGAccumulator.finalize(vog, np.arange(4)))
           | set(scores.MinibatchForgetting.finalize(mb)) | {"prediction_depth"}
           | set(scores.prototype_scores(rng.normal(size=(2, 4, 3)), np.arange(4), 2))
           | set(members.ensemble_scores(np.full((2, 4, 3), 1 / 3), np.arange(4) % 3)))
  assert names == set(scores.SCORES)
  assert scores.NEGATED <= set(scores.SCORES) | set(scores.LEGACY_ENSEMBLE_SCORES)
  assert not set(scores.ENSEMBLE_SCORES) & scores.NEGATED  # written higher = harder already
  assert scores.validate_names(["el2n", "aum"]) == ["el2n", "aum"]
  assert scores.validate_names("grand") == ["grand"]
  with pytest.raises(ValueError,
                     match=r"unknown score name\(s\) \['el3n'\]; valid names: .*'el2n'"):
    scores.validate_names(["el2n", "el3n"])
  with pytest.raises(ValueError, match="valid names"):
    scores.validate_names(["grand"], valid=scores.TRAJECTORY_SCORES)


def test_orient_makes_higher_harder():
  logits = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
  point = {k: np.asarray(v) for k, v in scores.point_scores(logits, np.array([0, 0])).items()}
  oriented = scores.orient(point)  # example 0 is easy, example 1 is hard (wrong, confident)
  for name, value in oriented.items():
    if name in ("max_p", "entropy"):  # label-free: both predictions are equally confident
      continue
    assert value[1] > value[0], name
  # Label-free scores: an uncertain prediction is harder than a confident one.
  logits = np.array([[5.0, 0, 0], [1.0, 0.9, 0.8]])
  unsure = scores.orient(scores.point_scores(logits, np.zeros(2, int)))
  assert unsure["max_p"][1] > unsure["max_p"][0] and unsure["entropy"][1] > unsure["entropy"][0]
  np.testing.assert_array_equal(oriented["p_y"], -point["p_y"])
  np.testing.assert_array_equal(oriented["loss"], point["loss"])
  with pytest.raises(ValueError, match="unknown score"):
    scores.orient({"bogus": np.zeros(2)})
  assert "bogus" in scores.orient({"bogus": np.zeros(2)}, strict=False)


def test_auroc_table_single_and_averaged():
  from jaxdiff.scores import auroc_table  # pylint: disable=g-import-not-at-top
  noisy = np.array([True, False, False, True, False])
  # Run 0 ranks noisy first perfectly; run 1 perfectly wrong; the mean ties within pairs.
  s = np.array([[5., 1, 2, 4, 3], [1., 4, 5, 2, 3], [np.nan] * 5])
  rows = auroc_table({"x": s, "const": np.ones((2, 5))}, noisy)
  assert [r["score"] for r in rows] == ["x"] and rows[0]["runs"] == 2
  assert rows[0]["auroc_single_mean"] == 0.5 and rows[0]["auroc_single_std"] == 0.5
  mean = s[:2].mean(0)  # [3, 2.5, 3.5, 3, 3]: pairs noisy>clean: 3>2.5 (x2), ties with 3 (x2)
  expected = np.mean([(a > b) + 0.5 * (a == b) for a in mean[noisy] for b in mean[~noisy]])
  assert rows[0]["auroc_mean_score"] == expected

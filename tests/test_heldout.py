"""Tests for jaxdiff.heldout: C-scores, memorisation, out-of-sample probabilities, report script.

Pure functions against Python-loop references and planted masks; one small real training run
(members on half the data) with known answers: random labels give C-score near chance and high
memorisation, duplicated examples C-score near 1.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, tiny_config
from jaxdiff import heldout
from jaxdiff.report import heldout as heldout_report
from jaxdiff import store
from jaxdiff import train


def _loop_mean(values, mask, valid, side, members=None):
  """Slow reference: per example, the members on `side`, their mean, SE (ddof=1) and count."""
  r, n = mask.shape
  members = np.ones(r, bool) if members is None else members
  mean, se, count = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, int)
  for j in range(n):
    vals = [values[i, j] for i in range(r) if valid[i] and members[i]
            and bool(mask[i, j]) == (side == "in")]
    count[j] = len(vals)
    if vals:
      mean[j] = np.mean(vals)
    if len(vals) >= 2:
      se[j] = np.std(vals, ddof=1) / np.sqrt(len(vals))
  return mean, se, count


def _random_case(seed=0, r=9, n=40):
  rng = np.random.default_rng(seed)
  mask = rng.random((r, n)) < 0.5
  values = rng.random((r, n))
  valid = np.ones(r, bool)
  valid[3] = False
  return values, mask, valid


@pytest.mark.parametrize("side", ["out", "in"])
def test_member_mean_matches_loop_reference(side):
  values, mask, valid = _random_case()
  est = heldout.member_mean(values, mask, valid, side=side, min_holdout=3)
  mean, se, count = _loop_mean(values, mask, valid, side)
  np.testing.assert_array_equal(est.count, count)
  np.testing.assert_array_equal(est.enough, count >= 3)
  np.testing.assert_allclose(est.mean, np.where(count >= 3, mean, np.nan), rtol=1e-12)
  np.testing.assert_allclose(est.stderr, np.where(count >= 3, se, np.nan), rtol=1e-12)
  assert (~est.enough).any() and est.enough.any()  # the flag case is exercised


def test_binary_stderr_is_binomial_formula():
  # For 0/1 values, SE = sqrt(p (1 - p) / (k - 1)): 3 of 4 held-out members correct -> 0.25.
  mask = np.array([[False], [False], [False], [False], [True]])
  correct = np.array([[1.], [1.], [1.], [0.], [1.]])
  est = heldout.member_mean(correct, mask)
  assert est.mean[0] == 0.75 and est.count[0] == 4
  np.testing.assert_allclose(est.stderr[0], np.sqrt(0.75 * 0.25 / 3))


def test_planted_mask_poison_never_reaches_heldout_estimates():
  rng = np.random.default_rng(1)
  r, n, c = 12, 30, 4
  mask = rng.random((r, n)) < 0.5
  valid = np.ones(r, bool)
  valid[5] = False
  correct = (rng.random((r, n)) < 0.6).astype(float)
  probs = rng.dirichlet(np.ones(c), size=(r, n))
  for poison in (np.nan, np.inf, 1e30):
    # Members that trained on the example, and the diverged member, carry poison.
    bad = mask | ~valid[:, None]
    pc = np.where(bad, poison, correct)
    pp = np.where(bad[..., None], poison, probs)
    cs = heldout.c_scores(pc, mask, np.full(r, 0.5), valid, min_holdout=1)
    ref, _, count = _loop_mean(correct, mask, valid, "out")
    np.testing.assert_allclose(cs.estimate.mean[0], ref, rtol=1e-12)
    assert np.isfinite(cs.estimate.mean[0][count >= 1]).all()
    p, k = heldout.oos_probs(pp, mask, valid)
    assert np.isfinite(p[k >= 1]).all()
    for j in range(n):
      held = [i for i in range(r) if valid[i] and not mask[i, j]]
      if held:
        np.testing.assert_allclose(p[j], probs[held, j].mean(0), rtol=1e-12)
  # And the converse: poison on the held-out side never reaches the in-sample mean.
  est = heldout.member_mean(np.where(~mask, np.nan, correct), mask, valid, side="in",
                            min_holdout=1)
  assert np.isfinite(est.mean[est.enough]).all()


def test_c_scores_group_members_by_fraction():
  rng = np.random.default_rng(2)
  r, n = 12, 50
  fractions = np.array([0.25, 0.75, 1.0] * 4)
  mask = rng.random((r, n)) < fractions[:, None]
  mask[fractions == 1.0] = True
  valid = np.ones(r, bool)
  correct = (rng.random((r, n)) < 0.7).astype(float)
  cs = heldout.c_scores(correct, mask, fractions, valid, min_holdout=1)
  np.testing.assert_array_equal(cs.fractions, [0.25, 0.75])  # fraction 1 holds nothing out
  for i, f in enumerate(cs.fractions):
    ref, se, count = _loop_mean(correct, mask, valid, "out", fractions == f)
    np.testing.assert_allclose(cs.estimate.mean[i], ref, rtol=1e-12)
    np.testing.assert_array_equal(cs.estimate.count[i], count)
  np.testing.assert_allclose(cs.integrated, cs.estimate.mean.mean(0))
  with pytest.raises(ValueError, match="subset_fraction < 1"):
    heldout.c_scores(correct, np.ones((r, n), bool), np.ones(r))


def test_memorisation_and_c_score_known_answers_on_synthetic_correctness():
  # 64 members on random halves; typical examples are right for every member, "random-label"
  # ones only for members that trained on them (memorised), a quarter of held-out members
  # guessing right (chance with 4 classes).
  rng = np.random.default_rng(3)
  r, n_typ, n_rand = 64, 30, 30
  n = n_typ + n_rand
  mask = rng.random((r, n)) < 0.5
  correct = np.ones((r, n))
  guess = rng.random((r, n_rand)) < 0.25
  correct[:, n_typ:] = np.where(mask[:, n_typ:], 1.0, guess)
  mem = heldout.memorisation(correct, mask, np.full(r, 0.5))
  cs = heldout.c_scores(correct, mask, np.full(r, 0.5))
  np.testing.assert_allclose(mem.value[0, :n_typ], 0.0)
  np.testing.assert_allclose(cs.estimate.mean[0, :n_typ], 1.0)
  assert abs(np.mean(cs.estimate.mean[0, n_typ:]) - 0.25) < 0.05
  assert abs(np.mean(mem.value[0, n_typ:]) - 0.75) < 0.05
  # Exact against the reference: acc_in - acc_out and the combined standard error.
  mi, si, _ = _loop_mean(correct, mask, np.ones(r, bool), "in")
  mo, so, _ = _loop_mean(correct, mask, np.ones(r, bool), "out")
  np.testing.assert_allclose(mem.value[0], mi - mo, rtol=1e-12)
  np.testing.assert_allclose(mem.stderr[0], np.sqrt(si ** 2 + so ** 2), rtol=1e-12)


def test_bad_inputs_name_the_value():
  values, mask, valid = _random_case()
  with pytest.raises(ValueError, match="side='both'"):
    heldout.member_mean(values, mask, side="both")
  with pytest.raises(ValueError, match="min_holdout=0"):
    heldout.member_mean(values, mask, min_holdout=0)
  with pytest.raises(ValueError, match=r"mask \[R, N\]"):
    heldout.member_mean(values[:, :5], mask)
  with pytest.raises(ValueError, match="boolean"):
    heldout.member_mean(values, mask * 2)
  with pytest.raises(ValueError, match="one subset fraction per member"):
    heldout.c_scores(values, mask, [0.5, 0.5])


def _atypical_dataset(seed=0):
  """4 Gaussian classes in 16-D; 24 examples with uniformly random labels (unlearnable from the
  others); 8 points with random labels, each duplicated 4 times (learnable from a copy)."""
  rng = np.random.default_rng(seed)
  c, d = 4, 16
  centers = rng.normal(0, 3, (c, d))
  y = rng.integers(0, c, 320)
  x = centers[y] + rng.normal(0, 1, (320, d))
  xr = centers[rng.integers(0, c, 24)] + rng.normal(0, 1, (24, d))
  yr = rng.integers(0, c, 24)
  xg = np.repeat(centers[rng.integers(0, c, 8)] + rng.normal(0, 1, (8, d)), 4, 0)
  yg = np.repeat((rng.integers(0, c, 8)), 4)
  x_all = np.concatenate([x, xr, xg]).astype(np.float32)
  y_all = np.concatenate([y, yr, yg]).astype(np.int32)
  groups = {"typical": slice(0, 320), "random": slice(320, 344), "duplicated": slice(344, 376)}
  return x_all, y_all, groups


def test_real_training_known_answers(tmp_path):
  x, y, groups = _atypical_dataset()
  c = tiny_config("mlp", num_runs=8, num_epochs=40, subset_fraction=0.5, batch_size=32,
                  **{"data.name": "arrays", "model.width": 64, "scores.grand": False,
                     "scores.vog": False, "scores.representation": False,
                     "scores.minibatch": False, "checkpoint_every": 0})
  train.train_and_evaluate(c, str(tmp_path), arrays={"x_train": x, "y_train": y})
  w = heldout.read_workdir(str(tmp_path))
  assert w.has_subsets and w.mask.shape == (8, 376)
  res = heldout.analyze(w)
  cs, mem = res.c.estimate.mean[0], res.mem.value[0]
  mean = {k: np.nanmean(cs[s]) for k, s in groups.items()}
  memo = {k: np.nanmean(mem[s]) for k, s in groups.items()}
  # Random labels: right out of sample only when the label happens to be the cluster's (1/4).
  assert abs(mean["random"] - 0.25) < 0.2, mean
  assert memo["random"] > 0.5 and memo["typical"] < 0.15, memo
  assert mean["typical"] > 0.85 and mean["duplicated"] > 0.7, mean
  # The report script runs end to end on it (no label noise: no AUROC table).
  out = tmp_path / "report"
  env = dict(os.environ, PYTHONPATH=ROOT)
  subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "heldout.py"),
                  f"--workdir={tmp_path}", f"--out={out}"], check=True, env=env,
                 capture_output=True, timeout=120)
  np.testing.assert_allclose(np.load(out / "c_score.npy"), res.c.estimate.mean)
  assert (out / "c_score_hist.png").stat().st_size > 1000
  assert "| 0.5 |" in (out / "summary.md").read_text()


def test_noise_auroc_rows_orientation_and_common_examples():
  rng = np.random.default_rng(4)
  n = 200
  noisy = np.zeros(n, bool)
  noisy[:20] = True
  neg_c = np.where(noisy, -0.1, -0.9) + rng.normal(0, 0.01, n)  # flipped: low C-score
  neg_c[-5:] = np.nan  # flagged examples are left out of every row
  stored = {"loss": np.stack([np.where(noisy, 1.0, 0.0) + rng.normal(0, 0.6, n)] * 3),
            "const": np.ones((3, n))}
  stored["loss"][1] = np.nan  # a diverged member
  sparse = np.where(noisy, 1.0, 0.0)
  sparse[30:] = np.nan  # defined on 15% of examples: evaluated on its own, not shrinking the rest
  rows, keep = heldout.noise_auroc_rows({"neg_c_score": neg_c, "memorisation": sparse},
                                        {"neg_in_p_y": -np.ones(n) * 0.9}, stored, noisy,
                                        full_data_scores={"el2n": np.where(noisy, 1.0, 0.5)[None]})
  assert keep.sum() == n - 5
  by = {r["score"]: r for r in rows}
  assert by["memorisation"]["examples"] == 30 and by["memorisation"]["auroc"] == 1.0
  assert by["neg_c_score"]["examples"] == by["loss"]["examples"] == n - 5
  assert by["neg_c_score"]["auroc"] == 1.0 and by["neg_c_score"]["kind"] == "held-out"
  assert by["neg_in_p_y"]["auroc"] == 0.5 and "const" not in by
  assert by["el2n"]["kind"] == "full-data" and by["el2n"]["auroc"] == 1.0
  from jaxdiff.scores import auroc  # pylint: disable=g-import-not-at-top
  s = stored["loss"][[0, 2]].mean(0)
  assert by["loss"]["auroc"] == pytest.approx(auroc(s[keep], noisy[keep]))


def test_read_workdir_defaults_for_workdirs_without_subsets(tmp_path):
  r, n, c = 2, 6, 3
  store.save_scores(str(tmp_path / "scores"), {"loss": np.zeros((r, n))},
                    example_ids=np.arange(n), labels=np.arange(n) % c, meta={})
  with pytest.raises(store.StoreError, match="no logits.npy"):
    heldout.read_workdir(str(tmp_path))
  np.save(tmp_path / "logits.npy", np.zeros((r, n, c), np.float32))
  w = heldout.read_workdir(str(tmp_path))
  assert w.mask.all() and not w.has_subsets and (w.fractions == 1).all() and w.noise_mask is None


# ------------------------------------------------------------------------------------------------
# Nothing written before every input is checked; errors that name the file (issue 16).


def _noisy_workdir(path, noise_seed=0, subsets=True, r=6, n=40, c=3):
  """A finished workdir by hand: scores, logits, subset and noise masks, with its fingerprint."""
  rng = np.random.default_rng(0)
  clean = rng.integers(0, c, n).astype(np.int32)
  noise = np.random.default_rng(noise_seed).random(n) < 0.2
  labels = np.where(noise, (clean + 1) % c, clean).astype(np.int32)
  fp = {"name": "toy", "num_train": n, "labels_sha256": f"{noise_seed:064x}",
        "noise_mask_sha256": f"{noise_seed + 7:064x}", "data": {"noise_seed": noise_seed}}
  mask = rng.random((r, n)) < 0.5 if subsets else np.ones((r, n), bool)
  store.save_scores(os.path.join(path, "scores"), {"loss": rng.random((r, n))},
                    example_ids=np.arange(n), labels=labels,
                    meta={"dataset": "toy", "dataset_fingerprint": fp, "arch": "mlp",
                          "subset_fractions": [0.5 if subsets else 1.0] * r, "num_epochs": 2})
  np.save(os.path.join(path, "logits.npy"), rng.normal(size=(r, n, c)).astype(np.float32))
  np.save(os.path.join(path, "subset_mask.npy"), mask)
  np.save(os.path.join(path, "noise_mask.npy"), noise)
  return str(path)


def test_other_full_data_workdir_writes_nothing(tmp_path):
  w = _noisy_workdir(tmp_path / "w")
  full_other = _noisy_workdir(tmp_path / "full", noise_seed=1, subsets=False)
  out = tmp_path / "out"
  with pytest.raises(store.StoreError,
                     match=r"'.*full' and '.*w' were trained on different data \(labels_sha256"):
    heldout_report.write_report(w, str(out), full_data_workdir=full_other)
  assert not out.exists()
  # The script: exit status 1, one line naming the difference, no output directory.
  env = dict(os.environ, PYTHONPATH=ROOT)
  res = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "heldout.py"),
                        f"--workdir={w}", f"--out={out}", f"--full_data_workdir={full_other}"],
                       env=env, capture_output=True, text=True, timeout=120)
  assert res.returncode != 0 and "trained on different data" in res.stderr
  assert "Traceback" not in res.stderr and not out.exists()
  # The same data: everything is written, with the full-data rows in the AUROC table.
  full_same = _noisy_workdir(tmp_path / "full_same", noise_seed=0, subsets=False)
  heldout_report.write_report(w, str(out), full_data_workdir=full_same, min_holdout=1)
  rows = json.loads((out / "noise_auroc.json").read_text())
  assert "full-data" in {r["kind"] for r in rows}
  assert (out / "c_score.npy").exists() and (out / "summary.md").exists()


@pytest.mark.parametrize("fname", ["logits.npy", "subset_mask.npy", "noise_mask.npy",
                                   "scores/labels.npy"])
def test_truncated_workdir_file_is_named(tmp_path, fname):
  w = _noisy_workdir(tmp_path / "w")
  path = tmp_path / "w" / fname
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 5])
  with pytest.raises(store.StoreError, match=f"corrupt or truncated file '{path}'"):
    heldout.read_workdir(w)
  with pytest.raises(store.StoreError, match=f"'{path}'"):
    heldout_report.write_report(w, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_noise_auroc_script_names_a_truncated_noise_mask(tmp_path):
  w = _noisy_workdir(tmp_path / "w")
  path = tmp_path / "w" / "noise_mask.npy"
  path.write_bytes(path.read_bytes()[:-5])
  env = dict(os.environ, PYTHONPATH=ROOT)
  res = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "noise_auroc.py"),
                        f"--workdir={w}"], env=env, capture_output=True, text=True, timeout=120)
  assert res.returncode != 0 and str(path) in res.stderr and "Traceback" not in res.stderr
  assert not (tmp_path / "w" / "noise_auroc.md").exists()

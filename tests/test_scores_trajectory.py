"""Trajectory accumulators: hand-made correctness sequences, Python-loop references, VoG formula."""

import numpy as np
import pytest

from jaxdiff.scores import trajectory
from jaxdiff.scores.trajectory import EpochAccumulator, MinibatchForgetting, VoGAccumulator

STEPS = [0, 2, 5, 7, 10, 11]  # recorded steps need not be consecutive; last + 1 = 12
# Correctness over the 6 records, and the hand-worked expectations:
# (forgetting events, learning time, consistent learning time, unforgettable, never learned)
CASES = {
    "always":           ([1, 1, 1, 1, 1, 1], 0, 0, 0, 1, 0),
    "never":            ([0, 0, 0, 0, 0, 0], 0, 12, 12, 0, 1),
    "learned_forgotten": ([0, 1, 1, 0, 0, 0], 1, 2, 12, 0, 0),
    "flip_flop":        ([1, 0, 1, 0, 1, 1], 2, 0, 10, 0, 0),
    "late":             ([0, 0, 1, 1, 1, 1], 0, 5, 5, 1, 0),
    "relearned":        ([1, 0, 0, 0, 0, 1], 1, 0, 11, 0, 0),
    "last_only":        ([0, 0, 0, 0, 0, 1], 0, 11, 11, 1, 0),
}


def run_epochs(correct, p_y, extra=None):
  """correct, p_y: [T, R, N]; returns the finalized scores."""
  t, r, n = correct.shape
  state = EpochAccumulator.init(r, n)
  rng = np.random.default_rng(0)
  extra = extra if extra is not None else rng.normal(size=(3, t, r, n))
  for i in range(t):
    point = {"correct": correct[i], "p_y": p_y[i], "loss": extra[0, i],
             "margin_logit": extra[1, i], "margin_prob": extra[2, i]}
    state = EpochAccumulator.update(state, point, STEPS[i])
  return EpochAccumulator.finalize(state), extra


def test_epoch_accumulator_hand_worked_sequences():
  names = list(CASES)
  correct = np.array([CASES[k][0] for k in names], float).T[:, None, :]  # [T, 1, N]
  # Second member: the same sequences reversed over examples, to check members stay separate.
  correct = np.concatenate([correct, correct[:, :, ::-1]], axis=1)
  p_y = np.random.default_rng(1).uniform(size=correct.shape)
  out, extra = run_epochs(correct, p_y)
  for j, name in enumerate(names):
    _, forgets, learn, consistent, unforgettable, never = CASES[name]
    for r, col in ((0, j), (1, len(names) - 1 - j)):
      # Never learned: T // 2 + 1 = 4 with T = 6 records, above any possible count (at most 3).
      assert out["forgetting_events"][r, col] == (4 if never else forgets), name
      assert out["forgetting_events_inf"][r, col] == (np.inf if never else forgets), name
      assert out["learning_time"][r, col] == learn, name
      assert out["learning_time_inf"][r, col] == (np.inf if never else learn), name
      assert out["consistent_learning_time"][r, col] == consistent, name
      assert out["consistent_learning_time_inf"][r, col] == (
          np.inf if consistent == 12 else consistent), name
      assert out["unforgettable"][r, col] == unforgettable, name
      assert out["never_learned"][r, col] == never, name
  np.testing.assert_allclose(out["mean_p_y"], p_y.mean(0), rtol=1e-6)
  np.testing.assert_allclose(out["variability"], np.std(p_y, axis=0, ddof=0), rtol=1e-5)
  np.testing.assert_allclose(out["mean_correct"], correct.mean(0), rtol=1e-6)
  np.testing.assert_allclose(out["mean_loss"], extra[0].mean(0), rtol=1e-5)
  np.testing.assert_allclose(out["aum"], extra[1].mean(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(out["aum_prob"], extra[2].mean(0), rtol=1e-5, atol=1e-7)
  assert all(v.dtype == np.float32 and v.shape == (2, len(names)) for v in out.values())


def test_never_learned_examples_rank_hardest_by_forgetting():
  # Golden, hand-worked: T = 5 records. Learned examples can be forgotten at most 5 // 2 = 2 times
  # (1, 0, 1, 0, x); a never-learned one gets 5 // 2 + 1 = 3, the hardest value, and the same in
  # every member whatever the others did (a member's scores do not depend on the ensemble).
  seqs = {"never": [0, 0, 0, 0, 0], "twice": [1, 0, 1, 0, 0], "once": [0, 1, 0, 0, 1],
          "always": [1, 1, 1, 1, 1]}
  expect = {"never": 3, "twice": 2, "once": 1, "always": 0}
  correct = np.array(list(seqs.values()), float).T[:, None, :]  # [T=5, R=1, N=4]
  state = EpochAccumulator.init(1, 4)
  for t in range(5):
    z = np.zeros((1, 4))
    state = EpochAccumulator.update(state, dict(correct=correct[t], p_y=z, loss=z, margin_logit=z,
                                                margin_prob=z), step=t)
  out = EpochAccumulator.finalize(state)
  np.testing.assert_array_equal(out["forgetting_events"][0], list(expect.values()))
  np.testing.assert_array_equal(out["forgetting_events_inf"][0], [np.inf, 2, 1, 0])
  np.testing.assert_array_equal(out["never_learned"][0], [1, 0, 0, 0])


def test_epoch_accumulator_state_round_trips_through_npz(tmp_path):
  rng = np.random.default_rng(2)
  correct = (rng.uniform(size=(6, 2, 9)) > 0.4).astype(float)
  p_y = rng.uniform(size=correct.shape)
  full, extra = run_epochs(correct, p_y)
  state = EpochAccumulator.init(2, 9)
  for i in range(6):
    point = {"correct": correct[i], "p_y": p_y[i], "loss": extra[0, i],
             "margin_logit": extra[1, i], "margin_prob": extra[2, i]}
    state = EpochAccumulator.update(state, point, STEPS[i])
    if i == 2:  # checkpoint and resume
      np.savez(tmp_path / "s.npz", **state)
      state = dict(np.load(tmp_path / "s.npz"))
  for k, v in EpochAccumulator.finalize(state).items():
    np.testing.assert_array_equal(v, full[k], err_msg=k)


def test_epoch_accumulator_validates():
  state = EpochAccumulator.init(1, 3)
  point = {k: np.zeros((1, 3)) for k in trajectory.EPOCH_INPUTS}
  with pytest.raises(ValueError, match="no step was recorded"):
    EpochAccumulator.finalize(state)
  state = EpochAccumulator.update(state, point, 4)
  with pytest.raises(ValueError, match="increase strictly: got step 4 after 4"):
    EpochAccumulator.update(state, point, 4)
  with pytest.raises(ValueError, match=r"lack \['margin_prob'\]"):
    EpochAccumulator.update(state, {k: v for k, v in point.items() if k != "margin_prob"}, 5)
  with pytest.raises(ValueError, match="expected"):
    EpochAccumulator.update(state, {**point, "loss": np.zeros((2, 3))}, 5)


def reference_minibatch(schedule, num_runs, num_examples):
  """Plain Python over every presentation, per member and example."""
  history = [[[] for _ in range(num_examples)] for _ in range(num_runs)]
  last = -1
  for step, idx, correct in schedule:
    last = max(last, step)
    for r in range(num_runs):
      for i, c in zip(idx[r], correct[r]):
        history[r][i].append((step, int(c)))
  out = {k: np.zeros((num_runs, num_examples)) for k in
         ("forgets", "learn", "consistent", "unforgettable", "never", "presentations")}
  for r in range(num_runs):
    for i in range(num_examples):
      h = history[r][i]
      seq = [c for _, c in h]
      forgets = sum(1 for a, b in zip(seq, seq[1:]) if a == 1 and b == 0)
      learned = [s for s, c in h if c == 1]
      consistent = last + 1
      for t in range(len(h)):
        if all(c == 1 for _, c in h[t:]):
          consistent = h[t][0]
          break
      out["forgets"][r, i] = forgets
      out["learn"][r, i] = learned[0] if learned else last + 1
      out["consistent"][r, i] = consistent
      out["unforgettable"][r, i] = float(bool(learned) and forgets == 0)
      out["never"][r, i] = float(not learned)
      out["presentations"][r, i] = len(h)
  return out


def test_minibatch_forgetting_matches_python_loop():
  rng = np.random.default_rng(3)
  r, n, b = 3, 20, 5
  schedule, step = [], 0
  for epoch in range(8):
    perms = np.stack([rng.permutation(n) for _ in range(r)])  # members see different orders
    for k in range(n // b - 1):  # the last batch is dropped: some examples go unseen some epochs
      idx = perms[:, k * b:(k + 1) * b]
      # Correct more often later, and for low ids: a mix of learned / forgotten / never.
      p = np.clip(0.15 + 0.1 * epoch - 0.02 * idx, 0, 1)
      schedule.append((step, idx, rng.uniform(size=idx.shape) < p))
      step += 3  # steps need not be consecutive
  state = MinibatchForgetting.init(r, n)
  for s, idx, correct in schedule:
    state = MinibatchForgetting.update(state, idx, correct, s)
  out = MinibatchForgetting.finalize(state)
  ref = reference_minibatch(schedule, r, n)
  last = schedule[-1][0]
  never = ref["never"].astype(bool)
  assert never.any() and (ref["forgets"] > 0).any() and ref["unforgettable"].any()
  bound = ref["presentations"].max(axis=1, keepdims=True) // 2 + 1  # per member
  np.testing.assert_array_equal(out["mb_forgetting_events"],
                                np.where(never, bound, ref["forgets"]))
  assert (out["mb_forgetting_events"][never] > ref["forgets"].max()).all()
  np.testing.assert_array_equal(out["mb_forgetting_events_inf"],
                                np.where(never, np.inf, ref["forgets"]))
  np.testing.assert_array_equal(out["mb_learning_time"], ref["learn"])
  np.testing.assert_array_equal(out["mb_learning_time_inf"], np.where(never, np.inf, ref["learn"]))
  np.testing.assert_array_equal(out["mb_consistent_learning_time"], ref["consistent"])
  np.testing.assert_array_equal(out["mb_consistent_learning_time_inf"],
                                np.where(ref["consistent"] == last + 1, np.inf, ref["consistent"]))
  np.testing.assert_array_equal(out["mb_unforgettable"], ref["unforgettable"])
  np.testing.assert_array_equal(out["mb_never_learned"], ref["never"])
  np.testing.assert_array_equal(out["mb_presentations"], ref["presentations"])


def test_minibatch_forgetting_hand_worked():
  # One member, 3 examples. Presentations of example 0: right, wrong, right, wrong (2 events);
  # example 1: wrong, right, right; example 2 never presented.
  state = MinibatchForgetting.init(1, 3)
  for step, idx, c in [(0, [0, 1], [1, 0]), (1, [1, 0], [1, 0]), (2, [0, 1], [1, 1]),
                       (3, [0], [0])]:
    state = MinibatchForgetting.update(state, np.array([idx]), np.array([c]), step)
  out = MinibatchForgetting.finalize(state)
  # Example 2 was never learned: 4 presentations at most (example 0) // 2 + 1 = 3.
  np.testing.assert_array_equal(out["mb_forgetting_events"][0], [2, 0, 3])
  np.testing.assert_array_equal(out["mb_learning_time"][0], [0, 1, 4])
  np.testing.assert_array_equal(out["mb_consistent_learning_time"][0], [4, 1, 4])
  np.testing.assert_array_equal(out["mb_unforgettable"][0], [0, 1, 0])
  np.testing.assert_array_equal(out["mb_never_learned"][0], [0, 0, 1])
  with pytest.raises(ValueError, match=r"\[R=1, B\]"):
    MinibatchForgetting.update(state, np.zeros((2, 2), int), np.zeros((2, 2)), 5)


def reference_vog(grads, labels):
  """The authors' formula, example by example: grads [K, R, N, ...]."""
  k, r, n = grads.shape[:3]
  raw = np.zeros((r, n))
  for m in range(r):
    for i in range(n):
      g = grads[:, m, i].reshape(k, -1)
      mu = g.sum(0) / k
      raw[m, i] = np.mean(np.sqrt(sum((gt - mu) ** 2 for gt in g) / k))
  norm = np.zeros_like(raw)
  for m in range(r):
    for c in np.unique(labels):
      vals = raw[m, labels == c]
      norm[m, labels == c] = (vals - vals.mean()) / vals.std()
  return raw, norm


@pytest.mark.parametrize("channel_mean", [False, True])
def test_vog_matches_authors_formula(channel_mean):
  rng = np.random.default_rng(4)
  grads = rng.normal(size=(4, 2, 12, 5, 3)) * rng.uniform(0.1, 2, size=(1, 1, 12, 1, 1))
  labels = np.array([0, 1, 2, 5] * 3)
  state = VoGAccumulator.init(2, 12)
  for g in grads:
    state = VoGAccumulator.update(state, g, channel_mean=channel_mean)
  out = VoGAccumulator.finalize(state, labels)
  raw, norm = reference_vog(grads.mean(-1) if channel_mean else grads, labels)
  np.testing.assert_allclose(out["vog_raw"], raw, rtol=1e-5)
  np.testing.assert_allclose(out["vog"], norm, rtol=1e-4, atol=1e-5)


def test_vog_single_example_class_gets_zero_and_shapes_checked():
  state = VoGAccumulator.init(1, 3)
  rng = np.random.default_rng(5)
  for _ in range(3):
    state = VoGAccumulator.update(state, rng.normal(size=(1, 3, 4)))
  out = VoGAccumulator.finalize(state, np.array([0, 0, 1]))
  assert out["vog"][0, 2] == 0.0 and np.all(np.abs(out["vog"][0, :2]) == 1.0)
  with pytest.raises(ValueError, match="earlier checkpoints"):
    VoGAccumulator.update(state, rng.normal(size=(1, 3, 5)))


def test_minibatch_update_steps_equals_step_by_step_updates():
  """An epoch in one scan (recording.py's call) == the python reference via per-step updates."""
  rng = np.random.default_rng(5)
  r, n, b, steps = 2, 12, 3, 4
  state_a, state_b = MinibatchForgetting.init(r, n), MinibatchForgetting.init(r, n)
  schedule = []
  for epoch in range(3):
    idx = np.stack([rng.permutation(n)[:steps * b].reshape(steps, b) for _ in range(r)])
    correct = rng.uniform(size=idx.shape) < 0.2 + 0.3 * epoch
    for s in range(steps):
      schedule.append((epoch * steps + s, idx[:, s], correct[:, s]))
      state_a = MinibatchForgetting.update(state_a, idx[:, s], correct[:, s], epoch * steps + s)
    state_b = MinibatchForgetting.update_steps(state_b, idx, correct, epoch * steps)
  a, b_ = MinibatchForgetting.finalize(state_a), MinibatchForgetting.finalize(state_b)
  ref = reference_minibatch(schedule, r, n)
  assert (ref["forgets"] > 0).any()
  bound = ref["presentations"].max(axis=1, keepdims=True) // 2 + 1
  np.testing.assert_array_equal(b_["mb_forgetting_events"],
                                np.where(ref["never"] > 0, bound, ref["forgets"]))
  for k in a:
    np.testing.assert_array_equal(a[k], b_[k], err_msg=k)
  with pytest.raises(ValueError, match=r"\[R=2, S, B\]"):
    MinibatchForgetting.update_steps(state_b, np.zeros((2, 2), int), np.zeros((2, 2)), 5)

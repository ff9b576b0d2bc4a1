"""Point scores (loss, margins, EL2N, ...) and the chunked driver, against numpy loops."""

import jax
import numpy as np
import pytest
from scipy import special

from jaxdiff.scores import point
from test_scores_models import CNN, MLP, cnn_apply, member, mlp_apply, stacked_init


def reference_point(logits, label):
  """One example, plain numpy: the definitions written out."""
  z = np.asarray(logits, np.float64)
  p = special.softmax(z)
  others = [c for c in range(len(z)) if c != label]
  onehot = np.eye(len(z))[label]
  return {
      "loss": -np.log(p[label]),
      "correct": float(np.argmax(z) == label),
      "p_y": p[label],
      "max_p": p.max(),
      "entropy": -sum(pc * np.log(pc) for pc in p if pc > 0),
      "margin_prob": p[label] - max(p[c] for c in others),
      "margin_logit": z[label] - max(z[c] for c in others),
      "el2n": np.sqrt(np.sum((p - onehot) ** 2)),
  }


def test_point_scores_match_numpy_loop():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 7, 5)) * 3
  logits[0, 0] = [2.0, 2.0, 1.0, 0.0, -1.0]  # tie for the max: argmax is class 0
  logits[1, 3] = [30.0, -30.0, 0.0, 0.0, 5.0]  # extreme: p underflows for class 1
  labels = rng.integers(0, 5, size=(2, 7))
  labels[0, 0] = 1
  got = jax.jit(point.point_scores)(logits, labels)
  assert set(got) == set(point.POINT_SCORE_NAMES)
  for i in range(2):
    for j in range(7):
      ref = reference_point(logits[i, j], labels[i, j])
      for name, value in ref.items():
        np.testing.assert_allclose(got[name][i, j], value, rtol=2e-5, atol=2e-6, err_msg=name)
  assert got["correct"][0, 0] == 0.0  # the tied example is "wrong" for label 1
  assert got["margin_logit"][0, 0] == 0.0


def test_point_scores_rejects_bad_shapes():
  with pytest.raises(ValueError, match="at least 2 classes"):
    point.point_scores(np.zeros((3, 1)), np.zeros(3, int))
  with pytest.raises(ValueError, match="does not match"):
    point.point_scores(np.zeros((3, 4)), np.zeros(2, int))


@pytest.mark.parametrize("model,apply", [(MLP, mlp_apply), (CNN, cnn_apply)])
def test_compute_point_scores_matches_per_member_loop(model, apply):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(37, 10)).astype(np.float32)
  y = rng.integers(0, 3, 37)
  v = stacked_init(model, 3, x)
  scores, logits = point.compute_point_scores(apply, v, x, y, chunk_size=16, return_logits=True)
  assert logits.shape == (3, 37, 3) and logits.dtype == np.float32
  for r in range(3):
    ref_logits = np.asarray(apply(member(v, r), x)[0])
    np.testing.assert_allclose(logits[r], ref_logits, rtol=1e-5, atol=1e-5)
    for i in range(37):
      ref = reference_point(ref_logits[i], y[i])
      for name, value in ref.items():
        np.testing.assert_allclose(scores[name][r, i], value, rtol=1e-4, atol=1e-5, err_msg=name)
  only = point.compute_point_scores(apply, v, x, y, chunk_size=16)
  np.testing.assert_array_equal(only["el2n"], scores["el2n"])


def test_compute_point_scores_compiles_once_for_all_chunk_counts():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(40, 10)).astype(np.float32)
  y = rng.integers(0, 3, 40)
  v = stacked_init(MLP, 2, x)

  def apply(variables, xx):  # a fresh function: its own jit cache entries
    return MLP.apply(variables, xx)

  before = point._point_chunk._cache_size()
  a = point.compute_point_scores(apply, v, x, y, chunk_size=16)  # 3 chunks, the last one padded
  b = point.compute_point_scores(apply, v, x[:33], y[:33], chunk_size=16)
  assert point._point_chunk._cache_size() - before == 1
  np.testing.assert_array_equal(a["loss"][:, :33], b["loss"])


def test_compute_point_scores_validates_inputs():
  x = np.zeros((5, 10), np.float32)
  v = stacked_init(MLP, 2, x)
  with pytest.raises(ValueError, match="label 7 is out of range.*3 classes"):
    point.compute_point_scores(mlp_apply, v, x, np.array([0, 1, 2, 7, 0]))
  with pytest.raises(ValueError, match=r"labels \[N\]"):
    point.compute_point_scores(mlp_apply, v, x, np.zeros(4, int))
  with pytest.raises(ValueError, match="chunk_size"):
    point.compute_point_scores(mlp_apply, v, x, np.zeros(5, int), chunk_size=0)
  with pytest.raises(ValueError, match="integers"):
    point.compute_point_scores(mlp_apply, v, x, np.zeros(5))
  bad = jax.tree_util.tree_map(lambda a: a, v)
  bad["params"]["Dense_0"]["bias"] = bad["params"]["Dense_0"]["bias"][:1]
  with pytest.raises(ValueError, match="leading members axis"):
    point.compute_point_scores(mlp_apply, bad, x, np.zeros(5, int))


def test_auto_chunk_size_follows_activation_memory():
  """Powers of two within range, halving as members double, smaller for bigger activations."""
  x = np.zeros((8, 10), np.float32)
  mlp_v = member(stacked_init(MLP, 1, x), 0)
  cnn_v = member(stacked_init(CNN, 1, x), 0)
  lo, hi = point.AUTO_CHUNK_RANGE
  for apply, v in ((mlp_apply, mlp_v), (cnn_apply, cnn_v)):
    sizes = [point.auto_chunk_size(apply, v, x, r, backend="cpu") for r in (1, 64, 128, 256, 10**6)]
    assert sizes[0] == hi and lo < sizes[3] < sizes[1] < hi, sizes
    assert all(s & (s - 1) == 0 and lo <= s <= hi for s in sizes), sizes
    assert sizes[-1] == lo
    assert all(a >= b for a, b in zip(sizes, sizes[1:])), sizes
    for a, b in zip(sizes[1:3], sizes[2:4]):
      if lo < b and a < hi:
        assert a == 2 * b, sizes  # members 64 -> 128 -> 256: the chunk halves
  wide = [point.auto_chunk_size(mlp_apply, mlp_v, x, 64, backend="cpu"),
          point.auto_chunk_size(cnn_apply, cnn_v, x, 64, backend="cpu")]
  assert wide[0] > wide[1], wide  # the CNN's activations per example are larger
  assert point.auto_chunk_size(cnn_apply, cnn_v, x, 64, backend="gpu") == point.ACCELERATOR_CHUNK


def test_auto_chunk_size_for_a_backward_pass_is_not_larger():
  """A kernel with a backward pass holds more per example: its chunk is at most the forward's."""
  x = np.zeros((8, 10), np.float32)
  for model, apply in ((MLP, mlp_apply), (CNN, cnn_apply)):
    v = member(stacked_init(model, 1, x), 0)
    for r in (64, 256):
      fwd = point.auto_chunk_size(apply, v, x, r, backend="cpu")
      bwd = point.auto_chunk_size(apply, v, x, r, backend="cpu", backward=True)
      assert bwd <= fwd, (r, fwd, bwd)
  assert point.auto_chunk_size(cnn_apply, member(stacked_init(CNN, 1, x), 0), x, 256,
                               backend="cpu", backward=True) < point.auto_chunk_size(
                                   cnn_apply, member(stacked_init(CNN, 1, x), 0), x, 256,
                                   backend="cpu")

"""GraNd (vmap and ghost methods) and input gradients, against per-example `jax.grad` loops."""

import jax
import numpy as np
import pytest

from jaxdiff.scores import grand, input_grad
from test_scores_models import CNN, MLP, cnn_apply, member, mlp_apply, stacked_init

N = 13


def data(seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(N, 10)).astype(np.float32), rng.integers(0, 3, N)


def reference_grand(apply, v, x, y):
  """Per-example Python loop of jax.grad over every member."""
  def loss(params, m, x1, y1):
    logits, _ = apply({**m, "params": params}, x1[None])
    return -jax.nn.log_softmax(logits[0])[y1]

  g = jax.jit(jax.grad(loss))
  out = np.zeros((v["params"]["Dense_0"]["bias"].shape[0], len(x)))
  for r in range(out.shape[0]):
    m = member(v, r)
    for i in range(len(x)):
      leaves = jax.tree_util.tree_leaves(g(m["params"], m, x[i], y[i]))
      out[r, i] = np.sqrt(sum(np.sum(np.asarray(l, np.float64) ** 2) for l in leaves))
  return out


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def case(request):
  model, apply = {"mlp": (MLP, mlp_apply), "cnn": (CNN, cnn_apply)}[request.param]
  x, y = data()
  v = stacked_init(model, 3, x, seed=4)
  return apply, v, x, y, reference_grand(apply, v, x, y)


@pytest.mark.parametrize("batch_size", [4, None])  # lax.map in batches of 4; one vmap per chunk
def test_grand_vmap_matches_per_example_loop(case, batch_size):
  apply, v, x, y, ref = case
  got = grand.grand_scores(apply, v, x, y, chunk_size=8, batch_size=batch_size)
  assert got.shape == (3, N) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  assert np.ptp(ref, axis=0).min() > 1e-3  # members really differ


def test_grand_ghost_matches_reference(case):
  apply, v, x, y, ref = case
  got = grand.grand_scores(apply, v, x, y, chunk_size=8, method="ghost", batch_size=4)
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_dense_plan_covers_dense_layers_only():
  x, _ = data()
  assert grand.dense_plan(mlp_apply, member(stacked_init(MLP, 2, x), 0), x) == (
      (("Dense_0",), True), (("Dense_1",), True), (("Dense_2",), True))
  # Convolutions and batch norm fall back to per-example gradients.
  assert grand.dense_plan(cnn_apply, member(stacked_init(CNN, 2, x), 0), x) == (
      (("Dense_0",), True), (("Dense_1",), True))


def test_ghost_falls_back_for_a_dense_called_twice():
  import flax.linen as nn

  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      d = nn.Dense(10)
      h = nn.tanh(d(nn.tanh(d(x))))  # the same Dense twice: its per-example norm has cross terms
      return nn.Dense(3)(h), {"layers": [h], "pre_logits": h}

  model = Shared()
  apply = lambda v, xx: model.apply(v, xx)
  x, y = data(1)
  v = stacked_init(model, 2, x)
  assert grand.dense_plan(apply, member(v, 0), x) == ((("Dense_1",), True),)
  np.testing.assert_allclose(grand.grand_scores(apply, v, x, y, method="ghost"),
                             reference_grand(apply, v, x, y), rtol=1e-5)


def test_grand_rejects_unknown_method():
  x, y = data()
  with pytest.raises(ValueError, match=r"unknown GraNd method 'fast'.*'vmap', 'ghost'"):
    grand.grand_scores(mlp_apply, stacked_init(MLP, 2, x), x, y, method="fast")


@pytest.mark.parametrize("target", ["p_y", "logit"])
@pytest.mark.parametrize("model,apply", [(MLP, mlp_apply), (CNN, cnn_apply)])
def test_input_grad_matches_per_example_grad(model, apply, target):
  x, y = data(2)
  v = stacked_init(model, 2, x, seed=1)
  got = input_grad.input_grad_py(apply, v, x, y, chunk_size=5, target=target)
  assert got.shape == (2, N, 10)
  def f(m, x1, y1):
    logits = apply(m, x1[None])[0][0]
    return (jax.nn.softmax(logits) if target == "p_y" else logits)[y1]

  g = jax.jit(jax.grad(f, argnums=1))
  for r in range(2):
    m = member(v, r)
    for i in range(N):
      np.testing.assert_allclose(got[r, i], g(m, x[i], y[i]), rtol=1e-4, atol=1e-6)
    # Central finite differences on one example (all coordinates at once, one batched call).
    eps = 1e-2
    pm = np.concatenate([x[0] + eps * np.eye(10), x[0] - eps * np.eye(10)]).astype(np.float32)
    logits = apply(m, pm)[0]
    vals = np.asarray(jax.nn.softmax(logits) if target == "p_y" else logits)[:, y[0]]
    fd = (vals[:10] - vals[10:]) / (2 * eps)
    np.testing.assert_allclose(got[r, 0], fd, rtol=0.05, atol=2e-3)


def test_input_grad_rejects_unknown_target():
  x, y = data()
  with pytest.raises(ValueError, match="valid targets"):
    input_grad.input_grad_py(mlp_apply, stacked_init(MLP, 2, x), x, y, target="loss")

"""GraNd (vmap and ghost methods) and input gradients, against per-example `jax.grad` loops.

The ghost method is checked on dense, 1-D/2-D conv (stride 2, SAME), ResNet (batch norm, convs
without bias) and layer/group/RMS-norm models, and its fallback on layers it does not cover.
"""

import flax.linen as nn
from flax import traverse_util
import jax
import numpy as np
import pytest

from jaxdiff import models
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
  out = np.zeros((jax.tree_util.tree_leaves(v)[0].shape[0], len(x)))
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
  if apply is mlp_apply:
    return
  # One member at a time (unbatched kernel) and per-layer work in batches of a few examples.
  one = jax.tree_util.tree_map(lambda a: a[1:2], v)
  got1 = grand.grand_scores(apply, one, x, y, chunk_size=8, method="ghost", max_grad_bytes=4096)
  np.testing.assert_allclose(got1, ref[1:2], rtol=1e-5)


class Norms(nn.Module):
  """Layer norm, group norm, RMS norm, a dilated conv with explicit padding, a Dense on `[B, T, d]`
  and a circular conv (not covered: it pads inside the layer) that falls back to per-example
  gradients."""

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Conv(4, (3,), padding="CIRCULAR")(x[..., None])
    h = nn.LayerNorm()(h)
    h = nn.relu(nn.Conv(6, (3,), strides=2, kernel_dilation=2, padding=[(1, 2)])(h))
    h = nn.RMSNorm()(nn.GroupNorm(num_groups=2)(h))
    h = nn.Dense(4)(h)  # a Dense at 5 positions
    h = h.reshape(h.shape[0], -1)
    return nn.Dense(3)(h), {"layers": [h], "pre_logits": h}


# name -> (model, input shape [N, ...]): the real jaxdiff models in tiny sizes.
CONV_MODELS = {
    "cnn1d": (models.CNN(3, width=4, depth=2, kernel_size=3), (N, 12)),  # stride 2, SAME
    "cnn2d": (models.CNN(3, width=3, depth=2, kernel_size=3), (N, 7, 7, 2)),  # stride 2, SAME
    "resnet": (models.ResNet(3, depth=8, width=2), (N, 6, 6, 1)),  # batch norm, convs w/o bias
    # both convolution implementations (on CPU "auto" is patches for the CNN, XLA for ResNet)
    "cnn1d_xla": (models.CNN(3, width=4, depth=2, kernel_size=3, conv_impl="xla"), (N, 12)),
    "resnet_patches": (models.ResNet(3, depth=8, width=2, conv_impl="patches"), (N, 6, 6, 1)),
    "norms": (Norms(), (N, 10)),
}


@pytest.fixture(scope="module", params=sorted(CONV_MODELS))
def conv_case(request):
  model, shape = CONV_MODELS[request.param]
  apply = lambda v, xx: model.apply(v, xx, train=False)
  rng = np.random.default_rng(5)
  x = rng.normal(size=shape).astype(np.float32)
  y = rng.integers(0, 3, N)
  v = stacked_init(model, 2, x, seed=6)
  return request.param, apply, v, x, y, reference_grand(apply, v, x, y)


def test_grand_ghost_matches_reference_on_conv_and_norm_models(conv_case):
  name, apply, v, x, y, ref = conv_case
  got = grand.grand_scores(apply, v, x, y, chunk_size=8, method="ghost")
  np.testing.assert_allclose(got, ref, rtol=2e-5)
  plan = grand.layer_plan(apply, member(v, 0), x)
  covered = {l.path + (leaf,) for l in plan for leaf in l.leaves}
  missing = set(traverse_util.flatten_dict(member(v, 0)["params"])) - covered
  # Everything is covered except the circular conv, which falls back to per-example gradients.
  assert missing == ({("Conv_0", "bias"), ("Conv_0", "kernel")} if name == "norms" else set())
  if name == "resnet":  # both ways of taking a conv kernel's norm are exercised
    assert {l.ghost for l in plan if l.kind == "conv"} == {True, False}


def test_layer_plan_covers_dense_conv_and_norm_layers():
  x, _ = data()
  assert grand.layer_plan(mlp_apply, member(stacked_init(MLP, 2, x), 0), x) == (
      grand.Layer(("Dense_0",), "dense", ("bias", "kernel"), (16,), 1, True),
      grand.Layer(("Dense_1",), "dense", ("bias", "kernel"), (12,), 1, True),
      grand.Layer(("Dense_2",), "dense", ("bias", "kernel"), (3,), 1, True))
  plan = grand.layer_plan(cnn_apply, member(stacked_init(CNN, 2, x), 0), x)
  assert [(l.path[0], l.kind, l.leaves) for l in plan] == [
      ("BatchNorm_0", "norm", ("bias", "scale")), ("BatchNorm_1", "norm", ("bias", "scale")),
      ("Conv_0", "conv", ("bias", "kernel")), ("Conv_1", "conv", ("bias", "kernel")),
      ("Dense_0", "dense", ("bias", "kernel")), ("Dense_1", "dense", ("bias", "kernel"))]

  class TrainModeNorm(nn.Module):  # batch statistics mix the examples: not covered
    @nn.compact
    def __call__(self, x, train=False):
      h = nn.BatchNorm(use_running_average=False)(nn.Dense(4)(x))
      return nn.Dense(3)(h), {"layers": [h], "pre_logits": h}

  model = TrainModeNorm()
  apply = lambda v, xx: model.apply(v, xx, mutable=["batch_stats"])[0]
  assert [l.path for l in grand.layer_plan(apply, member(stacked_init(model, 1, x), 0), x)] == [
      ("Dense_0",), ("Dense_1",)]


def test_conv_patches_reproduce_the_convolution():
  # P @ kernel.reshape(K, C) + bias is the layer's output, for every covered conv layer (here
  # stride 2, kernel dilation 2 and explicit asymmetric padding).
  model, shape = CONV_MODELS["norms"]
  x = np.random.default_rng(7).normal(size=shape).astype(np.float32)
  v = member(stacked_init(model, 1, x), 0)
  apply = lambda vv, xx: model.apply(vv, xx, train=False)
  plan = [l for l in grand.layer_plan(apply, v, x) if l.kind == "conv"]
  assert plan
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    seen[tuple(context.module.path)] = (args[0], out)
    return out

  with nn.intercept_methods(record):
    apply(v, x)
  for layer in plan:
    a, out = seen[layer.path]
    params = v["params"][layer.path[0]]
    p = jax.vmap(lambda a1: grand._patches(layer, a1))(a)  # pylint: disable=protected-access
    want = np.asarray(out).reshape(N, layer.positions, -1)
    kernel = params["kernel"].reshape(-1, params["kernel"].shape[-1])
    np.testing.assert_allclose(p @ kernel + params.get("bias", 0.0), want, rtol=1e-5, atol=1e-5)


def test_ghost_falls_back_for_a_dense_called_twice():
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
  assert [l.path for l in grand.layer_plan(apply, member(v, 0), x)] == [("Dense_1",)]
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


@pytest.mark.parametrize("model,apply", [(MLP, mlp_apply), (CNN, cnn_apply)])
def test_fused_point_scores_and_input_grad_equal_the_separate_passes(model, apply):
  from jaxdiff.scores import point  # pylint: disable=g-import-not-at-top
  x, y = data(3)
  v = stacked_init(model, 2, x, seed=2)
  pts, logits, grads = input_grad.point_scores_and_input_grad(apply, v, x, y, chunk_size=5)
  ref_pts, ref_logits = point.compute_point_scores(apply, v, x, y, chunk_size=4,
                                                   return_logits=True)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-6)
  assert sorted(pts) == sorted(ref_pts)
  for k in pts:
    np.testing.assert_allclose(pts[k], ref_pts[k], rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(grads, input_grad.input_grad_py(apply, v, x, y, chunk_size=13),
                             rtol=1e-5, atol=1e-7)

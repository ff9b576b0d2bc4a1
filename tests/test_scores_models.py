"""Tiny Flax models obeying the jaxdiff model contract, shared by the score tests.

`(logits, out)` with `out["layers"]` (depth order, last = penultimate) and `out["pre_logits"]`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class TinyMLP(nn.Module):
  hidden: tuple = (16, 12)
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = x.reshape((x.shape[0], -1))
    layers = []
    for width in self.hidden:
      h = nn.relu(nn.Dense(width)(h))
      layers.append(h)
    return nn.Dense(self.num_classes)(h), {"layers": layers, "pre_logits": h}


class TinyCNN(nn.Module):
  """1-D conv net with batch norm, so variables carry `batch_stats` too."""
  channels: tuple = (4, 5)
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = x[..., None] if x.ndim == 2 else x
    layers = []
    for c in self.channels:
      h = nn.Conv(c, kernel_size=(3,))(h)
      h = nn.BatchNorm(use_running_average=not train)(h)
      h = nn.relu(h)
      layers.append(h)
    h = h.reshape((h.shape[0], -1))
    h = nn.relu(nn.Dense(6)(h))
    layers.append(h)
    return nn.Dense(self.num_classes)(h), {"layers": layers, "pre_logits": h}


def stacked_init(model, num_members, x, seed=0):
  """Stacked numpy variables `[R, ...]`, different per member (and non-trivial batch stats).

  Shapes come from an abstract `model.init`; values are drawn with numpy (compiling the real
  initialisers costs seconds on a loaded 2-core machine): kernels N(0, 1/fan_in), biases N(0, 0.1),
  batch-norm scales and variances U(0.5, 1.5), means N(0, 0.2).
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.asarray(x[:2])))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(path[-1])
    shape = (num_members,) + leaf.shape
    if "kernel" in name:
      value = rng.normal(0.0, 1.0, shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif "scale" in name or "var" in name:
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0.0, 0.2 if "mean" in name else 0.1, shape)
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


MLP = TinyMLP()
CNN = TinyCNN()


def mlp_apply(v, x):
  return MLP.apply(v, x, train=False)


def cnn_apply(v, x):
  return CNN.apply(v, x, train=False)


def member(variables, r):
  return jax.tree_util.tree_map(lambda a: np.asarray(a)[r], variables)


def test_models_follow_contract():
  x = np.random.default_rng(0).normal(size=(5, 10)).astype(np.float32)
  for model, apply in ((MLP, mlp_apply), (CNN, cnn_apply)):
    v = stacked_init(model, 2, x)
    logits, out = apply(member(v, 1), x)
    assert logits.shape == (5, 3)
    np.testing.assert_array_equal(out["layers"][-1], out["pre_logits"])
    # Members differ.
    assert not np.allclose(apply(member(v, 0), x)[0], logits)

"""Tests of jaxdiff.models: forward passes against hand computation, parameter counts, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import models


def _count(params):
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def test_mlp_matches_numpy_forward_and_features():
  m = models.build_model({"name": "mlp", "width": 7, "depth": 2}, 3)
  x = np.random.default_rng(0).normal(size=(5, 4, 2)).astype(np.float32)
  v = m.init(jax.random.key(0), x)
  logits, out = m.apply(v, x)
  p = jax.tree_util.tree_map(np.asarray, v["params"])
  h = x.reshape(5, -1)
  feats = []
  for i in range(2):
    h = np.maximum(h @ p[f"dense{i}"]["kernel"] + p[f"dense{i}"]["bias"], 0)
    feats.append(h)
  np.testing.assert_allclose(logits, h @ p["head"]["kernel"] + p["head"]["bias"], rtol=1e-5,
                             atol=1e-5)
  assert len(out["layers"]) == 2
  for a, b in zip(out["layers"], feats):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cnn_1d_conv_matches_numpy():
  m = models.build_model({"name": "cnn", "width": 3, "depth": 1, "kernel_size": 3, "stride": 1,
                          "head": "gap"}, 2)
  x = np.random.default_rng(1).normal(size=(2, 6)).astype(np.float32)
  v = m.init(jax.random.key(0), x)
  _, out = m.apply(v, x)
  w = np.asarray(v["params"]["conv0"]["kernel"])  # (3, 1, 3)
  b = np.asarray(v["params"]["conv0"]["bias"])
  xp = np.pad(x, ((0, 0), (1, 1)))  # SAME padding
  ref = np.stack([xp[:, t:t + 3] @ w[:, 0, :] for t in range(6)], 1) + b
  np.testing.assert_allclose(out["layers"][0], np.maximum(ref, 0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["pre_logits"], np.maximum(ref, 0).mean(1), rtol=1e-5, atol=1e-5)


def _resnet_params(depth, w, classes, skip, in_ch=3):
  n = (depth - 2) // 6
  total = 9 * in_ch * w + 2 * w  # stem + bn
  cin = w
  for stage in range(3):
    cout = w * 2**stage
    for b in range(n):
      total += 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout
      if skip and cin != cout:
        total += cin * cout + 2 * cout
      cin = cout
  return total + cin * classes + classes


@pytest.mark.parametrize("skip", [True, False])
def test_resnet20_parameter_count_and_layers(skip):
  m = models.build_model({"name": "resnet", "depth": 20, "width": 16, "skip": skip}, 10)
  x = jnp.zeros((2, 32, 32, 3))
  v = m.init(jax.random.key(0), x)
  assert _count(v["params"]) == _resnet_params(20, 16, 10, skip)
  logits, out = m.apply(v, x)
  assert len(out["layers"]) == 1 + 9 + 1 and out["layers"][-1].shape == (2, 64)
  assert logits.shape == (2, 10)


def test_resnet_skip_changes_function():
  x = jax.random.normal(jax.random.key(1), (4, 40))
  outs = []
  for skip in (True, False):
    m = models.build_model({"name": "resnet", "depth": 8, "width": 4, "skip": skip}, 10)
    v = m.init(jax.random.key(0), x)
    outs.append(m.apply(v, x)[0])
  assert not np.allclose(outs[0], outs[1])


def test_vgg16_parameter_count():
  m = models.build_model({"name": "vgg", "depth": 16, "width_mult": 1.0, "batch_norm": True}, 10)
  v = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  chans = [c for c in models.VGG_CFGS[16] if c != "M"]
  cin, total = 3, 0
  for c in chans:
    total += 9 * cin * c + 2 * c
    cin = c
  assert _count(v["params"]) == total + 512 * 10 + 10


def test_build_errors_name_the_value():
  with pytest.raises(ValueError, match="unknown architecture 'lstm'; valid: cnn, linear, mlp"):
    models.build_model({"name": "lstm"}, 10)
  with pytest.raises(ValueError, match=r"'mlp' has no option\(s\) \['kernel_size'\]"):
    models.build_model({"name": "mlp", "kernel_size": 3}, 10)
  with pytest.raises(ValueError, match="depth=-1: must be positive"):
    models.build_model({"name": "mlp", "depth": -1}, 10)
  m = models.build_model({"name": "resnet", "depth": 21}, 10)
  with pytest.raises(ValueError, match="depth=21: must be 6n"):
    m.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


# (input shape, kernel spatial shape, strides, padding): 1-D and 2-D, SAME / VALID / explicit,
# strided, 1x1 (ResNet projections), non-square kernels.
PATCH_CASES = [((3, 40, 1), (5,), (2,), "SAME"), ((3, 17, 7), (3,), (1,), "VALID"),
               ((2, 9, 8, 3), (3, 3), (2, 2), "SAME"), ((2, 8, 8, 4), (1, 1), (2, 2), "SAME"),
               ((2, 7, 6, 2), (3, 2), (1, 2), ((1, 0), (2, 1)))]


@pytest.mark.parametrize("shape,ks,strides,padding", PATCH_CASES)
def test_patch_conv_equals_xla_convolution_and_its_gradients(shape, ks, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=ks + (shape[-1], 5)), jnp.float32)
  sp = "HW"[:len(ks)]
  dn = ("N" + sp + "C", sp + "IO", "N" + sp + "C")
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn,
                                                  precision="highest")
  new = lambda x, w: models.patch_conv(x, w, strides, padding, dimension_numbers=dn,
                                       precision="highest")
  np.testing.assert_allclose(new(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  for g_new, g_ref in zip(jax.grad(loss(new), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
    np.testing.assert_allclose(g_new, g_ref, rtol=1e-4, atol=1e-4)


def test_patch_conv_passes_other_convolutions_to_xla():
  x = jnp.ones((2, 9, 3))
  w = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  ref = jax.lax.conv_general_dilated(x, w, (1,), "SAME", rhs_dilation=(2,),
                                     dimension_numbers=("NWC", "WIO", "NWC"))
  got = models.patch_conv(x, w, (1,), "SAME", rhs_dilation=(2,),
                          dimension_numbers=("NWC", "WIO", "NWC"))
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("config,shape", [
    ({"name": "cnn", "width": 4}, (3, 40)),
    ({"name": "cnn", "width": 3, "pool": True, "head": "gap"}, (2, 8, 8, 3)),
    ({"name": "resnet", "depth": 8, "width": 4}, (3, 12, 12, 3)),
    ({"name": "vgg", "width_mult": 0.0625}, (2, 32, 32, 3))])
def test_conv_impls_give_the_same_model(config, shape):
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  a = models.build_model(dict(config, conv_impl="xla"), 10)
  b = models.build_model(dict(config, conv_impl="patches"), 10)
  v = a.init(jax.random.key(0), x)
  vb = b.init(jax.random.key(0), x)
  assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(vb)
  np.testing.assert_allclose(b.apply(v, x)[0], a.apply(v, x)[0], rtol=1e-4, atol=1e-5)


def test_conv_impl_auto_resolution_and_errors():
  assert models.resolve_conv_impl("auto", "CNN", "cpu") == "patches"
  assert models.resolve_conv_impl("auto", "ResNet", "cpu") == "xla"
  assert models.resolve_conv_impl("auto", "CNN", "gpu") == "xla"
  assert models.resolve_conv_impl("patches", "ResNet", "gpu") == "patches"
  with pytest.raises(ValueError, match="'im2col'"):
    models.build_model({"name": "cnn", "conv_impl": "im2col"}, 10)

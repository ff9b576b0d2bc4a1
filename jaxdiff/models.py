"""Flax models for jaxdiff: MLP, CNN (1-D and 2-D), CIFAR ResNet (skips switchable), VGG, and
how a user's own module is accepted (an import string or a Python object, `user_models.py`).

Every model returns `(logits, out)` with `out["layers"]` the per-layer features in depth order
and `out["pre_logits"]` the penultimate features (see docs/ARCHITECTURE.md). `MODELS` maps names to
constructors; `build_model(config, num_classes)` builds one from a config.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff import user_models

# He-normal (fan_in) init as in PyTorch CIFAR ResNets and the paper's models.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


CONV_IMPLS = ("auto", "xla", "patches")


def patch_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated` for channels-last convolutions as patches @ kernel (one matmul).

  The same convolution computed as a gather of strided slices (the receptive fields) and one
  matmul with the kernel reshaped to `[prod(kernel) * cin, cout]`, so it runs as XLA dots: on CPU
  that is 1.5x faster than XLA's convolution for MNIST-1D CNNs, it stays fast inside `lax.scan`
  (where XLA:CPU's convolution is 25-50x slower, FIELD-NOTES) and it vmaps to batched dots rather
  than to a grouped convolution. Equal to the convolution up to float32 summation order (tested).
  Cases other than plain strided NWC/NHWC convolutions (dilation, feature groups, other layouts)
  are passed to `lax.conv_general_dilated`.

  Args:
    lhs: `[B, *spatial, cin]` inputs.
    rhs: `[*kernel, cin, cout]` kernel.
    window_strides, padding, ...: as `lax.conv_general_dilated`.
  Returns:
    `[B, *out_spatial, cout]`.
  """
  nd = lhs.ndim - 2
  expected = jax.lax.conv_dimension_numbers(
      lhs.shape, rhs.shape, ("N" + "HWD"[:nd] + "C", "HWD"[:nd] + "IO", "N" + "HWD"[:nd] + "C"))
  plain = (feature_group_count == 1 and not kwargs
           and all(d == 1 for d in (lhs_dilation or (1,) * nd))
           and all(d == 1 for d in (rhs_dilation or (1,) * nd))
           and (dimension_numbers is None or
                jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                == expected) and rhs.shape[-2] == lhs.shape[-1])
  if not plain:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision=precision, **kwargs)
  ks, spatial = rhs.shape[:nd], lhs.shape[1:-1]
  strides = tuple(window_strides)
  pads = [tuple(p) for p in (jax.lax.padtype_to_pads(spatial, ks, strides, padding)
                             if isinstance(padding, str) else padding)]
  out = [(n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(spatial, ks, strides, pads)]
  xp = jnp.pad(lhs, [(0, 0), *pads, (0, 0)])
  b, cin = lhs.shape[0], lhs.shape[-1]
  cols = [jax.lax.slice(xp, (0, *off, 0),
                        (b, *[o + (m - 1) * s + 1 for o, m, s in zip(off, out, strides)], cin),
                        (1, *strides, 1))
          for off in itertools.product(*[range(k) for k in ks])]
  patches = cols[0] if len(cols) == 1 else jnp.stack(cols, axis=-2).reshape(b, *out, -1)
  return jnp.dot(patches, rhs.reshape(-1, rhs.shape[-1]), precision=precision)


patch_conv.same_as_lax_conv = True  # GraNd's ghost norm treats it as a plain convolution


# Architectures whose "auto" convolution is `patch_conv` on CPU, by measurement (BENCHMARKS.md):
# the plain CNN trains 1.5x faster as patches in one vmapped, scanned program than as XLA
# convolutions in a loop over members; ResNet and VGG (batch norm, 3x3) measured no faster.
_PATCHES_ON_CPU = ("CNN",)


def resolve_conv_impl(conv_impl: str, arch: str = "CNN", backend: str | None = None) -> str:
  """"auto" -> "patches" on CPU for the architectures it measured faster on, else "xla"."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"unknown conv_impl {conv_impl!r}; valid: {', '.join(CONV_IMPLS)}")
  if conv_impl == "auto":
    cpu = (backend or jax.default_backend()) == "cpu"
    return "patches" if cpu and arch in _PATCHES_ON_CPU else "xla"
  return conv_impl


def conv_impl_of(model: nn.Module) -> str | None:
  """The resolved convolution implementation of a jaxdiff model (None: it has no conv_impl)."""
  impl = getattr(model, "conv_impl", None)
  return None if impl is None else resolve_conv_impl(impl, type(model).__name__)


def _conv(conv_impl: str, *args, **kwargs) -> nn.Conv:
  """`nn.Conv` computed by `patch_conv` or by XLA's convolution (same parameters either way)."""
  fn = patch_conv if conv_impl == "patches" else None
  return nn.Conv(*args, conv_general_dilated=fn, **kwargs)


def _as_spatial(x):
  """Signals `[B, L]` -> `[B, L, 1]`; images stay `[B, H, W, C]`."""
  return x[..., None] if x.ndim == 2 else x


def _flatten(x):
  return x.reshape(x.shape[0], -1)


class MLP(nn.Module):
  """Multi-layer perceptron: flatten, `depth` x (Dense(width) + ReLU), Dense(classes)."""
  num_classes: int
  width: int = 100
  depth: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = _flatten(x)
    layers = []
    for i in range(self.depth):
      h = nn.relu(nn.Dense(self.width, name=f"dense{i}")(h))
      layers.append(h)
    logits = nn.Dense(self.num_classes, name="head")(h)
    return logits, {"layers": layers, "pre_logits": h}


class CNN(nn.Module):
  """Plain CNN for 1-D signals or 2-D images.

  `depth` x (Conv(width, kernel, stride) + ReLU [+ 2x max-pool if `pool`]), then flatten
  (`head="flatten"`, keeps position, as the MNIST-1D paper's CNN) or global average pooling
  (`head="gap"`), then Dense(classes).
  """
  num_classes: int
  width: int = 32
  depth: int = 3
  kernel_size: int = 5
  stride: int = 2
  pool: bool = False
  head: str = "flatten"
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = _as_spatial(x)
    nd = h.ndim - 2
    layers = []
    impl = conv_impl_of(self)
    for i in range(self.depth):
      h = _conv(impl, self.width, (self.kernel_size,) * nd, strides=(self.stride,) * nd,
                padding="SAME", kernel_init=_conv_init, name=f"conv{i}")(h)
      h = nn.relu(h)
      if self.pool:
        h = nn.max_pool(h, (2,) * nd, strides=(2,) * nd, padding="SAME")
      layers.append(h)
    h = _flatten(h) if self.head == "flatten" else jnp.mean(h, axis=tuple(range(1, 1 + nd)))
    layers.append(h)
    logits = nn.Dense(self.num_classes, name="head")(h)
    return logits, {"layers": layers, "pre_logits": h}


class _BasicBlock(nn.Module):
  """ResNet basic block (two 3x3 convs with batch norm); the skip can be switched off."""
  width: int
  stride: int
  skip: bool
  conv_impl: str = "xla"  # resolved ("xla" | "patches") by the ResNet

  @nn.compact
  def __call__(self, x, train: bool):
    nd = x.ndim - 2
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    conv = functools.partial(_conv, self.conv_impl)
    y = conv(self.width, (3,) * nd, (self.stride,) * nd, padding="SAME", use_bias=False,
             kernel_init=_conv_init, name="conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = conv(self.width, (3,) * nd, padding="SAME", use_bias=False, kernel_init=_conv_init,
             name="conv2")(y)
    y = norm("bn2")(y)
    if self.skip:
      if x.shape[-1] != self.width or self.stride != 1:  # projection shortcut (option B)
        x = conv(self.width, (1,) * nd, (self.stride,) * nd, use_bias=False,
                 kernel_init=_conv_init, name="proj")(x)
        x = norm("proj_bn")(x)
      y = y + x
    return nn.relu(y)


class ResNet(nn.Module):
  """CIFAR-style ResNet (He et al. 2016): depth = 6n + 2 (20, 32, 56, ...), three stages of
  widths (w, 2w, 4w); `skip=False` gives the same network without shortcuts (a plain net).
  Works on 1-D signals (kernel 3) and images (3x3)."""
  num_classes: int
  depth: int = 20
  width: int = 16
  skip: bool = True
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 2) % 6 or self.depth < 8:
      raise ValueError(f"ResNet depth={self.depth}: must be 6n+2 (8, 14, 20, 32, 56, ...)")
    n = (self.depth - 2) // 6
    h = _as_spatial(x)
    nd = h.ndim - 2
    impl = conv_impl_of(self)
    h = _conv(impl, self.width, (3,) * nd, padding="SAME", use_bias=False,
              kernel_init=_conv_init, name="stem")(h)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(h))
    layers = [h]
    for stage in range(3):
      for b in range(n):
        stride = 2 if stage > 0 and b == 0 else 1
        h = _BasicBlock(self.width * 2**stage, stride, self.skip, impl,
                        name=f"s{stage}b{b}")(h, train)
        layers.append(h)
    h = jnp.mean(h, axis=tuple(range(1, 1 + nd)))
    layers.append(h)
    logits = nn.Dense(self.num_classes, name="head")(h)
    return logits, {"layers": layers, "pre_logits": h}


VGG_CFGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
  """VGG (Simonyan & Zisserman 2015) for CIFAR: 3x3 convs, max-pools, optional batch norm,
  channel widths scaled by `width_mult`; global average pool then a linear classifier."""
  num_classes: int
  depth: int = 11
  width_mult: float = 1.0
  batch_norm: bool = True
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth not in VGG_CFGS:
      raise ValueError(f"VGG depth={self.depth}: valid depths are {sorted(VGG_CFGS)}")
    h = _as_spatial(x)
    nd = h.ndim - 2
    layers = []
    impl = conv_impl_of(self)
    i = 0
    for v in VGG_CFGS[self.depth]:
      if v == "M":
        h = nn.max_pool(h, (2,) * nd, strides=(2,) * nd, padding="SAME")
        layers.append(h)
        continue
      h = _conv(impl, max(1, int(v * self.width_mult)), (3,) * nd, padding="SAME",
                use_bias=not self.batch_norm, kernel_init=_conv_init, name=f"conv{i}")(h)
      if self.batch_norm:
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(h)
      h = nn.relu(h)
      i += 1
    h = jnp.mean(h, axis=tuple(range(1, 1 + nd)))
    layers.append(h)
    logits = nn.Dense(self.num_classes, name="head")(h)
    return logits, {"layers": layers, "pre_logits": h}


class Linear(nn.Module):
  """Logistic regression (the MNIST-1D paper's weakest baseline)."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = _flatten(x)
    return nn.Dense(self.num_classes, name="head")(h), {"layers": [h], "pre_logits": h}


# name -> (constructor, allowed config fields).
MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {
    "linear": (Linear, ()),
    "mlp": (MLP, ("width", "depth")),
    "cnn": (CNN, ("width", "depth", "kernel_size", "stride", "pool", "head", "conv_impl")),
    "resnet": (ResNet, ("depth", "width", "skip", "conv_impl")),
    "vgg": (VGG, ("depth", "width_mult", "batch_norm", "conv_impl")),
}


def check_name(name: Any) -> None:
  """Refuses a model name that is neither built in nor an importable `"package.module:factory"`
  (a `"python:..."` name, a model given from Python, is checked when it is built).

  Raises:
    ValueError naming the value, the built-in names and the import-string form.
  """
  if name in MODELS or (isinstance(name, str) and name.startswith(user_models.PYTHON_PREFIX)):
    return
  if user_models.is_user_name(name):
    user_models.resolve(name, sorted(MODELS))
    return
  raise ValueError(f"unknown architecture {name!r}; valid: {', '.join(sorted(MODELS))}, or an "
                   "import string 'package.module:factory' of your own Flax model")


def build_model(config: Mapping[str, Any], num_classes: int, example_x: Any = None,
                model: Any = None, need_features: bool = False) -> Any:
  """Builds `config["name"]` with the config's other fields as constructor arguments, or a
  user's model (an import string in `config["name"]`, or `model` from Python) in the adapter
  `user_models.UserModel`, checked on `example_x` as vmapped members.

  Args:
    config: the model section.
    num_classes: classes of the data.
    example_x: `[B, ...]` a few inputs; needed for user models (their factory gets the input
      shape, and they are traced once before any work).
    model: a `flax.linen.Module` or a factory `(model_config, num_classes, input_shape) -> Module`.
    need_features: representation scores are on (a bare-logits user model then needs
      `model.layers`).

  Raises:
    ValueError naming an unknown architecture or field, with the valid choices.
  """
  name = config.get("name")
  if model is not None or user_models.is_user_name(name):
    if example_x is None:
      raise ValueError(f"model {name!r}: a user model needs example inputs to be built")
    if model is None:
      check_name(name)
    return user_models.build(config, num_classes, example_x, model=model,
                             need_features=need_features)
  if name not in MODELS:
    check_name(name)
  ctor, fields = MODELS[name]
  kwargs = {k: v for k, v in dict(config).items() if k != "name"}
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f"architecture {name!r} has no option(s) {unknown}; valid: {list(fields)}")
  if "conv_impl" in kwargs:
    resolve_conv_impl(kwargs["conv_impl"])  # unknown values fail here, not at trace time
  for k, v in kwargs.items():
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
      raise ValueError(f"model.{k}={v}: must be positive")
  return ctor(num_classes=num_classes, **kwargs)


def has_batch_norm(variables: Mapping[str, Any]) -> bool:
  return "batch_stats" in variables and bool(variables["batch_stats"])


__all__: Sequence[str] = ("MLP", "CNN", "ResNet", "VGG", "Linear", "MODELS", "build_model",
                             "check_name")

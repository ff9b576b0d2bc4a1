"""Flax models for jaxdiff: MLP, CNN (1-D and 2-D), CIFAR ResNet (skips switchable), VGG.

Every model returns `(logits, out)` with `out["layers"]` the per-layer features in depth order
and `out["pre_logits"]` the penultimate features (see docs/ARCHITECTURE.md). `MODELS` maps names to
constructors; `build_model(config, num_classes)` builds one from a config.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

# He-normal (fan_in) init as in PyTorch CIFAR ResNets and the paper's models.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


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

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = _as_spatial(x)
    nd = h.ndim - 2
    layers = []
    for i in range(self.depth):
      h = nn.Conv(self.width, (self.kernel_size,) * nd, strides=(self.stride,) * nd,
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

  @nn.compact
  def __call__(self, x, train: bool):
    nd = x.ndim - 2
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    y = nn.Conv(self.width, (3,) * nd, (self.stride,) * nd, padding="SAME", use_bias=False,
                kernel_init=_conv_init, name="conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = nn.Conv(self.width, (3,) * nd, padding="SAME", use_bias=False, kernel_init=_conv_init,
                name="conv2")(y)
    y = norm("bn2")(y)
    if self.skip:
      if x.shape[-1] != self.width or self.stride != 1:  # projection shortcut (option B)
        x = nn.Conv(self.width, (1,) * nd, (self.stride,) * nd, use_bias=False,
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

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 2) % 6 or self.depth < 8:
      raise ValueError(f"ResNet depth={self.depth}: must be 6n+2 (8, 14, 20, 32, 56, ...)")
    n = (self.depth - 2) // 6
    h = _as_spatial(x)
    nd = h.ndim - 2
    h = nn.Conv(self.width, (3,) * nd, padding="SAME", use_bias=False, kernel_init=_conv_init,
                name="stem")(h)
    h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(h))
    layers = [h]
    for stage in range(3):
      for b in range(n):
        stride = 2 if stage > 0 and b == 0 else 1
        h = _BasicBlock(self.width * 2**stage, stride, self.skip, name=f"s{stage}b{b}")(h, train)
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

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth not in VGG_CFGS:
      raise ValueError(f"VGG depth={self.depth}: valid depths are {sorted(VGG_CFGS)}")
    h = _as_spatial(x)
    nd = h.ndim - 2
    layers = []
    i = 0
    for v in VGG_CFGS[self.depth]:
      if v == "M":
        h = nn.max_pool(h, (2,) * nd, strides=(2,) * nd, padding="SAME")
        layers.append(h)
        continue
      h = nn.Conv(max(1, int(v * self.width_mult)), (3,) * nd, padding="SAME",
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
    "cnn": (CNN, ("width", "depth", "kernel_size", "stride", "pool", "head")),
    "resnet": (ResNet, ("depth", "width", "skip")),
    "vgg": (VGG, ("depth", "width_mult", "batch_norm")),
}


def build_model(config: Mapping[str, Any], num_classes: int) -> nn.Module:
  """Builds `config["name"]` with the config's other fields as constructor arguments.

  Raises:
    ValueError naming an unknown architecture or field, with the valid choices.
  """
  name = config.get("name")
  if name not in MODELS:
    raise ValueError(f"unknown architecture {name!r}; valid: {', '.join(sorted(MODELS))}")
  ctor, fields = MODELS[name]
  kwargs = {k: v for k, v in dict(config).items() if k != "name"}
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f"architecture {name!r} has no option(s) {unknown}; valid: {list(fields)}")
  for k, v in kwargs.items():
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
      raise ValueError(f"model.{k}={v}: must be positive")
  return ctor(num_classes=num_classes, **kwargs)


def has_batch_norm(variables: Mapping[str, Any]) -> bool:
  return "batch_stats" in variables and bool(variables["batch_stats"])


__all__: Sequence[str] = ("MLP", "CNN", "ResNet", "VGG", "Linear", "MODELS", "build_model")

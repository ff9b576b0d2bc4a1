"""Shared fixtures: tiny configs so the whole suite stays fast on a 2-core CPU."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments.configs import default  # pylint: disable=g-import-not-at-top


def tiny_config(arch="mlp", **overrides):
  """MNIST-1D with 400 training examples, a width-16 model, 2 epochs, 3 members."""
  c = default.get_config()
  c.data.num_samples = 500
  c.num_runs = 3
  c.num_epochs = 2
  c.batch_size = 50
  c.checkpoint_every = 1
  c.progress = False
  if arch == "mlp":
    c.model.width = 16
  elif arch == "cnn":
    c.model = dict(name="cnn", width=8, depth=2, kernel_size=3, stride=2, pool=False,
                   head="flatten")
  elif arch == "resnet":
    c.model = dict(name="resnet", depth=8, width=4, skip=True)
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


@pytest.fixture
def tiny():
  return tiny_config

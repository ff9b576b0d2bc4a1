"""Reading a jaxdiff checkpoint back on any device count.

A checkpoint saved with the runs axis sharded over 2 CPU devices records that topology, and
Orbax refuses to restore it without a target elsewhere ("Topology mismatch"). `restore` builds the
target from the checkpoint's own metadata (shapes and dtypes) on the devices at hand.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def abstract_target(path: str, sharding: jax.sharding.Sharding | None = None) -> Any:
  """The checkpoint's tree as `jax.ShapeDtypeStruct` leaves placed on `sharding` (default: the
  first local device)."""
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  meta = ocp.StandardCheckpointer().metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  return jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype), sharding=sharding), tree)


def restore(step_dir: str, numpy: bool = True) -> Any:
  """The pytree saved in `<workdir>/checkpoints/<step>` (a dict of nested dicts), on any device
  count; NumPy leaves with `numpy=True`, else arrays on the first local device.

  Raises:
    FileNotFoundError: `step_dir` holds no checkpoint.
  """
  path = os.path.join(step_dir, "default")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{step_dir!r} holds no checkpoint (no {path!r})")
  target = abstract_target(path)
  if numpy:  # host arrays of the saved dtypes (device arrays would cast float64 to float32)
    target = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), target)
  return ocp.StandardCheckpointer().restore(path, target)

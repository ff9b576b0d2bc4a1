"""Softmax, p_y, margins and correctness of stored logits, in float64 numpy.

The one numpy home of these quantities, for code that reads logits back from a workdir (held-out
estimators, exports); `point.point_scores` computes the same ones in jnp on the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def softmax(logits: Any) -> np.ndarray:
  """Softmax over the last axis in float64, shifted by the max for stability."""
  z = np.asarray(logits, np.float64)
  z = z - np.max(z, axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def correctness(logits: Any, labels: Any) -> np.ndarray:
  """0/1 float `[R, N]`: argmax_c z_c == y (ties -> lowest class, like `scores.point`)."""
  logits = np.asarray(logits)
  return (logits.argmax(-1) == np.asarray(labels)[None, :]).astype(np.float64)


def label_prob(probs: Any, labels: Any) -> np.ndarray:
  """p_y: `[..., N]` probability of each example's label from `[..., N, C]` probabilities."""
  probs = np.asarray(probs)
  labels = np.asarray(labels)
  return np.take_along_axis(probs, labels.reshape((1,) * (probs.ndim - 2) + (-1, 1)),
                            axis=-1)[..., 0]


def margins(values: Any, labels: Any) -> dict[str, np.ndarray]:
  """The label's value, the best other class and the margin, over `[..., N, C]` (logits or
  probabilities; float64).

  Returns:
    {"target": v_y, "other": max_{c != y} v_c, "other_idx": its class (ties -> lowest),
     "margin": v_y - max_{c != y} v_c}, each `[..., N]`.
  """
  v = np.asarray(values, np.float64)
  y = np.asarray(labels)
  onehot = np.arange(v.shape[-1]) == y[:, None]
  target = np.where(onehot, v, 0.0).sum(-1)
  masked = np.where(onehot, -np.inf, v)
  other_idx = masked.argmax(-1)
  other = np.take_along_axis(masked, other_idx[..., None], -1)[..., 0]
  return {"target": target, "other": other, "other_idx": other_idx, "margin": target - other}

"""Label noise: a seeded share of training labels flipped to other classes, with the mask of the
flipped examples (label-issue detection is scored against it).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from jaxdiff.data.dataset import DataError


def add_label_noise(y: np.ndarray, num_classes: int, fraction: float, seed: int):
  """Flips exactly round(fraction * N) labels, each to a different class chosen uniformly.

  Returns:
    (noisy labels int32 `[N]`, mask bool `[N]` of flipped examples).
  """
  if not 0.0 <= fraction <= 1.0:
    raise DataError(f"label_noise={fraction}: must be a fraction in [0, 1]")
  rng = np.random.default_rng(seed)
  n = y.shape[0]
  idx = rng.choice(n, size=int(round(fraction * n)), replace=False)
  noisy = y.copy()
  # Adding 1..C-1 modulo C always changes the class, uniformly over the other classes.
  noisy[idx] = (y[idx] + rng.integers(1, num_classes, size=idx.shape[0])) % num_classes
  mask = np.zeros(n, bool)
  mask[idx] = True
  return noisy.astype(np.int32), mask


def noise_options(label_noise: Any, noise_seed: Any) -> tuple[float, int]:
  """Checked `data.label_noise` (a fraction in [0, 1)) and `data.noise_seed` (an integer >= 0)."""
  label_noise = 0.0 if label_noise is None else label_noise
  noise_seed = 0 if noise_seed is None else noise_seed
  if (isinstance(label_noise, bool) or not isinstance(label_noise, numbers.Real)
      or not math.isfinite(label_noise) or not 0.0 <= label_noise < 1.0):
    raise DataError(f"data.label_noise={label_noise!r}: must be a fraction in [0, 1) (the share "
                    "of training labels flipped)")
  if (isinstance(noise_seed, bool) or not isinstance(noise_seed, numbers.Integral)
      or noise_seed < 0):
    raise DataError(f"data.noise_seed={noise_seed!r}: must be a non-negative integer")
  return float(label_noise), int(noise_seed)

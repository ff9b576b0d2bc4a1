"""benchmarks/memory.py: the peak-memory figures the benchmarks report."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import memory  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_program_bytes_hand_worked():
  """tanh(a @ b) @ b on 512x512 f32 (1 MiB each), `a` donated: arguments 2 MiB + output 1 MiB -
  1 MiB reused from `a` + 1 MiB temporary tanh(a @ b) = 3 MiB."""
  f = jax.jit(lambda a, b: jnp.tanh(a @ b) @ b, donate_argnums=(0,))
  x = jnp.ones((512, 512), jnp.float32)
  assert memory.program_bytes(f, x, x) == 3 * 2**20


@pytest.mark.skipif(not memory.reset_peak_rss(), reason="needs Linux /proc/self/clear_refs")
def test_peak_rss_rises_with_an_allocation_and_resets():
  memory.reset_peak_rss()
  base = memory.peak_rss_bytes()
  a = np.ones(64 * 2**20 // 4, np.float32)  # 64 MiB, touched
  grown = memory.peak_rss_bytes()
  del a
  memory.reset_peak_rss()
  after = memory.peak_rss_bytes()
  assert grown - base >= 60 * 2**20
  assert after < grown - 32 * 2**20

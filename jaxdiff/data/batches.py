"""What each member sees in a step, computed inside the jitted step: its epoch order of examples,
its training subset (hold-out estimators) and the CIFAR augmentation of image batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def epoch_permutations(data_keys: jax.Array, epoch: int | jax.Array, num_examples: int,
                       batch_size: int, subset_mask: jax.Array | None = None,
                       num_steps: int | None = None) -> jax.Array:
  """Each member's own shuffled order for one epoch, cut into full batches.

  Args:
    data_keys: `[R]` PRNG keys, one per member.
    epoch: epoch number (folded into each member's key).
    num_examples: N.
    batch_size: B.
    subset_mask: optional bool `[R, N]`: member r only draws examples where it is True.
    num_steps: steps per epoch (default N // B; with subsets, min_r |subset_r| // B).
  Returns:
    int32 `[R, steps, batch_size]` example indices; the last partial batch is dropped (a
    different remainder each epoch, because each epoch has a new permutation).
  """
  steps = num_steps or num_examples // batch_size

  def one(key):
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return perm[:steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)

  def one_subset(key, mask):
    # A uniform random order of the member's subset, followed by the rest (never used).
    u = jax.random.uniform(jax.random.fold_in(key, epoch), (num_examples,))
    perm = jnp.argsort(jnp.where(mask, u, 2.0 + u))
    return perm[:steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)
  if subset_mask is None:
    return jax.vmap(one)(data_keys)
  return jax.vmap(one_subset)(data_keys, subset_mask)


def subset_masks(seed: int, member_ids: np.ndarray, fractions: np.ndarray, num_examples: int
                 ) -> np.ndarray:
  """Per-member random training subsets (for hold-out estimators such as the C-score).

  Member i's subset is the first round(fraction_i * N) examples of a permutation drawn from
  `fold_in(fold_in(key(seed), i), 3)`, so it depends only on the seed and the member's id.

  Returns:
    bool `[R, N]`, True where the member trains on the example.
  """
  base = jax.random.key(seed)

  def one(i, frac_count):
    key = jax.random.fold_in(jax.random.fold_in(base, i), 3)
    ranks = jnp.argsort(jax.random.permutation(key, num_examples))  # position in the permutation
    return ranks < frac_count
  counts = np.round(np.asarray(fractions, np.float64) * num_examples).astype(np.int32)
  return np.asarray(jax.vmap(one)(jnp.asarray(member_ids, jnp.uint32), jnp.asarray(counts)))


def augment_images(key: jax.Array, x: jax.Array, pad: int = 4, flip: bool = True) -> jax.Array:
  """CIFAR augmentation (He et al. 2016): random crop after zero-padding by `pad`, random
  horizontal flip; independently per example. `x`: `[B, H, W, C]`."""
  b, h, w, _ = x.shape
  k_crop, k_flip = jax.random.split(key)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
  out = jax.vmap(crop)(xp, offsets)
  if flip:
    do_flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    out = jnp.where(do_flip[:, None, None, None], out[:, :, ::-1, :], out)
  return out

"""Point difficulty scores from a model's logits, and the chunked driver over members and examples.

`point_scores` is a pure jnp function of `(logits, labels)`; `compute_point_scores` evaluates a
stacked ensemble on a training set in fixed-size jitted chunks, returning numpy arrays `[R, N]`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.scores import registry

ApplyFn = Callable[[Any, jax.Array], tuple[jax.Array, dict]]

# Names returned by `point_scores`, in a fixed order: the registry's "point" family.
POINT_SCORE_NAMES = registry.names("point")


class Parts(NamedTuple):
  """What the point kernels of the registry share, for logits `[..., C]` and labels `[...]`
  (p = softmax(z), y the label; every field float32 `[...]` unless shaped `[..., C]`)."""
  z: jax.Array          # logits [..., C]
  labels: jax.Array     # int [...]
  logp: jax.Array       # log softmax [..., C]
  p: jax.Array          # softmax [..., C]
  onehot: jax.Array     # bool [..., C], True at y
  logp_y: jax.Array     # log p_y
  z_y: jax.Array        # z_y
  p_y: jax.Array        # p_y
  p_other: jax.Array    # max_{c != y} p_c
  z_other: jax.Array    # max_{c != y} z_c


def parts(logits: jax.Array, labels: jax.Array) -> Parts:
  """The shared quantities of one prediction (validated shapes, at least 2 classes)."""
  z = jnp.asarray(logits, jnp.float32)
  num_classes = z.shape[-1]
  if num_classes < 2:
    raise ValueError(f"point scores need at least 2 classes; logits have shape {z.shape}")
  labels = jnp.asarray(labels)
  if labels.shape != z.shape[:-1]:
    raise ValueError(f"labels shape {labels.shape} does not match logits shape {z.shape}[:-1]")
  logp = jax.nn.log_softmax(z, axis=-1)
  p = jnp.exp(logp)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=bool)
  y_idx = labels[..., None].astype(jnp.int32)
  logp_y = jnp.take_along_axis(logp, y_idx, axis=-1)[..., 0]
  z_y = jnp.take_along_axis(z, y_idx, axis=-1)[..., 0]
  return Parts(z=z, labels=labels, logp=logp, p=p, onehot=onehot, logp_y=logp_y, z_y=z_y,
               p_y=jnp.exp(logp_y), p_other=jnp.max(jnp.where(onehot, -jnp.inf, p), axis=-1),
               z_other=jnp.max(jnp.where(onehot, -jnp.inf, z), axis=-1))


def point_scores(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Per-example scores of one prediction: every kernel of the registry's "point" family.

  Pure jnp, jit- and vmap-friendly. Each score's formula and paper are its registry entry
  (`scores.registry.REGISTRY`): loss -log p_y, correct (argmax ties -> lowest class), p_y, max_p,
  entropy (nats), margin_prob p_y - max_{c != y} p_c (Toneva et al. 2019), margin_logit
  z_y - max_{c != y} z_c (averaged over training it is AUM, Pleiss et al. 2020), el2n
  ||p - onehot(y)||_2 (Paul et al. 2021). Natural orientation (not "higher is harder"; see
  `jaxdiff.scores.orient`).

  Args:
    logits: float `[..., C]` with C >= 2.
    labels: int `[...]` in [0, C).

  Returns:
    name -> float32 `[...]` for every name in `POINT_SCORE_NAMES`.
  """
  q = parts(logits, labels)
  return {name: registry.ENTRIES[name].kernel(q) for name in POINT_SCORE_NAMES}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy -log softmax(z)_y; `[..., C]`, `[...]` -> `[...]`."""
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def num_members(variables: Any) -> int:
  """Returns R, the leading axis shared by every leaf of stacked `variables`."""
  leaves = jax.tree_util.tree_leaves(variables)
  if not leaves:
    raise ValueError("variables have no arrays; expected a stacked pytree with a leading R axis")
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"every leaf of the stacked variables needs the same leading members axis R; "
                     f"found leading sizes {sorted(map(str, sizes))}")
  return int(sizes.pop())


def check_examples(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
  """Validates an example set: `x` `[N, ...]`, integer `y` `[N]` >= 0; returns numpy views."""
  x = np.asarray(x)
  y = np.asarray(y)
  if y.ndim != 1 or x.ndim < 1 or x.shape[0] != y.shape[0]:
    raise ValueError(f"need x [N, ...] and labels [N]; got x {x.shape} and labels {y.shape}")
  if y.size and not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {y.dtype}")
  if y.size and y.min() < 0:
    raise ValueError(f"labels must be >= 0, got min label {y.min()}")
  if y.shape[0] == 0:
    raise ValueError("no examples given (x has length 0)")
  return x, y


def check_chunk_size(chunk_size: int) -> int:
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  return int(chunk_size)


# On CPU, scoring kernels run fastest when the forward activations of one chunk (all members on a
# device) stay near this size: CNN R=16 on MNIST-1D, forward + input gradients of 4,000 examples,
# took 0.24 + 0.36 s in chunks of 128 against 0.43-0.68 + 0.78-0.86 s in chunks of 1024; the MLP's
# smaller activations are fastest in chunks of 1024 (BENCHMARKS.md).
CPU_CHUNK_BYTES = 24 * 2**20
AUTO_CHUNK_RANGE = (32, 4096)
ACCELERATOR_CHUNK = 1024


def auto_chunk_size(apply_fn: ApplyFn, member_variables: Any, x: Any, members: int,
                    backend: str | None = None, backward: bool = False) -> int:
  """Examples per jitted scoring call, from the model's activation memory.

  On CPU: the largest power of two (within `AUTO_CHUNK_RANGE`) keeping `members` x chunk x
  (XLA's temporary bytes of one member's forward pass per example, or with `backward` of the
  gradient of its summed loss) within `CPU_CHUNK_BYTES`. Elsewhere `ACCELERATOR_CHUNK`.

  Args:
    apply_fn: `(member_variables, x [B, ...]) -> (logits, out)`.
    member_variables: the variables of one member (no runs axis).
    x: example inputs `[N, ...]` (shapes only; at least one row).
    members: members evaluated together on one device (1 when they are looped).
    backend: defaults to `jax.default_backend()`.
    backward: size for a kernel with a backward pass (GraNd, input gradients): about twice the
      activations of a forward pass (CNN R=16 on 2 CPU devices: GraNd 0.69 s in chunks of 128
      against 1.03 s in chunks of 256).
  """
  if (backend or jax.default_backend()) != "cpu":
    return ACCELERATOR_CHUNK
  probe = 64
  xs = jax.ShapeDtypeStruct((probe,) + tuple(np.shape(x)[1:]), np.asarray(x[:1]).dtype)
  vs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                              member_variables)
  if backward:
    ys = jax.ShapeDtypeStruct((probe,), np.int32)
    fn = jax.grad(lambda v, xx, yy: jnp.sum(cross_entropy(apply_fn(v, xx)[0], yy)))
    compiled = jax.jit(fn).lower(vs, xs, ys).compile()
  else:
    compiled = jax.jit(lambda v, xx: apply_fn(v, xx)[0]).lower(vs, xs).compile()
  mem = compiled.memory_analysis()
  per_example = max(1.0, (mem.temp_size_in_bytes + mem.output_size_in_bytes) / probe
                    if mem is not None else 4096.0)
  fit = CPU_CHUNK_BYTES / (max(1, members) * per_example)
  lo, hi = AUTO_CHUNK_RANGE
  return int(min(hi, max(lo, 2 ** int(np.floor(np.log2(max(fit, 1.0)))))))


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
  if a.shape[0] == rows:
    return a
  pad = np.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)
  return np.concatenate([a, pad], axis=0)


def run_chunked(kernel: Callable[..., Any], variables: Any, arrays: Sequence[np.ndarray],
                chunk_size: int) -> Any:
  """Applies `kernel(variables, *chunk)` over fixed-size example chunks and stitches the results.

  The last chunk is zero-padded to `chunk_size` so the jitted kernel compiles once; padded rows
  are dropped. When N < chunk_size the chunk shrinks to N (no wasted work).

  Args:
    kernel: jitted `(variables, *arrays_chunk) -> pytree of [R, chunk, ...]`.
    variables: stacked variables (leading R axis).
    arrays: numpy arrays `[N, ...]` split along axis 0.
    chunk_size: examples per call.

  Returns:
    The kernel's pytree with numpy leaves `[R, N, ...]`.
  """
  n = arrays[0].shape[0]
  chunk = min(check_chunk_size(chunk_size), n)
  out_leaves, treedef = None, None
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    parts = [_pad_rows(a[start:stop], chunk) for a in arrays]
    res = jax.device_get(kernel(variables, *parts))
    leaves, tdef = jax.tree_util.tree_flatten(res)
    if out_leaves is None:
      treedef = tdef
      out_leaves = [np.empty((l.shape[0], n) + l.shape[2:], l.dtype) for l in leaves]
    for buf, leaf in zip(out_leaves, leaves):
      buf[:, start:stop] = leaf[:, :stop - start]
  return jax.tree_util.tree_unflatten(treedef, out_leaves)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _point_chunk(apply_fn: ApplyFn, variables: Any, x: jax.Array, y: jax.Array,
                 return_logits: bool):
  def member(v):
    logits, _ = apply_fn(v, x)
    scores = point_scores(logits, y)
    return (scores, logits.astype(jnp.float32)) if return_logits else (scores,)
  return jax.vmap(member)(variables)


def compute_point_scores(apply_fn: ApplyFn, variables: Any, x: Any, y: Any,
                         chunk_size: int = 1024, return_logits: bool = False):
  """Point scores of every member on every example, in jitted chunks (vmap over members).

  The kernel is jitted with `apply_fn` static: pass the same `apply_fn` object on every call
  (e.g. build it once per run) so it compiles once.

  Args:
    apply_fn: `(member_variables, x [B, ...]) -> (logits [B, C], out)` in evaluation mode.
    variables: stacked variables, every leaf `[R, ...]`.
    x: inputs `[N, ...]` (numpy or jax; moved to device chunk by chunk).
    y: int labels `[N]`.
    chunk_size: examples per jitted call; device memory grows linearly with it.
    return_logits: also return the logits.

  Returns:
    `{name: float32 np.ndarray [R, N]}` for every name in `POINT_SCORE_NAMES`, and, if
    `return_logits`, a tuple `(scores, logits [R, N, C] float32)`.
  """
  x, y = check_examples(x, y)
  num_members(variables)
  # An abstract evaluation gives C, so bad labels fail before the full pass.
  check_labels_vs_classes(apply_fn, variables, x, y)
  res = run_chunked(lambda v, xc, yc: _point_chunk(apply_fn, v, xc, yc, return_logits),
                    variables, [x, y.astype(np.int32)], chunk_size)
  return (res[0], res[1]) if return_logits else res[0]


def check_labels_vs_classes(apply_fn: ApplyFn, variables: Any, x: np.ndarray,
                            y: np.ndarray) -> int:
  """Raises ValueError if a label is >= the model's number of classes C; returns C."""
  first = jax.tree_util.tree_map(lambda a: a[0], variables)
  out = jax.eval_shape(lambda v, xx: apply_fn(v, xx)[0], first, x[:1])
  num_classes = out.shape[-1]
  if y.max() >= num_classes:
    raise ValueError(f"label {int(y.max())} is out of range for a model with {num_classes} "
                     f"classes (valid labels: 0..{num_classes - 1})")
  return num_classes

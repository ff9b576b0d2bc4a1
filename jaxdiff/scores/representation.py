"""Representation scores at a checkpoint: prediction depth (k-NN probes) and prototype distances.

Features come from the models' `out["layers"]` / `out["pre_logits"]`; exact k-NN is computed
member by member in jitted query chunks, each against the training set in blocks (one matmul per
block, a running top-k), so that memory stays bounded at any number of training examples.

Why one module of ~520 lines: prediction depth and the prototype scores share the features, the
blocked k-NN and its reference subsets.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.scores import point

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes in distances (GPU default)


@functools.partial(jax.jit, static_argnums=(0,))
def _features_chunk(apply_fn, variables, x):
  def member(v):
    logits, out = apply_fn(v, x)
    flat = [jnp.reshape(h, (h.shape[0], -1)).astype(jnp.float32) for h in out["layers"]]
    return flat, logits.astype(jnp.float32)
  return jax.vmap(member)(variables)


def features(apply_fn: point.ApplyFn, variables: Any, x: Any, chunk_size: int = 1024,
             include_input: bool = False, return_logits: bool = False):
  """Per-layer features of every member on every example, flattened per example.

  Holds all of them in host memory (`R * N * sum_l F_l` floats): fine for small models.

  Args:
    apply_fn: `(member_variables, x [B, ...]) -> (logits [B, C], out)`, `out["layers"]` a list.
    variables: stacked variables, every leaf `[R, ...]`.
    x: inputs `[N, ...]`.
    chunk_size: examples per jitted call.
    include_input: prepend the flattened input as layer 0 (a read-only broadcast view `[R, N, F]`),
      as Baldock et al. 2021 do for prediction depth.
    return_logits: also return the logits `[R, N, C]`.

  Returns:
    List of float32 `[R, N, F_l]` in depth order (and the logits if asked).
  """
  x = np.asarray(x)
  if x.ndim < 1 or x.shape[0] == 0:
    raise ValueError(f"x must be a non-empty [N, ...] array, got shape {x.shape}")
  r = point.num_members(variables)
  layers, logits = point.run_chunked(lambda v, xc: _features_chunk(apply_fn, v, xc), variables,
                                     [x], chunk_size)
  layers = list(layers)
  if include_input:
    flat = x.reshape(x.shape[0], -1).astype(np.float32)
    layers.insert(0, np.broadcast_to(flat[None], (r,) + flat.shape))
  return (layers, logits) if return_logits else layers


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _knn_chunk(train, train_sq, labels, query, query_ids, k, num_classes, exclude_self, n):
  """k-NN predictions `[Q]` of one member for one query chunk `[Q, F]`, against the reference set
  in blocks: `train [nb, B, F]` and `train_sq [nb, B]` (its first `n` rows real, the rest padding).

  Never holds more than a `[Q, B + k + 1]` block of distances: each reference block's distances
  (one matmul) are merged into a running top-k.
  """
  kk = k + 1 if exclude_self else k
  size = train.shape[1]
  q_sq = jnp.sum(query * query, -1)[:, None]

  def block(b):
    d = q_sq - 2.0 * jnp.dot(query, train[b].T, precision=_HIGHEST) + train_sq[b][None, :]
    d = jnp.maximum(d, 0.0)  # rounding can make a (near-)duplicate's distance negative or -0.0
    ids = b * size + jnp.arange(size, dtype=jnp.int32)
    return -jnp.where(ids < n, d, jnp.inf), jnp.broadcast_to(ids, d.shape)  # padding last

  # top_k orders by (distance, position) as a stable sort. The running best comes first in each
  # merge and holds only lower indices than the new block, in (distance, index) order, so position
  # order is index order and the merged top-k is exactly the top-k of the whole distance row.
  neg, ids = block(0)
  best, pos = jax.lax.top_k(neg, kk)
  best_ids = jnp.take_along_axis(ids, pos, axis=1)

  def merge(b, carry):
    neg, ids = block(b)
    neg, ids = jnp.concatenate([carry[0], neg], 1), jnp.concatenate([carry[1], ids], 1)
    best, pos = jax.lax.top_k(neg, kk)
    return best, jnp.take_along_axis(ids, pos, axis=1)

  _, nbrs = jax.lax.fori_loop(1, train.shape[0], merge, (best, best_ids))
  # A query that is training example `id` (query_ids >= 0) is dropped from its own neighbours after
  # the fact: its k nearest others are among the k + 1 nearest overall.
  keep = nbrs != query_ids[:, None]
  keep = keep & (jnp.cumsum(keep, axis=1) <= k)
  votes = jnp.sum(jnp.where(keep[..., None],
                            jax.nn.one_hot(labels[nbrs], num_classes, dtype=jnp.int32), 0), axis=1)
  return jnp.argmax(votes, axis=-1).astype(jnp.int32)  # ties -> lowest class index


_sq_rows = jax.jit(lambda a: jnp.sum(a * a, axis=-1))


class _Probe:
  """k-NN probe of one support set (labels, k, self-exclusion) over fixed-size query chunks and
  fixed-size blocks of the support set."""

  def __init__(self, labels: np.ndarray, num_classes: int, k: int, exclude_self: bool,
               chunk_size: int, m: int, block_size: int = 4096,
               self_pos: np.ndarray | None = None):
    self.labels = np.asarray(labels, np.int32)
    n = self.labels.size
    self.static = (int(k), int(num_classes), bool(exclude_self), n)
    self.chunk = min(point.check_chunk_size(chunk_size), m)
    # Every block holds at least the k + 1 candidates that the running top-k keeps.
    self.block = min(max(point.check_chunk_size(block_size), int(k) + 1), n)
    self.exclude_self = exclude_self
    # With self-exclusion, query i leaves out support row self_pos[i] (-1: none; default i).
    self.self_pos = self_pos

  def __call__(self, train: np.ndarray, query: np.ndarray, rows: np.ndarray | None = None
               ) -> np.ndarray:
    """One member: `train [N, F]`, `query [M, F]` -> int32 predictions for the queries `rows`
    (default: all M), in that order."""
    rows = np.arange(query.shape[0]) if rows is None else np.asarray(rows)
    return self.collect(self.dispatch(train, query, rows), rows.size)

  def dispatch(self, train: np.ndarray, query: np.ndarray, rows: np.ndarray,
               device: jax.Device | None = None) -> list[jax.Array]:
    """Starts the probe of one member on `device` and returns without waiting (see `collect`)."""
    if not rows.size:
      return []
    train = np.asarray(train, np.float32)
    b = self.block
    pad = -train.shape[0] % b  # zero rows, masked out in `_knn_chunk`
    if pad:
      train = np.concatenate([train, np.zeros((pad, train.shape[1]), np.float32)])
    # [nb, B, F], sent once for every chunk.
    train_j = jax.device_put(train.reshape(-1, b, train.shape[1]), device)
    labels = jax.device_put(self.labels, device)
    train_sq = _sq_rows(train_j)
    c = self.chunk
    preds = []  # device arrays: chunks are dispatched without waiting for each other
    for start in range(0, rows.size, c):
      sel = rows[start:start + c]
      q = np.asarray(query[sel], np.float32)
      if not self.exclude_self:
        ids = np.full(sel.size, -1, np.int32)
      else:
        ids = (sel if self.self_pos is None else self.self_pos[sel]).astype(np.int32)
      if sel.size < c:  # pad so that every call has one shape
        q = np.concatenate([q, np.zeros((c - sel.size, q.shape[1]), np.float32)])
        ids = np.concatenate([ids, np.full(c - sel.size, -1, np.int32)])
      preds.append(_knn_chunk(train_j, train_sq, labels, jax.device_put(q, device),
                              jax.device_put(ids, device), *self.static))
    return preds

  @staticmethod
  def collect(preds: list[jax.Array], num_rows: int) -> np.ndarray:
    if not preds:
      return np.empty(0, np.int32)
    return np.concatenate(jax.device_get(preds))[:num_rows]


def _member_devices() -> list[jax.Device]:
  """Devices that members' probes are spread over (one per core after `ensemble.split_cpu`):
  XLA:CPU's top_k runs on one core."""
  return jax.local_devices()


def _probe_members(probe: _Probe | dict[int, _Probe], jobs: list[tuple],
                   on_wave: Callable[[int, int], None] | None = None) -> dict[int, np.ndarray]:
  """Runs `jobs` [(member, train [N, F], query [M, F], rows)] in waves of one member per device
  (concurrently, and with only one member's features on each device at a time), with `probe` or
  the member's own `probe[member]`; `on_wave(jobs_done, len(jobs))` after each wave.

  Returns:
    {member: int32 predictions for its rows}.
  """
  devices, out = _member_devices(), {}
  for start in range(0, len(jobs), len(devices)):
    wave = [(r, rows, (probe[r] if isinstance(probe, dict) else probe).dispatch(
                train, query, rows, device))
            for (r, train, query, rows), device in zip(jobs[start:start + len(devices)], devices)]
    for r, rows, pending in wave:
      out[r] = _Probe.collect(pending, rows.size)
    if on_wave is not None:
      on_wave(start + len(wave), len(jobs))
  return out


def _check_knn(train_shape, query_shape, labels, k, exclude_self):
  if len(train_shape) != 3 or len(query_shape) != 3 or train_shape[0] != query_shape[0] or \
     train_shape[2] != query_shape[2]:
    raise ValueError(f"need train features [R, N, F] and query features [R, M, F]; got "
                     f"{tuple(train_shape)} and {tuple(query_shape)}")
  n, m = train_shape[1], query_shape[1]
  if labels.shape != (n,):
    raise ValueError(f"train_labels have shape {labels.shape}, expected ({n},)")
  if exclude_self and m != n:
    raise ValueError(f"exclude_self needs the queries to be the {n} training examples; got {m}")
  max_k = n - 1 if exclude_self else n
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= max_k:
    raise ValueError(f"k must be an int in [1, {max_k}], got {k!r}")


def knn_predict(train_features: Any, train_labels: Any, query_features: Any, k: int = 30,
                exclude_self: bool = False, num_classes: int | None = None,
                chunk_size: int = 256, block_size: int = 4096) -> np.ndarray:
  """k-nearest-neighbour (Euclidean, majority vote) predictions, per member.

  The k neighbours are the k smallest squared distances ||q||^2 - 2 q.t + ||t||^2 (one matmul per
  query chunk and block of `block_size` training examples, merged into a running top-k), equal
  distances going to the lower training index (a stable sort's order); vote ties go to the lowest
  class index. One jitted call per query chunk, the member's train features sent to the device
  once; memory is about `chunk_size * (block_size + k) * 4` bytes for the distance block plus the
  member's features, never an `M x N` matrix.

  Args:
    train_features: `[R, N, F]`.
    train_labels: int `[N]`.
    query_features: `[R, M, F]`.
    k: neighbours, 1 <= k <= N (N - 1 with `exclude_self`).
    exclude_self: the queries are the training examples themselves (M == N, same order); query i
      does not count training example i among its neighbours.
    num_classes: number of classes (default: max label + 1).
    chunk_size: queries per distance block.
    block_size: training examples per distance block (at least k + 1; results do not depend on it).

  Returns:
    int32 `[R, M]`.
  """
  train = np.asarray(train_features, np.float32)
  query = np.asarray(query_features, np.float32)
  labels = np.asarray(train_labels)
  _check_knn(train.shape, query.shape, labels, k, exclude_self)
  num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
  probe = _Probe(labels, num_classes, k, exclude_self, chunk_size, query.shape[1], block_size)
  rows = np.arange(query.shape[1])
  out = _probe_members(probe, [(r, train[r], query[r], rows) for r in range(train.shape[0])])
  return np.stack([out[r] for r in range(train.shape[0])])


def _same(a: np.ndarray, b: np.ndarray) -> bool:
  """Exact equality of two feature arrays, checking one row first (cheap when they differ)."""
  return a.shape == b.shape and np.array_equal(a[:1], b[:1]) and np.array_equal(a, b)


def prediction_depth(train_features: Sequence[Any], train_labels: Any,
                     query_features: Sequence[Any] | None, final_pred: Any, k: int = 30,
                     exclude_self: bool | None = None, chunk_size: int = 256,
                     block_size: int = 4096,
                     on_layer: Callable[[int, int], None] | None = None,
                     reference: int = 0, seed: int = 0, member_ids: Any = None,
                     on_members: Callable[[int, int, int, int], None] | None = None
                     ) -> np.ndarray:
  """Prediction depth (Baldock, Maennel & Neyshabur 2021, "Deep Learning Through the Lens of
  Example Difficulty").

  A k-NN probe (`knn_predict`, k=30 by default, on the training features and labels) classifies
  each query at every layer l = 0..L-1 of the given list. The depth is the smallest l such that
  the probes of every layer l' >= l agree with the network's final prediction. Indexing follows
  the list: with the input prepended as layer 0 (`features(..., include_input=True)`), hidden layer
  i is layer i and depth 0 means "decided in the input", as in the paper. If the last probe
  already disagrees with the final prediction, no layer qualifies and the depth is L.

  Work: the layers are probed from the last to the first, each only for the queries whose probes
  agreed at every later layer (the depth of the others is already fixed), and a probe whose train
  and query features equal those of member 0 of the same layer (the input layer) or of the same
  member one layer up (a flatten after the last conv) is reused, not recomputed.

  Args:
    train_features: list of L arrays `[R, N, ...]` (flattened per example if not already).
    train_labels: int `[N]`.
    query_features: list of L arrays `[R, M, ...]`, or None to score the training set itself.
    final_pred: int `[R, M]`, the network's prediction (argmax of the logits) per member.
    k: neighbours per probe.
    exclude_self: leave each query out of its own neighbours (the queries must be the training
      examples in order). Default: True when `query_features` is None or is `train_features`.
    chunk_size: queries per distance block.
    block_size: training examples per distance block (see `knn_predict`).
    on_layer: called as `on_layer(layers_done, L)` after each layer's probes (for progress).
    on_members: called as `on_members(layers_done, L, probes_done, probes)` after each wave of
      members' probes within a layer (one member per device; for progress within a layer).
    reference: if 0 < reference < N, each member's probes use `reference` training examples drawn
      without replacement (`reference_subset(N, reference, seed, id)` for the member's id, the same
      subset at every layer) as their support set instead of all N: an approximation whose
      agreement with the exact depths is measured in BENCHMARKS.md; cost ~ reference / N of it.
      0 (or >= N): all N, exact.
    seed: seed of the reference subsets.
    member_ids: int `[R]`, the members' ids for the subsets (default 0..R-1).

  Returns:
    float32 `[R, M]` in [0, L].
  """
  if exclude_self is None:
    exclude_self = query_features is None or query_features is train_features
  if query_features is None:
    query_features = train_features
  if len(train_features) != len(query_features) or not train_features:
    raise ValueError(f"need the same non-zero number of train and query layers; got "
                     f"{len(train_features)} and {len(query_features)}")
  final_pred = np.asarray(final_pred)
  labels = np.asarray(train_labels)
  num_classes = int(max(labels.max(), final_pred.max())) + 1
  flat = lambda a: np.reshape(np.asarray(a, np.float32), np.shape(a)[:2] + (-1,))
  num_layers = len(train_features)
  n, num_members = labels.shape[0], final_pred.shape[0]
  subsets = None  # {member: sorted support rows}
  if not isinstance(reference, (int, np.integer)) or reference < 0:
    raise ValueError(f"reference must be an int >= 0 (0 = all training examples), got "
                     f"{reference!r}")
  if 0 < reference < n:
    if not k + exclude_self <= reference:
      raise ValueError(f"reference={reference} must be at least k + {int(exclude_self)} = "
                       f"{k + exclude_self} (or 0 = all training examples)")
    ids = range(num_members) if member_ids is None else [int(i) for i in np.ravel(member_ids)]
    if len(ids) != num_members:
      raise ValueError(f"member_ids has {len(ids)} ids for {num_members} members")
    subsets = {r: reference_subset(n, reference, seed, i) for r, i in enumerate(ids)}
  probe = None
  suffix = None  # [R, M] length of the agreeing suffix of probes so far
  above = None   # (train, query, preds [R, M]) of the layer above, for reuse
  for layer in reversed(range(num_layers)):
    tf, qf = flat(train_features[layer]), flat(query_features[layer])
    _check_knn(tf.shape, qf.shape, labels, k, exclude_self)
    if tf.shape[0] != final_pred.shape[0] or qf.shape[1:2] != final_pred.shape[1:]:
      raise ValueError(f"final_pred has shape {final_pred.shape}, expected [R, M] = "
                       f"{qf.shape[:2]}")
    if probe is None:
      suffix = np.zeros(final_pred.shape, np.int64)
      if subsets is None:
        probe = _Probe(labels, num_classes, k, exclude_self, chunk_size, qf.shape[1], block_size)
      else:
        probe = {r: _subset_probe(rows, labels, num_classes, k, exclude_self, chunk_size,
                                  qf.shape[1], block_size) for r, rows in subsets.items()}
    active = suffix == num_layers - 1 - layer  # every probe below the top agreed so far
    preds = np.full(qf.shape[:2], -1, np.int32)
    # Members whose features are member 0's share one probe over the union of their queries
    # (not with reference subsets: each member has its own).
    like0 = [r for r in range(tf.shape[0]) if r == 0 or (subsets is None and _same(tf[r], tf[0])
                                                         and _same(qf[r], qf[0]))]
    union = np.flatnonzero(active[like0].any(0))
    jobs = []  # members' probes, run concurrently over the devices
    for r in range(tf.shape[0]):
      rows = union if r in like0 else np.flatnonzero(active[r])
      if r in like0 and r:
        continue  # member 0's predictions, copied below
      if above is not None and _same(tf[r], above[0][r]) and _same(qf[r], above[1][r]):
        preds[r, rows] = above[2][r, rows]
      else:
        jobs.append((r, tf[r] if subsets is None else tf[r][subsets[r]], qf[r], rows))
    rows_of = {job[0]: job[3] for job in jobs}
    on_wave = None if on_members is None else functools.partial(
        on_members, num_layers - 1 - layer, num_layers)
    for r, p in _probe_members(probe, jobs, on_wave).items():
      preds[r, rows_of[r]] = p
    for r in like0[1:]:
      preds[r, union] = preds[0, union]
    suffix += active & (preds == final_pred)
    above = (tf, qf, preds)
    if on_layer is not None:
      on_layer(num_layers - layer, num_layers)
  return (num_layers - suffix).astype(np.float32)


def reference_subset(n: int, size: int, seed: int, member: int) -> np.ndarray:
  """The sorted support rows (`size` of `n`, without replacement) of member `member`'s probes;
  the member's id, not its position, sets them, so a member draws alike in any ensemble."""
  return np.sort(np.random.default_rng([int(seed), int(member)]).choice(n, size, replace=False))


def _subset_probe(rows: np.ndarray, labels: np.ndarray, num_classes: int, k: int,
                  exclude_self: bool, chunk_size: int, m: int, block_size: int) -> _Probe:
  """A probe whose support set is the training rows `rows`; with self-exclusion, query i leaves
  out its own row where `rows` holds it."""
  self_pos = np.full(labels.shape[0], -1, np.int64)
  self_pos[rows] = np.arange(rows.size)
  return _Probe(labels[rows], num_classes, k, exclude_self, chunk_size, m, block_size,
                self_pos=self_pos if exclude_self else None)


def prediction_depth_scores(apply_fn: point.ApplyFn, variables: Any, x: Any, y: Any, k: int = 30,
                            include_input: bool = True, chunk_size: int = 1024,
                            knn_chunk_size: int = 256) -> np.ndarray:
  """Prediction depth of every training example for every member (features + probes, see above).

  Uses the training set as the probes' support set, leaving each example out of its own
  neighbours, and the input as layer 0 (Baldock et al.'s convention) unless `include_input=False`.

  Returns:
    float32 `[R, N]`.
  """
  x, y = point.check_examples(x, y)
  layers, logits = features(apply_fn, variables, x, chunk_size, include_input=include_input,
                            return_logits=True)
  return prediction_depth(layers, y, None, logits.argmax(-1), k=k, chunk_size=knn_chunk_size)


def _kmeanspp(x: jax.Array, num_clusters: int, key: jax.Array) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii 2007): `x [N, D]` -> centroids `[K, D]`."""
  n = x.shape[0]
  key, sub = jax.random.split(key)
  first = x[jax.random.randint(sub, (), 0, n)]
  cents = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(first)
  d2 = jnp.sum(jnp.square(x - first), -1)

  def body(i, carry):
    cents, d2, key = carry
    key, sub = jax.random.split(key)
    # Sample proportionally to squared distance; all-zero distances -> uniform.
    logits = jnp.where(jnp.sum(d2) > 0, jnp.log(d2), 0.0)
    c = x[jax.random.categorical(sub, logits)]
    return cents.at[i].set(c), jnp.minimum(d2, jnp.sum(jnp.square(x - c), -1)), key

  cents, _, _ = jax.lax.fori_loop(1, num_clusters, body, (cents, d2, key))
  return cents


def _sq_dists(x: jax.Array, c: jax.Array) -> jax.Array:
  d = (jnp.sum(x * x, -1)[:, None] - 2.0 * jnp.dot(x, c.T, precision=_HIGHEST)
       + jnp.sum(c * c, -1)[None, :])
  return jnp.maximum(d, 0.0)


def lloyd(x: jax.Array, centroids: jax.Array, num_iters: int) -> jax.Array:
  """`num_iters` Lloyd iterations from `centroids [K, D]`; an empty cluster keeps its centroid.

  Stops early at a fixed point (an iteration that leaves the centroids bitwise unchanged: every
  later one would repeat it), so the result is that of all `num_iters` iterations.
  """
  k = centroids.shape[0]

  def step(c):
    assign = jnp.argmin(_sq_dists(x, c), axis=-1)
    onehot = jax.nn.one_hot(assign, k, dtype=x.dtype)  # [N, K]
    counts = onehot.sum(0)
    sums = jnp.dot(onehot.T, x, precision=_HIGHEST)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)

  def body(carry):
    i, c, _ = carry
    new = step(c)
    return i + 1, new, jnp.any(new != c)

  _, out, _ = jax.lax.while_loop(lambda carry: (carry[0] < num_iters) & carry[2], body,
                                 (jnp.int32(0), centroids, jnp.bool_(True)))
  return out


@functools.partial(jax.jit, static_argnums=(1, 3))
def kmeans(x: jax.Array, num_clusters: int, key: jax.Array, num_iters: int = 50) -> jax.Array:
  """k-means (k-means++ seeding, then `num_iters` Lloyd iterations) of `x [N, D]` -> `[K, D]`."""
  x = x.astype(jnp.float32)
  return lloyd(x, _kmeanspp(x, num_clusters, key), num_iters)


def member_key(seed: int, member: int) -> jax.Array:
  """The k-means key of member `member`: fold_in(PRNGKey(seed), member), independent of R."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), member)


@functools.partial(jax.jit, static_argnums=(2, 4))
def _prototypes(feats, labels, num_classes, keys, num_clusters_and_iters):
  num_clusters, num_iters = num_clusters_and_iters

  def member(f, key):
    onehot = jax.nn.one_hot(labels, num_classes, dtype=f.dtype)
    counts = jnp.maximum(onehot.sum(0), 1.0)[:, None]
    class_means = jnp.dot(onehot.T, f, precision=_HIGHEST) / counts
    supervised = jnp.sqrt(jnp.sum(jnp.square(f - class_means[labels]), -1))
    cents = lloyd(f, _kmeanspp(f, num_clusters, key), num_iters)
    selfsup = jnp.sqrt(jnp.min(_sq_dists(f, cents), axis=-1))
    return supervised, selfsup

  return jax.vmap(member)(feats, keys)


def prototype_scores(pre_logits: Any, labels: Any, num_clusters: int, seed: int = 0,
                     num_iters: int = 50, normalize: bool = False,
                     member_ids: Any = None) -> dict[str, np.ndarray]:
  """Prototype distances of every example in each member's penultimate space (Sorscher et al.
  2022, "Beyond neural scaling laws: beating power law scaling via data pruning").

    proto_supervised: ||h(x) - m_y||_2, with m_y the mean of h over the training examples labelled y
                      (the "supervised prototype" metric).
    proto_selfsup:    min_j ||h(x) - c_j||_2 over k-means centroids c_1..c_K of h (the
                      "self-supervised prototype" metric).

  Departures: Sorscher et al. cluster the embeddings of a separate self-supervised model (SwAV);
  here h is each member's own penultimate feature `out["pre_logits"]`. Their embeddings are unit
  vectors and they use cosine distance; `normalize=True` L2-normalises h first, so that squared
  distances are 2 - 2 cos. k-means: k-means++ seeding with key `member_key(seed, id)` for the
  member's id (so member i clusters alike in any ensemble that contains it), then
  `num_iters` Lloyd iterations (an empty cluster keeps its centroid).

  Args:
    pre_logits: `[R, N, D]`.
    labels: int `[N]`.
    num_clusters: K, 1 <= K <= N.
    seed: k-means seed.
    num_iters: Lloyd iterations.
    normalize: L2-normalise features first.
    member_ids: int `[R]`, the members' ids (default 0..R-1).

  Returns:
    {"proto_supervised", "proto_selfsup"} -> float32 `[R, N]`.
  """
  feats = np.asarray(pre_logits, np.float32)
  labels = np.asarray(labels)
  if feats.ndim != 3:
    raise ValueError(f"pre_logits must be [R, N, D], got shape {feats.shape}")
  r, n, _ = feats.shape
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
    raise ValueError(f"labels must be non-negative ints of shape ({n},); got {labels.shape} "
                     f"{labels.dtype}")
  if not isinstance(num_clusters, (int, np.integer)) or not 1 <= num_clusters <= n:
    raise ValueError(f"num_clusters must be an int in [1, {n}], got {num_clusters!r}")
  if normalize:
    feats = feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
  ids = range(r) if member_ids is None else [int(i) for i in np.asarray(member_ids)]
  if len(ids) != r:
    raise ValueError(f"member_ids has {len(ids)} ids for {r} members")
  keys = jnp.stack([member_key(seed, i) for i in ids])
  # One member per call: a member's distances do not depend on how many members are clustered
  # with it (XLA:CPU rounds a vmapped batch of 5+ differently from one).
  labels_d = jnp.asarray(labels, jnp.int32)
  parts = [_prototypes(jnp.asarray(feats[i:i + 1]), labels_d, int(labels.max()) + 1,
                       keys[i:i + 1], (int(num_clusters), int(num_iters))) for i in range(r)]
  return {"proto_supervised": np.concatenate([np.asarray(p[0]) for p in parts]),
          "proto_selfsup": np.concatenate([np.asarray(p[1]) for p in parts])}

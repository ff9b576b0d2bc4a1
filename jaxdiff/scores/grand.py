"""GraNd: the L2 norm of each example's loss gradient w.r.t. all parameters, for every member.

Two exact methods: "vmap" (per-example gradients, memory-bounded) and "ghost" (per-layer norms from
each layer's inputs and output gradients for Dense, Conv and normalisation layers; per-example
gradients for the parameters of any other layer).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, NamedTuple

import flax.linen as nn
from flax.linen.linear import canonicalize_padding
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff.scores import point

METHODS = ("vmap", "ghost")

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes in the norm contractions (GPU default)
# Normalisation layers covered by the per-layer method: their parameters act on each example
# separately (BatchNorm only in evaluation mode, with running statistics).
_NORMS = (nn.BatchNorm, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
_COVERABLE = (nn.Dense, nn.Conv) + _NORMS


class Layer(NamedTuple):
  """One layer whose per-example gradient norm the "ghost" method computes in closed form.

  Attributes:
    path: module path, also its path in `params`.
    kind: "dense", "conv" or "norm".
    leaves: names of its parameters (all of them are covered).
    out_shape: its output shape for one example (without the batch axis).
    positions: T, the positions sharing the kernel (dense: product of the middle input axes,
      conv: output positions); 0 for norms.
    ghost: dense/conv kernel norm via the Gram identity (else the per-example kernel gradient is
      materialised); chosen by cost.
    conv: conv geometry `(kernel_size, strides, pads, input_dilation, kernel_dilation)`, else ().
  """
  path: tuple
  kind: str
  leaves: tuple
  out_shape: tuple
  positions: int
  ghost: bool
  conv: tuple = ()


def grand_scores(apply_fn: point.ApplyFn, variables: Any, x: Any, y: Any, chunk_size: int = 4096,
                 method: str = "vmap", batch_size: int | None = None,
                 max_grad_bytes: int = 2**28) -> np.ndarray:
  """GraNd of every example for every member (Paul et al. 2021, "Deep Learning on a Data Diet").

  GraNd(x, y) = || d/dtheta CE(f_theta(x), y) ||_2 over all trainable parameters
  `variables["params"]` (batch statistics are not parameters), at the member's current parameters in
  evaluation mode. Paul et al. average this norm over several initialisations early in training;
  here each member gives one `[N]` row and averaging over members is left to the caller.

  Methods (both exact):
    "vmap": per-example gradients of all parameters (the reference). They are materialised for
      `batch_size` examples of every member at once, about `R * batch_size * num_params * 4` bytes;
      by default `batch_size` is the largest that keeps this under `max_grad_bytes`. Examples go
      through `lax.map(..., batch_size)` inside one jitted call per chunk of `chunk_size` examples.
    "ghost": the squared norm is a sum over layers, and for the layers of `layer_plan` each term
      comes from one batched backward pass (the gradients `g` w.r.t. every covered layer's output;
      examples do not interact in evaluation mode) and the layer's input `a`, without per-example
      gradients of the whole network:
        Dense / Conv kernel: with P [T, K] the layer's input patches of one example (Dense: the
          input rows, T = 1 for `[B, din]` inputs; Conv: the receptive fields of its T output
          positions, K = prod(kernel_size) * cin) and G [T, C] its output gradient, the example's
          kernel gradient is P^T G, and
            ||P^T G||_F^2 = sum_{t,t'} (P P^T)_{tt'} (G G^T)_{tt'}
          (Goodfellow 2015, "Efficient Per-Example Gradient Computations", for T = 1; Li et al.
          2022 "ghost clipping" for T positions), used when T^2 (K + C) < T K C and else P^T G
          is formed per example (the per-layer choice of Bu et al. 2022's "mixed ghost
          clipping"); bias: ||sum_t G_t||^2.
        BatchNorm (running statistics), LayerNorm, RMSNorm, GroupNorm: the layer acts on each
          example separately, so its parameter gradients for one example are the vector-Jacobian
          product of the layer alone at that example's input and output gradient (for batch norm
          scale: sum over positions of g * x_hat; bias: sum of g), vmapped over examples.
      Every other parameter (other layers, a layer called twice, a conv with feature groups or
      circular/causal padding, batch norm in training mode) falls back to per-example gradients
      as in "vmap". Per-layer work runs in example batches of at most `max_grad_bytes / R` bytes.

  Cost (benchmarks/bench_scores.py, loaded 2-core CPU, MNIST-1D, 4,000 examples, warm, as a
  multiple of one training epoch at the same R): MLP 40-100-100-10 R=16: "ghost" 0.07 s (0.5x),
  "vmap" 2.6 s (18x); default CNN (every layer covered, no per-example gradients) R=16, members
  one at a time: "ghost" 1.35 s (0.7x), "vmap" 6.2 s (3x). The model is traced once per model and
  shapes (cached), not once per member.

  Args:
    apply_fn: `(member_variables, x [B, ...]) -> (logits [B, C], out)` in evaluation mode; pass the
      same object on every call so the kernel compiles once.
    variables: stacked variables, every leaf `[R, ...]`, with a "params" collection.
    x: inputs `[N, ...]`.
    y: int labels `[N]`.
    chunk_size: examples per jitted call.
    method: "vmap" (reference) or "ghost".
    batch_size: examples whose per-example gradients are held at once inside a chunk (`lax.map`
      batch size) for the parameters not covered; None picks it from `max_grad_bytes`. A value >=
      chunk size is a plain vmap (on CPU convolutions inside `lax.map` are slow).
    max_grad_bytes: memory budget for per-example gradients (and per-layer patches and Gram
      matrices of the "ghost" method).

  Returns:
    float32 `[R, N]`.
  """
  if method not in METHODS:
    raise ValueError(f"unknown GraNd method {method!r}; valid methods: {list(METHODS)}")
  x, y = point.check_examples(x, y)
  r = point.num_members(variables)
  if not hasattr(variables, "keys") or "params" not in variables:
    keys = list(variables.keys()) if hasattr(variables, "keys") else None
    raise ValueError("variables must be a mapping with a 'params' collection; got "
                     f"{type(variables).__name__} with keys {keys}")
  chunk = min(point.check_chunk_size(chunk_size), x.shape[0])
  member0 = jax.tree_util.tree_map(lambda a: a[0], variables)
  num_classes, plan = _model_info(apply_fn, _structs(member0), _structs(x), method == "ghost")
  if y.max() >= num_classes:  # as point.check_labels_vs_classes, from the cached trace
    raise ValueError(f"label {int(y.max())} is out of range for a model with {num_classes} "
                     f"classes (valid labels: 0..{num_classes - 1})")
  fallback_params = _num_params(member0["params"])
  if method == "ghost":
    covered = {l.path + (leaf,) for l in plan for leaf in l.leaves}
    fallback_params = sum(int(np.size(v)) for k, v in
                          traverse_util.flatten_dict(member0["params"]).items() if k not in covered)
  if batch_size is None:
    batch_size = max(1, min(chunk, max_grad_bytes // max(1, r * fallback_params * 4)))
  elif not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
  batch_size = int(min(batch_size, chunk))
  if method == "vmap":
    kernel = lambda v, xc, yc: _vmap_chunk(apply_fn, v, xc, yc, batch_size)
  else:
    budget = max(1, int(max_grad_bytes) // r)
    kernel = lambda v, xc, yc: _ghost_chunk(apply_fn, v, xc, yc, plan, batch_size, budget)
  return point.run_chunked(kernel, variables, [x, y.astype(np.int32)], chunk)


def _num_params(params: Any) -> int:
  return sum(int(np.size(l)) for l in jax.tree_util.tree_leaves(params))


def _sq_norm(tree: Any) -> jax.Array:
  return sum(jnp.sum(jnp.square(l.astype(jnp.float32))) for l in jax.tree_util.tree_leaves(tree))


def _map_examples(f, xs, batch_size: int):
  """`f` over the leading axis of `xs`: one vmap if it fits, else `lax.map` in batches."""
  n = jax.tree_util.tree_leaves(xs)[0].shape[0]
  if batch_size >= n:
    return jax.vmap(f)(xs)
  return jax.lax.map(f, xs, batch_size=batch_size)


def _over_members(member, variables):
  """vmap of `member` over the stacked variables; a single member runs unbatched (a vmapped
  convolution with batched weights and inputs is a slow grouped convolution on CPU)."""
  r = jax.tree_util.tree_leaves(variables)[0].shape[0]
  if r == 1:
    return member(jax.tree_util.tree_map(lambda a: a[0], variables))[None]
  return jax.vmap(member)(variables)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _vmap_chunk(apply_fn, variables, x, y, batch_size):
  def member(v):
    def example(xy):
      x1, y1 = xy
      def loss(params):
        logits, _ = apply_fn({**v, "params": params}, x1[None])
        return point.cross_entropy(logits, y1[None])[0]
      return _sq_norm(jax.grad(loss)(v["params"]))
    return _map_examples(example, (x, y), batch_size)
  return jnp.sqrt(_over_members(member, variables))


# ----------------------------------------------------------------------------- the layer plan


def _is_candidate(context) -> bool:
  # Exactly these classes: a subclass may change __call__ (and calls super().__call__, seen twice).
  return context.method_name == "__call__" and type(context.module) in _COVERABLE


def _layer_input(args, kwargs):
  if args:
    return args[0]
  return kwargs["inputs"] if "inputs" in kwargs else kwargs["x"]


def _conv_geometry(m: nn.Conv, in_shape: tuple) -> tuple | None:
  """`(kernel_size, strides, pads, input_dilation, kernel_dilation)` of a plain `nn.Conv` on a
  `[B, *spatial, cin]` input, or None where the patches below would not reproduce it."""
  ks = (m.kernel_size,) if isinstance(m.kernel_size, int) else tuple(m.kernel_size)
  nd = len(ks)
  if (len(in_shape) != nd + 2 or m.feature_group_count != 1 or m.mask is not None
      or not getattr(m.conv_general_dilated, "same_as_lax_conv", m.conv_general_dilated is None)
      or m.conv_general_dilated_cls is not None):
    return None

  def bcast(v):
    v = 1 if v is None else v
    return (v,) * nd if isinstance(v, int) else tuple(v)

  strides, in_dil, k_dil = bcast(m.strides), bcast(m.input_dilation), bcast(m.kernel_dilation)
  spatial = in_shape[1:-1]
  eff_ks = tuple((k - 1) * d + 1 for k, d in zip(ks, k_dil))
  padding = canonicalize_padding(m.padding, nd)
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID") or any(d != 1 for d in in_dil):
      return None  # CIRCULAR / REFLECT / CAUSAL pad inside the layer: not reproduced here
    pads = tuple(jax.lax.padtype_to_pads(spatial, eff_ks, strides, padding))
  else:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return ks, strides, tuple(tuple(p) for p in pads), in_dil, k_dil


def _conv_out_spatial(spatial, geometry) -> tuple:
  ks, strides, pads, in_dil, k_dil = geometry
  out = []
  for n, k, s, (lo, hi), di, dk in zip(spatial, ks, strides, pads, in_dil, k_dil):
    length = (n - 1) * di + 1 + lo + hi - ((k - 1) * dk + 1)
    out.append(length // s + 1 if length >= 0 else 0)
  return tuple(out)


def _separable_norm(m, args, kwargs, ndim: int) -> bool:
  """True when a normalisation layer's output for one example depends only on that example."""
  if kwargs.get("mask") is not None or getattr(m, "axis_name", None) is not None:
    return False
  axes = lambda a: {(ndim + i) % ndim for i in ((a,) if isinstance(a, int) else tuple(a))}
  if isinstance(m, nn.BatchNorm):
    call = args[1] if len(args) > 1 else kwargs.get("use_running_average")
    running = m.use_running_average if call is None else call
    return bool(running) and 0 not in axes(m.axis)
  if isinstance(m, nn.GroupNorm):
    return m.reduction_axes is None or 0 not in axes(m.reduction_axes)
  return 0 not in axes(m.reduction_axes) | axes(m.feature_axes)  # LayerNorm, RMSNorm


def _describe(m, args, kwargs, out, batch: int):
  """A batch-independent description of one call of a coverable layer, or None."""
  a = _layer_input(args, kwargs)
  if (not hasattr(a, "shape") or not hasattr(out, "shape") or a.ndim < 2 or out.ndim < 1
      or a.shape[0] != batch or out.shape[0] != batch):
    return None
  in_shape, out_shape = tuple(a.shape), tuple(out.shape)
  if isinstance(m, nn.Dense):
    return ("dense", in_shape[1:], out_shape[1:], m.features, m.use_bias)
  if isinstance(m, nn.Conv):
    geometry = _conv_geometry(m, in_shape)
    if geometry is None or out_shape[1:-1] != _conv_out_spatial(in_shape[1:-1], geometry):
      return None
    return ("conv", in_shape[1:], out_shape[1:], m.features, m.use_bias, geometry)
  if _separable_norm(m, args, kwargs, a.ndim):
    return ("norm", in_shape[1:], out_shape[1:])
  return None


def _trace_calls(apply_fn, member_variables, x_struct, batch: int) -> dict:
  calls: dict[tuple, list] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if _is_candidate(context):
      calls.setdefault(tuple(context.module.path), []).append(
          _describe(context.module, args, kwargs, out, batch))
    return out

  def run(v, xx):
    with nn.intercept_methods(record):
      return apply_fn(v, xx)[0]

  jax.eval_shape(run, member_variables,
                 jax.ShapeDtypeStruct((batch,) + tuple(x_struct.shape[1:]), x_struct.dtype))
  return calls


def _structs(tree: Any) -> Any:
  """Hashable shape/dtype skeleton of a pytree of arrays."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((tuple(np.shape(l)), np.dtype(l.dtype)) for l in leaves)


@functools.lru_cache(maxsize=64)
def _model_info(apply_fn, member_structs, x_structs, with_plan: bool) -> tuple[int, tuple]:
  """(number of classes, `layer_plan` or ()) of one member, traced once per model and shapes
  (members scored one at a time would otherwise trace the model for each)."""
  treedef, leaves = member_structs
  member = jax.tree_util.tree_unflatten(
      treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves])
  (x_shape, x_dtype), = x_structs[1]
  x1 = jax.ShapeDtypeStruct((1,) + x_shape[1:], x_dtype)
  num_classes = jax.eval_shape(lambda v, xx: apply_fn(v, xx)[0], member, x1).shape[-1]
  return num_classes, (layer_plan(apply_fn, member, x1) if with_plan else ())


def layer_plan(apply_fn: point.ApplyFn, member_variables: Any, x: Any) -> tuple[Layer, ...]:
  """Finds the layers the "ghost" method covers, by tracing one member abstractly.

  A layer is covered when it is exactly `flax.linen.Dense`, `Conv` (no feature groups or mask,
  SAME/VALID/explicit padding), `BatchNorm` in evaluation mode, `LayerNorm`, `RMSNorm` or
  `GroupNorm` (statistics within each example); is called once per forward pass; its input and
  output have the examples on their leading axis (checked by tracing two batch sizes); and its
  parameters are exactly its own `kernel [.., cin, features]` (+ `bias [features]`), or for a norm
  its `scale` and/or `bias`, at its module path in `params`.

  Args:
    apply_fn: one member's evaluation-mode apply function.
    member_variables: one member's variables (no members axis).
    x: example inputs `[N, ...]` (only the shape and dtype are used).

  Returns:
    Hashable tuple of `Layer`, in path order.
  """
  x_struct = jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype") else
                                  np.asarray(x).dtype)
  traces = [_trace_calls(apply_fn, member_variables, x_struct, b) for b in (2, 3)]
  flat = traverse_util.flatten_dict(member_variables["params"])
  plan = []
  for path in sorted(traces[0]):
    seen = [t.get(path, []) for t in traces]
    if any(len(s) != 1 or s[0] is None for s in seen) or seen[0] != seen[1]:
      continue
    desc = seen[0][0]
    kind, in_shape, out_shape = desc[:3]
    own = {k[len(path):]: tuple(np.shape(v)) for k, v in flat.items() if k[:len(path)] == path}
    if kind == "norm":
      if own and set(own) <= {("scale",), ("bias",)}:
        plan.append(Layer(path, kind, tuple(sorted(k[0] for k in own)), out_shape, 0, False))
      continue
    features, use_bias = desc[3], desc[4]
    cin = in_shape[-1]
    if kind == "dense":
      want = {("kernel",): (cin, features)}
      positions, k, geometry = int(np.prod(in_shape[:-1], dtype=np.int64)), cin, ()
    else:
      geometry = desc[5]
      want = {("kernel",): tuple(geometry[0]) + (cin, features)}
      positions = int(np.prod(out_shape[:-1], dtype=np.int64))
      k = int(np.prod(geometry[0])) * cin
    if use_bias:
      want[("bias",)] = (features,)
    if own != want or out_shape[-1] != features:
      continue
    ghost = positions * positions * (k + features) < positions * k * features
    plan.append(Layer(path, kind, tuple(sorted(l[0] for l in want)), out_shape, positions, ghost,
                      geometry))
  return tuple(plan)


# ----------------------------------------------------------------------------- per-layer norms


def _patches(layer: Layer, a: jax.Array) -> jax.Array:
  """One example's input patches `[T, K]`, ordered like the flattened kernel `[K, C]`."""
  if layer.kind == "dense":
    return a.reshape(layer.positions, a.shape[-1])
  ks, strides, pads, in_dil, k_dil = layer.conv
  out_spatial = layer.out_shape[:-1]
  cfg = [(lo, hi, d - 1) for (lo, hi), d in zip(pads, in_dil)] + [(0, 0, 0)]
  ap = jax.lax.pad(a, jnp.zeros((), a.dtype), cfg)  # input dilation and padding, as lax.conv does
  cols = []
  for offset in itertools.product(*(range(k) for k in ks)):
    start = [o * d for o, d in zip(offset, k_dil)] + [0]
    limit = [s + (t - 1) * st + 1 for s, t, st in zip(start, out_spatial, strides)] + [a.shape[-1]]
    cols.append(jax.lax.slice(ap, start, limit, tuple(strides) + (1,)))
  return jnp.stack(cols, axis=-2).reshape(layer.positions, -1)  # [*T, offsets, cin] -> [T, K]


def _kernel_sq_norms(layer: Layer, a: jax.Array, g: jax.Array, budget: int) -> jax.Array:
  """Per-example squared norm of a Dense/Conv layer's kernel (+ bias) gradient: `[B]`."""
  t, c = layer.positions, layer.out_shape[-1]
  k = int(np.prod(layer.conv[0])) * a.shape[-1] if layer.kind == "conv" else a.shape[-1]

  def one(ag):
    a1, g1 = ag
    p = _patches(layer, a1.astype(jnp.float32))
    gm = g1.astype(jnp.float32).reshape(t, c)
    if layer.ghost:
      s = jnp.sum(jnp.dot(p, p.T, precision=_HIGHEST) * jnp.dot(gm, gm.T, precision=_HIGHEST))
    else:
      s = jnp.sum(jnp.square(jnp.dot(p.T, gm, precision=_HIGHEST)))
    if "bias" in layer.leaves:
      s = s + jnp.sum(jnp.square(jnp.sum(gm, axis=0)))
    return s

  per_example = 4 * (t * k + t * c + (2 * t * t if layer.ghost else k * c))
  return _map_examples(one, (a, g), max(1, budget // per_example))


def _norm_sq_norms(module, extra_args, kwargs, cols, a, g, budget: int) -> jax.Array:
  """Per-example squared norm of a normalisation layer's parameter gradients: `[B]`.

  The layer acts on each example separately, so one example's gradient is the layer's own
  vector-Jacobian product at that example (run on a batch of one)."""
  def one(ag):
    a1, g1 = ag
    f = lambda p: module.apply({**cols, "params": p}, a1[None], *extra_args, **kwargs)
    out, vjp = jax.vjp(f, cols["params"])
    return _sq_norm(vjp(g1[None].astype(out.dtype)))

  per_example = 4 * 4 * int(np.prod(a.shape[1:]))
  return _map_examples(one, (a, g), max(1, budget // per_example))


def _subtree(tree: Any, path: tuple) -> Any:
  for p in path:
    if not hasattr(tree, "keys") or p not in tree:
      return None
    tree = tree[p]
  return tree


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _ghost_chunk(apply_fn, variables, x, y, plan, batch_size, budget):
  index = {layer.path: i for i, layer in enumerate(plan)}
  covered = {l.path + (leaf,) for l in plan for leaf in l.leaves}

  def member(v):
    b = x.shape[0]
    flat = traverse_util.flatten_dict(v["params"])
    rest = {k: a for k, a in flat.items() if k not in covered}
    total = jnp.zeros((b,), jnp.float32)

    if plan:
      # Output gradients of every covered layer from one batched backward pass through zero
      # perturbations added to the layer outputs.
      eps = [jnp.zeros((b,) + layer.out_shape, jnp.float32) for layer in plan]
      modules = [None] * len(plan)  # norm layers: (unbound module, extra args, kwargs), at trace

      def loss(eps):
        acts = [None] * len(plan)

        def perturb(next_fun, args, kwargs, context):
          i = index.get(tuple(context.module.path)) if _is_candidate(context) else None
          if i is None:
            return next_fun(*args, **kwargs)
          acts[i] = _layer_input(args, kwargs)
          if plan[i].kind == "norm":
            rest_args = args[1:] if args else ()
            rest_kwargs = {k: val for k, val in kwargs.items() if k != "x"}
            modules[i] = (context.module.clone(parent=None), rest_args, rest_kwargs)
          out = next_fun(*args, **kwargs)
          return out + eps[i].astype(out.dtype)

        with nn.intercept_methods(perturb):
          logits, _ = apply_fn(v, x)
        return jnp.sum(point.cross_entropy(logits, y)), acts

      grads, acts = jax.grad(loss, has_aux=True)(eps)
      for layer, g, a, mod in zip(plan, grads, acts, modules):
        if layer.kind == "norm":
          cols = {c: sub for c in v if (sub := _subtree(v[c], layer.path)) is not None}
          total = total + _norm_sq_norms(mod[0], mod[1], mod[2], cols, a, g, budget)
        else:
          total = total + _kernel_sq_norms(layer, a, g, budget)

    if rest:
      def example(xy):
        x1, y1 = xy
        def loss_rest(rest_params):
          params = traverse_util.unflatten_dict({**flat, **rest_params})
          logits, _ = apply_fn({**v, "params": params}, x1[None])
          return point.cross_entropy(logits, y1[None])[0]
        return _sq_norm(jax.grad(loss_rest)(rest))
      total = total + _map_examples(example, (x, y), batch_size)
    return total

  return jnp.sqrt(_over_members(member, variables))

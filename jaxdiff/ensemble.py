"""The ensemble engine: R members stacked on a leading axis, one jitted step over all of them.

Holds the member state, stacked initialisation, the pure per-member train step (with divergence
masking), the ways of running members (vmap, or a loop of per-member compiled steps where that
measures faster), epoch execution (`lax.scan` or step by step) and sharding of the runs axis.

Why one module of ~700 lines: the step, the member chunks, the per-device programs and the
layout of the runs axis are one mechanism (member identity depends on all four agreeing); the
pieces that stand alone live elsewhere (memory.py sizes chunks, distributed.py the processes).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdiff import config as config_lib
from jaxdiff import data as data_lib
from jaxdiff import distributed
from jaxdiff import memory
from jaxdiff import models

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
MEMBER_STRATEGIES = ("auto", "vmap", "loop")
EPOCH_LOOPS = ("auto", "scan", "python")


@flax.struct.dataclass
class MemberState:
  """Training state of one member, or of all members stacked on a leading `[R]` axis.

  Attributes:
    params: model parameters.
    batch_stats: batch-norm running statistics (`{}` for models without batch norm).
    opt_state: Optax state (holds the step count used by learning-rate schedules).
    diverged: bool, True once the member's loss or parameters became non-finite.
    diverged_step: int32, the global step at which it diverged (-1 if it has not).
    lr_scale: float32, this member's learning-rate multiplier (1.0 unless
      `optim.member_lr_scale` gives per-member values, e.g. for a learning-rate sweep).
  """
  params: Any
  batch_stats: Any
  opt_state: Any
  diverged: jax.Array
  diverged_step: jax.Array
  lr_scale: jax.Array


def make_optimizer(config: Mapping[str, Any], steps_per_epoch: int, num_epochs: int
                   ) -> optax.GradientTransformation:
  """Optax optimiser from the `optim` config section (missing fields: `config.OPTIM`).

  Fields: `name` (sgd|adam|adamw), `lr`, `momentum` (sgd), `nesterov`, `weight_decay` (added to the
  gradient as in PyTorch's SGD; decoupled for adamw), `schedule` (constant|step|cosine),
  `milestones` (fractions of training for "step", default (0.5, 0.75)), `decay_factor` (0.1),
  `warmup_epochs`.
  """
  name = config.get("name", config_lib.OPTIM["name"])
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimiser {name!r}; valid: {', '.join(OPTIMIZERS)}")
  lr = float(config.get("lr", config_lib.OPTIM["lr"]))
  if not lr > 0:
    raise ValueError(f"optim.lr={lr}: must be positive")
  total = max(1, steps_per_epoch * num_epochs)
  schedule = config.get("schedule", "constant")
  if schedule == "constant":
    sched = optax.constant_schedule(lr)
  elif schedule == "step":
    milestones = config.get("milestones", (0.5, 0.75))
    factor = float(config.get("decay_factor", 0.1))
    sched = optax.piecewise_constant_schedule(
        lr, {int(round(m * total)): factor for m in milestones})
  elif schedule == "cosine":
    sched = optax.cosine_decay_schedule(lr, total)
  else:
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
  warmup = int(config.get("warmup_epochs", 0) or 0) * steps_per_epoch
  if warmup:
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), sched], [warmup])
  wd = float(config.get("weight_decay", 0.0) or 0.0)
  if wd < 0:
    raise ValueError(f"optim.weight_decay={wd}: must be >= 0")
  if name == "sgd":
    momentum = float(config.get("momentum", 0.9))
    tx = optax.sgd(sched, momentum=momentum or None, nesterov=bool(config.get("nesterov", False)))
    return optax.chain(optax.add_decayed_weights(wd), tx) if wd else tx
  if name == "adam":
    tx = optax.adam(sched)
    return optax.chain(optax.add_decayed_weights(wd), tx) if wd else tx
  return optax.adamw(sched, weight_decay=wd)


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _has_conv(params) -> bool:
  return any(x.ndim >= 3 for x in jax.tree_util.tree_leaves(params))


@dataclasses.dataclass
class Engine:
  """Trains R members of one architecture at once.

  Attributes:
    model: a Flax module following the jaxdiff model contract (returns `(logits, out)`).
    tx: Optax optimiser (the same for every member).
    augment: apply the CIFAR crop+flip augmentation to images inside the step.
    member_strategy: "vmap" (one vmapped program) or "loop" (a loop of per-member compiled steps;
      on CPU a vmapped convolution is a slow grouped convolution); "auto" picks per backend and
      architecture (see `resolve_strategy`).
    epoch_loop: "scan" (an epoch in one `lax.scan`) or "python" (one call per step); "auto" picks.
    mesh: optional 1-D mesh with axis "runs"; the runs axis of every state leaf is sharded on it.
    member_chunk: vmapped members run in chunks of exactly this many (the last one padded), each
      device's chunks one epoch after another, so that a chunk's parameters and activations stay
      in cache and every member runs through the same program whatever the ensemble: member i
      of any ensemble equals a 1-member run of member i, bit for bit on CPU. 0 = auto
      (`CPU_MEMBER_CHUNK` on CPU; all members of a device on accelerators, where a wide vmap
      fills the chip but a member's rounding then depends on the ensemble's size).
    memory_budget: with `member_chunk=0`, bytes a device may use for a chunk's program: the
      chunk is then the most members that fit (`memory.chunk_from_programs`, sized at the
      first epoch from XLA's memory analysis; at most `CPU_MEMBER_CHUNK` on CPU). 0 = the
      device's free memory on accelerators (all of a device's members where it is not
      reported), `CPU_MEMBER_CHUNK` on CPU.
  """
  model: nn.Module
  tx: optax.GradientTransformation
  augment: bool = False
  member_strategy: str = "auto"
  epoch_loop: str = "auto"
  mesh: Mesh | None = None
  member_chunk: int = 0
  memory_budget: int = 0

  def __post_init__(self):
    if self.member_strategy not in MEMBER_STRATEGIES:
      raise ValueError(f"unknown member_strategy {self.member_strategy!r}; valid: "
                       f"{', '.join(MEMBER_STRATEGIES)}")
    if self.epoch_loop not in EPOCH_LOOPS:
      raise ValueError(f"unknown epoch_loop {self.epoch_loop!r}; valid: {', '.join(EPOCH_LOOPS)}")
    if not isinstance(self.member_chunk, int) or self.member_chunk < 0:
      raise ValueError(f"member_chunk={self.member_chunk!r}: need an int >= 0 (0 = auto)")
    self._compiled = {}

  # ------------------------------------------------------------------ init

  def init(self, init_keys: jax.Array, example_x: np.ndarray,
           lr_scale: np.ndarray | None = None) -> MemberState:
    """Initialises one member per key, each from its own key.

    Args:
      init_keys: `[R]` PRNG keys.
      example_x: `[B, ...]` a batch of inputs (shapes only).
      lr_scale: optional float `[R]` per-member learning-rate multipliers (default 1).
    Returns:
      MemberState with a leading `[R]` axis on every leaf.
    """
    x = jnp.asarray(example_x[:1])
    num_runs = init_keys.shape[0]
    if lr_scale is None:
      lr_scale = np.ones(num_runs, np.float32)
    lr_scale = np.asarray(lr_scale, np.float32)
    if lr_scale.shape != (num_runs,) or not np.all(lr_scale > 0):
      raise ValueError(f"member learning-rate scales {lr_scale.tolist()}: need {num_runs} "
                       "positive values, one per member")

    def init_one(key, scale):
      variables = self.model.init(key, x, train=False)
      params = variables["params"]
      return MemberState(params=params, batch_stats=variables.get("batch_stats", {}),
                         opt_state=self.tx.init(params), diverged=jnp.array(False),
                         diverged_step=jnp.array(-1, jnp.int32), lr_scale=scale)
    state = jax.jit(jax.vmap(init_one))(init_keys, jnp.asarray(lr_scale))
    self.resolve(state.params)
    return self.shard(state)

  def resolve(self, stacked_params):
    """Chooses the member strategy, epoch loop, member chunk and devices for members of these
    stacked parameters `[R, ...]` (`init` calls it; an engine built around members trained
    elsewhere calls it itself)."""
    backend = jax.default_backend()
    # Convolutions computed as patches @ kernel (models.patch_conv) run as dots: like dense layers
    # they vmap to batched matmuls and stay fast inside lax.scan.
    conv = (_has_conv(jax.tree_util.tree_map(lambda a: a[0], stacked_params))
            and models.conv_impl_of(self.model) != "patches")
    member_params = sum(int(np.prod(a.shape[1:]))
                        for a in jax.tree_util.tree_leaves(stacked_params))
    self.resolved_member_strategy, self.resolved_epoch_loop = resolve_strategy(
        self.member_strategy, self.epoch_loop, backend, conv, member_params)
    if not isinstance(self.memory_budget, int) or self.memory_budget < 0:
      raise ValueError(f"memory_budget={self.memory_budget!r}: need an int >= 0 bytes (0 = the "
                       "device's free memory)")
    # Sized from memory at the first epoch (chunk_size), once the chunk program's shapes are known.
    self._chunk_from_memory = not self.member_chunk and (backend != "cpu" or self.memory_budget > 0)
    self.chunk_plan = None
    self.resolved_member_chunk = self.member_chunk or (
        CPU_MEMBER_CHUNK if backend == "cpu" and not self._chunk_from_memory else 0)
    if self.mesh is not None and self.resolved_member_strategy == "loop":
      if backend == "cpu" and jax.process_count() == 1:
        # Members that loop (XLA convolutions, wide dense layers) already use every core, and
        # sharded they would have to run vmapped, 2-3x slower: loop on one device instead.
        logging.info("member_strategy=loop on CPU: members run on one device, not sharded over "
                     "%d", self.mesh.size)
        self.mesh = None
      else:
        self.resolved_member_strategy = "vmap"  # sharding needs one program over the runs axis
    g = self.resolved_member_chunk
    if self.mesh is not None and self.resolved_member_strategy == "vmap" and g and (
        jax.process_count() == 1):  # (several processes: each keeps its devices' members)
      # No more devices than chunks: a device with fewer members than a chunk computes a whole
      # padded chunk (4 members over 2 devices would compute 16 member-epochs, on one 8).
      num_runs = jax.tree_util.tree_leaves(stacked_params)[0].shape[0]
      d = max(k for k in range(1, min(self.mesh.size, -(-num_runs // g)) + 1)
              if num_runs % k == 0)
      if d < self.mesh.size:
        logging.info("%d members in chunks of %d: %d device(s) of %d", num_runs, g, d,
                     self.mesh.size)
        self.mesh = Mesh(np.array(list(self.mesh.devices.flat)[:d]), ("runs",)) if d > 1 else None

  def shard(self, tree):
    """Places the leading runs axis of every leaf on the mesh (no-op without a mesh)."""
    if self.mesh is None:
      return tree
    return _put_global(tree, NamedSharding(self.mesh, P("runs")))

  def place(self, tree, num_runs: int):
    """Lays out device arrays as the engine's state is: leaves with a leading `[num_runs]` axis
    sharded over the mesh, the others replicated; NumPy leaves stay on the host. Restored
    checkpoints go through this, so they land where the live state they replace lives."""
    def one(a):
      if not isinstance(a, jax.Array):
        return a
      if a.ndim and a.shape[0] == num_runs:
        return self.shard(a)
      return self.replicate(a)
    return jax.tree_util.tree_map(one, tree)

  def replicate(self, tree):
    if self.mesh is None:
      return jax.device_put(tree)
    return _put_global(tree, NamedSharding(self.mesh, P()))

  # ------------------------------------------------------------------ the step

  def variables(self, st: MemberState) -> dict:
    v = {"params": st.params}
    if st.batch_stats:
      v["batch_stats"] = st.batch_stats
    return v

  def member_step(self, st: MemberState, x_all, y_all, idx, aug_key, step):
    """One SGD step of one member on the examples `idx` (`[B]`) of (`x_all`, `y_all`).

    A member whose loss or new parameters are non-finite keeps its previous state and is marked
    diverged; members are independent, so this never affects the others.

    Returns:
      (new state, {"loss": [B] per-example loss, "correct": [B] bool}).
    """
    x = x_all[idx]
    y = y_all[idx]
    if self.augment and x.ndim == 4:
      x = data_lib.augment_images(jax.random.fold_in(aug_key, step), x)
    has_bn = bool(st.batch_stats)
    # User models (models.build_model's adapter) get a per-member, per-step "dropout" stream;
    # built-in models have no randomness in training and are called as before (bit-identical).
    rngs = ({"rngs": {"dropout": jax.random.fold_in(jax.random.fold_in(aug_key, step),
                                                    _DROPOUT_STREAM)}}
            if getattr(self.model, "needs_rngs", False) else {})

    def loss_fn(params):
      v = {"params": params}
      if has_bn:
        v["batch_stats"] = st.batch_stats
        (logits, _), upd = self.model.apply(v, x, train=True, mutable=["batch_stats"], **rngs)
        new_bs = upd["batch_stats"]
      else:
        logits, _ = self.model.apply(v, x, train=True, **rngs)
        new_bs = st.batch_stats
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return losses.mean(), (losses, logits, new_bs)

    (loss, (losses, logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params)
    updates, new_opt = self.tx.update(grads, st.opt_state, st.params)
    # Scaling the final update scales the learning rate (SGD with momentum, Adam); x1.0 is exact.
    updates = jax.tree_util.tree_map(lambda u: u * st.lr_scale.astype(u.dtype), updates)
    new_params = optax.apply_updates(st.params, updates)
    ok = jnp.isfinite(loss) & _all_finite(new_params) & ~st.diverged
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
    newly = ~ok & ~st.diverged
    new_state = MemberState(
        params=keep(new_params, st.params), batch_stats=keep(new_bs, st.batch_stats),
        opt_state=keep(new_opt, st.opt_state), diverged=st.diverged | newly,
        diverged_step=jnp.where(newly, jnp.asarray(step, jnp.int32), st.diverged_step),
        lr_scale=st.lr_scale)
    return new_state, {"loss": losses, "correct": jnp.argmax(logits, -1) == y}

  # ------------------------------------------------------------------ an epoch

  def train_epoch(self, state: MemberState, x_all, y_all, idx: jax.Array, aug_keys: jax.Array,
                  step0: int):
    """Runs one epoch for every member.

    Args:
      state: stacked MemberState `[R]`; donated (updated in place: use the returned state).
      x_all, y_all: the training set on device, `[N, ...]` and `[N]`.
      idx: int32 `[R, S, B]`, each member's batches for this epoch.
      aug_keys: `[R]` augmentation keys.
      step0: global step of the first batch.
    Returns:
      (state, {"loss": [R, S, B], "correct": [R, S, B]}) as the members saw their batches.
    """
    if self.resolved_member_strategy == "vmap":
      return self._chunked_epoch(state, x_all, y_all, idx, aug_keys, step0)
    return self._loop_epoch(state, x_all, y_all, idx, aug_keys, step0)

  def _get(self, name, builder):
    if name not in self._compiled:
      self._compiled[name] = builder()
    return self._compiled[name]

  def _chunk_epoch_fn(self):
    """The one program that trains a chunk of exactly `chunk` vmapped members for an epoch.

    Every member of every ensemble runs through a program of this one shape, on whichever
    device, so its arithmetic does not depend on how many members share its device or chunk:
    XLA:CPU picks its dot kernels by the batch size and the partitioning (a member vmapped with
    4 others, or in a 2-device `shard_map`, rounds differently from one trained alone, and
    training amplifies it: 0.61 in a parameter after 10 epochs).
    """
    vstep = jax.vmap(self.member_step, in_axes=(0, None, None, 0, 0, None))
    if self.resolved_epoch_loop == "python":
      return jax.jit(vstep, donate_argnums=(0,))

    def epoch(state, x_all, y_all, idx, aug_keys, step0):
      def body(st, inp):
        idx_s, s = inp
        return vstep(st, x_all, y_all, idx_s, aug_keys, step0 + s)
      steps = jnp.arange(idx.shape[1], dtype=jnp.int32)
      state, out = jax.lax.scan(body, state, (jnp.swapaxes(idx, 0, 1), steps))
      return state, jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), out)
    return jax.jit(epoch, donate_argnums=(0,))

  def member_blocks(self, num_runs: int, local: bool = False) -> list[tuple[Any, int, int]]:
    """How the runs axis lies on devices: `[(device, first, stop)]`, one block per device (the
    mesh's row blocks, or every member on the one device without a mesh); with `local`, only
    the blocks on this process's devices (all of them in a single-process run)."""
    if self.mesh is None:
      return [(None, 0, num_runs)]
    per = num_runs // self.mesh.size
    return [(d, k * per, (k + 1) * per) for k, d in enumerate(self.mesh.devices.flat)
            if not local or d.process_index == jax.process_index()]

  def chunk_size(self, num_runs: int, program: tuple[Callable, tuple] | None = None) -> int:
    """Members per vmapped chunk: `resolved_member_chunk`, or (0, accelerators) all members of a
    device.

    With `member_chunk=0` on an accelerator (or a `memory_budget`), the first call given the
    chunk program `(jitted fn, its arguments for all members)` sizes the chunk from XLA's memory
    analysis of `fn` at 1 and 2 members against the budget (`memory.chunk_from_programs`), and
    keeps it (`resolved_member_chunk`, `chunk_plan`) for training and scoring alike.
    """
    blocks = self.member_blocks(num_runs)
    block = max(stop - first for _, first, stop in blocks)
    if getattr(self, "_chunk_from_memory", False) and program is not None:
      fn, args = program
      budget = self.memory_budget or memory.free_bytes(
          [d for d, _, _ in blocks] if blocks[0][0] is not None else jax.local_devices()[:1])
      self._chunk_from_memory = False
      if budget:
        resident = memory.tree_bytes(args[1:3])  # the training set: on the device already
        lower = lambda c: (fn.lower(*memory.shape_chunk(
            args, (True, False, False, True, True, False), c)).compile(), resident)
        self.chunk_plan = memory.chunk_from_programs(
            lower, block, budget, CPU_MEMBER_CHUNK if jax.default_backend() == "cpu" else 0)
        self.resolved_member_chunk = self.chunk_plan.chunk
        logging.info("member chunks of %d (of %d members per device) from memory: %s",
                     self.chunk_plan.chunk, block, self.chunk_plan)
    return self.resolved_member_chunk or block

  def _chunked_epoch(self, state, x_all, y_all, idx, aug_keys, step0):
    """Each device trains its block of members in chunks of `chunk_size` (the last chunk padded
    with copies of its last member, whose results are dropped), one chunk's epoch after another,
    every chunk through the same compiled program (`_chunk_epoch_fn`)."""
    fn = self._get("chunk_epoch", self._chunk_epoch_fn)
    idx_arg = idx if self.resolved_epoch_loop == "scan" else jax.ShapeDtypeStruct(
        idx.shape[:1] + idx.shape[2:], idx.dtype)  # one step's batches
    chunk = self.chunk_size(idx.shape[0], (fn, (state, x_all, y_all, idx_arg, aug_keys,
                                                jnp.int32(step0))))
    take, join = self._get("take_chunk", _take_chunk_fn), self._get("join", _join_fn)
    step0 = jnp.int32(step0)

    def block(item):
      device, (st_b, idx_b, keys_b) = item
      x_d, y_d = self._on_device(x_all, device), self._on_device(y_all, device)
      n = idx_b.shape[0]
      outs = []
      for first in range(0, n, chunk):
        st_c, idx_c, keys_c = take((st_b, idx_b, keys_b), jnp.int32(first), chunk)
        if self.resolved_epoch_loop == "scan":
          outs.append(fn(st_c, x_d, y_d, idx_c, keys_c, step0))
        else:
          seen = []
          for s in range(idx_c.shape[1]):
            st_c, o = fn(st_c, x_d, y_d, idx_c[:, s], keys_c, step0 + s)
            seen.append(o)
          outs.append((st_c, jax.tree_util.tree_map(lambda *a: jnp.stack(a, 1), *seen)))
      return join(tuple(outs), n)

    # One thread per device: XLA:CPU runs a program on the thread that dispatches it, so the
    # devices' blocks only overlap when dispatched from threads of their own.
    blocks = _local_blocks((state, idx, aug_keys), self.member_blocks(idx.shape[0], local=True))
    new_blocks = _per_device(block, blocks)
    return _assemble(new_blocks, self.mesh, idx.shape[0])

  def map_members(self, fn: Callable[[Any], Any], tree: Any) -> Any:
    """`fn(chunk)` over the members of a stacked `tree`, in the chunks training uses.

    Each device's block of members goes through `fn` in chunks of exactly `chunk_size` members
    (the last padded, its padding dropped), the devices in parallel threads, so a member's
    scores, like its training, come from programs of one shape in any ensemble.

    Args:
      fn: `(tree with a leading [chunk] axis) -> pytree of arrays [chunk, ...]`.
      tree: every leaf `[R, ...]`.
    Returns:
      `fn`'s pytree with NumPy leaves `[R, ...]`.
    """
    num_runs = jax.tree_util.tree_leaves(tree)[0].shape[0]
    chunk = self.chunk_size(num_runs)
    take = self._get("take_chunk", _take_chunk_fn)

    def block(item):
      _, t = item
      n = jax.tree_util.tree_leaves(t)[0].shape[0]
      outs = []
      for first in range(0, n, chunk):
        res = jax.device_get(fn(take(t, jnp.int32(first), chunk)))
        outs.append(jax.tree_util.tree_map(lambda a, k=min(chunk, n - first): a[:k], res))
      return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *outs)

    results = _per_device(block, _local_blocks(tree, self.member_blocks(num_runs, local=True)))
    local = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *results)
    if jax.process_count() == 1 or self.mesh is None:
      return local
    # Each process holds the contiguous members of its devices (the mesh lists devices process
    # by process): every process gets every member's results, in member order.
    return distributed.concat_processes(local)

  def _on_device(self, array, device):
    """`array` (replicated over the mesh, or on one device) as a single-device array."""
    if device is None:
      return array
    for shard in array.addressable_shards:
      if shard.device == device:
        return shard.data
    return jax.device_put(array, device)

  def _member_fn(self):
    """One member's step, or (epoch_loop="scan") one member's epoch, jitted once."""
    if self.resolved_epoch_loop == "scan":
      def epoch(st, x_all, y_all, idx, aug_key, step0):
        def body(s_, inp):
          idx_s, s = inp
          return self.member_step(s_, x_all, y_all, idx_s, aug_key, step0 + s)
        steps = jnp.arange(idx.shape[0], dtype=jnp.int32)
        return jax.lax.scan(body, st, (idx, steps))
      return jax.jit(epoch, donate_argnums=(0,))

    def step(st, x_all, y_all, idx, s, aug_key, step0):
      return self.member_step(st, x_all, y_all, idx[s], aug_key, step0 + s)
    return jax.jit(step, donate_argnums=(0,))

  def _loop_epoch(self, state, x_all, y_all, idx, aug_keys, step0):
    """Members one after another, each taken out of the stacked state and written back in place
    (the stacked state is donated), so memory holds the ensemble once plus one member's working
    set: collecting the members and stacking them again held it three times (15 GiB for 128
    CIFAR-shaped MLPs of width 1024, BENCHMARKS.md)."""
    fn = self._get("member", self._member_fn)
    take, put = self._get("take", _take_fn), self._get("put", _put_fn)
    num_runs, num_steps = idx.shape[:2]
    step0 = jnp.int32(step0)
    outs = []
    for r in range(num_runs):
      r_ = jnp.int32(r)  # traced: one compilation for every member
      st = take(state, r_)
      idx_r, key_r = idx[r], aug_keys[r]
      if self.resolved_epoch_loop == "scan":
        st, out = fn(st, x_all, y_all, idx_r, key_r, step0)
      else:
        steps = []
        for s in range(num_steps):
          st, o = fn(st, x_all, y_all, idx_r, jnp.int32(s), key_r, step0)
          steps.append(o)
        out = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *steps)
      state = put(state, st, r_)
      outs.append(out)
    return state, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)

  # ------------------------------------------------------------------ evaluation

  def apply_fn(self, variables, x):
    """Evaluation-mode forward pass of one member: `(logits [B, C], out)`."""
    return self.model.apply(variables, x, train=False)

  def logits(self, state: MemberState, x: np.ndarray | jax.Array, chunk_size: int = 1024
             ) -> jax.Array:
    """Evaluation logits of every member on every example, in fixed-size jitted chunks.

    Returns:
      float32 `[R, N, C]` (a NumPy array where members are vmapped).
    """
    n = x.shape[0]
    chunk = min(chunk_size, n)
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    xp = jnp.asarray(x)
    if pad:
      xp = jnp.concatenate([xp, jnp.zeros((pad,) + xp.shape[1:], xp.dtype)])
    variables = self.variables(state)
    if self.resolved_member_strategy == "loop" and self.mesh is None:
      fn = self._get("eval_member", lambda: jax.jit(lambda v, xc: self.apply_fn(v, xc)[0]))
      take = self._get("take", _take_fn)
      num_runs = state.diverged.shape[0]
      per_member = []
      for r in range(num_runs):
        v = take(variables, jnp.int32(r))  # one dispatch, not one slice per leaf
        per_member.append(jnp.concatenate(
            [fn(v, xp[i * chunk:(i + 1) * chunk]) for i in range(num_chunks)]))
      out = jnp.stack(per_member)
    else:
      # The training's member chunks (map_members): a member's logits do not depend on the
      # ensemble around it, as its scores do not.
      fn = self._get("eval_vmap", lambda: jax.jit(
          jax.vmap(lambda v, xc: self.apply_fn(v, xc)[0], in_axes=(0, None))))
      out = self.map_members(lambda v: jnp.concatenate(
          [fn(v, xp[i * chunk:(i + 1) * chunk]) for i in range(num_chunks)], axis=1), variables)
    return out[:, :n]


# Folded into a member's augmentation key of a step for its dropout key ("drop").
_DROPOUT_STREAM = 0x64726F70


# Members this large (parameters) have matmuls big enough to fill the CPU on their own; batched
# over members they ran slower (MLP width 1024: vmap 0.81-0.95x a loop, BENCHMARKS.md).
CPU_LOOP_MIN_PARAMS = 2**18


# Members per chunk on CPU (`Engine.member_chunk`). Measured on this project's 2-core CPU, 2 devices,
# member-epochs/s, all of a device's members vmapped -> in chunks of 8: CNN R=64 24.6 -> 30.7,
# R=128 25.9 -> 34.2 (chunks of 4: 36.7; R=64 in chunks of 16: 26.7); MLP R=128 210 -> 235.
# A fixed chunk pads small ensembles (a 1-member run computes 8): see BENCHMARKS.md.
CPU_MEMBER_CHUNK = 8


def _take_fn():
  """Jitted `take(stacked, r)`: member r of a stacked tree."""
  return jax.jit(lambda tree, r: jax.tree_util.tree_map(
      lambda a: jax.lax.dynamic_index_in_dim(a, r, keepdims=False), tree))


def _put_fn():
  """Jitted `put(stacked, member, r)`: the stacked tree with member r replaced, in place (the
  stacked tree is donated)."""
  return jax.jit(lambda tree, member, r: jax.tree_util.tree_map(
      lambda a, m: jax.lax.dynamic_update_index_in_dim(a, m, r, 0), tree, member),
                 donate_argnums=(0,))


def _take_chunk_fn():
  """Jitted `take(tree, first, chunk)`: members `first .. first + chunk` of a stacked tree, the
  indices past its end clamped to its last member (the padding of a last, short chunk)."""
  def take(tree, first, chunk):
    def one(a):
      rows = jnp.minimum(first + jnp.arange(chunk), a.shape[0] - 1)
      return jnp.take(a, rows, axis=0)
    return jax.tree_util.tree_map(one, tree)
  return jax.jit(take, static_argnums=(2,))


def _join_fn():
  """Jitted `join(chunks, n)`: the chunks' outputs concatenated, trimmed to `n` members."""
  return jax.jit(lambda chunks, n: jax.tree_util.tree_map(
      lambda *a: jnp.concatenate(a)[:n], *chunks), static_argnums=(1,))


def _local_blocks(tree, blocks):
  """`[(device, tree of that device's block of members)]`: the single-device pieces of a tree
  whose leaves are sharded over `blocks` (or the tree itself without a mesh)."""
  if blocks[0][0] is None:
    return [(None, tree)]
  out = []
  for device, first, stop in blocks:
    def piece(a, device=device, first=first, stop=stop):
      for shard in a.addressable_shards:
        if shard.device == device and (shard.index[0].start or 0) == first:
          return shard.data
      return jax.device_put(a[first:stop], device)  # not laid out on the mesh (yet)
    out.append((device, jax.tree_util.tree_map(piece, tree)))
  return out


@functools.lru_cache(maxsize=None)
def _reshard_fn(sharding):
  """Jitted identity onto `sharding` (one compiled program per layout, not one per call)."""
  return jax.jit(lambda x: x, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _wrap_keys_fn(sharding):
  return jax.jit(jax.random.wrap_key_data, out_shardings=sharding, static_argnames="impl")


def _put_global(tree, sharding):
  """`jax.device_put(tree, sharding)`, also where the sharding spans other processes' devices
  (multi-process runs): every process holds the whole value (host data, or an array computed
  alike on each process) and contributes the shards of its own devices."""
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return a if a.sharding == sharding else _reshard_fn(sharding)(a)
    if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      return _wrap_keys_fn(sharding)(one(jax.random.key_data(a)), impl=jax.random.key_impl(a))
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree_util.tree_map(one, tree)


def _per_device(fn, blocks):
  """`[fn(block) for block in blocks]`, each device's block in a thread of its own."""
  if len(blocks) == 1:
    return [fn(blocks[0])]
  with concurrent.futures.ThreadPoolExecutor(len(blocks)) as pool:
    return list(pool.map(fn, blocks))


def _assemble(blocks, mesh, num_runs):
  """Device blocks `[tree]` -> one tree sharded over the mesh's runs axis (or the one block)."""
  if mesh is None:
    return blocks[0]
  sharding = NamedSharding(mesh, P("runs"))
  return jax.tree_util.tree_map(
      lambda *a: jax.make_array_from_single_device_arrays((num_runs,) + a[0].shape[1:], sharding,
                                                          list(a)), *blocks)


def resolve_strategy(member_strategy: str, epoch_loop: str, backend: str, has_conv: bool,
                     member_params: int = 0) -> tuple[str, str]:
  """Chooses how members and steps run, from measurements on each backend.

  `has_conv`: the model has XLA convolutions (not `models.patch_conv`). On CPU, XLA lowers a
  vmapped convolution to a grouped convolution 3-4x slower than a loop of per-member steps, and
  convolutions inside `lax.scan` run 25-50x slower than called step by step (FIELD-NOTES,
  BENCHMARKS.md); dense models (and patch convolutions) gain from vmap and from scanning the
  epoch (dispatch). On GPU/TPU one small member leaves the chip idle, so members are vmapped and
  the epoch scanned. A dense member of >= `CPU_LOOP_MIN_PARAMS` parameters fills the CPU alone:
  members loop, each running its epoch in one scan.
  """
  wide = backend == "cpu" and member_params >= CPU_LOOP_MIN_PARAMS
  if member_strategy == "auto":
    member_strategy = "loop" if (backend == "cpu" and has_conv) or wide else "vmap"
  if epoch_loop == "auto":
    epoch_loop = "python" if (backend == "cpu" and has_conv) else "scan"
  return member_strategy, epoch_loop


def split_cpu(num_devices: int = 0) -> int | None:
  """Splits the host CPU into JAX devices, so that the engine shards members over its cores.

  XLA:CPU runs one program's small batched matmuls on about one core; with one JAX device per
  core, the runs axis is sharded over the cores (on this project's 2-core CPU the default MLP and
  CNN ensembles train 1.2-2x faster, BENCHMARKS.md). Members that loop on CPU (ResNet, VGG, wide
  MLPs) are not sharded (see `Engine`). Only the CPU platform's device count changes, so this is
  harmless where a GPU or TPU is the default backend.

  It must run before JAX starts its backends (before any JAX computation), as the experiment
  scripts do first thing; later it changes nothing. An explicit
  `XLA_FLAGS=--xla_force_host_platform_device_count=N` is left to win.

  Args:
    num_devices: CPU devices wanted: 0 = one per core available to this process, 1 = no split.

  Returns:
    the CPU device count set, or None if it was left unchanged (too late, or set by XLA_FLAGS).
  """
  if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 0:
    raise ValueError(f"cpu_devices={num_devices!r}: need 0 (one per core) or a positive int")
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return None
  n = num_devices or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1)
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    if n != jax.config.jax_num_cpu_devices and n > 1:
      logging.info("split_cpu(%d): JAX's backends already started; the CPU keeps its devices", n)
    return None
  jax.config.update("jax_num_cpu_devices", n)
  return n


def make_mesh(num_runs: int, num_devices: int = 0) -> Mesh | None:
  """A 1-D mesh over the largest number of devices (<= num_devices, 0 = all) dividing num_runs.

  Returns None when only one device would be used.
  """
  devices = jax.devices()
  if jax.process_count() > 1:
    # Every process trains the members of its own devices: all devices, each an equal block.
    if num_runs % len(devices):
      raise ValueError(f"num_runs={num_runs} is not divisible by the {len(devices)} devices of "
                       f"{jax.process_count()} processes; use a multiple of {len(devices)}")
    return Mesh(np.array(devices), ("runs",))
  limit = len(devices) if num_devices <= 0 else min(num_devices, len(devices))
  d = max(k for k in range(1, limit + 1) if num_runs % k == 0)
  if d < limit:
    logging.warning("num_runs=%d is not divisible by %d devices; using %d", num_runs, limit, d)
  if d == 1:
    return None
  return Mesh(np.array(devices[:d]), ("runs",))


def member_keys(seed: int, member_ids: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-member (init, data order, augmentation) keys, derived with fold_in from the seed and the
  member's id, so member i gets the same keys in any ensemble that contains it.

  Returns:
    three `[R]` key arrays.
  """
  base = jax.random.key(seed)
  ids = jnp.asarray(member_ids, jnp.uint32)
  mk = jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)
  derive = lambda tag: jax.vmap(lambda k: jax.random.fold_in(k, tag))(mk)
  return derive(0), derive(1), derive(2)

"""Training throughput of the jaxdiff engine against a Python loop over members (and PyTorch).

  python benchmarks/bench_train.py                       # MNIST-1D MLP + CNN, R in {1, 8, 32}
  python benchmarks/bench_train.py --archs=mlp,cnn,resnet,resnet_noskip,vgg --runs=1,8,32,128 \
      --shape=cifar                                      # CIFAR-shaped 32x32x3 data
  python benchmarks/bench_train.py --cpu_devices=1       # one CPU device (default: one per core)

Prints a table and writes benchmarks/results/train_<shape>.json. Everything is measured in one run,
as ratios (the machine is shared and noisy): member-epochs per second of
  engine:  the engine as train.py runs it (member_strategy/epoch_loop "auto"),
  vmap:    one vmapped program (epoch scanned for dense models, step by step for conv),
  loop:    a Python loop over members, each calling the same jitted per-member step per batch,
  torch:   a PyTorch loop over members, one model at a time (if torch is installed),
and achieved FLOP/s (XLA's cost analysis of one member step, times steps) against a 2048^2 matmul
timed just before and after each engine timing (the larger of the two: the host's speed drifts).
Memory of the engine (json): `engine_program_bytes`, what XLA plans per device for the training
program (column MiB); `engine_peak_rss_bytes`, the process's peak resident memory while it ran
(Linux); `engine_device_peak_bytes` where the backend reports it (GPU/TPU).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import data as data_lib  # pylint: disable=g-import-not-at-top
from jaxdiff import ensemble as ens
from jaxdiff import memory as memory_lib
from jaxdiff import models
from jaxdiff import store
import memory  # pylint: disable=g-import-not-at-top,g-bad-import-order  (benchmarks/memory.py)

_ARCHS = flags.DEFINE_list("archs", ["mlp", "cnn"], "Architectures (keys of ARCHS).")
_RUNS = flags.DEFINE_list("runs", ["1", "8", "32"], "Ensemble sizes R.")
_SHAPE = flags.DEFINE_enum("shape", "mnist1d", ["mnist1d", "cifar"], "Input shape.")
_STEPS = flags.DEFINE_integer("steps", 0, "Steps per timed epoch (0 = a full epoch).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median).")
_TORCH = flags.DEFINE_bool("torch", True, "Include the PyTorch loop if torch is importable.")
_STRATEGIES = flags.DEFINE_list("strategies", ["engine", "vmap", "loop", "torch"], "What to time.")
_OUT = flags.DEFINE_string("out", "", "Output json (default benchmarks/results/train_<shape>.json).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "Split the CPU into this many JAX devices (0 = one per core, as the "
    "experiment scripts do; 1 = no split) and shard the engine's "
    "runs axis over them (XLA:CPU runs the batched small matmuls of one program on ~1 core).")

ARCHS = {
    "mlp": {"name": "mlp", "width": 100, "depth": 2},
    "mlp1024": {"name": "mlp", "width": 1024, "depth": 2},
    "cnn": {"name": "cnn", "width": 32, "depth": 3, "kernel_size": 5, "stride": 2, "pool": False,
            "head": "flatten"},
    "resnet": {"name": "resnet", "depth": 20, "width": 16, "skip": True},
    "resnet_noskip": {"name": "resnet", "depth": 20, "width": 16, "skip": False},
    "vgg": {"name": "vgg", "depth": 11, "width_mult": 0.25, "batch_norm": True},
}
BATCH = 128


def matmul_peak(n=2048, repeats=5):
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    ts.append(time.perf_counter() - t)
  return 2 * n**3 / np.median(ts)


def dataset(shape, n):
  if shape == "mnist1d":
    ds = data_lib.load_dataset({"name": "mnist1d"})
    return ds.x_train[:n], ds.y_train[:n]
  rng = np.random.default_rng(0)
  return rng.normal(size=(n, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)


def time_fn(fn, repeats):
  fn()  # compile + warm up
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def bench_jax(arch, num_runs, x, y, steps, strategy, repeats):
  cfg = ARCHS[arch]
  if strategy == "loop" and cfg["name"] != "mlp":
    cfg = dict(cfg, conv_impl="xla")  # the naive loop uses XLA's convolution, as a user would
  model = models.build_model(cfg, 10)
  tx = ens.make_optimizer({"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4},
                          steps, 10)
  mesh = None
  if strategy == "engine":
    mesh = ens.make_mesh(num_runs)  # as train.py: all devices (members that loop stay on one)
    engine = ens.Engine(model, tx, mesh=mesh)
  elif strategy == "vmap":
    engine = ens.Engine(model, tx, member_strategy="vmap")
  else:  # the naive loop: same jitted per-member step, called per member per batch
    engine = ens.Engine(model, tx, member_strategy="loop", epoch_loop="python")
  ik, dk, ak = ens.member_keys(0, np.arange(num_runs))
  state = [engine.init(ik, x[:1])]
  if strategy == "vmap" and engine.resolved_member_strategy == "vmap":
    engine.resolved_epoch_loop = "scan" if not ens._has_conv(  # pylint: disable=protected-access
        jax.tree_util.tree_map(lambda a: a[0], state[0].params)) else "python"
  xd, yd = engine.replicate(jnp.asarray(x)), engine.replicate(jnp.asarray(y))
  idx = engine.shard(data_lib.epoch_permutations(dk, 1, x.shape[0], BATCH)[:, :steps])
  ak = engine.shard(ak)
  jax.block_until_ready(idx)

  def epoch():
    state[0], out = engine.train_epoch(state[0], xd, yd, idx, ak, 0)
    jax.block_until_ready((state[0], out))
  memory.reset_peak_rss()
  seconds = time_fn(epoch, repeats)
  devices = f" x{engine.mesh.size}" if engine.mesh is not None else ""
  chunk = f" c{engine.chunk_size(num_runs)}" if engine.resolved_member_strategy == "vmap" else ""
  resolved = engine.resolved_member_strategy + "/" + engine.resolved_epoch_loop + devices + chunk
  if strategy != "engine":  # FLOPs and memory are reported for the engine only
    return seconds, None, resolved, {}
  mem = {"peak_rss_bytes": memory.peak_rss_bytes(), "device_peak_bytes": memory.device_peak_bytes(),
         "program_bytes": _program_bytes(engine, state[0], xd, yd, idx, ak)}
  # FLOPs of one member step from XLA's cost analysis.
  st1 = jax.device_get(jax.tree_util.tree_map(lambda a: a[0], state[0]))
  lowered = jax.jit(engine.member_step).lower(st1, np.asarray(x), np.asarray(y),
                                              np.asarray(idx[0, 0]), ak[0], jnp.int32(0))
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0)) * steps * num_runs
  return seconds, flops, resolved, mem


def _program_bytes(engine, state, x, y, idx, keys):
  """Per-device bytes XLA plans for the engine's training program (a looping member's program
  plus the whole ensemble's state, which stays resident)."""
  # pylint: disable=protected-access
  s0 = jnp.int32(0)
  if engine.resolved_member_strategy == "vmap":  # one chunk's program (Engine._chunk_epoch_fn)
    idx_arg = idx if engine.resolved_epoch_loop == "scan" else idx[:, 0]
    args = memory_lib.shape_chunk((state, x, y, idx_arg, keys, s0),
                                  (True, False, False, True, True, False),
                                  engine.chunk_size(idx.shape[0]))
    return memory.program_bytes(engine._compiled["chunk_epoch"], *args)
  one = jax.tree_util.tree_map(lambda a: a[0], state)
  args = ((one, x, y, idx[0], keys[0], s0) if engine.resolved_epoch_loop == "scan"
          else (one, x, y, idx[0], s0, keys[0], s0))
  state_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(state))
  return memory.program_bytes(engine._compiled["member"], *args) + state_bytes


def bench_torch(arch, num_runs, x, y, steps, repeats):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  cfg = ARCHS[arch]
  spatial = x.ndim == 2

  def make():
    if cfg["name"] == "mlp":
      d = int(np.prod(x.shape[1:]))
      return nn.Sequential(nn.Flatten(), nn.Linear(d, cfg["width"]), nn.ReLU(),
                           nn.Linear(cfg["width"], cfg["width"]), nn.ReLU(),
                           nn.Linear(cfg["width"], 10))
    if cfg["name"] == "cnn" and spatial:
      layers, cin, length = [], 1, x.shape[1]
      for _ in range(cfg["depth"]):
        layers += [nn.Conv1d(cin, cfg["width"], cfg["kernel_size"], cfg["stride"],
                             padding=cfg["kernel_size"] // 2), nn.ReLU()]
        cin, length = cfg["width"], (length + 1) // 2
      return nn.Sequential(nn.Unflatten(1, (1, x.shape[1])), *layers, nn.Flatten(),
                           nn.Linear(cin * length, 10))
    return None
  models_ = [make() for _ in range(num_runs)]
  if models_[0] is None:
    return None
  opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
          for m in models_]
  xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
  perms = [np.random.default_rng(r).permutation(x.shape[0]) for r in range(num_runs)]
  loss_fn = nn.CrossEntropyLoss()

  def epoch():
    for m, o, p in zip(models_, opts, perms):
      for s in range(steps):
        b = torch.from_numpy(p[s * BATCH:(s + 1) * BATCH])
        o.zero_grad()
        loss_fn(m(xt[b]), yt[b]).backward()
        o.step()
  return time_fn(epoch, repeats)


def main(argv):
  del argv
  ens.split_cpu(_CPU_DEVICES.value)  # before the backend starts
  n = 4000 if _SHAPE.value == "mnist1d" else 50000
  x, y = dataset(_SHAPE.value, n)
  steps = _STEPS.value or n // BATCH
  full_steps = n // BATCH
  peak = matmul_peak()
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    have_torch = _TORCH.value
  except ImportError:
    have_torch = False
  rows = []
  print(f"backend={jax.default_backend()} devices={len(jax.devices())} "
        f"(engine sharded over up to {len(jax.devices())}) "
        f"matmul peak={peak / 1e9:.0f} GFLOP/s  shape={_SHAPE.value} steps={steps}/{full_steps}")
  hdr = f"{'arch':<14}{'R':>4}  {'strategy':<12}" + "".join(
      f"{s + ' ep/s':>13}" for s in _STRATEGIES.value) + f"{'eng/loop':>9}{'eng/torch':>10}{'%peak':>7}{'MiB':>7}"
  print(hdr)
  for arch in _ARCHS.value:
    for r in map(int, _RUNS.value):
      row = {"arch": arch, "runs": r, "steps": steps, "shape": _SHAPE.value}
      for s in _STRATEGIES.value:
        if s == "torch":
          t = bench_torch(arch, r, x, y, steps, _REPEATS.value) if have_torch else None
          row["torch_s"] = t
          continue
        if s == "engine":  # the peak next to this timing: a shared host's speed drifts
          before = matmul_peak()
        t, flops, resolved, mem = bench_jax(arch, r, x, y, steps, s, _REPEATS.value)
        row[f"{s}_s"] = t
        if s == "engine":
          row.update({f"engine_{k}": v for k, v in mem.items()})
          local_peak = max(before, matmul_peak())  # the larger of before and after: conservative
          peak = max(peak, local_peak)
          row["engine_strategy"] = resolved
          row["flops_per_s"] = flops / t
          row["matmul_peak_flops"] = local_peak
          row["pct_peak"] = 100 * flops / t / local_peak
      # member-epochs per second, scaled to a full epoch
      for s in _STRATEGIES.value:
        t = row.get(f"{s}_s")
        row[f"{s}_member_epochs_per_s"] = (r * steps / full_steps / t) if t else None
      row["engine_over_loop"] = (row["loop_s"] / row["engine_s"]) if row.get("loop_s") else None
      row["engine_over_torch"] = (row["torch_s"] / row["engine_s"]) if row.get("torch_s") else None
      rows.append(row)
      fmt = lambda v, f: (f % v) if v is not None else "-"
      mib = lambda b: b / 2**20 if b is not None else None
      print(f"{arch:<14}{r:>4}  {row.get('engine_strategy', '-'):<12}" + "".join(
          f"{fmt(row.get(f'{s}_member_epochs_per_s'), '%.2f'):>13}" for s in _STRATEGIES.value)
            + f"{fmt(row['engine_over_loop'], '%.2fx'):>9}{fmt(row['engine_over_torch'], '%.2fx'):>10}"
            + f"{fmt(row.get('pct_peak'), '%.0f'):>7}"
            + f"{fmt(mib(row.get('engine_program_bytes')), '%.1f'):>7}", flush=True)
  out = _OUT.value or os.path.join(os.path.dirname(__file__), "results", f"train_{_SHAPE.value}.json")
  store.atomic_write_json(out, {"backend": jax.default_backend(), "matmul_peak_flops": peak,
                                "engine_devices": len(jax.devices()), "rows": rows})
  print("wrote", out)


if __name__ == "__main__":
  app.run(main)

"""What jaxdiff needs checked on an accelerator, in one run: correctness, speed, memory, determinism.

  python benchmarks/accelerator_check.py                 # one GPU/TPU: under ~8 minutes (untimed
                                                         # so far: no accelerator was lent yet)
  python benchmarks/accelerator_check.py --smoke         # CPU, tiny shapes, R=1,2, 1 step (CI)

Prints and writes (`--out`, default benchmarks/results/accelerator_check.json):
  checks       vmap vs loop members (max |difference| of every parameter; the per-member
               parameters are saved next to the JSON as <out>.npz for anyone to recompare),
               the runs axis sharded over the local devices vs one device, GraNd "ghost" vs
               the "vmap" reference;
  speed        member-epochs/s of the engine, of a Python loop over members (R <= --loop_max_runs:
               its speed does not grow with R) and of a PyTorch loop (where torch imports and
               bench_train.py has the model) for MLP, CNN, ResNet-20 with and without skips and
               VGG on CIFAR-shaped random data, R = 1, 8, 32, 64; the engine's strategy and member
               chunk (sized from memory on accelerators), XLA's planned bytes of its program and
               the device's peak bytes in use so far (`memory_stats()`, where reported);
  determinism  `--xla_gpu_deterministic_ops=true` against the default, each in a fresh process:
               seconds per epoch (ratio) and whether two identical trainings give bit-identical
               members.
Needs jax, flax, optax, numpy and ml-collections (jaxdiff.config imports it); see README
"Accelerator check" for bringing ml-collections as a wheel to a machine without it.
"""

import argparse
import io
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # pylint: disable=g-import-not-at-top,g-bad-import-order  (benchmarks/)
from jaxdiff import data as data_lib  # pylint: disable=g-import-not-at-top
from jaxdiff import ensemble as ens
from jaxdiff import models
from jaxdiff import store
from jaxdiff.scores import grand

ARCHS = ("mlp", "cnn", "resnet", "resnet_noskip", "vgg")
DETERMINISM_FLAG = "--xla_gpu_deterministic_ops=true"
SMOKE_ARCHS = {"mlp": {"name": "mlp", "width": 16, "depth": 1},
               "cnn": {"name": "cnn", "width": 4, "depth": 1, "kernel_size": 3, "stride": 2,
                       "pool": False, "head": "flatten"}}


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny shapes, R=1,2, 1 step")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "accelerator_check.json"))
  p.add_argument("--archs", default=",".join(ARCHS))
  p.add_argument("--runs", default="1,8,32,64")
  p.add_argument("--steps", type=int, default=10, help="steps per timed epoch (of 390)")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--loop_max_runs", type=int, default=8)
  p.add_argument("--determinism_worker", default="", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.smoke:
    a.archs, a.runs, a.steps, a.repeats = "mlp", "1,2", 1, 1
  bad = sorted(set(a.archs.split(",")) - set(ARCHS))
  if bad:
    p.error(f"--archs {bad}: valid {list(ARCHS)}")
  return a


def _arch(name, smoke):
  return SMOKE_ARCHS[name] if smoke else bench_train.ARCHS[name]


def _data(smoke, n=None):
  """CIFAR-shaped random data (8x8x3 and 64 examples in smoke mode)."""
  rng = np.random.default_rng(0)
  side, n = (8, n or 64) if smoke else (32, n or 50000)
  return (rng.normal(size=(n, side, side, 3)).astype(np.float32),
          rng.integers(0, 10, n).astype(np.int32))


def _train(cfg, x, y, num_runs, steps, **engine_kw):
  """Trains `num_runs` members for `steps` steps of batch 8/128; returns (engine, state, s/epoch
  of the second epoch)."""
  batch = min(bench_train.BATCH, x.shape[0] // max(steps, 1))
  model = models.build_model(cfg, 10)
  eng = ens.Engine(model, ens.make_optimizer({"name": "sgd", "lr": 0.01, "momentum": 0.9},
                                             steps, 2), **engine_kw)
  ik, dk, ak = ens.member_keys(0, np.arange(num_runs))
  state = eng.init(ik, x[:1])
  xd, yd, ak = eng.replicate(jnp.asarray(x)), eng.replicate(jnp.asarray(y)), eng.shard(ak)
  seconds = 0.0
  for e in (1, 2):
    idx = eng.shard(data_lib.epoch_permutations(dk, e, x.shape[0], batch)[:, :steps])
    t = time.perf_counter()
    state, out = eng.train_epoch(state, xd, yd, idx, ak, (e - 1) * steps)
    jax.block_until_ready((state, out))
    seconds = time.perf_counter() - t
  return eng, jax.device_get(state), seconds


def _flat(state):
  """Every member's parameters and batch statistics as one float vector each: `[R, P]`."""
  leaves = jax.tree_util.tree_leaves((state.params, state.batch_stats))
  return np.concatenate([np.asarray(a, np.float64).reshape(a.shape[0], -1) for a in leaves], 1)


def _compare(a, b, rtol):
  diff = float(np.max(np.abs(a - b)))
  scale = float(np.max(np.abs(b)))
  return {"max_abs_diff": diff, "max_abs_value": scale, "rtol": rtol,
          "bit_identical": bool(np.array_equal(a, b)), "equal_within_rtol": diff <= rtol * scale}


def check_members(smoke, arrays):
  """vmap vs loop (same members, same steps), and the runs axis sharded vs on one device."""
  x, y = _data(smoke, 64 if smoke else 2048)
  runs, steps = (2, 2) if smoke else (8, 4)
  out = {}
  for arch in ("mlp",) if smoke else ("mlp", "cnn"):
    cfg = _arch(arch, smoke)
    _, vm, _ = _train(cfg, x, y, runs, steps, member_strategy="vmap")
    _, lp, _ = _train(cfg, x, y, runs, steps, member_strategy="loop")
    arrays[f"{arch}_vmap"], arrays[f"{arch}_loop"] = _flat(vm), _flat(lp)
    out[f"vmap_vs_loop_{arch}"] = _compare(_flat(vm), _flat(lp), 1e-4)
  devices = len(jax.local_devices())
  if devices < 2:
    out["sharded_vs_one_device"] = "skipped: 1 local device"
  else:
    cfg = _arch("mlp", smoke)
    n = devices * runs
    _, sh, _ = _train(cfg, x, y, n, steps, member_strategy="vmap", mesh=ens.make_mesh(n))
    _, one, _ = _train(cfg, x, y, n, steps, member_strategy="vmap")
    arrays["sharded"], arrays["one_device"] = _flat(sh), _flat(one)
    out["sharded_vs_one_device"] = dict(_compare(_flat(sh), _flat(one), 1e-4), devices=devices)
  return out


def check_grand(smoke):
  """GraNd by per-layer norms ("ghost") against per-example gradients ("vmap"), ResNet-20 (CNN
  in smoke mode) with batch norm's running statistics."""
  x, y = _data(smoke, 32 if smoke else 256)
  cfg = _arch("cnn" if smoke else "resnet", smoke)
  eng, state, _ = _train(cfg, x, y, 2, 1)
  v = eng.variables(state)
  ghost = grand.grand_scores(eng.apply_fn, v, x, y, chunk_size=64, method="ghost")
  ref = grand.grand_scores(eng.apply_fn, v, x, y, chunk_size=64, method="vmap")
  return _compare(np.asarray(ghost, np.float64), np.asarray(ref, np.float64), 1e-4)


def speed(args, log):
  x, y = _data(args.smoke, 512 if args.smoke else None)
  full = x.shape[0] // bench_train.BATCH
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    torch_missing = None
  except ImportError:
    torch_missing = "skipped: torch not importable"
  rows = []
  for arch in args.archs.split(","):
    bench_train.ARCHS.setdefault(f"smoke_{arch}", _arch(arch, True))
    name = f"smoke_{arch}" if args.smoke else arch
    for r in map(int, args.runs.split(",")):
      row = {"arch": arch, "runs": r, "steps": args.steps, "full_epoch_steps": full}
      t, _, resolved, mem = bench_train.bench_jax(name, r, x, y, args.steps, "engine", args.repeats)
      row.update(engine_s=t, engine_strategy=resolved, **{f"engine_{k}": v for k, v in mem.items()})
      if r <= args.loop_max_runs:
        row["loop_s"] = bench_train.bench_jax(name, r, x, y, args.steps, "loop", args.repeats)[0]
      else:
        row["loop_s"] = f"skipped: R > --loop_max_runs={args.loop_max_runs}"
      if torch_missing:
        row["torch_s"] = torch_missing
      else:
        t = bench_train.bench_torch(name, r, x, y, args.steps, args.repeats)
        row["torch_s"] = t if t is not None else f"skipped: bench_train has no PyTorch {arch}"
      for k in ("engine", "loop", "torch"):
        t = row[f"{k}_s"]
        row[f"{k}_member_epochs_per_s"] = (r * args.steps / full / t
                                           if isinstance(t, float) else None)
      rows.append(row)
      log(f"{arch:<14}{r:>4}  {resolved:<22}" + "".join(
          f"{k} {row[f'{k}_member_epochs_per_s']:.3g}  " if row[f"{k}_member_epochs_per_s"]
          else f"{k} -  " for k in ("engine", "loop", "torch"))
          + f"peak {_mib(mem.get('device_peak_bytes'))} MiB")
  return rows


def _mib(b):
  return "-" if b is None else f"{b / 2**20:.0f}"


def determinism_worker(spec):
  """In a fresh process (XLA_FLAGS set by the parent): trains the same members twice, returns
  seconds per epoch and whether the two trainings' members are bit-identical."""
  smoke, arch, runs, steps = spec.split(":")
  smoke = smoke == "1"
  x, y = _data(smoke, 256 if smoke else 4096)
  cfg = _arch(arch, smoke)
  _, a, _ = _train(cfg, x, y, int(runs), int(steps))
  _, b, seconds = _train(cfg, x, y, int(runs), int(steps))
  return {"seconds_per_epoch": seconds, "bit_identical": bool(np.array_equal(_flat(a), _flat(b))),
          "max_abs_diff": float(np.max(np.abs(_flat(a) - _flat(b))))}


def determinism(smoke):
  spec = "1:mlp:2:1" if smoke else "0:resnet:8:20"
  out = {"workload": spec}
  for name, flag in (("default", ""), ("deterministic", DETERMINISM_FLAG)):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip())
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--determinism_worker={spec}"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    out[name] = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
        "error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}
  if "seconds_per_epoch" in out["default"] and "seconds_per_epoch" in out["deterministic"]:
    out["slowdown"] = out["deterministic"]["seconds_per_epoch"] / out["default"]["seconds_per_epoch"]
  return out


def main(argv=None):
  args = parse(argv)
  if args.determinism_worker:
    print(json.dumps(determinism_worker(args.determinism_worker)))
    return
  if args.smoke:
    ens.split_cpu(2)  # two CPU devices, so the sharding check runs (before the backend starts)
  t0 = time.perf_counter()
  log = lambda s: print(s, flush=True)
  log(f"backend={jax.default_backend()} devices={jax.local_devices()}")
  arrays = {}
  result = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.local_devices()],
            "smoke": args.smoke, "args": vars(args)}
  result["checks"] = check_members(args.smoke, arrays)
  result["checks"]["grand_ghost_vs_vmap"] = check_grand(args.smoke)
  for k, v in result["checks"].items():
    log(f"check {k}: {v}")
  result["speed"] = speed(args, log)
  result["determinism"] = determinism(args.smoke)
  log(f"determinism: {result['determinism']}")
  stats = jax.local_devices()[0].memory_stats() or {}
  result["device_peak_bytes"] = stats.get("peak_bytes_in_use")
  result["seconds"] = time.perf_counter() - t0
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  store.atomic_write_bytes(os.path.splitext(args.out)[0] + ".npz", buf.getvalue())
  store.atomic_write_json(args.out, result)
  log(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
  main()

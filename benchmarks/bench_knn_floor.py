"""What exact prediction depth must cost on this machine, from the work it does (issue 21).

  python experiments/train.py --config=experiments/configs/default.py --workdir=/tmp/jd/mlp50k \
      --config.data.num_samples=62500 --config.num_runs=16 --config.num_epochs=3
  python benchmarks/bench_knn_floor.py --workdir=/tmp/jd/mlp50k

Reads a finished run (its config, checkpoint and `scores/prediction_depth.npy`) and counts the
distances its exact k-NN probes computed, as `representation.prediction_depth` does the work:
layers from the top down, layer l probed only for the queries whose probes agreed at every layer
above (depth <= l + 1), a layer equal for every member (the input) probed once for the union of
their queries, a layer equal to the one above (a flatten) not probed again. Every probed query
costs N distances of F_l features and a selection of the k + 1 nearest among them.

It then measures, on synthetic features of the same N and F_l and with both cores busy (one
member per CPU device, as the probes run): the cost per distance of today's exact kernel
(`representation._knn_chunk`: 256 queries x 4,096-row blocks, running top-k), of its distances
alone (the same matmul blocks, a min instead of the top-k), and of the cheapest exact selection
this machine offers over an already computed row of N distances: one `lax.top_k` over the whole
row, or numpy's `partition` (introselect; two threads). A lower bound on exact prediction depth
with these primitives is then the distances plus the cheapest selection for every distance; the
estimate of today's kernel is its measured cost per distance times the work. Also printed: the
FLOPs of the distances against those of one training epoch (forward + backward ~ 3 forward
passes per example and member, the forward's FLOPs from XLA's cost analysis): at equal FLOP
efficiency no exact kernel can take fewer epochs than that.

Writes `--out` (default benchmarks/results/knn_floor.json). The machine is shared: compare within one run.
"""

import concurrent.futures
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import ensemble as ens  # pylint: disable=g-import-not-at-top
from jaxdiff import posthoc
from jaxdiff import store
from jaxdiff import workdir as workdir_lib
from jaxdiff.scores import representation as rep
import bench_scaling  # pylint: disable=g-import-not-at-top,g-bad-import-order  (_distances_only, matmul_peak; bench_scores' --repeats, --out)

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished training workdir with prediction "
                               "depth scores.", required=True)
_TARGET = flags.DEFINE_float("target_s", 180.0, "The whole final scoring's target (seconds).")
FLAGS = flags.FLAGS

_CHUNK, _BLOCK = 256, 4096  # today's query chunk and reference block (representation.py)


def probe_work(layers_sample, depth, n):
  """Queries probed per layer, as `prediction_depth` schedules them.

  Args:
    layers_sample: list of L arrays `[R, S, ...]`, every layer's features on a few examples (to
      tell which layers are shared by all members or repeat the layer above).
    depth: float `[R, N]`, the run's prediction depths.
    n: training examples (each probed query costs n distances).
  Returns:
    list of L dicts {"features", "queries", "shared", "repeat"}.
  """
  num_layers = len(layers_sample)
  flat = [np.reshape(np.asarray(l, np.float32), np.shape(l)[:2] + (-1,)) for l in layers_sample]
  out = []
  for l in range(num_layers):
    active = depth <= l + 1  # every probe above l agreed (the top layer: all queries)
    shared = all(np.array_equal(flat[l][r], flat[l][0]) for r in range(flat[l].shape[0]))
    repeat = l + 1 < num_layers and flat[l].shape == flat[l + 1].shape and np.array_equal(
        flat[l], flat[l + 1])
    if repeat:
      queries = 0
    elif shared:
      queries = int(active.any(0).sum())
    else:
      queries = int(active.sum())
    out.append({"features": int(flat[l].shape[-1]), "queries": queries, "shared": shared,
                "repeat": repeat, "distances": float(queries) * n})
  return out


def _best(fn, repeats):
  fn()  # compiled, warm
  best = np.inf
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def per_distance_costs(n, feats, k, repeats):
  """Nanoseconds per distance (wall, every CPU device busy with one member) of today's kernel,
  of its distances alone, and of whole-row selections, for each feature size in `feats`."""
  devices = jax.local_devices()
  rng = np.random.default_rng(0)
  b = min(_BLOCK, n)
  pad = -n % b
  costs = {}

  def on_devices(fn_of_device):
    with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:
      jax.block_until_ready(list(pool.map(fn_of_device, devices)))

  for f in sorted(set(feats)):
    train = rng.standard_normal((n + pad, f)).astype(np.float32)
    train[n:] = 0.0
    per_dev = []
    for d in devices:
      t = jax.device_put(train.reshape(-1, b, f), d)
      per_dev.append((t, rep._sq_rows(t), jax.device_put(np.zeros(n, np.int32), d),  # pylint: disable=protected-access
                      jax.device_put(train[:_CHUNK], d),
                      jax.device_put(np.arange(_CHUNK, dtype=np.int32), d)))
    args = lambda i: per_dev[i] + (k, 10, True, n)
    index = {d: i for i, d in enumerate(devices)}
    dists = len(devices) * _CHUNK * n
    kernel = _best(lambda: on_devices(lambda d: rep._knn_chunk(*args(index[d]))), repeats)  # pylint: disable=protected-access
    only = _best(lambda: on_devices(lambda d: bench_scaling._distances_only(*args(index[d]))),  # pylint: disable=protected-access
                 repeats)
    costs[f] = {"kernel_ns": kernel / dists * 1e9, "distances_ns": only / dists * 1e9}
  # Selection over a computed row [256, N] (independent of F).
  rows = rng.standard_normal((_CHUNK, n)).astype(np.float32)
  on_dev = [jax.device_put(rows, d) for d in devices]
  top_k = jax.jit(lambda a: jax.lax.top_k(-a, k + 1))
  dists = len(devices) * _CHUNK * n
  sel_top_k = _best(lambda: jax.block_until_ready([top_k(a) for a in on_dev]), repeats)
  with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:  # numpy releases the GIL
    sel_np = _best(lambda: list(pool.map(lambda _: np.partition(rows, k, axis=1),
                                         range(len(devices)))), repeats)
  return costs, {"lax.top_k (whole row)": sel_top_k / dists * 1e9,
                 "numpy.partition (whole row)": sel_np / dists * 1e9}


def main(argv):
  del argv
  ens.split_cpu(0)  # one device per core, as experiments/train.py
  wd = _WORKDIR.value
  depth_file = workdir_lib.score_file(wd, "prediction_depth")
  try:
    e = posthoc.load_ensemble(wd)
  except posthoc.WorkdirError as err:
    raise SystemExit(f"--workdir: {err}") from None
  if not os.path.exists(depth_file):
    raise SystemExit(f"--workdir={wd!r} has no {depth_file}: train it to the end with "
                     "scores.representation=True (the default)")
  depth = np.load(depth_file)
  if not np.all(np.isfinite(depth)):
    raise SystemExit(f"{wd}: prediction depths of diverged members are NaN; use a run whose "
                     "members all trained")
  k = int(e.config.scores.knn_k)
  x = e.data.x_train
  n, num_runs = x.shape[0], e.num_runs
  layers = rep.features(e.apply_fn, e.variables, x[:64], include_input=True)
  work = probe_work(layers, depth, n)
  costs, selection = per_distance_costs(n, [w["features"] for w in work], k, FLAGS.repeats)
  sel_name, sel_ns = min(selection.items(), key=lambda kv: kv[1])
  today = sum(w["distances"] * costs[w["features"]]["kernel_ns"] for w in work) * 1e-9
  dist_s = sum(w["distances"] * costs[w["features"]]["distances_ns"] for w in work) * 1e-9
  floor = dist_s + sum(w["distances"] for w in work) * sel_ns * 1e-9
  knn_flops = sum(2.0 * w["features"] * w["distances"] for w in work)
  # One epoch: forward + backward ~ 3 forward passes per example and member; XLA counts the
  # forward's FLOPs (convolutions included) on a batch of 256.
  batch = x[:256]
  cost = jax.jit(lambda v, xb: e.apply_fn(v, xb)[0]).lower(e.member(0), batch).compile(
      ).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  forward = float(cost["flops"]) / batch.shape[0]
  epoch_flops = 3.0 * forward * n * num_runs
  peak = bench_scaling.matmul_peak()
  row = {"workdir": wd, "num_train": int(n), "runs": num_runs, "knn_k": k, "layers": work,
         "cost_per_distance_ns": {str(f): c for f, c in costs.items()},
         "selection_ns_per_distance": selection, "today_estimate_s": today,
         "distances_s": dist_s, "floor_s": floor, "floor_selection": sel_name,
         "floor_over_today": floor / today, "distances_over_today": dist_s / today,
         "forward_flops_per_example": forward, "knn_over_epoch_flops": knn_flops / epoch_flops,
         "matmul_peak_gflops": peak, "distances_at_peak_s": knn_flops / peak / 1e9,
         "load": os.getloadavg()[0]}
  print(f"{wd}: N={n}, R={num_runs}, k={k}; matmul peak {peak:.0f} GFLOP/s; load "
        f"{row['load']:.1f}")
  for l, w in enumerate(work):
    note = " (repeats the layer above)" if w["repeat"] else " (shared: once)" if w["shared"] else ""
    print(f"  layer {l}: F={w['features']}, {w['queries']} queries probed{note}, "
          f"{w['distances']:.3g} distances")
  for f, c in costs.items():
    print(f"  F={f}: today's kernel {c['kernel_ns']:.2f} ns/distance, its distances alone "
          f"{c['distances_ns']:.2f}")
  for name, ns in selection.items():
    print(f"  selection, {name}: {ns:.2f} ns/distance")
  print(f"prediction depth: today's kernel ~{today:.0f} s; distances alone {dist_s:.0f} s; "
        f"floor with the cheapest selection ({sel_name}) {floor:.0f} s; distances at the "
        f"{peak:.0f} GFLOP/s matmul peak {row['distances_at_peak_s']:.0f} s; target for the "
        f"whole final scoring {_TARGET.value:.0f} s")
  print(f"floor / today's kernel = {floor / today:.2f} (distances alone {dist_s / today:.2f}): "
        "ratios in one run hold across loads; scale a quiet run's prediction depth by them")
  print(f"FLOPs: the probes' distances are {row['knn_over_epoch_flops']:.1f}x one training "
        f"epoch's (3 x {forward:.0f} forward FLOPs per example and member)")
  out = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "knn_floor.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  store.atomic_write_json(out, row)


if __name__ == "__main__":
  app.run(main)

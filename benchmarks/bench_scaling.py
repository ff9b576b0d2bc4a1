"""Final scoring at growing training sets: seconds and peak memory of each stage (issue 21).

  python benchmarks/bench_scaling.py --archs=mlp,cnn --num_samples=5000,15620,62500 --runs=16

For each architecture and MNIST-1D size (`data.num_samples`; 80% are training examples, so
5,000 / 15,620 / 62,500 give N = 4,000 / 12,496 / 50,000), trains R members for
`--train_epochs` epochs (one epoch = the median of the epochs after the first), then runs each
stage of the final scoring once, as a training run's end does (compilation included): point
scores, GraNd (ghost), the features of every layer, prediction depth (k = `--knn_k`, the probes on
all N training examples, or on `--knn_reference` sampled per member) and prototypes, each with the
process's peak resident memory while it ran (the high-water mark reset before each). With
`--split`, prediction depth's top layer is probed twice more, in full and with distances only (the
same matmul blocks, no top-k), for the share of the distances and their rate against a
2048 x 2048 float32 matmul measured in the same process. Writes benchmarks/results/scaling.json
(rewritten after every row, so a run cut short keeps what it measured). The machine is shared:
compare within a row.
"""

import functools
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import data as data_lib  # pylint: disable=g-import-not-at-top
from jaxdiff import ensemble as ens
from jaxdiff import recording
from jaxdiff import scores as S
from jaxdiff import store
from jaxdiff.scores import representation as rep
import bench_scores  # pylint: disable=g-import-not-at-top,g-bad-import-order  (train, ARCHS; its flags)
import memory  # pylint: disable=g-import-not-at-top,g-bad-import-order

_SIZES = flags.DEFINE_list("num_samples", ["5000", "15620", "62500"], "MNIST-1D num_samples.")
_REFERENCE = flags.DEFINE_integer("knn_reference", 0, "Prediction depth's support set per member "
                                  "(0 = all training examples, exact).")
_AGREE = flags.DEFINE_list("agreement", [], "Reference sizes whose prediction depths are compared "
                           "with the exact ones (fraction equal, Spearman), with their seconds.")
_SPLIT = flags.DEFINE_bool("split", True, "Time the top layer's probes with and without top-k.")
_MAX_TRAIN = flags.DEFINE_integer("split_max_train", 20000, "Skip --split above this N.")
FLAGS = flags.FLAGS

# What each stage's work grows with: R members, N training examples, F_l features of layer l, L
# layers, K prototype clusters, I Lloyd iterations.
COMPLEXITY = {
    "epoch": "O(R N) (forward + backward)",
    "point": "O(R N) (forward)",
    "grand_ghost": "O(R N) (per-example gradient norms)",
    "features": "O(R N sum_l F_l) (forward, every layer kept)",
    "prediction_depth": "O(R N^2 sum_l F_l) distances + O(R N^2) top-k (exact k-NN per layer)",
    "prototypes": "O(R N K D I) (k-means)",
}


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _distances_only(train, train_sq, labels, query, query_ids, k, num_classes, exclude_self, n):
  """`rep._knn_chunk`'s distance blocks (same matmuls and masking) reduced by a min, no top-k."""
  del labels, k, num_classes, exclude_self
  size = train.shape[1]
  q_sq = jnp.sum(query * query, -1)[:, None]

  def block(b, acc):
    d = q_sq - 2.0 * jnp.dot(query, train[b].T, precision=rep._HIGHEST) + train_sq[b][None, :]  # pylint: disable=protected-access
    ids = b * size + jnp.arange(size, dtype=jnp.int32)
    d = jnp.where((ids[None, :] >= n) | (ids[None, :] == query_ids[:, None]), jnp.inf,
                  jnp.maximum(d, 0.0))
    return jnp.minimum(acc, jnp.min(d, -1))

  acc = jax.lax.fori_loop(0, train.shape[0], block, jnp.full(query.shape[0], jnp.inf))
  return (acc < 0).astype(jnp.int32)


def matmul_peak():
  """GFLOP/s of a 2048 x 2048 float32 matmul (best of 5)."""
  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  best = min(_timed(lambda: jax.block_until_ready(f(a)))[1] for _ in range(5))
  return 2 * 2048**3 / best / 1e9


def _timed(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def stage(fn):
  """(result, seconds, peak RSS bytes) of one call."""
  memory.reset_peak_rss()
  out, secs = _timed(fn)
  return out, secs, memory.peak_rss_bytes()


def bench(arch, num_runs, ds, peak):
  x, y = ds.x_train, ds.y_train
  n = x.shape[0]
  engine, state, epoch_times, _ = bench_scores.train(arch, num_runs, x, y, FLAGS.train_epochs)
  epoch = float(np.median(epoch_times[1:]))
  v = engine.variables(state)
  recorder = recording.Recorder({"chunk_size": FLAGS.chunk_size}, engine, ds, num_runs,
                                progress=False)
  recorder._variables(state)  # pylint: disable=protected-access  (sets the auto chunk size)
  apply_fn, chunk = engine.apply_fn, recorder.chunk
  members = lambda fn: recorder._members(fn, v)  # pylint: disable=protected-access  (as finalize)

  row = {"arch": arch, "runs": num_runs, "num_train": int(n), "epoch_s": epoch,
         "knn_k": FLAGS.knn_k, "knn_reference": _REFERENCE.value,
         "load_before": os.getloadavg()[0]}
  stages = {}
  (_, logits), *stages["point"] = stage(lambda: members(
      lambda vv: S.compute_point_scores(apply_fn, vv, x, y, chunk, return_logits=True)))
  _, *stages["grand_ghost"] = stage(lambda: recorder._grand(v))  # pylint: disable=protected-access
  (layers, _), *stages["features"] = stage(lambda: members(
      lambda vv: S.representation.features(apply_fn, vv, x, chunk, include_input=True,
                                           return_logits=True)))
  final = logits.argmax(-1)
  depth, *stages["prediction_depth"] = stage(lambda: S.prediction_depth(
      layers, y, None, final, k=FLAGS.knn_k, reference=_REFERENCE.value))
  _, *stages["prototypes"] = stage(lambda: S.prototype_scores(layers[-1], y, 10, seed=0))
  for name, (secs, rss) in stages.items():
    row[f"{name}_s"], row[f"{name}_over_epoch"] = secs, secs / epoch
    row[f"{name}_peak_rss_bytes"] = rss
  row["final_scoring_s"] = sum(secs for secs, _ in stages.values())
  row["final_scoring_peak_rss_bytes"] = max(rss or 0 for _, rss in stages.values())
  row["layer_features"] = [int(np.prod(l.shape[2:])) for l in layers]
  row["depth_histogram"] = np.bincount(depth.astype(int).ravel(), minlength=len(layers) + 1
                                       ).tolist()
  if _SPLIT.value and n <= _MAX_TRAIN.value and not _REFERENCE.value:
    top = np.asarray(layers[-1], np.float32).reshape(num_runs, n, -1)
    probe = lambda: rep.knn_predict(top, y, top, k=FLAGS.knn_k, exclude_self=True)
    probe()  # compiled
    _, full = _timed(probe)
    real = rep._knn_chunk  # pylint: disable=protected-access
    rep._knn_chunk = lambda *a: _distances_only(*a[:9])  # pylint: disable=protected-access
    try:
      probe()
      _, dist = _timed(probe)
    finally:
      rep._knn_chunk = real  # pylint: disable=protected-access
    flops = 2.0 * num_runs * n * n * top.shape[-1]
    row["top_layer_split"] = {"features": int(top.shape[-1]), "probe_s": full,
                              "distances_s": dist, "distance_share": dist / full,
                              "distance_gflops": flops / dist / 1e9,
                              "distance_over_peak": flops / dist / 1e9 / peak}
  for size in map(int, _AGREE.value):
    approx, secs = _timed(lambda: S.prediction_depth(layers, y, None, final, k=FLAGS.knn_k,
                                                     reference=size))  # pylint: disable=cell-var-from-loop
    row.setdefault("agreement", []).append({
        "knn_reference": size, "seconds": secs, "equal": float((approx == depth).mean()),
        "spearman": float(stats.spearmanr(approx.ravel(), depth.ravel())[0]),
        "mean_abs_diff": float(np.abs(approx - depth).mean())})
  row["load_after"] = os.getloadavg()[0]
  return row


def main(argv):
  del argv
  ens.split_cpu(FLAGS.cpu_devices)  # before JAX starts
  peak = matmul_peak()
  print(f"backend={jax.default_backend()} devices={len(jax.devices())}; matmul peak "
        f"{peak:.0f} GFLOP/s; load {os.getloadavg()[0]:.1f}", flush=True)
  out = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  "scaling.json")
  rows = []
  for size in map(int, _SIZES.value):
    ds = data_lib.load_dataset({"name": "mnist1d", "num_samples": size})
    for arch in FLAGS.archs:
      for r in map(int, FLAGS.runs):
        row = bench(arch, r, ds, peak)
        rows.append(row)
        print(f"{arch} R={r} N={row['num_train']}: epoch {row['epoch_s']:.3f} s; final scoring "
              f"{row['final_scoring_s']:.1f} s, peak RSS "
              f"{row['final_scoring_peak_rss_bytes'] / 2**30:.2f} GiB (load "
              f"{row['load_before']:.1f} -> {row['load_after']:.1f})")
        for name in COMPLEXITY:
          if name != "epoch":
            print(f"  {name:<17}{row[f'{name}_s']:8.2f} s {row[f'{name}_over_epoch']:7.1f}x epoch"
                  f"  peak RSS {row[f'{name}_peak_rss_bytes'] / 2**20:6.0f} MiB  "
                  f"{COMPLEXITY[name]}")
        for a in row.get("agreement", ()):
          print(f"  knn_reference={a['knn_reference']}: {a['seconds']:.2f} s, depths equal to exact "
                f"{a['equal']:.3f}, Spearman {a['spearman']:.3f}")
        if "top_layer_split" in row:
          s = row["top_layer_split"]
          print(f"  top layer probes: {s['probe_s']:.2f} s, distances only {s['distances_s']:.2f} s"
                f" ({100 * s['distance_share']:.0f}%), {s['distance_gflops']:.0f} GFLOP/s = "
                f"{100 * s['distance_over_peak']:.0f}% of the matmul peak")
        sys.stdout.flush()
        store.atomic_write_json(out, {"matmul_peak_gflops": peak, "complexity": COMPLEXITY,
                                      "train_epochs": FLAGS.train_epochs, "rows": rows})
  print("wrote", out)


if __name__ == "__main__":
  FLAGS.set_default("runs", ["16"])
  FLAGS.set_default("train_epochs", 2)
  app.run(main)

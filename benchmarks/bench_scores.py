"""Cost of the difficulty scores as multiples of one training epoch of the same ensemble.

  python benchmarks/bench_scores.py                          # MLP + CNN on MNIST-1D, R in {8, 16}
  python benchmarks/bench_scores.py --archs=cnn --runs=16 --train_epochs=5

For each architecture and ensemble size R, trains R members with the engine (as train.py runs it,
member strategy "auto") for `--train_epochs` epochs on MNIST-1D (4,000 examples, batch 100), takes
one epoch as the median time of the epochs after the first (which compiles), then times on the
trained members, the way recording.py calls them (one member at a time where the engine loops over
members): all point scores, GraNd ("vmap" reference and "ghost"), the features and the prediction
depth probes (k-NN, k=30, input + every layer), prototypes, and the per-epoch recording of a
training run (`recording.Recorder.on_epoch`: point scores of the training and test sets, VoG's
input gradients, the trajectory accumulators). Each is reported cold (first call,
compilation included, as in the final scoring of a training run) and warm (median of the next
`--repeats` calls), and as
warm time / one epoch, with the process's peak resident memory while each ran (Linux; the
high-water mark is reset before each). Writes benchmarks/results/scores.json. The machine is
shared: compare the ratios within one run.
"""

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
from jaxdiff import models
from jaxdiff import recording
from jaxdiff import scores as S
from jaxdiff import store
import memory  # pylint: disable=g-import-not-at-top,g-bad-import-order  (benchmarks/memory.py)

_ARCHS = flags.DEFINE_list("archs", ["mlp", "cnn"], "Architectures (keys of ARCHS).")
_RUNS = flags.DEFINE_list("runs", ["8", "16"], "Ensemble sizes R.")
_EPOCHS = flags.DEFINE_integer("train_epochs", 6, "Epochs trained before scoring (>= 2).")
_CHUNK = flags.DEFINE_integer("chunk_size", 0, "Examples per scoring call (0 = auto, the "
                               "recording default).")
_K = flags.DEFINE_integer("knn_k", 30, "k of the prediction-depth probes.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Warm calls timed per score (median).")
_GRAND_VMAP = flags.DEFINE_bool("grand_vmap", True, "Also time the 'vmap' GraNd reference.")
_OUT = flags.DEFINE_string("out", "", "Output json (default benchmarks/results/scores.json).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Split the CPU into this many JAX devices "
                                    "(0 = one per core, as the experiment scripts; 1 = no split).")

ARCHS = {
    "mlp": {"name": "mlp", "width": 100, "depth": 2},
    "cnn": {"name": "cnn", "width": 32, "depth": 3, "kernel_size": 5, "stride": 2, "pool": False,
            "head": "flatten"},
}
BATCH = 100


def train(arch, num_runs, x, y, num_epochs):
  """Trains the ensemble.

  Returns:
    (engine, state, seconds of each epoch, (idx, seen) of the last epoch).
  """
  model = models.build_model(ARCHS[arch], 10)
  steps = x.shape[0] // BATCH
  tx = ens.make_optimizer({"name": "adam", "lr": 1e-2}, steps, num_epochs)
  engine = ens.Engine(model, tx, mesh=ens.make_mesh(num_runs))  # as train.py
  init_keys, data_keys, aug_keys = ens.member_keys(0, np.arange(num_runs))
  state = engine.init(init_keys, x[:1])
  xd, yd = engine.replicate(jnp.asarray(x)), engine.replicate(jnp.asarray(y))
  data_keys, aug_keys = engine.shard(data_keys), engine.shard(aug_keys)
  times = []
  for epoch in range(num_epochs):
    idx = engine.shard(data_lib.epoch_permutations(data_keys, epoch, x.shape[0], BATCH))
    jax.block_until_ready(idx)
    last = idx
    t = time.perf_counter()
    state, out = engine.train_epoch(state, xd, yd, idx, aug_keys, epoch * steps)
    jax.block_until_ready((state, out))
    times.append(time.perf_counter() - t)
  return engine, state, times, (last, out)


def cold_warm(fn):
  """(result, seconds of the first call, median seconds of the next `--repeats` calls, peak
  resident bytes of the process meanwhile)."""
  memory.reset_peak_rss()
  t = time.perf_counter()
  fn()
  cold = time.perf_counter() - t
  warm = []
  for _ in range(_REPEATS.value):
    t = time.perf_counter()
    out = fn()
    warm.append(time.perf_counter() - t)
  return out, cold, float(np.median(warm)), memory.peak_rss_bytes()


def bench(arch, num_runs, ds):
  x, y = ds.x_train, ds.y_train
  engine, state, epoch_times, (idx, seen) = train(arch, num_runs, x, y, _EPOCHS.value)
  epoch = float(np.median(epoch_times[1:]))
  v = engine.variables(state)
  recorder = recording.Recorder({"chunk_size": _CHUNK.value, "vog": True}, engine, ds, num_runs)
  recorder._variables(state)  # pylint: disable=protected-access  (sets the auto chunk size)
  apply_fn, chunk, gchunk = engine.apply_fn, recorder.chunk, recorder.grad_chunk
  loop = engine.resolved_member_strategy == "loop"

  def members(fn):  # as recording.Recorder._members
    if not loop:
      return fn(v)
    outs = [fn(jax.tree_util.tree_map(lambda a: a[r:r + 1], v)) for r in range(num_runs)]  # pylint: disable=cell-var-from-loop
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a, axis=0), *outs)

  grand_kw = {"batch_size": gchunk} if loop else {}
  grand = lambda method: members(lambda vv: S.grand_scores(
      apply_fn, vv, x, y, chunk_size=gchunk, method=method, **grand_kw))
  row = {"arch": arch, "runs": num_runs, "strategy": engine.resolved_member_strategy,
         "epoch_s": epoch, "epoch_times_s": epoch_times, "chunk_size": chunk,
         "grad_chunk_size": gchunk}
  timings = {}
  epochs = iter(range(_EPOCHS.value + 1, 10**6))
  record = lambda: recorder.on_epoch(next(epochs), state, idx, seen)
  t = time.perf_counter()
  record()  # the accumulators' shardings settle after the first update: warm up twice
  cold = time.perf_counter() - t
  _, _, warm, rss = cold_warm(record)
  timings["recording_epoch"] = (cold, warm, rss)
  (_, logits), *timings["point"] = cold_warm(lambda: members(
      lambda vv: S.compute_point_scores(apply_fn, vv, x, y, chunk, return_logits=True)))
  ghost, *timings["grand_ghost"] = cold_warm(lambda: grand("ghost"))
  if _GRAND_VMAP.value:
    ref, *timings["grand_vmap"] = cold_warm(lambda: grand("vmap"))
    row["grand_max_rel_diff"] = float(np.max(np.abs(ghost - ref) / np.maximum(ref, 1e-30)))
  (layers, _), *timings["features"] = cold_warm(lambda: members(
      lambda vv: S.representation.features(apply_fn, vv, x, chunk, include_input=True,
                                           return_logits=True)))
  depth, *timings["prediction_depth"] = cold_warm(lambda: S.prediction_depth(
      layers, y, None, logits.argmax(-1), k=_K.value))
  _, *timings["prototypes"] = cold_warm(lambda: S.prototype_scores(layers[-1], y, 10, seed=0))
  row["depth_histogram"] = np.bincount(depth.astype(int).ravel(), minlength=len(layers) + 1
                                       ).tolist()
  row["train_acc"] = float((logits.argmax(-1) == y).mean())
  for name, (cold, warm, rss) in timings.items():
    row[f"{name}_cold_s"], row[f"{name}_s"], row[f"{name}_over_epoch"] = cold, warm, warm / epoch
    row[f"{name}_peak_rss_bytes"] = rss
  all_scores = ("point", "grand_ghost", "features", "prediction_depth", "prototypes")
  row["all_scores_s"] = sum(row[f"{n}_s"] for n in all_scores)
  row["all_scores_over_epoch"] = row["all_scores_s"] / epoch
  return row


def main(argv):
  del argv
  ens.split_cpu(_CPU_DEVICES.value)  # before JAX starts
  if _EPOCHS.value < 2:
    raise app.UsageError(f"--train_epochs={_EPOCHS.value}: need >= 2 (the first one compiles)")
  ds = data_lib.load_dataset({"name": "mnist1d"})
  x, y = ds.x_train, ds.y_train
  names = (["recording_epoch", "point", "grand_ghost"] + (["grand_vmap"] if _GRAND_VMAP.value else [])
           + ["features", "prediction_depth", "prototypes"])
  print(f"backend={jax.default_backend()} devices={len(jax.devices())} N={x.shape[0]}; "
        "seconds warm (cold) and warm / epoch")
  rows = []
  for arch in _ARCHS.value:
    for r in map(int, _RUNS.value):
      row = bench(arch, r, ds)
      rows.append(row)
      print(f"{arch} R={r} ({row['strategy']}, chunks of {row['chunk_size']}, "
            f"{row['grad_chunk_size']} with gradients): epoch "
            f"{row['epoch_s']:.3f} s, train acc "
            f"{row['train_acc']:.2f}, depth histogram {row['depth_histogram']}")
      for n in names + ["all_scores"]:
        cold = f" ({row[f'{n}_cold_s']:7.3f})" if f"{n}_cold_s" in row else " " * 10
        rss = row.get(f"{n}_peak_rss_bytes")
        rss = f"  peak RSS {rss / 2**20:6.0f} MiB" if rss else ""
        print(f"  {n:<18}{row[f'{n}_s']:8.3f}{cold} s  {row[f'{n}_over_epoch']:6.2f}x epoch{rss}")
      if "grand_max_rel_diff" in row:
        print(f"  GraNd ghost vs vmap: max relative difference {row['grand_max_rel_diff']:.1e}")
      sys.stdout.flush()
  out = _OUT.value or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "scores.json")
  store.atomic_write_json(out, {"backend": jax.default_backend(), "devices": len(jax.devices()),
                                "num_train": int(x.shape[0]),
                                "train_epochs": _EPOCHS.value, "rows": rows})
  print("wrote", out)


if __name__ == "__main__":
  app.run(main)

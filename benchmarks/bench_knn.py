"""Prediction depth's exact k-NN before and after blocking the reference set (issue 21).

  python benchmarks/bench_knn.py --old=ed2ec50 --num_samples=5000,15625 --runs=4

For each MNIST-1D size (`data.num_samples`; 80% are training examples), trains the default MLP
ensemble (R = `--runs`, `--train_epochs` epochs, as benchmarks/bench_scores.py), takes the
features (input + every layer) and runs `prediction_depth` (k = `--knn_k`) with the
representation module of git revision `--old` (distances of a query chunk against the whole
training set, one top-k) and with today's (reference blocks of `--block_size`, a running top-k
merge): time cold (compilation included) and warm, the process's peak resident memory during each,
and checks that the depths are identical. One epoch's time is given for scale. The machine is
shared: compare within one run. Writes benchmarks/results/knn.json.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import data as data_lib  # pylint: disable=g-import-not-at-top
from jaxdiff import ensemble as ens
from jaxdiff import store
from jaxdiff.scores import representation as rep
import bench_scores  # pylint: disable=g-import-not-at-top,g-bad-import-order  (its flags: --runs, --train_epochs, --knn_k, --repeats, --cpu_devices)

_SIZES = flags.DEFINE_list("num_samples", ["5000", "15625"], "MNIST-1D data.num_samples values.")
_OLD = flags.DEFINE_string("old", "ed2ec50", "Git revision of the unblocked representation.py "
                           "('' = skip the comparison).")
_BLOCK = flags.DEFINE_integer("block_size", 4096, "Reference rows per distance block (new code).")
FLAGS = flags.FLAGS


def load_old(rev):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  src = subprocess.run(["git", "show", f"{rev}:jaxdiff/scores/representation.py"], cwd=root,
                       check=True, capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), "representation_old.py")
  with open(path, "w") as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location("representation_old", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def main(argv):
  del argv
  ens.split_cpu(FLAGS.cpu_devices)  # before JAX starts
  old = load_old(_OLD.value) if _OLD.value else None
  rows = []
  for size in map(int, _SIZES.value):
    ds = data_lib.load_dataset({"name": "mnist1d", "num_samples": size})
    x, y = ds.x_train, ds.y_train
    for r in map(int, FLAGS.runs):
      engine, state, epoch_times, _ = bench_scores.train("mlp", r, x, y, FLAGS.train_epochs)
      v = engine.variables(state)
      layers, logits = rep.features(engine.apply_fn, v, x, 1024, include_input=True,
                                    return_logits=True)
      final = logits.argmax(-1)
      row = {"num_train": int(x.shape[0]), "runs": r, "epoch_s": float(np.median(epoch_times[1:])),
             "block_size": _BLOCK.value, "knn_k": FLAGS.knn_k}
      impls = {"new": lambda: rep.prediction_depth(layers, y, None, final, k=FLAGS.knn_k,
                                                   block_size=_BLOCK.value)}
      if old is not None:
        impls = {"old": lambda: old.prediction_depth(layers, y, None, final, k=FLAGS.knn_k),
                 **impls}
      depths = {}
      for name, fn in impls.items():
        depths[name], cold, warm, rss = bench_scores.cold_warm(fn)
        row.update({f"{name}_cold_s": cold, f"{name}_s": warm, f"{name}_peak_rss_bytes": rss})
        print(f"N={x.shape[0]} R={r} {name}: {warm:.2f} s warm ({cold:.2f} s cold), "
              f"{warm / row['epoch_s']:.1f}x epoch ({row['epoch_s']:.3f} s), peak RSS "
              f"{rss / 2**20:.0f} MiB", flush=True)
      if old is not None:
        row["identical"] = bool(np.array_equal(depths["old"], depths["new"]))
        row["new_over_old"] = row["new_s"] / row["old_s"]
        print(f"  identical depths: {row['identical']}; new / old time {row['new_over_old']:.2f}")
      row["depth_histogram"] = np.bincount(depths["new"].astype(int).ravel()).tolist()
      rows.append(row)
  out = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  "knn.json")
  store.atomic_write_json(out, {"old": _OLD.value, "rows": rows})
  print("wrote", out)


if __name__ == "__main__":
  FLAGS.set_default("runs", ["4"])
  FLAGS.set_default("train_epochs", 2)
  FLAGS.set_default("repeats", 1)
  app.run(main)

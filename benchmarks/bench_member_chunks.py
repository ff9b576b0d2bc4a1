"""Training speed of the fixed member chunks (issue 16) against the engine before them.

  python benchmarks/bench_member_chunks.py --old=/path/to/old/jaxdiff/ensemble.py

The engine before the change (commit 48d037d: all of a device's members vmapped in a
`shard_map`, chunks the largest divisor of the members per device, `lax.map` over chunks) is
loaded from `--old`; both train the default MLP and CNN on MNIST-1D over the default CPU split,
epochs interleaved (old, new, old, new, ...) so that load on the shared machine hits both alike.
Prints and writes (`--out`) seconds per epoch and new/old ratios.
"""

import importlib.util
import json
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import ensemble  # pylint: disable=g-import-not-at-top

_OLD = flags.DEFINE_string("old", None, "Path of the old ensemble.py.")
_RUNS = flags.DEFINE_list("runs", ["1", "4", "16", "32"], "Ensemble sizes.")
_ARCHS = flags.DEFINE_list("archs", ["mlp", "cnn"], "default.py (mlp) and/or cnn.py.")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Timed epochs per engine (after one warm-up).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/member_chunks.json", "JSON output.")


def _engine_epoch(ens_mod, config, ds, num_runs):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxdiff import data as data_lib, models  # pylint: disable=g-import-not-at-top
  model = models.build_model(config.model, ds.num_classes)
  spe = ds.num_train // config.batch_size
  eng = ens_mod.Engine(model, ens_mod.make_optimizer(config.optim, spe, 100),
                       mesh=ens_mod.make_mesh(num_runs))
  ik, dk, ak = ens_mod.member_keys(config.seed, np.arange(num_runs))
  box = {"state": eng.init(ik, ds.x_train[:1]), "epoch": 0}
  dk, ak = eng.shard(dk), eng.shard(ak)
  x, y = eng.replicate(jnp.asarray(ds.x_train)), eng.replicate(jnp.asarray(ds.y_train))

  def epoch():
    box["epoch"] += 1
    idx = eng.shard(data_lib.epoch_permutations(dk, box["epoch"], ds.num_train,
                                                config.batch_size, None, spe))
    t0 = time.perf_counter()
    box["state"], out = eng.train_epoch(box["state"], x, y, idx, ak, (box["epoch"] - 1) * spe)
    jax.block_until_ready((box["state"], out))
    return time.perf_counter() - t0
  return epoch


def main(argv):
  del argv
  ensemble.split_cpu(0)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments.configs import cnn, default  # pylint: disable=g-import-not-at-top
  from jaxdiff import data as data_lib  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("old_ensemble", _OLD.value)
  old = importlib.util.module_from_spec(spec)
  sys.modules["old_ensemble"] = old  # its dataclasses look their module up
  spec.loader.exec_module(old)
  rows = []
  for arch in _ARCHS.value:
    config = (default if arch == "mlp" else cnn).get_config()
    ds = data_lib.load_dataset(config.data)
    for runs in map(int, _RUNS.value):
      fns = {"old": _engine_epoch(old, config, ds, runs),
             "new": _engine_epoch(ensemble, config, ds, runs)}
      for fn in fns.values():
        fn()  # compile
      times = {k: [] for k in fns}
      for _ in range(_EPOCHS.value):
        for k, fn in fns.items():
          times[k].append(fn())
      med = {k: float(np.median(v)) for k, v in times.items()}
      row = {"arch": arch, "runs": runs, "old_s": round(med["old"], 4),
             "new_s": round(med["new"], 4), "new_over_old": round(med["new"] / med["old"], 3)}
      print(json.dumps(row), flush=True)
      rows.append(row)
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  flags.mark_flag_as_required("old")
  app.run(main)

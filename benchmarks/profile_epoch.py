"""Where one training epoch's time goes: XLA ops by kind, from a `jax.profiler` trace.

  python benchmarks/profile_epoch.py --config=cnn --runs=8 --cpu_devices=1

Takes the model, batch size and optimiser of `experiments/configs/<config>.py`, trains `--runs` members for one epoch (compiles), then traces one more epoch and sums the XLA ops'
durations by kind: matmuls (dots and YNNPACK fusions), patch building (pads, slices, selects,
concatenates), copies (transposes), the rest. Prints the kinds and the top ops. On several devices
the sums add both devices' ops (they overlap in time).
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
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
from experiments.configs import cnn, default  # pylint: disable=g-bad-import-order

_CONFIG = flags.DEFINE_enum("config", "cnn", ["default", "cnn"], "experiments/configs/<name>.py")
_RUNS = flags.DEFINE_integer("runs", 8, "Ensemble size R.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 1, "JAX devices on the CPU (0 = one per core).")
_TOP = flags.DEFINE_integer("top", 15, "How many single ops to list.")

_SKIP = re.compile(r"^\$|ThunkExecutor|ThreadPool|PjitFunction|Execute|^while|trace")


def kind(name: str) -> str:
  if name.startswith(("ynn", "xnn", "dot", "onednn")):
    return "matmul"
  if re.search("pad|slice|select|concatenate", name):
    return "patches (pad/slice/select/concat)"
  if "copy" in name or "transpose" in name:
    return "copy/transpose"
  return "other"


def main(argv):
  del argv
  ens.split_cpu(_CPU_DEVICES.value)
  config = {"default": default, "cnn": cnn}[_CONFIG.value].get_config()
  ds = data_lib.load_dataset(config.data)
  x, y = ds.x_train, ds.y_train
  steps = x.shape[0] // config.batch_size
  model = models.build_model(config.model, ds.num_classes)
  tx = ens.make_optimizer(config.optim, steps, config.num_epochs)
  engine = ens.Engine(model, tx, mesh=ens.make_mesh(_RUNS.value))
  ik, dk, ak = ens.member_keys(0, np.arange(_RUNS.value))
  state = engine.init(ik, x[:1])
  xd, yd = engine.replicate(jnp.asarray(x)), engine.replicate(jnp.asarray(y))
  idx = engine.shard(data_lib.epoch_permutations(dk, 1, x.shape[0], config.batch_size)[:, :steps])
  ak = engine.shard(ak)
  state, _ = engine.train_epoch(state, xd, yd, idx, ak, 0)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as d:
    t = time.perf_counter()
    with jax.profiler.trace(d, create_perfetto_trace=True):
      state, out = engine.train_epoch(state, xd, yd, idx, ak, 0)
      jax.block_until_ready((state, out))
    wall = time.perf_counter() - t
    with gzip.open(glob.glob(f"{d}/**/*perfetto_trace.json.gz", recursive=True)[0]) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  by_op, by_kind = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not _SKIP.search(e["name"]):
      by_op[e["name"]] += e.get("dur", 0)
      by_kind[kind(e["name"])] += e.get("dur", 0)
  total = sum(by_kind.values())
  print(f"{_CONFIG.value} R={_RUNS.value} on {len(jax.devices())} device(s), "
        f"{engine.resolved_member_strategy}/{engine.resolved_epoch_loop}: epoch {wall:.3f} s "
        f"traced, XLA ops {total / 1e6:.3f} s")
  for k, v in by_kind.most_common():
    print(f"  {k:<36}{v / 1e3:9.1f} ms {100 * v / total:5.1f}%")
  print("top ops:")
  for k, v in by_op.most_common(_TOP.value):
    print(f"  {k:<36}{v / 1e3:9.1f} ms")


if __name__ == "__main__":
  app.run(main)

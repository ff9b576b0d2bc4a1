"""Trains an ensemble of R seeds of one architecture and records difficulty scores.

  python experiments/train.py --config=experiments/configs/default.py --workdir=/tmp/jaxdiff/mlp \
      --config.num_runs=32
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import cli  # pylint: disable=g-import-not-at-top
from jaxdiff import ensemble  # pylint: disable=g-import-not-at-top
from jaxdiff import train

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumed if it exists).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  ensemble.split_cpu(_CONFIG.value.get("cpu_devices", 0))  # before JAX starts: one device per core
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)

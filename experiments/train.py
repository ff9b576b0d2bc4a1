"""Trains an ensemble of R seeds of one architecture and records difficulty scores.

  python experiments/train.py --config=experiments/configs/default.py --workdir=/tmp/jaxdiff/mlp \
      --config.num_runs=32

Several processes (hosts) train one ensemble together, each the members of its own devices (see
jaxdiff/distributed.py): the same command in every process, with
  --coordinator_address=host0:12345 --num_processes=N --process_id=i   (or --distributed on
SLURM / TPU pods, where JAX detects them).
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import cli  # pylint: disable=g-import-not-at-top
from jaxdiff import distributed  # pylint: disable=g-import-not-at-top
from jaxdiff import ensemble  # pylint: disable=g-import-not-at-top
from jaxdiff import train

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumed if it exists).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-process: host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-process: processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-process: this process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-process: let JAX detect the cluster (SLURM, TPU pods).")
_DIST_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 120, "Multi-process: seconds to wait for every process to join.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  ensemble.split_cpu(_CONFIG.value.get("cpu_devices", 0))  # before JAX starts: one device per core
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         auto=_DISTRIBUTED.value, timeout_s=_DIST_TIMEOUT.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)

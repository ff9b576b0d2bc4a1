"""Runs the whole study: architectures x runs, analysis, fingerprint, pruning, one report.

  python experiments/study.py --config=experiments/configs/study.py --workdir=/tmp/jaxdiff/study

writes <workdir>/report/report.md (+ figures/, tables/, findings.json) and prints each finding.
Rerunning with the same --workdir skips finished architectures and stages and resumes interrupted
trainings. Override any field: --config.train.num_runs=8 --config.pruning.enabled=False.
"""

import os
import sys

# The analysis runs numpy in threads and the fingerprint many small L-BFGS fits: one BLAS thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import cli  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxdiff import ensemble  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxdiff import study  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Study folder (resumed if it exists).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Before JAX starts: one CPU device per core.
  ensemble.split_cpu(_CONFIG.value.train.get("cpu_devices", 0))
  findings = study.run_study(_CONFIG.value, _WORKDIR.value)
  print("\n".join(findings["summary"]))
  print(f"report: {findings['report']}  (total {findings['timings']['total']:.0f} s)")


if __name__ == "__main__":
  cli.run(main)

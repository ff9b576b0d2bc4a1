"""C-scores, memorisation and out-of-sample probabilities of an ensemble trained on subsets.

  python experiments/train.py --config=experiments/configs/default.py --workdir=/tmp/heldout \
      --config.subset_fraction=0.5 --config.data.label_noise=0.1 --config.num_epochs=40
  python experiments/heldout.py --workdir=/tmp/heldout --out=/tmp/heldout/heldout \
      [--full_data_workdir=<same config with subset_fraction=1.0>]

Writes to --out: the arrays of `heldout.save_result` (.npy), summary.md, c_score_hist.png, and with
label noise noise_auroc.{md,json}: AUROC of C-score and out-of-sample confidence against the
in-sample scores for finding the flipped labels. Seconds on MNIST-1D (R=16, N=4,000).
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import cli  # pylint: disable=g-import-not-at-top
from jaxdiff import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
from jaxdiff.report import heldout as heldout_report  # pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (subset_fraction < 1).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <workdir>/heldout).")
_MIN_HOLDOUT = flags.DEFINE_integer("min_holdout", 2, "Fewer held-out members: flagged, NaN.")
_FULL = flags.DEFINE_string("full_data_workdir", None,
                            "Optional workdir of an ensemble trained on every example with the "
                            "same data and label noise: its scores join the AUROC table.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = _OUT.value or workdir_lib.heldout_dir(_WORKDIR.value)
  # Every input is checked before anything is written; a refusal is one line (cli.run).
  print(heldout_report.write_report(_WORKDIR.value, out, min_holdout=_MIN_HOLDOUT.value,
                             full_data_workdir=_FULL.value))


if __name__ == "__main__":
  cli.run(main)

"""Merges member blocks trained as independent jobs into the workdir of one run of all members.

  python experiments/merge.py --blocks=/tmp/jaxdiff/block0,/tmp/jaxdiff/block1 \
      --workdir=/tmp/jaxdiff/mlp

Each block is a finished workdir of experiments/train.py with its own `--config.first_member`
and `--config.num_runs`, the config otherwise the same (docs/scaling.md). The merged workdir is
what one run of all members writes (bit for bit on CPU), for analyze.py, heldout.py,
fingerprint.py, score.py and the exports alike. Expected runtime: seconds for MNIST-1D-sized
blocks (it reads and writes the blocks' files once; no training, no scoring).
"""

import os
import sys

from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import cli  # pylint: disable=g-import-not-at-top

_BLOCKS = flags.DEFINE_list("blocks", None, "Finished block workdirs, in any order.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The merged workdir (new, or an empty folder).")
flags.mark_flags_as_required(["blocks", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise cli.app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jaxdiff import blocks  # pylint: disable=g-import-not-at-top  (JAX after the flags)
  out = blocks.merge_blocks(_BLOCKS.value, _WORKDIR.value)
  logging.info("wrote %s", out)


if __name__ == "__main__":
  cli.run(main)

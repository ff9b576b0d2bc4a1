"""Computes scores from a training workdir's saved checkpoint and adds them to its score store.

  python experiments/score.py --workdir=/tmp/jaxdiff/mlp                       # final epoch
  python experiments/score.py --workdir=/tmp/jaxdiff/mlp --epoch=90 --scores=point,grand

Groups (`--scores`, default all): point (loss, margins, EL2N, ...), grand, input_grad
(input_grad_norm = ||d p_y / d x||_2), representation (prediction depth, prototypes). A
non-final epoch's scores are stored as `<name>_e<epoch>` (`loss_e90`). See
`jaxdiff.posthoc.score_workdir` (members trained outside jaxdiff: `posthoc.score_members`, from
Python, given their apply function and parameters). Expected runtime: the default config with 4
members, all groups, 36 s on a shared 2-core CPU (17 s of CPU; most of it compiling).
"""

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import cli  # pylint: disable=g-import-not-at-top
from jaxdiff import ensemble
from jaxdiff import posthoc

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/).")
_EPOCH = flags.DEFINE_integer("epoch", None, "Saved epoch to score (default: the newest, final).")
_SCORES = flags.DEFINE_list("scores", list(posthoc.GROUPS),
                            f"Score groups, some of {list(posthoc.GROUPS)}.")
_KNN_K = flags.DEFINE_integer("knn_k", None, "k of prediction depth's k-NN probes (default: "
                              "the workdir's scores.knn_k).")
_KNN_REFERENCE = flags.DEFINE_integer(
    "knn_reference", None, "Prediction depth's probes on this many training examples per member "
    "(approximate; 0 = all, exact; default: the workdir's scores.knn_reference).")
_GRAND_METHOD = flags.DEFINE_string("grand_method", None, "GraNd method (default: the "
                                    "workdir's scores.grand_method).")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", None, "Examples per scoring call (default: "
                                   "the workdir's scores.chunk_size; 0 = auto).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise cli.app.UsageError(f"unexpected arguments: {argv[1:]}")
  groups = posthoc.check_groups(_SCORES.value)  # before JAX starts: bad input costs nothing
  config = posthoc.read_config(_WORKDIR.value)
  ensemble.split_cpu(config.get("cpu_devices", 0))  # before JAX starts: one device per core
  posthoc.score_workdir(_WORKDIR.value, _EPOCH.value, groups, knn_k=_KNN_K.value,
                        knn_reference=_KNN_REFERENCE.value,
                        grand_method=_GRAND_METHOD.value, chunk_size=_CHUNK_SIZE.value)


if __name__ == "__main__":
  cli.run(main)

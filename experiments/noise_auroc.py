"""AUROC of every score for finding the flipped labels of a label-noise run.

  python experiments/train.py --config=experiments/configs/default.py --workdir=/tmp/noisy \
      --config.data.label_noise=0.1
  python experiments/noise_auroc.py --workdir=/tmp/noisy

Prints a markdown table and writes <workdir>/noise_auroc.{md,json}.
"""

import os
import sys

from absl import app
from absl import flags
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import cli  # pylint: disable=g-import-not-at-top
from jaxdiff import scores  # pylint: disable=g-import-not-at-top
from jaxdiff import store
from jaxdiff import workdir as workdir_lib
from jaxdiff.report import tables

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir with noise_mask.npy.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  path = workdir_lib.path(_WORKDIR.value, "noise_mask")
  if not os.path.exists(path):
    raise app.UsageError(f"{path} does not exist: train with --config.data.label_noise > 0")
  s = workdir_lib.load_scores(_WORKDIR.value)
  noisy = store.load_npy(path, (s.example_ids.size,), what="flipped labels").astype(bool)
  rows = scores.auroc_table({k: s.get(k) for k in s.scores if k != "mb_presentations"}, noisy)
  lines = [f"Label noise {noisy.mean():.0%} ({int(noisy.sum())} of {noisy.size}), "
           f"{s.meta.get('arch')}, R={rows[0]['runs'] if rows else 0}, "
           f"{s.meta.get('num_epochs')} epochs.", ""]
  table = pd.DataFrame(
      [[r["score"], f"{r['auroc_mean_score']:.3f}",
        f"{r['auroc_single_mean']:.3f} +- {r['auroc_single_std']:.3f}"] for r in rows],
      columns=["score", "AUROC (run-averaged score)", "AUROC single run (mean +- std)"])
  text = "\n".join(lines) + "\n" + tables.markdown_table(table, cell=str, empty=None)
  print(text)
  store.atomic_write_text(workdir_lib.path(_WORKDIR.value, "noise_auroc_md"), text)
  store.atomic_write_json(workdir_lib.path(_WORKDIR.value, "noise_auroc_json"), rows)


if __name__ == "__main__":
  cli.run(main)

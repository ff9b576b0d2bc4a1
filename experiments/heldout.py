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
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import cli  # pylint: disable=g-import-not-at-top
from jaxdiff import heldout  # pylint: disable=g-import-not-at-top
from jaxdiff import store

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
  out = _OUT.value or os.path.join(_WORKDIR.value, "heldout")
  w = heldout.read_workdir(_WORKDIR.value)
  if not w.has_subsets:
    raise app.UsageError(f"{_WORKDIR.value} was trained without subsets (every member saw every "
                         "example): retrain with --config.subset_fraction=0.5")
  res = heldout.analyze(w, min_holdout=_MIN_HOLDOUT.value)
  heldout.save_result(res, out, w.example_ids)
  heldout.plot_c_scores(res.c, os.path.join(out, "c_score_hist.png"), w.noise_mask,
                        title=f"{w.meta.get('arch')}, R={w.mask.shape[0]}, "
                              f"{w.meta.get('num_epochs')} epochs")
  rows = None
  if w.noise_mask is not None and w.noise_mask.any():
    s = store.load_scores(os.path.join(_WORKDIR.value, "scores"))
    held, insample = heldout.heldout_difficulty(res)
    full = None
    if _FULL.value:
      f = heldout.read_workdir(_FULL.value)
      if (f.noise_mask is None or not np.array_equal(f.noise_mask, w.noise_mask)
          or not np.array_equal(f.labels, w.labels)):
        raise app.UsageError(f"{_FULL.value} has other labels or flipped examples than "
                             f"{_WORKDIR.value}: train it with the same data and label noise")
      fs = store.load_scores(os.path.join(_FULL.value, "scores"))
      full = {k: fs.get(k) for k in fs.scores if k != "mb_presentations"}
    rows, _ = heldout.noise_auroc_rows(
        held, insample, {k: s.get(k) for k in s.scores if k != "mb_presentations"}, w.noise_mask,
        full_data_scores=full)
    store.atomic_write_json(os.path.join(out, "noise_auroc.json"), rows)
  text = heldout.summary_markdown(w, res, rows, min_holdout=_MIN_HOLDOUT.value,
                                  figure="c_score_hist.png")
  store.atomic_write_text(os.path.join(out, "summary.md"), text)
  if rows:
    store.atomic_write_text(os.path.join(out, "noise_auroc.md"),
                            text[text.index("Label-noise AUROC"):])
  print(text)


if __name__ == "__main__":
  cli.run(main)

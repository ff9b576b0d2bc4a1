"""Exports a training workdir to the formats other tools read (cleanlab, cartography, AUM, tidy).

  python experiments/export.py --workdir=/tmp/heldout --out=/tmp/heldout/export \
      --format=cleanlab,cartography,aum,tidy

cleanlab: pred_probs.npy + labels.npy (out-of-sample with subset_fraction < 1); cartography: one
training_dynamics directory per member (needs --config.scores.save_history=True); aum:
aum_values.csv; tidy: tidy.parquet (tidy.csv without pyarrow). See jaxdiff/export.py for layouts.
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import cli  # pylint: disable=g-import-not-at-top
from jaxdiff import export  # pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished training workdir.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <workdir>/export).")
_FORMAT = flags.DEFINE_list("format", list(export.FORMATS),
                            f"Comma-separated subset of {','.join(export.FORMATS)}.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = _OUT.value or os.path.join(_WORKDIR.value, "export")
  try:
    done = export.export(_WORKDIR.value, out, _FORMAT.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  for fmt in done:
    print(f"{fmt}: {os.path.join(out, fmt)}")


if __name__ == "__main__":
  cli.run(main)

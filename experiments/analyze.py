"""Turns training workdirs into an analysis report (reliability, agreement, sensitivity).

  python experiments/analyze.py --workdirs=workdirs/mlp,workdirs/cnn --out=report/

writes report/report.md, report/tables/*.csv|json, report/per_example/*.npz, report/figures/*.png.
With one workdir the architecture-sensitivity sections are skipped. Expected runtime: seconds for
MNIST-1D-sized runs. 4 architectures x 100 runs x 50,000 examples x 10 scores with --num_draws=10:
62 s of analysis + 17 s of report on 2 shared cores (benchmarks/bench_analysis.py).
"""

import os

# analyze() runs its stages in threads: one BLAS thread each avoids oversubscribing the cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import analysis  # pylint: disable=g-import-not-at-top
from jaxdiff import cli
from jaxdiff import workdir as workdir_lib
from jaxdiff.report import analysis as analysis_report  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", None, "Training workdirs (each with scores/ and config.json).")
flags.DEFINE_string("out", None, "Output folder of the report.")
flags.DEFINE_list("scores", None, "Scores to analyse (default: all).")
flags.DEFINE_string("primary_score", None, "Score for figures and example lists (default: loss).")
flags.DEFINE_integer("num_draws", 20, "Random choices of runs per reliability point.")
flags.DEFINE_integer("kendall_draws", 1, "Draws that also compute Kendall's tau (slow).")
flags.DEFINE_list("fractions", ["0.1", "0.3", "0.5"], "Pruning fractions for top-k overlaps.")
flags.DEFINE_float("alpha", 0.05, "Significance level (Bonferroni and Benjamini-Hochberg).")
flags.DEFINE_integer("num_permutations", 0, "Permutation-test relabellings (0: t-tests only).")
flags.DEFINE_integer("top_m", 20, "Length of the example lists.")
flags.DEFINE_integer("num_workers", 2, "Threads.")
flags.DEFINE_integer("seed", 0, "Seed of the random draws.")
flags.DEFINE_bool("gallery", True, "Draw the gallery (loads the dataset from config.json).")
flags.DEFINE_bool("figures", True, "Draw figures.")
flags.DEFINE_bool("progress", True, "Log each analysis stage with the elapsed time and what is "
                  "left.")
flags.mark_flags_as_required(["workdirs", "out"])


def load_inputs(workdir):
  """The training inputs `[N, ...]` and their kind, from the workdir's config; None on failure."""
  try:
    import ml_collections
    from jaxdiff import data
    with open(workdir_lib.path(workdir, "config")) as f:
      cfg = json.load(f)
    ds = data.load_dataset(ml_collections.ConfigDict(cfg["data"]))
    return ds.x_train, ds.kind
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("gallery skipped: could not load the dataset of %s (%s: %s)", workdir,
                    type(e).__name__, e)
    return None


def main(argv):
  del argv
  sets = analysis.load_workdirs(FLAGS.workdirs)
  logging.info("analysing %s", {k: v.num_runs for k, v in sets.items()})
  notes = []
  # Without --scores, analyze() leaves out bookkeeping, non-finite (*_inf) and constant scores and
  # lists them with their reason in report.md.
  result = analysis.analyze(
      sets, scores=FLAGS.scores or None, primary_score=FLAGS.primary_score,
      num_draws=FLAGS.num_draws, kendall_draws=FLAGS.kendall_draws, fractions=[float(f) for f in FLAGS.fractions],
      alpha=FLAGS.alpha, num_permutations=FLAGS.num_permutations, top_m=FLAGS.top_m,
      num_workers=FLAGS.num_workers, seed=FLAGS.seed, progress=FLAGS.progress)
  inputs = None
  if FLAGS.gallery and FLAGS.figures:
    inputs = load_inputs(FLAGS.workdirs[0])
    if inputs is None:
      notes.append("The gallery was skipped: the dataset could not be loaded (see the log).")
  x, kind = inputs if inputs is not None else (None, None)
  written = analysis_report.write_report(result, FLAGS.out, x=x, kind=kind, figures=FLAGS.figures,
                                         notes=notes)
  logging.info("wrote %d files to %s; timings %s", len(written), FLAGS.out, result.timings)


if __name__ == "__main__":
  cli.run(main)

"""Fingerprint architectures from a few architecture-sensitive examples' difficulty scores.

Reads `<workdir>/scores` of several training workdirs (one architecture each), splits each
architecture's runs into fit and test runs, selects examples on fit runs, and writes to --out:
report.md, accuracy_vs_k.{md,csv,png}, accuracy_vs_fit_runs.csv, holdout.csv and fingerprint/.

  python experiments/fingerprint.py --workdirs=wd/mlp,wd/cnn,wd/cnn_wide,wd/resnet \\
      --score=loss --out=fp_report/

Apply the saved fingerprint to a new model's scores:
  jaxdiff.fingerprint.load_fingerprint("fp_report/fingerprint").predict(
      jaxdiff.store.load_scores("wd/new/scores")).answer
"""

import os
import sys

# The classifiers make thousands of small L-BFGS steps; multi-threaded OpenBLAS on tiny vectors was
# ~20x slower than one thread on a loaded 2-core machine (one 4000-feature fit: 1.2 s vs 0.06 s).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from absl import flags, logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxdiff import cli  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxdiff import fingerprint  # noqa: E402  pylint: disable=g-import-not-at-top
from jaxdiff.report import fingerprint as fingerprint_report  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", None, "Training workdirs, one per architecture.", required=True)
flags.DEFINE_list("names", [], "Architecture names (default: meta['arch'], else workdir names).")
flags.DEFINE_list("score", ["loss"], "Score name(s) used as features.")
flags.DEFINE_string("out", None, "Output directory for the report and the fingerprint.",
                    required=True)
flags.DEFINE_list("ks", [str(k) for k in fingerprint.DEFAULT_KS], "Numbers of examples k.")
flags.DEFINE_list("methods", list(fingerprint.SELECTION_METHODS), "Selection methods.")
flags.DEFINE_enum("test", "anova", list(fingerprint.TESTS),
                  "Per-example test: one-way ANOVA F, or min over pairs of Welch t.")
flags.DEFINE_float("alpha", 0.05, "Family-wise error rate for Bonferroni selection.")
flags.DEFINE_float("fit_fraction", 0.5, "Fraction of each architecture's runs used to fit.")
flags.DEFINE_integer("seed", 0, "Seed of the run split, random selection, CV folds, k-means.")
flags.DEFINE_integer("random_repeats", 5, "Draws averaged for random selection.")
flags.DEFINE_integer("fingerprint_k", 10, "k of the saved fingerprint.")
flags.DEFINE_enum("fingerprint_method", "pvalue", list(fingerprint.SELECTION_METHODS),
                  "Selection method of the saved fingerprint and the hold-out study.")
flags.DEFINE_integer("holdout_k", 10, "k of the hold-one-architecture-out study.")
flags.DEFINE_integer("fit_runs_k", 10, "k of the accuracy-vs-fit-runs study.")
flags.DEFINE_integer("cv_folds", 5, "Folds choosing the L2 strength.")
flags.DEFINE_float("none_quantile", 0.99, "Quantile of fit-run distances above which a run is "
                   "'none of these'.")


def main(argv):
  del argv
  sets = fingerprint.load_workdirs(FLAGS.workdirs, FLAGS.names)
  data = fingerprint.collect_runs(sets, FLAGS.score)
  report = fingerprint.run_report(
      data, ks=[int(k) for k in FLAGS.ks], methods=FLAGS.methods, test=FLAGS.test,
      alpha=FLAGS.alpha, fit_fraction=FLAGS.fit_fraction, seed=FLAGS.seed,
      random_repeats=FLAGS.random_repeats, fingerprint_k=FLAGS.fingerprint_k,
      fingerprint_method=FLAGS.fingerprint_method, holdout_k=FLAGS.holdout_k,
      fit_runs_k=FLAGS.fit_runs_k, cv_folds=FLAGS.cv_folds, none_quantile=FLAGS.none_quantile)
  paths = fingerprint_report.write_report(report, FLAGS.out)
  logging.info("%s", report.header)
  print(fingerprint_report.accuracy_table_markdown(report.accuracy_vs_k))
  for name, path in paths.items():
    logging.info("wrote %s: %s", name, path)


if __name__ == "__main__":
  cli.run(main)

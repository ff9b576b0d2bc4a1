"""Benchmark of the full analysis: 100 runs x 50,000 examples x 10 scores x 4 architectures.

  PYTHONPATH=. python benchmarks/bench_analysis.py [--examples=50000 --num_draws=10 ...]

Generates synthetic score tensors in memory (common difficulty factor + per-score part +
architecture shifts on 2% of examples + run noise; two count-like scores with ties), times each
stage of `jaxdiff.analysis.analyze` (Welch t-tests, the analyze script's default) and of writing the
report, then times the permutation-test alternative on one pair of architectures, prints a table
and writes benchmarks/results/analysis.json atomically.
"""

import os

# analyze() runs its stages in threads: one BLAS thread each avoids oversubscribing the 2 cores
# (OpenBLAS threads spin; nested parallelism made the permutation matmuls several times slower).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import platform  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import scipy

from jaxdiff import analysis
from jaxdiff import store
from jaxdiff.report import analysis as analysis_report

FLAGS = flags.FLAGS
flags.DEFINE_integer("runs", 100, "Runs per architecture.")
flags.DEFINE_integer("examples", 50_000, "Examples.")
flags.DEFINE_integer("scores", 10, "Scores.")
flags.DEFINE_integer("archs", 4, "Architectures.")
flags.DEFINE_integer("num_draws", 10, "Random choices of runs per reliability point.")
flags.DEFINE_integer("kendall_draws", 1, "Draws with Kendall's tau.")
flags.DEFINE_integer("num_permutations", 1000,
                     "Relabellings of the separately timed permutation test (one pair).")
flags.DEFINE_integer("num_workers", 2, "Threads.")
flags.DEFINE_bool("figures", True, "Also time writing the figures.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        "analysis.json"), "Result JSON.")


def synthetic_sets(runs, n, num_scores, num_archs, seed=0):
  """arch -> ScoreSet of float32 `[runs, n]` scores of known structure (see module docstring)."""
  rng = np.random.default_rng(seed)
  common = rng.standard_normal(n, dtype=np.float32)
  truth = [common * rng.uniform(0.5, 1.5) + rng.standard_normal(n, dtype=np.float32) * 0.5
           for _ in range(num_scores)]
  noise_sd = rng.uniform(0.5, 2.0, num_scores).astype(np.float32)
  labels = rng.integers(0, 10, n)
  sets = {}
  for k in range(num_archs):
    shift = np.zeros(n, np.float32)
    hit = rng.choice(n, n // 50, replace=False)
    shift[hit] = rng.normal(0.0, 1.0, hit.size)
    scores = {}
    for j in range(num_scores):
      s = rng.standard_normal((runs, n), dtype=np.float32)
      s *= noise_sd[j]
      s += truth[j] + shift
      if j >= num_scores - 2:  # count-like scores (e.g. forgetting events): many ties
        np.rint(s, out=s)
      scores[f"score{j}"] = s
    meta = dict(dataset="synthetic", arch=f"arch{k}", num_runs=runs, diverged=[False] * runs)
    sets[f"arch{k}"] = store.ScoreSet(scores=scores, example_ids=np.arange(n), labels=labels,
                                      meta=meta)
  return sets


def main(argv):
  del argv
  t0 = time.perf_counter()
  sets = synthetic_sets(FLAGS.runs, FLAGS.examples, FLAGS.scores, FLAGS.archs)
  gen_s = time.perf_counter() - t0
  load_before = os.getloadavg()
  t0, c0 = time.perf_counter(), time.process_time()
  result = analysis.analyze(sets, num_draws=FLAGS.num_draws, kendall_draws=FLAGS.kendall_draws,
                            num_workers=FLAGS.num_workers)
  analysis_s = time.perf_counter() - t0
  # CPU seconds of this process (all threads): less sensitive than wall time to other users' load.
  analysis_cpu_s = time.process_time() - c0
  with tempfile.TemporaryDirectory() as out:
    t0 = time.perf_counter()
    analysis_report.write_report(result, out, figures=FLAGS.figures)
    report_s = time.perf_counter() - t0
  # The permutation-test alternative, timed on one pair for the primary score.
  by_arch = {a: s.get(result.primary_score) for a, s in sets.items()}
  pairs = [(a, b) for i, a in enumerate(by_arch) for b in list(by_arch)[i + 1:]]
  t0 = time.perf_counter()
  perm_p = analysis.permutation_test(by_arch[pairs[0][0]], by_arch[pairs[0][1]],
                                     FLAGS.num_permutations)
  perm_pair_s = time.perf_counter() - t0
  perm_min_p = float(perm_p.min())
  load_after = os.getloadavg()
  timings = dict(result.timings)
  stages = ["reliability", "agreement", "sensitivity", "write_tables", "figures"]
  rows = [(s, timings.get(s, float("nan"))) for s in stages]
  rows += [("analysis total", analysis_s), ("report writing", report_s),
           ("analysis + report", analysis_s + report_s),
           (f"perm. test 1 pair P={FLAGS.num_permutations}", perm_pair_s)]
  shape = (f"{FLAGS.runs} runs x {FLAGS.examples} examples x {FLAGS.scores} scores x "
           f"{FLAGS.archs} archs")
  print(f"\nanalysis benchmark: {shape}; draws {FLAGS.num_draws}, Kendall draws "
        f"{FLAGS.kendall_draws}, Welch t-tests, {FLAGS.num_workers} threads; data generation "
        f"{gen_s:.1f} s (not counted)")
  print(f"{'stage':<30}{'seconds':>9}")
  for name, sec in rows:
    print(f"{name:<30}{sec:>9.2f}")
  print(f"permutation test: {perm_pair_s / FLAGS.num_permutations * 1e3:.2f} ms per relabelling "
        f"per pair (extrapolated, all {len(pairs)} pairs x {FLAGS.scores} scores: "
        f"{perm_pair_s * len(pairs) * FLAGS.scores:.0f} s; smallest p {perm_min_p:.2g})")
  print(f"analysis CPU time {analysis_cpu_s:.1f} s (all threads); load average before/after: "
        f"{load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} CPUs")
  counts = result.tables["sensitivity_counts"]
  store.atomic_write_json(FLAGS.out, dict(
      benchmark="analysis", shape=dict(runs=FLAGS.runs, examples=FLAGS.examples,
                                       scores=FLAGS.scores, archs=FLAGS.archs),
      settings=result.settings, num_workers=FLAGS.num_workers, seconds=dict(rows),
      analysis_cpu_s=analysis_cpu_s, data_generation_s=gen_s, loadavg_before=load_before, loadavg_after=load_after,
      cpus=os.cpu_count(), numpy=np.__version__, scipy=scipy.__version__,
      python=platform.python_version(), machine=platform.machine(),
      permutation_test=dict(pairs_timed=1, num_permutations=FLAGS.num_permutations,
                            seconds_per_pair=perm_pair_s, num_pairs=len(pairs),
                            smallest_p=perm_min_p),
      planted_examples_per_arch=FLAGS.examples // 50,
      median_bh_discoveries_per_pair=float(counts.bh.median()) if len(counts) else None))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)

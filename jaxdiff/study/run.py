"""`run_study`: the study end to end, stage after stage, each skipped when its result is current."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from jaxdiff import data as data_lib
from jaxdiff import progress as progress_lib
from jaxdiff import workdir as workdir_lib
from jaxdiff.report import study as study_report
from jaxdiff.study import findings, stages
from jaxdiff.study.config import check_study_workdir, validate_config
from jaxdiff.study.scores import choose_score, usable_scores


@contextlib.contextmanager
def _timed(timings: dict, name: str, prog: progress_lib.Stages):
  prog.begin()
  yield
  timings[name] = prog.done(name)


def run_study(config: ml_collections.ConfigDict, workdir: str,
              arrays: Mapping[str, np.ndarray] | None = None, *,
              train_fn: Callable[..., Any] | None = None) -> dict:
  """Runs (or finishes) the whole study and writes `<workdir>/report`.

  Args:
    config: see experiments/configs/study.py (`train`, `archs`, `arch_order`, `analysis`,
      `fingerprint`, `pruning`, `compilation_cache`).
    workdir: the study folder (see `jaxdiff.study`); rerunning resumes it.
    arrays: training data for `config.train.data.name == "arrays"`.
    train_fn: `train.train_and_evaluate` (replaceable in tests).

  With `config.progress` (default True) each stage logs as it ends, with the time so far and the
  stages left (absl INFO, `jaxdiff.progress`), and the analysis and pruning their own progress.

  Returns:
    The findings dict (also written as report/findings.json), with "report" the report.md path.
  """
  timings, t_all = {}, time.perf_counter()
  validate_config(config)
  check_study_workdir(config, workdir)
  if config.get("compilation_cache", False):
    stages.enable_compilation_cache(workdir_lib.study_path(workdir, "jax_cache"))
  out = workdir_lib.study_report_dir(workdir)
  prog = progress_lib.Stages("study", [
      "train", "analysis", *(["fingerprint"] if config.fingerprint.enabled else []),
      *(["pruning"] if config.pruning.enabled else []), "report"], config.get("progress", True))
  prog.plan(f"{len(config.archs)} architecture(s) x {config.train.num_runs} runs")
  with _timed(timings, "train", prog):
    workdirs = stages.train_archs(config, workdir, arrays, train_fn)
  sets = stages.load_sets(workdirs)
  names, dropped = usable_scores(sets, list(config.analysis.scores) or None)
  primary = choose_score(names, config.analysis.primary_score)
  key = stages.sets_key(workdirs)
  ds = data_lib.load_dataset(config.train.data, arrays)

  analysis_dir = workdir_lib.study_report_dir(workdir, "analysis")
  with _timed(timings, "analysis", prog):
    analysis = stages.run_analysis(
        config, sets, names, primary, analysis_dir,
        stages.digest([key, config.analysis.to_dict(), names, primary]), x=ds.x_train,
        kind=ds.kind, dropped=dropped)
  fp, results, pr_score = None, None, ""
  if config.fingerprint.enabled:
    with _timed(timings, "fingerprint", prog):
      fp_score = choose_score(names, config.fingerprint.score or primary)
      fp_dir = workdir_lib.study_report_dir(workdir, "fingerprint")
      fp = stages.run_fingerprint(config, sets, fp_score, fp_dir,
                                  stages.digest([key, config.fingerprint.to_dict(), fp_score]))
  if config.pruning.enabled:
    with _timed(timings, "pruning", prog):
      pr_score = choose_score(names, config.pruning.score or primary)
      results = stages.run_pruning_stage(config, sets, pr_score, workdir, arrays, train_fn)

  with _timed(timings, "report", prog):
    f = findings.study_findings(config, sets, workdirs, num_examples=ds.num_train, scores=names,
                                dropped=dropped, primary=primary, analysis=analysis,
                                fingerprint=fp, pruning_results=results, pruning_score=pr_score)
  timings["total"] = time.perf_counter() - t_all
  f["timings"] = timings
  f["compute_seconds"] = stages.read_timings(workdir)
  return study_report.write_report(f, out, analysis.tables["reliability"], analysis_dir)

"""The study's stages: training every architecture, then analysis, fingerprint and pruning, each
skipped when its output folder holds the result for the same inputs (the stage cache), and the
compute time of every piece of work (timings.json)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import pandas as pd

from jaxdiff import analysis
from jaxdiff import data as data_lib
from jaxdiff import fingerprint
from jaxdiff import progress as progress_lib
from jaxdiff import pruning
from jaxdiff import store
from jaxdiff import train
from jaxdiff import workdir as workdir_lib
from jaxdiff.analysis import agreement as agreement_lib
from jaxdiff.analysis import sensitivity
from jaxdiff.report import analysis as analysis_report
from jaxdiff.report import fingerprint as fingerprint_report
from jaxdiff.report.tables import safe_name
from jaxdiff.study.config import StudyError, arch_config, arch_names


# ----------------------------------------------------------------------------- training


def arch_workdir(workdir: str, name: str) -> str:
  """`<workdir>/runs/<name>`: the training workdir of architecture `name` (`workdir.py`)."""
  return workdir_lib.study_arch_workdir(workdir, name)


def is_trained(workdir: str) -> bool:
  """A training workdir is finished when its scores/meta.json exists (written last)."""
  return workdir_lib.scores_complete(workdir)


def train_archs(config: ml_collections.ConfigDict, workdir: str,
                arrays: Mapping[str, np.ndarray] | None = None,
                train_fn: Callable[..., Any] | None = None) -> dict[str, str]:
  """Trains every architecture not yet finished; interrupted ones resume from their checkpoint.

  Returns:
    arch name -> its training workdir `<workdir>/runs/<arch>`.
  """
  train_fn = train_fn or train.train_and_evaluate
  out = {}
  names = arch_names(config)
  for i, name in enumerate(names):
    wd = arch_workdir(workdir, name)
    out[name] = wd
    if is_trained(wd):
      logging.info("[study] %s: trained already (%s), skipped", name, wd)
      continue
    logging.info("[study] training %s (%d/%d): %d runs x %d epochs", name, i + 1, len(names),
                 config.train.num_runs, config.train.num_epochs)
    t0 = time.perf_counter()
    train_fn(arch_config(config, name), wd, arrays=arrays)
    add_timing(workdir, time.perf_counter() - t0, "train", name)
    logging.info("[study] %s trained in %.0f s", name, time.perf_counter() - t0)
  return out


def find_workdirs(path: str) -> dict[str, str]:
  """Training workdirs under `path`, keyed by name.

  `path` may be one training workdir (with scores/), a study workdir (with runs/<arch>/), a study
  report folder (`<study>/report`), or a folder of training workdirs.

  Raises:
    StudyError if no finished training workdir is found.
  """
  path = os.path.abspath(path)
  if is_trained(path):
    return {os.path.basename(path): path}
  candidates = [path, workdir_lib.study_path(path, "runs")]
  if os.path.basename(path) == workdir_lib.STUDY_FILES["report"]:
    candidates.append(workdir_lib.study_path(os.path.dirname(path), "runs"))
  for c in candidates:
    if not os.path.isdir(c):
      continue
    found = {d: os.path.join(c, d) for d in sorted(os.listdir(c)) if is_trained(os.path.join(c, d))}
    if found:
      runs = c.endswith(workdir_lib.STUDY_FILES["runs"])
      order = _study_order(os.path.dirname(c) if runs else c, list(found))
      return {n: found[n] for n in order}
  raise StudyError(f"no finished training workdir (with scores/{store.META}) in {path!r}, its "
                   "runs/ folder or, for a report folder, the study's runs/")


def _study_order(study_dir: str, names: list[str]) -> list[str]:
  path = workdir_lib.study_path(study_dir, "config")
  try:
    with open(path) as f:
      order = list(json.load(f).get("arch_order") or [])
  except (OSError, json.JSONDecodeError):
    order = []
  return [n for n in order if n in names] + [n for n in names if n not in order]


def load_sets(workdirs: Mapping[str, str]) -> dict[str, store.ScoreSet]:
  """The score sets of training workdirs, keyed by the given names, checked to be comparable."""
  sets = {n: workdir_lib.load_scores(wd) for n, wd in workdirs.items()}
  store.check_compatible(sets)
  return sets


# ----------------------------------------------------------------------------- stage cache


def digest(obj: Any) -> str:
  """A short hash of a JSON-able object: the key of a stage's inputs."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sets_key(workdirs: Mapping[str, str]) -> dict:
  """What identifies trained score sets: each one's meta.json (rewritten on every training)."""
  key = {}
  for n, wd in workdirs.items():
    with open(os.path.join(workdir_lib.scores_dir(wd), store.META)) as f:
      key[n] = digest(f.read())
  return key


def _stage_done(out: str, key: str) -> bool:
  try:
    with open(os.path.join(out, ".stage.json")) as f:
      return json.load(f).get("key") == key
  except (OSError, json.JSONDecodeError):
    return False


def _mark_done(out: str, key: str, seconds: float) -> None:
  store.atomic_write_json(os.path.join(out, ".stage.json"), {"key": key, "seconds": seconds})


def add_timing(workdir: str, seconds: float, *keys: str) -> None:
  """Adds `seconds` at `keys` in <workdir>/timings.json: the compute time of every piece of work
  the study did, summed over invocations (a resumed study reports what all of it cost)."""
  path = workdir_lib.study_path(workdir, "timings")
  try:
    with open(path) as f:
      t = json.load(f)
  except (OSError, json.JSONDecodeError):
    t = {}
  node = t
  for k in keys[:-1]:
    node = node.setdefault(k, {})
  node[keys[-1]] = float(node.get(keys[-1], 0.0)) + float(seconds)
  store.atomic_write_json(path, t)


def read_timings(workdir: str) -> dict:
  """<workdir>/timings.json as {stage: seconds} with per-architecture / per-condition sums."""
  try:
    with open(workdir_lib.study_path(workdir, "timings")) as f:
      t = json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}
  order = ["train", "analysis", "fingerprint", "pruning"]
  keys = [k for k in order if k in t] + sorted(k for k in t if k not in order)
  return {k: (sum(t[k].values()) if isinstance(t[k], dict) else t[k]) for k in keys} | {
      "detail": t}


# ----------------------------------------------------------------------------- stages


def run_analysis(config: ml_collections.ConfigDict, sets: Mapping[str, store.ScoreSet],
                 names: Sequence[str], primary: str, out: str, key: str,
                 x: np.ndarray | None = None, kind: str | None = None,
                 dropped: Mapping[str, str] | None = None) -> analysis.Analysis:
  """Reliability, agreement and sensitivity (`analysis.analyze`) written to `out`; when `out`
  holds the result for the same inputs, read back from it (`load_analysis`) instead. `dropped`
  (score -> reason) is listed in its report.md.

  Returns:
    the `Analysis`, computed now or loaded from `out`.
  """
  if _stage_done(out, key):
    logging.info("[study] analysis: up to date in %s, loaded", out)
    return load_analysis(out)
  a = config.analysis
  t0 = time.perf_counter()
  res = analysis.analyze(sets, scores=list(names), primary_score=primary, num_draws=a.num_draws,
                         kendall_draws=a.kendall_draws, fractions=tuple(a.fractions),
                         alpha=a.alpha, num_permutations=a.num_permutations,
                         methods=tuple(a.methods), num_workers=a.num_workers, seed=a.seed,
                         dropped=dropped, progress=config.get("progress", True))
  analysis_report.write_report(res, out, x=x, kind=kind)
  _mark_done(out, key, time.perf_counter() - t0)
  add_timing(os.path.dirname(os.path.dirname(out)), time.perf_counter() - t0, "analysis")
  logging.info("[study] analysis done in %.0f s", time.perf_counter() - t0)
  return res


def load_analysis(out: str) -> analysis.Analysis:
  """The `Analysis` that `report.analysis.write_report` wrote to `out`, read back.

  Everything the written files hold comes back as computed: the tables (CSV), the settings,
  inputs, primary score, timings and dropped scores (analysis.json), the per-pair sensitivity
  (`PairwiseSensitivity` from per_example/*.npz) and the agreement (correlation matrices and PCA
  spectra from their tables, `Spectrum.loadings` None). The per-draw reliability curves and
  per-example spreads are not written: `curves` and `spreads` are empty.
  """
  with open(os.path.join(out, "analysis.json")) as f:
    info = json.load(f)
  table_dir = os.path.join(out, "tables")
  tables = {n[:-4]: _read_table(os.path.join(table_dir, n))
            for n in sorted(os.listdir(table_dir)) if n.endswith(".csv")}
  settings = info["settings"]
  archs = [d["arch"] for d in info["inputs"]]
  sens, ids, labels = {}, None, None
  for score in tables["sensitivity_counts"].score.unique():
    path = os.path.join(out, "per_example", f"sensitivity_{safe_name(score)}.npz")
    with np.load(path) as z:
      ids, labels = z["example_ids"], z["labels"]
      sens[score] = sensitivity.PairwiseSensitivity(
          archs=archs, pairs=[tuple(str(p).split(" vs ")) for p in z["pairs"]], t=z["t"],
          df=z["df"], log10_p=-z["neg_log10_p"], mean_diff=z["mean_diff"],
          hedges_g=z["hedges_g"], perm_p=z["perm_p"] if "perm_p" in z else None,
          num_permutations=int(settings["num_permutations"]), alpha=float(settings["alpha"]))
  if ids is None:  # one architecture: the examples from the extremes table (every example)
    ext = tables["difficulty_extremes"].sort_values("index")
    ids, labels = ext.example_id.to_numpy(), ext.label.to_numpy()
  return analysis.Analysis(
      tables=tables, curves={}, spreads={}, agreement=_agreement_of(tables), sensitivity=sens,
      example_ids=ids, labels=labels, primary_score=info["primary_score"], settings=settings,
      inputs=info["inputs"], timings=info["timings"], dropped=info.get("dropped", {}))


def _read_table(path: str) -> pd.DataFrame:
  try:
    return pd.read_csv(path)
  except pd.errors.EmptyDataError:  # a table without rows or columns (e.g. no agreement)
    return pd.DataFrame()


def _agreement_of(tables: Mapping[str, pd.DataFrame]) -> dict:
  """arch -> `agreement.score_agreement`-like dict (names, corr, pca, overlap) from the tables."""
  out = {}
  corr, pca, so = tables["correlation"], tables["pca"], tables["score_overlap"]
  if corr.empty:  # fewer than two scores: no agreement
    return out
  for a in dict.fromkeys(corr.arch):
    c = corr[corr.arch == a]
    names = sorted(set(c.score_a))
    mats = {m: g.pivot(index="score_a", columns="score_b", values="value").loc[names, names]
            .to_numpy() for m, g in c.groupby("method", sort=False)}
    spectra = {}
    for m, g in pca[pca.arch == a].groupby("method", sort=False):
      g = g.sort_values("component")
      kept = ~np.isnan(mats[m]).all(axis=1) & ~np.isnan(np.diag(mats[m]))
      spectra[m] = agreement_lib.Spectrum(
          eigenvalues=g.eigenvalue.to_numpy(), shares=g.share.to_numpy(), loadings=None,
          names=[n for n, k in zip(names, kept) if k])
    o = so[so.arch == a]
    overlap = {(float(f), side): g.pivot(index="score_a", columns="score_b", values="overlap")
               .loc[names, names].to_numpy() for (f, side), g in o.groupby(["fraction", "side"])}
    out[a] = dict(names=names, corr=mats, pca=spectra, overlap=overlap)
  return out


def run_fingerprint(config: ml_collections.ConfigDict, sets: Mapping[str, store.ScoreSet],
                    score: str, out: str, key: str) -> fingerprint.Report:
  """The fingerprint study (`fingerprint.run_report`) on one score, written to `out`; read back
  (`load_fingerprint_report`) when `out` was up to date."""
  if _stage_done(out, key):
    logging.info("[study] fingerprint: up to date in %s, loaded", out)
    return load_fingerprint_report(out)
  fp = config.fingerprint
  t0 = time.perf_counter()
  data = fingerprint.collect_runs(sets, [score])
  rep = fingerprint.run_report(
      data, ks=tuple(int(k) for k in fp.ks), methods=tuple(fp.methods), test=fp.test,
      alpha=fp.alpha, fit_fraction=fp.fit_fraction, seed=fp.seed,
      random_repeats=fp.random_repeats, fingerprint_k=fp.fingerprint_k,
      holdout_k=fp.holdout_k, fit_runs_k=fp.fit_runs_k, cv_folds=fp.cv_folds)
  fingerprint_report.write_report(rep, out)
  _mark_done(out, key, time.perf_counter() - t0)
  add_timing(os.path.dirname(os.path.dirname(out)), time.perf_counter() - t0, "fingerprint")
  logging.info("[study] fingerprint done in %.0f s", time.perf_counter() - t0)
  return rep


def load_fingerprint_report(out: str) -> fingerprint.Report:
  """The `fingerprint.Report` that `report.fingerprint.write_report` wrote to `out`, read back
  (its tables and saved fingerprint; `header` and `title` are not written: empty)."""
  holdout = os.path.join(out, "holdout.csv")
  return fingerprint.Report(
      accuracy_vs_k=pd.read_csv(os.path.join(out, "accuracy_vs_k.csv")),
      accuracy_vs_fit_runs=pd.read_csv(os.path.join(out, "accuracy_vs_fit_runs.csv")),
      holdout=pd.read_csv(holdout) if os.path.exists(holdout) else None,
      fingerprint=fingerprint.load_fingerprint(os.path.join(out, "fingerprint")), header="")


def run_pruning_stage(config: ml_collections.ConfigDict, sets: Mapping[str, store.ScoreSet],
                      score: str, workdir: str, arrays: Mapping[str, np.ndarray] | None = None,
                      train_fn: Callable[..., Any] | None = None) -> pd.DataFrame:
  """Trains the pruned ensembles (resumable, see `pruning.run_pruning`); per-seed results."""
  pr = config.pruning
  ss = sets[pr.arch]
  ds = data_lib.load_dataset(config.train.data, arrays)
  cfg = pruning.training_config(config.train, config.archs[pr.arch], num_seeds=pr.num_seeds,
                                num_epochs=pr.num_epochs, seed=pr.seed, scores=pr.scores,
                                label=f"{pr.arch} (pruned)")
  if pr.single_run >= int(ss.valid_runs.sum()):
    raise StudyError(f"config.pruning.single_run={pr.single_run} but {pr.arch} has "
                     f"{int(ss.valid_runs.sum())} valid runs")
  prog = progress_lib.Stages("study", enabled=config.get("progress", True), min_interval=0.0)

  def progress(name, i, total):
    prog.step("pruning", i, total, part="trainings", verb=f"done, next {name}")

  return pruning.run_pruning(cfg, ds, ss.get(score), ss.example_ids,
                             workdir_lib.study_path(workdir, "pruning"),
                             fractions=tuple(pr.fractions),
                             methods=tuple(pr.methods), keep=tuple(pr.keep),
                             single_run=pr.single_run, seed=pr.seed, train_fn=train_fn,
                             on_condition=progress,
                             on_trained=lambda n, sec: add_timing(workdir, sec, "pruning", n))


def enable_compilation_cache(directory: str) -> bool:
  """Turns on JAX's persistent compilation cache in `directory` unless one is already set.

  The pruned ensembles of one fraction have identical shapes, so all but the first of them load
  their compiled steps from the cache instead of compiling again (a tiny ensemble: ~8 s -> ~1 s
  per training on a 2-core CPU); a resumed study reuses the first invocation's compilations. This
  sets process-wide JAX options (`jax_compilation_cache_dir`, and caches every compilation).

  Returns:
    True if this call enabled it.
  """
  if jax.config.jax_compilation_cache_dir:
    return False
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return True

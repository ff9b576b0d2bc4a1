"""The paper's study end to end: architectures x runs, analysis, fingerprint, pruning, one report.

`run_study(config, workdir)` trains every architecture (resuming interrupted runs), runs the
analysis, the architecture fingerprint and the pruning experiment, and writes
`<workdir>/report/report.md` with figures and CSV/JSON tables (Kwok et al. 2024, arXiv 2401.01867).
Every stage skips work already done, so rerunning after an interruption finishes the study.

Layout of a study workdir::

    <workdir>/study_config.json     the resolved study config
    <workdir>/runs/<arch>/          one training workdir per architecture (train.train_and_evaluate)
    <workdir>/pruning/<condition>/  one training workdir per pruned training set
    <workdir>/report/report.md      the findings, each with its numbers
    <workdir>/report/findings.json  every number of report.md, machine-readable
    <workdir>/report/figures/       reliability, agreement, sensitivity, fingerprint, pruning
    <workdir>/report/tables/        CSV (and JSON) of every table
    <workdir>/report/analysis/      the full analysis report (analysis.write_report)
    <workdir>/report/fingerprint/   the full fingerprint report and the saved fingerprint
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import ml_collections
import numpy as np
import pandas as pd

from jaxdiff import store
from jaxdiff.analysis import report as report_lib

# Score used for figures, sensitivity, fingerprint and pruning when the config names none: the first
# of these that the runs recorded. EL2N is the pruning score of Paul et al. (2021); AUM, the mean
# training loss and the final loss are the fallbacks as the recorded set grows or shrinks.
PRIMARY_PREFERENCE = ("el2n", "aum", "mean_loss", "loss")
# Files in a score folder that are bookkeeping, not difficulty scores.
NOT_SCORES = report_lib.NOT_SCORES
SECTIONS = ("Reliability of single runs and of n-run means", "Agreement between scores",
            "Architecture-sensitive examples", "Architecture fingerprint", "Dataset pruning")


class StudyError(ValueError):
  """An invalid study config or an inconsistent study workdir."""


# ----------------------------------------------------------------------------- config


def arch_names(config: ml_collections.ConfigDict) -> list[str]:
  """Architecture names in report order: `config.arch_order` if set, else sorted."""
  archs = config.get("archs")
  if not archs:
    raise StudyError("config.archs is empty; give at least one architecture (name -> model config)")
  names = list(config.get("arch_order") or sorted(archs.keys()))
  unknown = [n for n in names if n not in archs]
  if unknown:
    raise StudyError(f"config.arch_order names {unknown}, not in config.archs "
                     f"({sorted(archs.keys())})")
  if len(set(names)) != len(names):
    raise StudyError(f"config.arch_order repeats a name: {names}")
  for n in names:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", n):
      raise StudyError(f"architecture name {n!r}: use letters, digits, '_', '.', '-' only")
  return names


def arch_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The training config of architecture `name`: `config.train` with its model and label."""
  if name not in config.archs:
    raise StudyError(f"unknown architecture {name!r}; valid: {sorted(config.archs.keys())}")
  cfg = ml_collections.ConfigDict(config.train.to_dict())
  cfg.model = ml_collections.ConfigDict(config.archs[name].to_dict())
  cfg.arch_label = name
  return cfg


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the whole study config before any training; errors name the bad value."""
  from jaxdiff import models, pruning, train  # pylint: disable=g-import-not-at-top
  names = arch_names(config)
  for n in names:
    try:
      train.validate_config(arch_config(config, n))
    except ValueError as e:
      raise StudyError(f"architecture {n!r}: {e}") from e
    try:
      models.build_model(config.archs[n], 10)  # unknown model fields
    except ValueError as e:
      raise StudyError(f"architecture {n!r}: {e}") from e
  if config.train.num_runs < 2:
    raise StudyError(f"config.train.num_runs={config.train.num_runs}: the study needs >= 2 runs "
                     "per architecture (reliability compares runs)")
  a = config.analysis
  for f in a.fractions:
    if not 0.0 < f < 1.0:
      raise StudyError(f"config.analysis.fractions has {f}; fractions must be in (0, 1)")
  fp = config.fingerprint
  if fp.enabled and len(names) < 2:
    raise StudyError("the fingerprint needs >= 2 architectures; set config.fingerprint.enabled="
                     "False or add architectures")
  if any(int(k) < 1 for k in fp.ks):
    raise StudyError(f"config.fingerprint.ks={tuple(fp.ks)}: every k must be >= 1")
  pr = config.pruning
  if pr.enabled:
    if pr.arch not in names:
      raise StudyError(f"config.pruning.arch={pr.arch!r} is not a study architecture; valid: "
                       f"{names}")
    pruning.conditions(pr.fractions, pr.methods, pr.keep)  # raises on bad names / fractions
    if not 0 <= pr.single_run < config.train.num_runs:
      raise StudyError(f"config.pruning.single_run={pr.single_run}: must be in "
                       f"[0, {config.train.num_runs})")
    cfg = pruning.training_config(config.train, config.archs[pr.arch], num_seeds=pr.num_seeds,
                                  num_epochs=pr.num_epochs, seed=pr.seed, scores=pr.scores)
    try:
      train.validate_config(cfg)
    except ValueError as e:
      raise StudyError(f"pruning training config: {e}") from e


def _check_study_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes study_config.json, or refuses a workdir whose architectures were trained otherwise.

  Only what decides the trained runs must match: `train` (but the fields `train.RESUME_SAFE_FIELDS`)
  and the model of every architecture in both configs. Architectures may be added or left out, and
  analysis, fingerprint, pruning settings may change (their stages then recompute).
  """
  from jaxdiff import train  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "study_config.json")
  resolved = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise StudyError(f"{path} is unreadable ({e}); remove it or use a new workdir") from e
    common = set(old.get("archs", {})) & set(resolved["archs"])
    flat = train.flatten_config
    a = flat({"train": old.get("train", {}), "archs": {n: old["archs"][n] for n in common}})
    b = flat({"train": resolved["train"], "archs": {n: resolved["archs"][n] for n in common}})
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                  and k.removeprefix("train.") not in train.RESUME_SAFE_FIELDS)
    if diff:
      details = "; ".join(f"{k}: workdir has {a.get(k)!r}, config has {b.get(k)!r}"
                          for k in diff[:6])
      raise StudyError(f"study workdir {workdir!r} was trained with another config ({details}). "
                       "Use a new --workdir, or the original config to resume.")
  os.makedirs(workdir, exist_ok=True)
  store.atomic_write_json(path, resolved)


# ----------------------------------------------------------------------------- training


def arch_workdir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "runs", name)


def is_trained(workdir: str) -> bool:
  """A training workdir is finished when its scores/meta.json exists (written last)."""
  return os.path.exists(os.path.join(workdir, "scores", store.META))


def train_archs(config: ml_collections.ConfigDict, workdir: str,
                arrays: Mapping[str, np.ndarray] | None = None,
                train_fn: Callable[..., Any] | None = None) -> dict[str, str]:
  """Trains every architecture not yet finished; interrupted ones resume from their checkpoint.

  Returns:
    arch name -> its training workdir `<workdir>/runs/<arch>`.
  """
  if train_fn is None:
    from jaxdiff import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
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
  candidates = [path, os.path.join(path, "runs")]
  if os.path.basename(path) == "report":
    candidates.append(os.path.join(os.path.dirname(path), "runs"))
  for c in candidates:
    if not os.path.isdir(c):
      continue
    found = {d: os.path.join(c, d) for d in sorted(os.listdir(c)) if is_trained(os.path.join(c, d))}
    if found:
      order = _study_order(os.path.dirname(c) if c.endswith("runs") else c, list(found))
      return {n: found[n] for n in order}
  raise StudyError(f"no finished training workdir (with scores/{store.META}) in {path!r}, its "
                   "runs/ folder or, for a report folder, the study's runs/")


def _study_order(study_dir: str, names: list[str]) -> list[str]:
  path = os.path.join(study_dir, "study_config.json")
  try:
    with open(path) as f:
      order = list(json.load(f).get("arch_order") or [])
  except (OSError, json.JSONDecodeError):
    order = []
  return [n for n in order if n in names] + [n for n in names if n not in order]


def load_sets(workdirs: Mapping[str, str]) -> dict[str, store.ScoreSet]:
  """The score sets of training workdirs, keyed by the given names, checked to be comparable."""
  sets = {n: store.load_scores(os.path.join(wd, "scores")) for n, wd in workdirs.items()}
  store.check_compatible(sets)
  return sets


# ----------------------------------------------------------------------------- scores


def usable_scores(sets: Mapping[str, store.ScoreSet],
                  requested: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
  """Scores that every architecture recorded and that the statistics can use.

  Dropped (with the reason): bookkeeping files (`NOT_SCORES`), scores missing in an architecture,
  scores with non-finite values in a valid run (e.g. the `*_inf` variants), and scores whose
  run-averaged value is constant over examples in some architecture (no ranking to measure).

  Args:
    sets: arch -> ScoreSet.
    requested: restrict to these names (each must be recorded by every architecture).

  Returns:
    (kept names in sorted order, {dropped name: reason}).
  """
  all_names = sorted(set().union(*(s.scores for s in sets.values())))
  if requested:
    missing = {n: [a for a, s in sets.items() if n not in s.scores] for n in requested}
    missing = {n: a for n, a in missing.items() if a}
    if missing:
      raise StudyError(f"requested scores are not recorded by every architecture: {missing}; "
                       f"recorded: {all_names}")
    all_names = sorted(requested)
  dropped = {n: f"not recorded by {[a for a, s in sets.items() if n not in s.scores]}"
             for n in all_names if any(n not in s.scores for s in sets.values())}
  dropped.update(report_lib.score_problems(sets, [n for n in all_names if n not in dropped]))
  kept = [n for n in all_names if n not in dropped]
  if not kept:
    raise StudyError(f"no usable score: {dropped}")
  return kept, dropped


def choose_score(names: Sequence[str], requested: str = "",
                 preference: Sequence[str] = PRIMARY_PREFERENCE) -> str:
  """`requested` if given (must be in `names`), else the first of `preference` in `names`, else
  the first name in sorted order."""
  if requested:
    if requested not in names:
      raise StudyError(f"score {requested!r} is not usable here; valid choices: {sorted(names)}")
    return requested
  for p in preference:
    if p in names:
      return p
  return sorted(names)[0]


# ----------------------------------------------------------------------------- stage cache


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sets_key(workdirs: Mapping[str, str]) -> dict:
  """What identifies trained score sets: each one's meta.json (rewritten on every training)."""
  key = {}
  for n, wd in workdirs.items():
    with open(os.path.join(wd, "scores", store.META)) as f:
      key[n] = _digest(f.read())
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
  path = os.path.join(workdir, "timings.json")
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
    with open(os.path.join(workdir, "timings.json")) as f:
      t = json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}
  order = ["train", "analysis", "fingerprint", "pruning"]
  keys = [k for k in order if k in t] + sorted(k for k in t if k not in order)
  return {k: (sum(t[k].values()) if isinstance(t[k], dict) else t[k]) for k in keys} | {
      "detail": t}


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


# ----------------------------------------------------------------------------- stages


def run_analysis(config: ml_collections.ConfigDict, sets: Mapping[str, store.ScoreSet],
                 names: Sequence[str], primary: str, out: str, key: str,
                 x: np.ndarray | None = None, kind: str | None = None,
                 dropped: Mapping[str, str] | None = None) -> bool:
  """Reliability, agreement and sensitivity (`analysis.analyze`) written to `out`; skipped when
  `out` holds the result for the same inputs. `dropped` (score -> reason) is listed in its
  report.md. Returns True if it ran."""
  from jaxdiff import analysis  # pylint: disable=g-import-not-at-top
  if _stage_done(out, key):
    logging.info("[study] analysis: up to date in %s, skipped", out)
    return False
  a = config.analysis
  t0 = time.perf_counter()
  res = analysis.analyze(sets, scores=list(names), primary_score=primary, num_draws=a.num_draws,
                         kendall_draws=a.kendall_draws, fractions=tuple(a.fractions),
                         alpha=a.alpha, num_permutations=a.num_permutations,
                         methods=tuple(a.methods), num_workers=a.num_workers, seed=a.seed,
                         dropped=dropped)
  analysis.write_report(res, out, x=x, kind=kind)
  _mark_done(out, key, time.perf_counter() - t0)
  add_timing(os.path.dirname(os.path.dirname(out)), time.perf_counter() - t0, "analysis")
  logging.info("[study] analysis done in %.0f s", time.perf_counter() - t0)
  return True


def run_fingerprint(config: ml_collections.ConfigDict, sets: Mapping[str, store.ScoreSet],
                    score: str, out: str, key: str) -> bool:
  """The fingerprint study (`fingerprint.run_report`) on one score, written to `out`."""
  from jaxdiff import fingerprint  # pylint: disable=g-import-not-at-top
  if _stage_done(out, key):
    logging.info("[study] fingerprint: up to date in %s, skipped", out)
    return False
  fp = config.fingerprint
  t0 = time.perf_counter()
  data = fingerprint.collect_runs(sets, [score])
  rep = fingerprint.run_report(
      data, ks=tuple(int(k) for k in fp.ks), methods=tuple(fp.methods), test=fp.test,
      alpha=fp.alpha, fit_fraction=fp.fit_fraction, seed=fp.seed,
      random_repeats=fp.random_repeats, fingerprint_k=fp.fingerprint_k,
      holdout_k=fp.holdout_k, fit_runs_k=fp.fit_runs_k, cv_folds=fp.cv_folds)
  fingerprint.write_report(rep, out)
  _mark_done(out, key, time.perf_counter() - t0)
  add_timing(os.path.dirname(os.path.dirname(out)), time.perf_counter() - t0, "fingerprint")
  logging.info("[study] fingerprint done in %.0f s", time.perf_counter() - t0)
  return True


def run_pruning_stage(config: ml_collections.ConfigDict, sets: Mapping[str, store.ScoreSet],
                      score: str, workdir: str, arrays: Mapping[str, np.ndarray] | None = None,
                      train_fn: Callable[..., Any] | None = None) -> pd.DataFrame:
  """Trains the pruned ensembles (resumable, see `pruning.run_pruning`); per-seed results."""
  from jaxdiff import data as data_lib  # pylint: disable=g-import-not-at-top
  from jaxdiff import pruning  # pylint: disable=g-import-not-at-top
  pr = config.pruning
  ss = sets[pr.arch]
  ds = data_lib.load_dataset(config.train.data, arrays)
  cfg = pruning.training_config(config.train, config.archs[pr.arch], num_seeds=pr.num_seeds,
                                num_epochs=pr.num_epochs, seed=pr.seed, scores=pr.scores,
                                label=f"{pr.arch} (pruned)")
  if pr.single_run >= int(ss.valid_runs.sum()):
    raise StudyError(f"config.pruning.single_run={pr.single_run} but {pr.arch} has "
                     f"{int(ss.valid_runs.sum())} valid runs")
  t0 = time.perf_counter()

  def progress(name, i, total):
    logging.info("[study] pruning %d/%d: %s (%.0f s so far)", i + 1, total, name,
                 time.perf_counter() - t0)

  return pruning.run_pruning(cfg, ds, ss.get(score), ss.example_ids,
                             os.path.join(workdir, "pruning"), fractions=tuple(pr.fractions),
                             methods=tuple(pr.methods), keep=tuple(pr.keep),
                             single_run=pr.single_run, seed=pr.seed, train_fn=train_fn,
                             on_condition=progress,
                             on_trained=lambda n, sec: add_timing(workdir, sec, "pruning", n))


# ----------------------------------------------------------------------------- findings


def _read(path: str) -> pd.DataFrame:
  return pd.read_csv(path)


def _final_accuracy(wd: str) -> dict:
  from jaxdiff import pruning  # pylint: disable=g-import-not-at-top
  acc = pruning.read_test_accuracy(wd)
  ok = acc[~acc.diverged].test_acc.to_numpy()
  return dict(test_acc_mean=float(ok.mean()), test_acc_std=float(ok.std(ddof=1)) if ok.size > 1
              else float("nan"), epochs=int(acc.epoch.iloc[0]), diverged=int(acc.diverged.sum()))


def reliability_findings(analysis_dir: str, primary: str, archs: Sequence[str],
                         targets: Sequence[float] = (0.9, 0.95)) -> dict:
  """Finding 1 from the analysis tables: split-half Spearman of single runs and n-run means, and
  runs needed (Spearman-Brown from the single-run value, and as measured), per architecture."""
  rel = _read(os.path.join(analysis_dir, "tables", "reliability.csv"))
  need = _read(os.path.join(analysis_dir, "tables", "runs_needed.csv"))
  sp = rel[(rel.measure == "split") & (rel.metric == "spearman")]
  per_arch, all_scores = {}, []
  for a in archs:
    g = sp[(sp.arch == a) & (sp.score == primary)].sort_values("n")
    if g.empty:
      continue
    first, last = g.iloc[0], g.iloc[-1]
    nd = need[(need.arch == a) & (need.score == primary) & (need.metric == "spearman")]
    row = dict(rho1=float(first["mean"]), rho1_lo=float(first.lo), rho1_hi=float(first.hi),
               n_max=int(last.n), rho_n_max=float(last["mean"]), rho_n_max_lo=float(last.lo),
               rho_n_max_hi=float(last.hi))
    for t in targets:
      r = nd[np.isclose(nd.target, t)]
      row[f"runs_for_{t:g}"] = float(r.runs_needed.iloc[0]) if len(r) else float("nan")
      row[f"runs_measured_{t:g}"] = float(r.runs_measured.iloc[0]) if len(r) else float("nan")
    per_arch[a] = row
  for (a, n), g in sp[sp.n == 1].groupby(["arch", "score"]):
    nd = need[(need.arch == a) & (need.score == n) & (need.metric == "spearman")]
    r90 = nd[np.isclose(nd.target, targets[0])].runs_needed
    all_scores.append(dict(arch=a, score=n, rho1=float(g["mean"].iloc[0]),
                           **{f"runs_for_{targets[0]:g}": float(r90.iloc[0]) if len(r90)
                              else float("nan")}))
  all_df = pd.DataFrame(all_scores)
  by_score = (all_df.groupby("score").rho1.median().sort_values() if len(all_df)
              else pd.Series(dtype=float))
  return dict(score=primary, archs=per_arch, targets=list(targets),
              rho1_range=[min(r["rho1"] for r in per_arch.values()),
                          max(r["rho1"] for r in per_arch.values())] if per_arch else [],
              median_runs_for=({f"{t:g}": float(np.median([r[f"runs_for_{t:g}"]
                                                           for r in per_arch.values()]))
                                for t in targets} if per_arch else {}),
              least_reliable_scores=[[k, float(v)] for k, v in by_score.head(3).items()],
              most_reliable_scores=[[k, float(v)] for k, v in by_score.tail(3)[::-1].items()],
              all_scores=all_df)


def agreement_findings(analysis_dir: str, primary: str, archs: Sequence[str]) -> dict:
  """Finding 2: first principal component's share of the Spearman correlation matrix of the
  run-averaged scores, per architecture, and the correlation matrix averaged over architectures."""
  pca = _read(os.path.join(analysis_dir, "tables", "pca.csv"))
  corr = _read(os.path.join(analysis_dir, "tables", "correlation.csv"))
  pc1 = pca[(pca.method == "spearman") & (pca.component == 1)]
  per_arch = {}
  mats = []
  names = None
  for a in archs:
    r = pc1[pc1.arch == a]
    c = corr[(corr.arch == a) & (corr.method == "spearman")]
    if r.empty or c.empty:
      continue
    piv = c.pivot(index="score_a", columns="score_b", values="value")
    names = names or list(piv.index)
    m = piv.loc[names, names].to_numpy()
    mats.append(m)
    k = len(names)
    off = m[~np.eye(k, dtype=bool)]
    per_arch[a] = dict(pc1_share=float(r.share.iloc[0]), num_scores=int(pca[
        (pca.arch == a) & (pca.method == "spearman")].component.max()),
                       mean_abs_corr=float(np.nanmean(np.abs(off))))
  if not mats:
    return dict(archs={}, names=[], mean_corr=None)
  mean_corr = np.nanmean(np.stack(mats), axis=0)
  i = names.index(primary) if primary in names else None
  closest = []
  if i is not None:
    order = [j for j in np.argsort(-mean_corr[i]) if j != i][:5]
    closest = [[names[j], float(mean_corr[i, j])] for j in order]
  return dict(archs=per_arch, names=names, mean_corr=mean_corr, closest_to_primary=closest,
              pc1_range=[min(r["pc1_share"] for r in per_arch.values()),
                         max(r["pc1_share"] for r in per_arch.values())],
              num_scores=len(names))


def sensitivity_findings(sets: Mapping[str, store.ScoreSet], score: str, analysis_dir: str,
                         alpha: float) -> dict:
  """Finding 3: architecture-sensitive examples for `score`.

  Counts (a) examples whose mean score differs across all architectures by a one-way ANOVA F-test
  (Fisher; `fingerprint.selection.anova_log_pvalues`) with Bonferroni over the N examples, and
  (b) examples significant for at least one architecture pair by per-pair Welch t-tests with
  Benjamini-Hochberg (the analysis' `sensitivity_counts`); "how sensitive" is the largest
  |Hedges' g| over pairs of each sensitive example. The most sensitive example ids are the
  analysis' ranking (largest -log10 p of the pairwise Welch tests), the one its gallery shows.
  """
  from jaxdiff.fingerprint import selection  # pylint: disable=g-import-not-at-top
  archs = list(sets)
  x = np.concatenate([sets[a].get(score) for a in archs]).astype(np.float64)
  y = np.concatenate([np.full(int(sets[a].valid_runs.sum()), i) for i, a in enumerate(archs)])
  n = x.shape[1]
  log_p, f_stat = selection.anova_log_pvalues(x, y)
  anova_sig = log_p < math.log(alpha / n)
  path = os.path.join(analysis_dir, "per_example", f"sensitivity_{_safe(score)}.npz")
  counts = _read(os.path.join(analysis_dir, "tables", "sensitivity_counts.csv"))
  counts = counts[counts.score == score]
  with np.load(path) as z:
    bh, bonf, g = z["bh"], z["bonferroni"], z["hedges_g"]
    pairs = [str(p) for p in z["pairs"]]
  max_g = np.abs(g).max(axis=0)
  bh_any = bh.any(axis=0)
  eff = max_g[anova_sig]
  ids = sets[archs[0]].example_ids
  # The most sensitive examples as the analysis ranks them (and its gallery row shows them): by
  # the largest -log10 p of the pairwise Welch tests, ties by the largest |Hedges' g|.
  listed = _read(os.path.join(analysis_dir, "tables", "sensitive_examples.csv"))
  listed = listed[(listed.score == score) & (listed.group == "most")].sort_values("rank")
  neg_log10_p = -log_p / math.log(10)
  per_example = pd.DataFrame(dict(example_id=ids, label=sets[archs[0]].labels,
                                  anova_neg_log10_p=neg_log10_p, anova_f=f_stat,
                                  anova_bonferroni=anova_sig, bh_any_pair=bh_any,
                                  max_abs_hedges_g=max_g))
  pair_rows = [dict(pair=f"{r.arch_a} vs {r.arch_b}", bonferroni=int(r.bonferroni), bh=int(r.bh))
               for r in counts.itertuples()]
  best = max(pair_rows, key=lambda r: r["bh"]) if pair_rows else None
  return dict(score=score, num_examples=int(n), alpha=alpha, num_archs=len(archs),
              anova_bonferroni=int(anova_sig.sum()), anova_fraction=float(anova_sig.mean()),
              bh_any_pair=int(bh_any.sum()), bh_any_fraction=float(bh_any.mean()),
              bonferroni_any_pair=int(bonf.any(axis=0).sum()), num_pairs=len(pairs),
              median_max_abs_g=float(np.median(eff)) if eff.size else float("nan"),
              q90_max_abs_g=float(np.quantile(eff, 0.9)) if eff.size else float("nan"),
              median_max_abs_g_all=float(np.median(max_g)),
              most_sensitive_ids=[int(i) for i in listed.example_id[:10]], pairs=pair_rows,
              most_separated_pair=best, per_example=per_example, neg_log10_p=neg_log10_p)


def fingerprint_findings(fingerprint_dir: str, classifier: str = "logreg") -> dict:
  """Finding 4: test accuracy of the fingerprint on held-out runs versus k (selected examples), for
  each selection method against random selection, the dataset-mean baseline and chance."""
  df = _read(os.path.join(fingerprint_dir, "accuracy_vs_k.csv"))
  df = df[df.classifier == classifier]
  table = {}
  for m, g in df.groupby("method", sort=False):
    table[m] = {int(r.k): dict(accuracy=float(r.accuracy), sd=float(r.accuracy_sd),
                               n_selected=int(r.n_selected)) for r in g.itertuples()}
  ks = sorted(int(k) for k in df.k.unique())
  best = "pvalue" if "pvalue" in table else next((m for m in table if m not in ("random",
                                                                                  "mean_score")),
                                                  None)
  reach = None
  if best:
    ok = [k for k in ks if table[best][k]["accuracy"] >= 0.9]
    reach = ok[0] if ok else None
  return dict(classifier=classifier, ks=ks, table=table, selection=best,
              chance=float(df.chance.iloc[0]), n_test=int(df.n_test.iloc[0]),
              n_fit=int(df.n_fit.iloc[0]), k_for_90=reach, frame=df)


def pruning_findings(results: pd.DataFrame, sets: Mapping[str, store.ScoreSet], score: str,
                     config: ml_collections.ConfigDict) -> dict:
  """Finding 5: pruned-data test accuracy per condition and the effect of averaging the score."""
  from jaxdiff import pruning  # pylint: disable=g-import-not-at-top
  pr = config.pruning
  summary = pruning.summarize(results)
  effect = pruning.averaging_effect(results)
  overlap = pruning.subset_overlap(sets[pr.arch].get(score), tuple(pr.fractions), tuple(pr.keep),
                                   single_run=pr.single_run, seed=pr.seed)
  return dict(arch=pr.arch, score=score, seeds=int(pr.num_seeds), epochs=int(pr.num_epochs),
              single_run=int(pr.single_run), results=results, summary=summary, effect=effect,
              overlap=overlap)


# ----------------------------------------------------------------------------- report


def _pct(v: float, digits: int = 1) -> str:
  if v is None or not np.isfinite(v):
    return "–"
  return f"{round(100 * v, digits) + 0.0:.{digits}f}%"  # + 0.0: no "-0.0%"


def _num(v: float, digits: int = 3) -> str:
  if v is None or (isinstance(v, float) and not np.isfinite(v)):
    return "–" if v is None or np.isnan(v) else ("inf" if v > 0 else "-inf")
  return f"{v:.{digits}f}"


def _runs(v: float) -> str:
  if v is None or np.isnan(v):
    return "–"
  return "never" if np.isinf(v) else str(int(v))


def summary_lines(f: Mapping[str, Any]) -> list[str]:
  """The headline sentence of each finding, with its numbers (printed by the script and opening
  each section of report.md)."""
  lines = []
  rel = f.get("reliability")
  if rel and rel["archs"]:
    lo, hi = rel["rho1_range"]
    nmax = min(r["n_max"] for r in rel["archs"].values())
    rn = [r["rho_n_max"] for r in rel["archs"].values()]
    med = rel["median_runs_for"]
    lines.append(
        f"(1) Reliability: two single runs rank examples by {rel['score']} with Spearman "
        f"{_num(lo)}-{_num(hi)} across architectures; means of {nmax} runs agree at "
        f"{_num(min(rn))}-{_num(max(rn))}. By Spearman-Brown, averaging {rel['score']} over "
        f"{_runs(med['0.9'])} runs reaches 0.9 and over {_runs(med['0.95'])} runs 0.95 (median "
        "over architectures).")
  ag = f.get("agreement")
  if ag and ag["archs"]:
    lo, hi = ag["pc1_range"]
    k = ag["num_scores"]
    lines.append(f"(2) Agreement: the first principal component of {k} run-averaged scores "
                 f"explains {_pct(lo)}-{_pct(hi)} of their variance (1/K = {_pct(1 / k)}); mean "
                 "|Spearman| between scores "
                 f"{_num(min(r['mean_abs_corr'] for r in ag['archs'].values()), 2)}-"
                 f"{_num(max(r['mean_abs_corr'] for r in ag['archs'].values()), 2)}.")
  se = f.get("sensitivity")
  if se:
    lines.append(
        f"(3) Sensitivity: {se['anova_bonferroni']} of {se['num_examples']} examples "
        f"({_pct(se['anova_fraction'])}) have a {se['score']} that differs across the "
        f"{se['num_archs']} architectures (ANOVA, Bonferroni alpha={se['alpha']:g}); "
        f"{se['bh_any_pair']} ({_pct(se['bh_any_fraction'])}) differ for at least one pair (Welch, "
        f"BH); their largest |Hedges' g| has median {_num(se['median_max_abs_g'], 2)}.")
  fp = f.get("fingerprint")
  if fp and fp.get("selection"):
    t = fp["table"]
    k = 10 if 10 in fp["ks"] else fp["ks"][len(fp["ks"]) // 2]
    sel = t[fp["selection"]][k]["accuracy"]
    rnd = t.get("random", {}).get(k, {}).get("accuracy", float("nan"))
    base = t.get("mean_score", {}).get(k, {}).get("accuracy", float("nan"))
    lines.append(
        f"(4) Fingerprint: with k={k} examples chosen by {fp['selection']}, the architecture of "
        f"{_pct(sel)} of {fp['n_test']} held-out runs is named correctly, vs {_pct(rnd)} with k "
        f"random examples, {_pct(base)} from the dataset-mean score, chance {_pct(fp['chance'])}"
        + (f"; 90% is reached at k={fp['k_for_90']}." if fp["k_for_90"] else "."))
  pr = f.get("pruning")
  if pr is not None and len(pr["summary"]):
    s = pr["summary"].set_index("condition")
    full = s.loc["full"] if "full" in s.index else None
    parts = []
    for frac in sorted(s[s.method != "full"].fraction.unique()):
      row = s[np.isclose(s.fraction, frac)]
      cell = []
      for m in ("single", "mean"):
        for k in ("hardest", "easiest"):
          r = row[(row.method == m) & (row.keep == k)]
          if len(r):
            cell.append(f"{m}/{k} {_pct(r['mean'].iloc[0])}")
      r = row[row.method == "random"]
      if len(r):
        cell.append(f"random {_pct(r['mean'].iloc[0])}")
      parts.append(f"pruning {_pct(frac, 0)}: " + ", ".join(cell))
    head = (f"(5) Pruning ({pr['arch']}, {pr['score']}, mean test accuracy of {pr['seeds']} "
            f"seeds" + (f"; full data {_pct(full['mean'])}" if full is not None else "") + "): ")
    lines.append(head + "; ".join(parts) + ".")
    eff = pr["effect"]
    if len(eff):
      lines.append(
          "    Averaging the score over runs instead of one run changes the pruned accuracy by "
          f"{_pct(eff.mean_minus_single.min(), 2)} to {_pct(eff.mean_minus_single.max(), 2)} "
          f"(smallest paired p = {_num(eff.p_value.min(), 3)}).")
  return lines


def _json_ready(obj):
  if isinstance(obj, pd.DataFrame):
    return json.loads(obj.to_json(orient="records"))
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, Mapping):
    return {str(k): _json_ready(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_ready(v) for v in obj]
  if isinstance(obj, (np.floating, float)):
    v = float(obj)
    return v if np.isfinite(v) else (None if np.isnan(v) else ("inf" if v > 0 else "-inf"))
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def _write_table(out: str, name: str, df: pd.DataFrame) -> str:
  path = os.path.join(out, "tables", f"{name}.csv")
  store.atomic_write_text(path, df.to_csv(index=False))
  store.atomic_write_json(path[:-4] + ".json", json.loads(df.to_json(orient="records")))
  return path


def _md_table(df: pd.DataFrame) -> str:
  from jaxdiff.analysis import markdown_table  # pylint: disable=g-import-not-at-top
  return markdown_table(df)


def write_figures(f: Mapping[str, Any], out: str, analysis_dir: str,
                  fingerprint_dir: str | None) -> dict[str, str]:
  """The report's figures under out/figures; returns name -> path."""
  from jaxdiff import plots, pruning  # pylint: disable=g-import-not-at-top
  from jaxdiff.analysis import reliability as rel_lib  # pylint: disable=g-import-not-at-top
  figs = {}
  fig_dir = os.path.join(out, "figures")
  rel = f["reliability"]
  table = _read(os.path.join(analysis_dir, "tables", "reliability.csv"))
  sp = table[(table.measure == "split") & (table.metric == "spearman") &
             (table.score == rel["score"])]
  curves, pred, ns = {}, {}, None
  for a in rel["archs"]:
    g = sp[sp.arch == a].sort_values("n")
    if ns is None or len(g) < len(ns):
      ns = g.n.to_numpy()
  for a, r in rel["archs"].items():
    g = sp[sp.arch == a].sort_values("n").iloc[:len(ns)]
    curves[a] = (g["mean"].to_numpy(), g.lo.to_numpy(), g.hi.to_numpy())
    pred[f"{a} (Spearman-Brown)"] = rel_lib.spearman_brown(r["rho1"], ns)
  if curves:
    figs["reliability"] = plots.reliability_plot(
        ns, curves, os.path.join(fig_dir, "reliability.png"), predicted=pred,
        title=f"{rel['score']}: Spearman between disjoint n-run means (95% of draws)")
  ag = f["agreement"]
  if ag.get("mean_corr") is not None:
    figs["agreement"] = plots.heatmap(ag["mean_corr"], ag["names"],
                                      os.path.join(fig_dir, "agreement.png"),
                                      title="Spearman correlation of run-averaged scores "
                                            "(mean over architectures)")
  se = f["sensitivity"]
  if se is not None:
    thr = -math.log10(se["alpha"] / se["num_examples"])
    figs["sensitivity"] = plots.manhattan_plot(
        se["neg_log10_p"][None],
        [f"{se['score']}: per-example one-way ANOVA over {se['num_archs']} architectures"],
        os.path.join(fig_dir, "sensitivity.png"), labels=se["per_example"].label.to_numpy(),
        thresholds=[{"Bonferroni": thr}])
  if f.get("fingerprint") is not None and fingerprint_dir:
    from jaxdiff import fingerprint  # pylint: disable=g-import-not-at-top
    path = os.path.join(fig_dir, "fingerprint.png")
    fingerprint.plot_accuracy_vs_k(f["fingerprint"]["frame"], path,
                                   title=f"fingerprint from {f['primary']}: held-out runs")
    figs["fingerprint"] = path
  if f.get("pruning") is not None:
    p = f["pruning"]
    figs["pruning"] = pruning.plot_pruning(
        p["summary"], os.path.join(fig_dir, "pruning.png"),
        title=f"{p['arch']} retrained on pruned data ({p['score']}; {p['seeds']} seeds)")
  gallery = os.path.join(analysis_dir, "figures", "gallery.png")
  if os.path.exists(gallery):
    figs["gallery"] = gallery
  return figs


def _sensitivity_markdown(se: Mapping[str, Any]) -> list[str]:
  return [summary_lines({"sensitivity": se})[0][4:] + "\n\n",
          f"Among the ANOVA-sensitive examples the largest |Hedges' g| over pairs has median "
          f"{_num(se['median_max_abs_g'], 2)} and 90th percentile {_num(se['q90_max_abs_g'], 2)} "
          f"(median over all examples: {_num(se['median_max_abs_g_all'], 2)}). Most sensitive "
          "example ids (ranked by the largest -log10 p of the pairwise Welch tests, as the "
          "gallery's \"most arch-sensitive\" row; the ANOVA above counts, it does not rank): "
          f"{', '.join(map(str, se['most_sensitive_ids']))}. Per pair (Welch, "
          f"alpha {se['alpha']:g}; Bonferroni and BH over the examples of the pair):\n\n",
          _md_table(pd.DataFrame(se["pairs"]))]


def write_markdown(f: Mapping[str, Any], out: str, figs: Mapping[str, str]) -> str:
  """Writes out/report.md: the inputs, then one section per finding with its numbers."""
  rel_path = lambda p: os.path.relpath(p, out)
  md = ["# jaxdiff study report\n\n"]
  md.append("Kwok et al., *Dataset Difficulty and the Role of Inductive Bias* (arXiv 2401.01867), "
            f"reproduced on `{f['dataset']}` ({f['num_examples']} training examples) with "
            f"{len(f['archs'])} architectures x {f['runs']} runs. Scores are oriented so that "
            "higher means harder.\n\n")
  md += [f"- {line.strip()}\n" for line in summary_lines(f)]
  md.append("\n## Inputs\n\n")
  md.append(_md_table(f["arch_table"]))
  md.append(f"\nScores analysed ({len(f['scores'])}): {', '.join(f['scores'])}. "
            f"Primary score: `{f['primary']}`.\n")
  if f["dropped_scores"]:
    md.append("Left out: " + "; ".join(f"`{k}` ({v})" for k, v in f["dropped_scores"].items())
              + ".\n")

  rel = f["reliability"]
  md.append(f"\n## 1. {SECTIONS[0]}\n\n")
  md.append((summary_lines({"reliability": rel}) or ["    (needs 2+ valid runs)"])[0][4:]
            + "\n\n")
  md.append("Spearman correlation between the mean scores of two disjoint sets of n runs (mean "
            "over random draws of runs, 95% of draws in brackets); runs needed for a target from "
            "Spearman-Brown applied to the single-run value (and the smallest measured n that "
            "reached it, – if none did):\n\n")
  rows = []
  for a, r in rel["archs"].items():
    rows.append({"arch": a, "single run": f"{_num(r['rho1'])} [{_num(r['rho1_lo'])}, "
                 f"{_num(r['rho1_hi'])}]",
                 f"mean of n runs": f"n={r['n_max']}: {_num(r['rho_n_max'])} "
                 f"[{_num(r['rho_n_max_lo'])}, {_num(r['rho_n_max_hi'])}]",
                 "runs for 0.9": f"{_runs(r['runs_for_0.9'])} (measured "
                 f"{_runs(r['runs_measured_0.9'])})",
                 "runs for 0.95": f"{_runs(r['runs_for_0.95'])} (measured "
                 f"{_runs(r['runs_measured_0.95'])})"})
  md.append(_md_table(pd.DataFrame(rows)))
  if rel["least_reliable_scores"]:
    md.append("\nOver all scores (median single-run Spearman over architectures): least reliable "
              + ", ".join(f"`{n}` {_num(v)}" for n, v in rel["least_reliable_scores"])
              + "; most reliable " + ", ".join(f"`{n}` {_num(v)}"
                                               for n, v in rel["most_reliable_scores"])
              + ". Every architecture x score: `tables/reliability_all_scores.csv`.\n")
  if "reliability" in figs:
    md.append(f"\n![reliability]({rel_path(figs['reliability'])})\n")

  ag = f["agreement"]
  md.append(f"\n## 2. {SECTIONS[1]}\n\n")
  if ag["archs"]:
    md.append(summary_lines({"agreement": ag})[0][4:] + "\n\n")
    md.append(_md_table(pd.DataFrame([dict(arch=a, scores=r["num_scores"],
                                           **{"PC1 share": _pct(r["pc1_share"]),
                                              "mean abs Spearman": _num(r["mean_abs_corr"], 3)})
                                      for a, r in ag["archs"].items()])))
    if ag["closest_to_primary"]:
      md.append(f"\nScores closest to `{f['primary']}` (mean Spearman over architectures): "
                + ", ".join(f"`{n}` {_num(v, 2)}" for n, v in ag["closest_to_primary"]) + ".\n")
    if "agreement" in figs:
      md.append(f"\n![agreement]({rel_path(figs['agreement'])})\n")
  else:
    md.append("(needs at least two usable scores)\n")

  se = f["sensitivity"]
  md.append(f"\n## 3. {SECTIONS[2]}\n\n")
  if se is None:
    md.append("(needs two or more architectures)\n")
  else:
    md += _sensitivity_markdown(se)
  if "sensitivity" in figs:
    md.append(f"\n![sensitivity]({rel_path(figs['sensitivity'])})\n")
  if "gallery" in figs:
    md.append(f"\n![examples]({rel_path(figs['gallery'])})\n")


  md.append(f"\n## 4. {SECTIONS[3]}\n\n")
  fp = f.get("fingerprint")
  if fp is not None and fp.get("selection"):
    md.append(summary_lines({"fingerprint": fp})[0][4:] + "\n\n")
    md.append(f"Test accuracy on {fp['n_test']} held-out runs ({fp['n_fit']} fit runs select the "
              f"examples and train the {fp['classifier']} classifier), by number of examples "
              "k:\n\n")
    rows = []
    for m, t in fp["table"].items():
      label = "dataset-mean score (baseline)" if m == "mean_score" else m
      rows.append({"selection": label, **{f"k={k}": _pct(t[k]["accuracy"]) + (
          f" ± {_pct(t[k]['sd'])}" if m == "random" else "") for k in fp["ks"] if k in t}})
    rows.append({"selection": "chance", **{f"k={k}": _pct(fp["chance"]) for k in fp["ks"]}})
    md.append(_md_table(pd.DataFrame(rows)))
    if "fingerprint" in figs:
      md.append(f"\n![fingerprint]({rel_path(figs['fingerprint'])})\n")
  else:
    md.append("(disabled)\n")

  md.append(f"\n## 5. {SECTIONS[4]}\n\n")
  pr = f.get("pruning")
  if pr is not None and len(pr["summary"]):
    for line in summary_lines({"pruning": pr}):
      md.append(line.strip()[4:] + "\n\n" if line.startswith("(5)") else line.strip() + "\n\n")
    md.append(f"Fresh {pr['arch']} ensembles ({pr['seeds']} seeds, {pr['epochs']} epochs each, the "
              f"same seeds in every condition) trained on what is kept after pruning by "
              f"`{pr['score']}`: *single* ranks by run {pr['single_run']} of the scoring ensemble, "
              "*mean* by the mean over all its runs, *random* keeps a uniform subset. Test "
              "accuracy mean ± std over seeds (min-max), and the mean paired difference to full "
              "data:\n\n")
    s = pr["summary"]
    md.append(_md_table(pd.DataFrame([{
        "condition": r.condition, "kept": r.kept, "test accuracy": f"{_pct(r.mean, 2)} ± "
        f"{_pct(r.std, 2)}", "min-max": f"{_pct(r.min, 1)}-{_pct(r.max, 1)}",
        "vs full": _pct(r.vs_full, 2)} for r in s.itertuples()])))
    if len(pr["effect"]):
      md.append("\nMean-score minus single-run-score accuracy, paired by seed (two-sided paired "
                "t-test):\n\n")
      md.append(_md_table(pd.DataFrame([{
          "pruned": _pct(r.fraction, 0), "keep": r.keep, "difference": _pct(r.mean_minus_single, 2),
          "std": _pct(r.std, 2), "p": _num(r.p_value, 3)} for r in pr["effect"].itertuples()])))
    md.append("\nOverlap of the kept sets chosen by the single-run and the averaged score (chance "
              "= kept fraction):\n\n")
    md.append(_md_table(pd.DataFrame([{
        "pruned": _pct(r.fraction, 0), "keep": r.keep, "kept": r.kept, "overlap": _pct(r.overlap),
        "chance": _pct(r.chance)} for r in pr["overlap"].itertuples()])))
    if "pruning" in figs:
      md.append(f"\n![pruning]({rel_path(figs['pruning'])})\n")
  else:
    md.append("(disabled)\n")

  md.append("\n## Files and timings\n\n")
  md.append("- `findings.json`: every number above; `tables/*.csv|json`: the tables\n"
            "- `analysis/report.md`: the full analysis (every architecture x score)\n")
  if fp is not None:
    md.append("- `fingerprint/report.md`: the full fingerprint study; `fingerprint/fingerprint/`: "
              "the saved fingerprint\n")
  cs = {k: v for k, v in f["compute_seconds"].items() if k != "detail"}
  if cs:
    detail = f["compute_seconds"]["detail"]
    parts = []
    for k, v in cs.items():
      sub = detail.get(k)
      if isinstance(sub, dict) and k == "train":
        order = [n for n in f["archs"] if n in sub] + [n for n in sub if n not in f["archs"]]
        parts.append(f"{k} {v:.0f} (" + ", ".join(f"{n} {sub[n]:.0f}" for n in order) + ")")
      else:
        parts.append(f"{k} {v:.0f}")
    md.append("\nCompute time of the work in this report, summed over the invocations that did "
              f"it (s): {', '.join(parts)}; total {sum(cs.values()):.0f} s "
              f"({sum(cs.values()) / 60:.1f} min).\n")
  md.append("\nWall time of this invocation (s): " + ", ".join(
      f"{k} {v:.0f}" for k, v in f["timings"].items()) + ".\n")
  path = os.path.join(out, "report.md")
  store.atomic_write_text(path, "".join(md))
  return path


# ----------------------------------------------------------------------------- the study


def enable_compilation_cache(directory: str) -> bool:
  """Turns on JAX's persistent compilation cache in `directory` unless one is already set.

  The pruned ensembles of one fraction have identical shapes, so all but the first of them load
  their compiled steps from the cache instead of compiling again (a tiny ensemble: ~8 s -> ~1 s
  per training on a 2-core CPU); a resumed study reuses the first invocation's compilations. This
  sets process-wide JAX options (`jax_compilation_cache_dir`, and caches every compilation).

  Returns:
    True if this call enabled it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir:
    return False
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return True


def run_study(config: ml_collections.ConfigDict, workdir: str,
              arrays: Mapping[str, np.ndarray] | None = None, *,
              train_fn: Callable[..., Any] | None = None) -> dict:
  """Runs (or finishes) the whole study and writes `<workdir>/report`.

  Args:
    config: see experiments/configs/study.py (`train`, `archs`, `arch_order`, `analysis`,
      `fingerprint`, `pruning`, `compilation_cache`).
    workdir: the study folder (see the module docstring); rerunning resumes it.
    arrays: training data for `config.train.data.name == "arrays"`.
    train_fn: `train.train_and_evaluate` (replaceable in tests).

  Returns:
    The findings dict (also written as report/findings.json), with "report" the report.md path.
  """
  timings = {}
  t_all = time.perf_counter()
  validate_config(config)
  _check_study_workdir(config, workdir)
  if config.get("compilation_cache", False):
    enable_compilation_cache(os.path.join(workdir, "jax_cache"))
  names = arch_names(config)
  out = os.path.join(workdir, "report")

  t0 = time.perf_counter()
  workdirs = train_archs(config, workdir, arrays, train_fn)
  timings["train"] = time.perf_counter() - t0
  sets = load_sets(workdirs)
  score_names, dropped = usable_scores(sets, list(config.analysis.scores) or None)
  primary = choose_score(score_names, config.analysis.primary_score)
  key = _sets_key(workdirs)

  from jaxdiff import data as data_lib  # pylint: disable=g-import-not-at-top
  ds = data_lib.load_dataset(config.train.data, arrays)

  t0 = time.perf_counter()
  analysis_dir = os.path.join(out, "analysis")
  run_analysis(config, sets, score_names, primary, analysis_dir,
               _digest([key, config.analysis.to_dict(), score_names, primary]),
               x=ds.x_train, kind=ds.kind, dropped=dropped)
  timings["analysis"] = time.perf_counter() - t0

  fp_dir, fp_score = None, None
  if config.fingerprint.enabled:
    t0 = time.perf_counter()
    fp_score = choose_score(score_names, config.fingerprint.score or primary)
    fp_dir = os.path.join(out, "fingerprint")
    run_fingerprint(config, sets, fp_score, fp_dir,
                    _digest([key, config.fingerprint.to_dict(), fp_score]))
    timings["fingerprint"] = time.perf_counter() - t0

  results, pr_score = None, None
  if config.pruning.enabled:
    t0 = time.perf_counter()
    pr_score = choose_score(score_names, config.pruning.score or primary)
    results = run_pruning_stage(config, sets, pr_score, workdir, arrays, train_fn)
    timings["pruning"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  arch_rows = []
  for a in names:
    acc = _final_accuracy(workdirs[a])
    arch_rows.append(dict(arch=a, model=_model_label(config.archs[a]),
                          runs=int(sets[a].valid_runs.sum()), epochs=acc["epochs"],
                          test_acc=f"{_pct(acc['test_acc_mean'])} ± {_pct(acc['test_acc_std'])}",
                          test_acc_mean=acc["test_acc_mean"], test_acc_std=acc["test_acc_std"],
                          diverged=acc["diverged"]))
  f = dict(dataset=sets[names[0]].meta.get("dataset"), num_examples=int(ds.num_train),
           archs=names, runs=int(config.train.num_runs), scores=score_names,
           dropped_scores=dropped, primary=primary,
           arch_table=pd.DataFrame(arch_rows).drop(columns=["test_acc_mean", "test_acc_std"]),
           arch_accuracy=pd.DataFrame(arch_rows))
  f["reliability"] = reliability_findings(analysis_dir, primary, names)
  f["agreement"] = agreement_findings(analysis_dir, primary, names)
  f["sensitivity"] = sensitivity_findings(sets, primary, analysis_dir, config.analysis.alpha) \
      if len(names) >= 2 else None
  f["fingerprint"] = fingerprint_findings(fp_dir) if fp_dir else None
  f["pruning"] = (pruning_findings(results, sets, pr_score, config) if results is not None
                  else None)
  timings["report"] = time.perf_counter() - t0
  timings["total"] = time.perf_counter() - t_all
  f["timings"] = timings
  f["compute_seconds"] = read_timings(workdir)

  figs = write_figures(f, out, analysis_dir, fp_dir)
  _write_table(out, "archs", f["arch_accuracy"])
  _write_table(out, "reliability_all_scores", f["reliability"]["all_scores"])
  if f["sensitivity"] is not None:
    _write_table(out, "sensitivity_per_example", f["sensitivity"]["per_example"])
    _write_table(out, "sensitivity_pairs", pd.DataFrame(f["sensitivity"]["pairs"]))
  if f["agreement"].get("mean_corr") is not None:
    _write_table(out, "agreement_mean_spearman", pd.DataFrame(
        f["agreement"]["mean_corr"], index=f["agreement"]["names"],
        columns=f["agreement"]["names"]).reset_index(names="score"))
  if f["fingerprint"] is not None:
    _write_table(out, "fingerprint_accuracy", f["fingerprint"]["frame"])
  if f["pruning"] is not None:
    for name in ("results", "summary", "effect", "overlap"):
      _write_table(out, f"pruning_{name}", f["pruning"][name])
  f["report"] = write_markdown(f, out, figs)
  f["summary"] = summary_lines(f)
  store.atomic_write_json(os.path.join(out, "findings.json"), _json_ready(_public(f)))
  return f


def _public(f: Mapping[str, Any]) -> dict:
  """The findings without bulky per-example arrays (those are in the tables)."""
  drop = {"per_example", "neg_log10_p", "frame", "results", "all_scores"}
  return {k: ({kk: vv for kk, vv in v.items() if kk not in drop} if isinstance(v, Mapping) else v)
          for k, v in f.items() if k not in ("arch_table", "report")}


def _model_label(model: Mapping[str, Any]) -> str:
  m = dict(model)
  return m.get("name", "?") + "(" + ",".join(f"{k}={v}" for k, v in sorted(m.items())
                                            if k != "name") + ")"


def load_findings(path: str) -> dict:
  """report/findings.json of a study (give the study workdir or its report folder)."""
  for p in (os.path.join(path, "findings.json"), os.path.join(path, "report", "findings.json")):
    if os.path.exists(p):
      with open(p) as f:
        return json.load(f)
  raise StudyError(f"no findings.json in {path!r} or {path!r}/report")

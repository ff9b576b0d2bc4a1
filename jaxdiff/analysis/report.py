"""The analysis report: the tables of reliability, agreement and sensitivity of training workdirs.

`load_workdirs` reads the score sets, `analyze` computes the tables (pandas) and per-example
results as an `Analysis`; `jaxdiff.report.analysis.write_report` writes them (report.md, tables,
per-example arrays, figures).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from jaxdiff import progress as progress_lib
from jaxdiff import scores as scores_lib
from jaxdiff import store
from jaxdiff.workdir import load_workdirs  # pylint: disable=unused-import (re-exported)
from jaxdiff.analysis import agreement, correlation, reliability, sensitivity

log = logging.getLogger(__name__)


# Files in a score folder that are bookkeeping, not difficulty scores.
NOT_SCORES = frozenset(scores_lib.BOOKKEEPING)  # bookkeeping files, not scores


def score_problems(sets: Mapping[str, store.ScoreSet], names: Sequence[str]) -> dict[str, str]:
  """Why each of `names` cannot be analysed ({} if all can), checked in every set that has it.

  Reasons: bookkeeping files (`NOT_SCORES`); fewer than 2 valid runs; non-finite values in a valid
  run (e.g. the `*_inf` variants: +inf for never-learned examples); a run-averaged value that is
  constant over examples (no ranking to measure).
  """
  problems = {}
  for name in names:
    if name in NOT_SCORES:
      problems[name] = "bookkeeping, not a difficulty score"
      continue
    for a, ss in sets.items():
      if name not in ss.scores:
        continue
      v = ss.get(name)
      reason = None
      if v.shape[0] < 2:
        reason = f"{a} has {v.shape[0]} valid run(s)"
      elif not np.isfinite(v).all():
        reason = f"non-finite values in {a} ({int((~np.isfinite(v)).sum())} of {v.size})"
      elif np.ptp(v.mean(axis=0, dtype=np.float64)) == 0:
        reason = f"constant over examples in {a}"
      if reason:
        problems[name] = reason
        break
  return problems


@dataclasses.dataclass
class Analysis:
  """Everything `analyze` computed.

  Attributes:
    tables: name -> tidy DataFrame (written as CSV and JSON).
    curves: (arch, score) -> `reliability.ReliabilityCurve`.
    spreads: (arch, score) -> `reliability.Spread`.
    agreement: arch -> `agreement.score_agreement` dict.
    sensitivity: score -> `sensitivity.PairwiseSensitivity` (empty with one architecture).
    example_ids, labels: `[N]` of the (common) examples.
    primary_score: the score used for the gallery, Manhattan and spread figures.
    settings: the arguments of `analyze`; inputs: one dict per architecture.
    timings: stage -> seconds.
    dropped: score name -> why it was left out (written into report.md).
  """
  tables: dict
  curves: dict
  spreads: dict
  agreement: dict
  sensitivity: dict
  example_ids: np.ndarray
  labels: np.ndarray
  primary_score: str
  settings: dict
  inputs: list
  timings: dict
  dropped: dict = dataclasses.field(default_factory=dict)


def _map(fn: Callable, items: Sequence, num_workers: int) -> list:
  # numpy sorts, BLAS and scipy's kendalltau release the GIL, so threads use both cores.
  if num_workers <= 1 or len(items) <= 1:
    return [fn(x) for x in items]
  with concurrent.futures.ThreadPoolExecutor(num_workers) as ex:
    return list(ex.map(fn, items))


def choose_primary(names: Sequence[str], requested: str | None = None) -> str:
  """The requested score, else "loss" if present, else the first name in sorted order."""
  if requested:
    if requested not in names:
      raise ValueError(f"unknown score {requested!r}; valid choices are {sorted(names)}")
    return requested
  return "loss" if "loss" in names else sorted(names)[0]


def analyze(sets: Mapping[str, store.ScoreSet], *, scores: Sequence[str] | None = None,
            primary_score: str | None = None, num_draws: int = 20, kendall_draws: int = 1,
            fractions: Sequence[float] = agreement.FRACTIONS, alpha: float = 0.05,
            num_permutations: int = 0, num_run_pairs: int = 20, top_m: int = 20,
            methods: Sequence[str] = correlation.METHODS, num_workers: int = 2,
            seed: int = 0, dropped: Mapping[str, str] | None = None,
            progress: bool = True) -> Analysis:
  """Runs the whole analysis on score sets of one dataset (one per architecture).

  Args:
    sets: arch -> ScoreSet (diverged runs are dropped).
    scores: score names to analyse (default: every score that `score_problems` finds nothing
      against; the others are left out and listed with their reason in `Analysis.dropped` and
      report.md; sensitivity uses those every arch has). A named score with non-finite values is
      refused.
    primary_score: score for the figures and example lists (default `choose_primary`).
    num_draws, kendall_draws: see `reliability.reliability_curve`.
    fractions: pruning fractions for top-k overlaps.
    alpha: level of the Bonferroni and BH corrections.
    num_permutations: permutations per pair and score (0: Welch t-tests only).
    num_run_pairs: pairs of single runs for the run-to-run overlap.
    top_m: length of the most/least sensitive and easiest/hardest example lists.
    methods: correlation methods for the matrices between scores.
    num_workers: threads (numpy sorts, BLAS and scipy's kendalltau release the GIL); with more
      than one, set OPENBLAS_NUM_THREADS=1 before numpy is imported (the scripts do) so that BLAS
      threads do not oversubscribe the cores.
    seed: base seed. The reliability draws of architecture i (in `sets` order) and score j (in
      sorted order) use seed + 1000 i + j; ties in the example lists are broken by `seed`.
    dropped: score name -> reason, for scores the caller left out itself (added to the report's
      list of scores left out).
    progress: log each stage (reliability, agreement, sensitivity, examples) as it ends, with
      the time so far and what is left, and the reliability's progress over (arch, score) pairs
      (absl INFO, `jaxdiff.progress`); False: silent.

  Raises:
    ValueError naming a bad setting and its valid range, an unknown or unusable score.
  """
  if not sets:
    raise ValueError("no score sets given")
  _check_settings(alpha=alpha, top_m=top_m, num_draws=num_draws, kendall_draws=kendall_draws,
                  num_permutations=num_permutations, num_run_pairs=num_run_pairs,
                  num_workers=num_workers)
  for m in methods:
    correlation.check_method(m)
  for f in fractions:
    agreement.check_fraction(f)
  settings = dict(scores=list(scores) if scores else None, num_draws=num_draws,
                  kendall_draws=kendall_draws, fractions=[float(f) for f in fractions],
                  alpha=alpha, num_permutations=num_permutations, num_run_pairs=num_run_pairs,
                  top_m=top_m, methods=list(methods), seed=seed)
  if len(sets) > 1:
    store.check_compatible(sets)
  archs = list(sets)
  ref = sets[archs[0]]
  dropped = dict(dropped or {})
  if scores:
    nonfinite = {n: r for n, r in score_problems(sets, scores).items() if "non-finite" in r}
    if nonfinite:
      raise ValueError(f"cannot analyse {nonfinite}: the statistics need finite scores; leave "
                       "them out (or pass no scores to drop such scores with a note)")
  else:
    dropped.update(score_problems(sets, sorted(set().union(*(s.scores for s in sets.values())))))
    for n, r in sorted(dropped.items()):
      log.info("score %s left out: %s", n, r)
  data = {}
  for a in archs:
    names = ([n for n in sets[a].scores if n not in dropped] if not scores else list(scores))
    missing = [n for n in names if n not in sets[a].scores]
    if missing:
      raise ValueError(f"scores {missing} are not in architecture {a!r}; it has "
                       f"{sorted(sets[a].scores)}")
    data[a] = {n: sets[a].get(n) for n in sorted(names)}
  if not any(data.values()):
    raise ValueError(f"no usable score: {dropped}")
  common = sorted(set.intersection(*(set(d) for d in data.values())))
  primary = choose_primary(common if common else sorted(data[archs[0]]), primary_score)
  inputs = [dict(arch=a, dataset=sets[a].meta.get("dataset"), runs=int(sets[a].valid_runs.sum()),
                 total_runs=sets[a].num_runs, examples=int(sets[a].example_ids.size),
                 scores=", ".join(sorted(data[a]))) for a in archs]
  timings = {}
  prog = progress_lib.Stages("analysis", ["reliability", "agreement", "sensitivity", "examples"],
                             progress)
  prog.plan(f"{len(archs)} architecture(s) x {len(set().union(*data.values()))} score(s)")

  # Reliability, spread and run-to-run overlap: one task per (arch, score).
  t0 = time.perf_counter()
  tasks = [(a, n, i) for a in archs for i, n in enumerate(data[a])]
  finished = itertools.count(1)  # thread-safe: tasks end in worker threads

  def rel_task(task):
    a, n, i = task
    s = data[a][n]
    if s.shape[0] < 2:
      log.warning("%s/%s has %d valid run(s); reliability needs 2: skipped", a, n, s.shape[0])
      prog.step("reliability", next(finished), len(tasks), part="(arch, score)", verb="done")
      return None
    curve = reliability.reliability_curve(s, num_draws=num_draws, kendall_draws=kendall_draws,
                                          seed=seed + 1000 * archs.index(a) + i)
    out = (curve, reliability.runs_needed_table(curve), reliability.spread_vs_difficulty(s),
           agreement.run_overlap(s, fractions, num_pairs=num_run_pairs, seed=seed + i))
    prog.step("reliability", next(finished), len(tasks), part="(arch, score)", verb="done")
    return out

  results = _map(rel_task, tasks, num_workers)
  curves, spreads = {}, {}
  rel_rows, need_rows, spread_rows, bin_rows, overlap_rows = [], [], [], [], []
  for (a, n, _), res in zip(tasks, results):
    if res is None:
      continue
    curve, need, spread, overlap = res
    curves[a, n], spreads[a, n] = curve, spread
    rho1 = {m: curve.rho1(m) for m in reliability.SB_METRICS}
    for row in curve.summary():
      sb = (float(reliability.spearman_brown(rho1[row["metric"]], row["n"]))
            if row["measure"] == "split" and row["metric"] in rho1 else np.nan)
      rel_rows.append(dict(arch=a, score=n, **row, spearman_brown=sb))
    need_rows += [dict(arch=a, score=n, **r) for r in need]
    spread_rows.append(dict(arch=a, score=n, spearman=spread.spearman, pearson=spread.pearson))
    bin_rows += [dict(arch=a, score=n, **b) for b in spread.bins]
    overlap_rows += [dict(arch=a, score=n, **r) for r in overlap]
  timings["reliability"] = time.perf_counter() - t0
  prog.done("reliability")

  # Agreement between scores, per architecture.
  t0 = time.perf_counter()
  multi = [a for a in archs if len(data[a]) >= 2]
  agree = dict(zip(multi, _map(
      lambda a: agreement.score_agreement(data[a], methods=methods, fractions=fractions), multi,
      num_workers)))
  corr_rows, pca_rows, score_overlap_rows = [], [], []
  for a, res in agree.items():
    names = res["names"]
    for m, c in res["corr"].items():
      corr_rows += [dict(arch=a, method=m, score_a=x, score_b=y, value=float(c[i, j]))
                    for i, x in enumerate(names) for j, y in enumerate(names)]
    for m, spec in res["pca"].items():
      pca_rows += [dict(arch=a, method=m, component=k + 1, eigenvalue=float(ev),
                        share=float(sh), cumulative_share=float(cs))
                   for k, (ev, sh, cs) in enumerate(zip(spec.eigenvalues, spec.shares,
                                                        np.cumsum(spec.shares)))]
    for (f, side), mat in res["overlap"].items():
      score_overlap_rows += [dict(arch=a, fraction=f, side=side, score_a=x, score_b=y,
                                  overlap=float(mat[i, j]), chance=f)
                             for i, x in enumerate(names) for j, y in enumerate(names)]
  timings["agreement"] = time.perf_counter() - t0
  prog.done("agreement")

  # Sensitivity to the architecture, per score shared by all architectures.
  t0 = time.perf_counter()
  sens = {}
  count_rows, sensitive_rows = [], []
  if len(archs) >= 2:
    ok = [n for n in common if all(data[a][n].shape[0] >= 2 for a in archs)]
    sens = dict(zip(ok, _map(
        lambda n: sensitivity.pairwise_sensitivity(
            {a: data[a][n] for a in archs}, alpha=alpha, num_permutations=num_permutations,
            seed=seed + 7919 * (1 + common.index(n))), ok, num_workers)))
    for n, res in sens.items():
      count_rows += [dict(score=n, **r) for r in res.counts()]
      nlp, g, at = res.example_sensitivity()
      order = res.ranking()
      m = min(top_m, order.size)
      for group, idx in (("most", order[:m]), ("least", order[::-1][:m])):
        sensitive_rows += [dict(score=n, group=group, rank=k + 1, index=int(i),
                                example_id=int(ref.example_ids[i]), label=int(ref.labels[i]),
                                max_neg_log10_p=float(nlp[i]), max_abs_hedges_g=float(g[i]),
                                pair="{} vs {}".format(*res.pairs[at[i]]))
                           for k, i in enumerate(idx)]
  timings["sensitivity"] = time.perf_counter() - t0
  prog.done("sensitivity")

  # Easiest and hardest examples of the primary score, averaged over architectures. Ties (a
  # discrete score) are broken at random (seeded), so a list is a draw from the tied group at its
  # end, not that group's lowest example indices; "tied" counts the examples sharing the value.
  pooled = np.mean([data[a][primary].mean(axis=0, dtype=np.float64) for a in archs
                    if primary in data[a]], axis=0)
  m = min(top_m, pooled.size)
  _, inverse, counts = np.unique(pooled, return_inverse=True, return_counts=True)
  extreme_rows = [dict(score=primary, group=group, rank=k + 1, index=int(i),
                       example_id=int(ref.example_ids[i]), label=int(ref.labels[i]),
                       mean_score=float(pooled[i]), tied=int(counts[inverse[i]]))
                  for group, desc in (("easiest", False), ("hardest", True))
                  for k, i in enumerate(agreement.order_random_ties(
                      pooled, descending=desc, seed=seed)[:m])]
  prog.done("examples")

  tables = dict(inputs=pd.DataFrame(inputs), reliability=pd.DataFrame(rel_rows),
                runs_needed=pd.DataFrame(need_rows), spread=pd.DataFrame(spread_rows),
                spread_bins=pd.DataFrame(bin_rows), run_overlap=pd.DataFrame(overlap_rows),
                correlation=pd.DataFrame(corr_rows), pca=pd.DataFrame(pca_rows),
                score_overlap=pd.DataFrame(score_overlap_rows),
                sensitivity_counts=_frame(count_rows, ["score", "arch_a", "arch_b", "examples",
                                                       "alpha", "bonferroni", "bh"]),
                sensitive_examples=_frame(sensitive_rows, [
                    "score", "group", "rank", "index", "example_id", "label", "max_neg_log10_p",
                    "max_abs_hedges_g", "pair"]),
                difficulty_extremes=pd.DataFrame(extreme_rows))
  return Analysis(tables=tables, curves=curves, spreads=spreads, agreement=agree,
                  sensitivity=sens, example_ids=ref.example_ids, labels=ref.labels,
                  primary_score=primary, settings=settings, inputs=inputs, timings=timings,
                  dropped=dropped)


def _check_settings(**values) -> None:
  """Refuses a setting of `analyze` outside its range, naming the value and the valid range."""
  alpha = values.pop("alpha")
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha={alpha!r}: the significance level must be in (0, 1)")
  low = dict(top_m=1, num_draws=1, kendall_draws=0, num_permutations=0, num_run_pairs=1,
             num_workers=1)
  for name, v in values.items():
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low[name]:
      raise ValueError(f"{name}={v!r}: must be an integer >= {low[name]}")
  if values["kendall_draws"] > values["num_draws"]:
    raise ValueError(f"kendall_draws={values['kendall_draws']}: must be in [0, num_draws="
                     f"{values['num_draws']}]")


def _frame(rows: list, columns: Sequence[str]) -> pd.DataFrame:
  # An empty table still gets its header, so pandas can read the CSV back.
  return pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(columns))

"""The analysis report: the tables of reliability, agreement and sensitivity of training workdirs.

`load_workdirs` reads the score sets, `analyze` computes the tables (pandas) and per-example
results, `write_report` writes report.md, tables/*.csv|json, per_example/*.npz and figures/*.png.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import logging
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from jaxdiff import store
from jaxdiff.analysis import agreement, correlation, reliability, sensitivity

log = logging.getLogger(__name__)


def arch_name(meta: Mapping[str, Any], fallback: str) -> str:
  """The architecture label of a score set: meta["arch"] (a name, or a config dict with "name")."""
  arch = meta.get("arch")
  if isinstance(arch, str) and arch:
    return arch
  if isinstance(arch, Mapping):
    for key in ("name", "model", "arch"):
      if isinstance(arch.get(key), str) and arch[key]:
        return arch[key]
  return fallback


# Files in a score folder that are bookkeeping, not difficulty scores.
NOT_SCORES = frozenset({"mb_presentations"})


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


def load_workdirs(workdirs: Sequence[str]) -> dict[str, store.ScoreSet]:
  """Loads `<workdir>/scores` of each workdir, keyed by architecture, checked to be comparable.

  Two workdirs with the same architecture name are told apart by their folder names.

  Raises:
    ValueError (store.StoreError): a missing or broken score directory, a workdir given twice (in
      any spelling: compared by realpath), or workdirs trained on different data (dataset,
      example ids, labels, data fingerprint: `store.check_compatible`).
  """
  if not workdirs:
    raise ValueError("no workdirs given")
  store.check_distinct_paths(workdirs)
  sets = {}
  for wd in workdirs:
    ss = store.load_scores(os.path.join(wd, "scores"))
    base = os.path.basename(os.path.normpath(wd))
    name = arch_name(ss.meta, base)
    if name in sets:
      name = f"{name}@{base}"
    if name in sets:  # distinct workdirs (checked above) with one folder name and architecture
      raise ValueError(f"workdir {wd!r} and another workdir named {base!r} both hold "
                       f"architecture {arch_name(ss.meta, base)!r}: rename one of the folders")
    sets[name] = ss
  store.check_compatible(sets)
  return sets


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
            seed: int = 0, dropped: Mapping[str, str] | None = None) -> Analysis:
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

  # Reliability, spread and run-to-run overlap: one task per (arch, score).
  t0 = time.perf_counter()
  tasks = [(a, n, i) for a in archs for i, n in enumerate(data[a])]

  def rel_task(task):
    a, n, i = task
    s = data[a][n]
    if s.shape[0] < 2:
      log.warning("%s/%s has %d valid run(s); reliability needs 2: skipped", a, n, s.shape[0])
      return None
    curve = reliability.reliability_curve(s, num_draws=num_draws, kendall_draws=kendall_draws,
                                          seed=seed + 1000 * archs.index(a) + i)
    return (curve, reliability.runs_needed_table(curve), reliability.spread_vs_difficulty(s),
            agreement.run_overlap(s, fractions, num_pairs=num_run_pairs, seed=seed + i))

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


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def _fmt(v) -> str:
  if isinstance(v, (float, np.floating)):
    if np.isnan(v):
      return "–"
    if np.isinf(v):
      return "inf" if v > 0 else "-inf"
    if float(v).is_integer() and abs(v) < 1e6:
      return str(int(v))
    return f"{v:.3g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.3f}"
  return str(v)


def markdown_table(df: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
  """A DataFrame as a GitHub markdown table (no tabulate dependency)."""
  if df.empty:
    return "(none)\n"
  cols = list(columns or df.columns)
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in df[cols].itertuples(False)]
  return "\n".join(lines) + "\n"


def write_tables(analysis: Analysis, out: str) -> list[str]:
  """Writes every table as tables/<name>.csv and tables/<name>.json (list of records), and the
  per-example sensitivity arrays as per_example/sensitivity_<score>.npz."""
  written = []
  for name, df in analysis.tables.items():
    path = os.path.join(out, "tables", f"{name}.csv")
    store.atomic_write_text(path, df.to_csv(index=False))
    store.atomic_write_json(path[:-4] + ".json", json.loads(df.to_json(orient="records")))
    written += [path, path[:-4] + ".json"]
  for score, res in analysis.sensitivity.items():
    arrays = dict(example_ids=analysis.example_ids, labels=analysis.labels,
                  pairs=np.array([f"{a} vs {b}" for a, b in res.pairs]), t=res.t, df=res.df,
                  neg_log10_p=res.neg_log10_p, hedges_g=res.hedges_g, mean_diff=res.mean_diff,
                  bonferroni=res.bonferroni(), bh=res.bh())
    if res.perm_p is not None:
      arrays["perm_p"] = res.perm_p
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = os.path.join(out, "per_example", f"sensitivity_{_safe(score)}.npz")
    store.atomic_write_bytes(path, buf.getvalue())
    written.append(path)
  return written


def write_figures(analysis: Analysis, out: str, *, x: np.ndarray | None = None,
                  kind: str | None = None, gallery_size: int = 8) -> list[str]:
  """Writes the PNG figures under out/figures; the gallery only when inputs `x` (indexed by example
  id, e.g. the training set) and their `kind` are given."""
  from jaxdiff import plots
  fig_dir = os.path.join(out, "figures")
  written = []
  primary = analysis.primary_score
  archs = [d["arch"] for d in analysis.inputs]
  for a in archs:
    names = [n for (aa, n) in analysis.curves if aa == a]
    if not names:
      continue
    curves, pred = {}, {}
    for n in names:
      c = analysis.curves[a, n]
      v = c.split["spearman"]
      curves[n] = (v.mean(1), np.percentile(v, 2.5, axis=1), np.percentile(v, 97.5, axis=1))
      pred[f"{n} (Spearman-Brown)"] = reliability.spearman_brown(c.rho1("spearman"), c.ns)
    written.append(plots.reliability_plot(
        analysis.curves[a, names[0]].ns, curves,
        os.path.join(fig_dir, f"reliability_{_safe(a)}.png"), predicted=pred,
        title=f"{a}: Spearman between disjoint n-run means (95% of draws)"))
    if (a, primary) in analysis.spreads:
      sp = analysis.spreads[a, primary]
      written.append(plots.spread_plot(
          sp.mean, sp.std, os.path.join(fig_dir, f"spread_{_safe(a)}.png"), bins=sp.bins,
          title=f"{a}: {primary}, spread vs difficulty (Spearman {sp.spearman:.2f})"))
  for a, res in analysis.agreement.items():
    method = "spearman" if "spearman" in res["corr"] else next(iter(res["corr"]))
    written.append(plots.heatmap(res["corr"][method], res["names"],
                                 os.path.join(fig_dir, f"correlation_{_safe(a)}.png"),
                                 title=f"{a}: {method} correlation of run-averaged scores"))
  shares = {a: res["pca"]["spearman"].shares for a, res in analysis.agreement.items()
            if "spearman" in res["pca"]}
  if shares:
    written.append(plots.scree_plot(shares, os.path.join(fig_dir, "pca_scree.png"),
                                    title="PCA of scores (Spearman correlation matrix)"))
  res = analysis.sensitivity.get(primary)
  if res is not None:
    thresholds = []
    for i in range(len(res.pairs)):
      bh = sensitivity.bh_threshold(10.0**res.log10_p[i], res.alpha)
      thresholds.append({"Bonferroni": -np.log10(res.alpha / res.num_examples),
                         "BH": -np.log10(bh)})
    written.append(plots.manhattan_plot(
        res.neg_log10_p, [f"{a} vs {b}" for a, b in res.pairs],
        os.path.join(fig_dir, f"manhattan_{_safe(primary)}.png"), labels=analysis.labels,
        thresholds=thresholds, title=f"per-example Welch t-test, score {primary}"))
  if x is not None and kind is not None:
    ids = analysis.example_ids
    if ids.size and (ids.min() < 0 or ids.max() >= len(x)):
      raise ValueError(f"example ids reach {ids.max()} but the inputs have {len(x)} rows")
    ext = analysis.tables["difficulty_extremes"]
    groups, captions = {}, {}

    def add(name, idx, values, label):
      idx = list(idx)[:gallery_size]
      groups[name] = [int(ids[i]) for i in idx]
      captions[name] = [f"id {int(ids[i])} y={int(analysis.labels[i])}\n{label}={v:.2g}"
                        for i, v in zip(idx, values)]

    for g in ("easiest", "hardest"):
      rows = ext[ext.group == g]
      add(f"{g} ({primary})", rows["index"], rows["mean_score"], "score")
    if res is not None:
      rows = analysis.tables["sensitive_examples"]
      rows = rows[(rows.score == primary) & (rows.group == "most")]
      add("most arch-sensitive\n(pairwise Welch)", rows["index"], rows["max_neg_log10_p"],
          "-log10p")
    written.append(plots.gallery(x, kind, groups, os.path.join(fig_dir, "gallery.png"),
                                 captions=captions, title=f"examples by {primary}"))
  return written


def write_markdown(analysis: Analysis, out: str, *, figures: Sequence[str] = (),
                   notes: Sequence[str] = ()) -> str:
  """Writes out/report.md: a summary of each section with links to the tables and figures."""
  t = analysis.tables
  rel_fig = lambda p: os.path.relpath(p, out)
  figs = {os.path.basename(p): rel_fig(p) for p in figures}
  md = ["# jaxdiff analysis report\n", "## Inputs\n", markdown_table(t["inputs"])]
  md.append(f"\nSettings: `{json.dumps(analysis.settings)}`. Primary score: "
            f"`{analysis.primary_score}`. Scores follow jaxdiff's sign convention "
            "(higher = harder).\n")
  if analysis.dropped:
    md.append("\nScores left out: " + "; ".join(f"`{k}` ({v})"
                                                for k, v in sorted(analysis.dropped.items()))
              + ".\n")
  md += [f"\n> {n}\n" for n in notes]

  md.append("\n## Reliability across runs\n")
  md.append("Split-half reliability: correlation between the means of two disjoint sets of n runs, "
            "mean over random draws of runs with the central 95% of draws in brackets; rank error "
            "is |rank - rank of the reference| / N at n = 1, the reference being the mean of half "
            "of the runs, disjoint from the n runs; runs needed from Spearman-Brown "
            "applied to the single-run Spearman reliability.\n\n")
  rel, need = t["reliability"], t["runs_needed"]
  if not rel.empty:
    rows, flagged = [], []
    for (a, n), g in rel.groupby(["arch", "score"], sort=False):
      sp = g[(g.measure == "split") & (g.metric == "spearman")].sort_values("n")
      pe = g[(g.measure == "split") & (g.metric == "pearson")].sort_values("n")
      q50 = g[(g.measure == "rank_error") & (g.metric == "q0.5") & (g.n == 1)]
      q90 = g[(g.measure == "rank_error") & (g.metric == "q0.9") & (g.n == 1)]
      nd = need[(need.arch == a) & (need.score == n) & (need.metric == "spearman")]
      flag = nd.flag.iloc[0] if "flag" in nd and len(nd) else ""
      if flag:
        flagged.append(f"`{n}` ({a}): {flag}")
      first, last = sp.iloc[0], sp.iloc[-1]
      rows.append({"arch": a, "score": n, "Spearman n=1": f"{first['mean']:.3f} [{first.lo:.3f}, "
                   f"{first.hi:.3f}]", "Pearson n=1": f"{pe.iloc[0]['mean']:.3f}",
                   f"Spearman n={int(last.n)}": (f"{last['mean']:.3f} [{last.lo:.3f}, "
                                                 f"{last.hi:.3f}]"),
                   f"SB n={int(last.n)}": last.spearman_brown,
                   "rank err med/q90": (f"{q50['mean'].iloc[0]:.3f}/{q90['mean'].iloc[0]:.3f}"
                                        if len(q50) and len(q90) else "–"),
                   "runs for .9/.95/.99": ("flagged" if flag else
                                           "/".join(_fmt(v) for v in nd.runs_needed))})
    md.append(markdown_table(pd.DataFrame(rows)))
    if flagged:
      md.append("\nFlagged: " + "; ".join(flagged) + ". For these scores the measured curve "
                "contradicts the Spearman-Brown extrapolation, or ties dominate, so the runs "
                "needed are not reported as a finding (they stay in `tables/runs_needed.csv`, "
                "column `flag`).\n")
    md.append("\nAre hard examples noisier? Spearman correlation over examples between the mean "
              "score and its std across runs:\n\n")
    md.append(markdown_table(t["spread"]))
  else:
    md.append("(no architecture has 2 or more valid runs)\n")
  md += [f"\n![reliability]({v})\n" for k, v in figs.items() if k.startswith("reliability_")]
  md += [f"\n![spread]({v})\n" for k, v in figs.items() if k.startswith("spread_")]

  md.append("\n## Agreement between scores\n")
  pca = t["pca"]
  if not pca.empty:
    first = pca[pca.component == 1][["arch", "method", "eigenvalue", "share"]]
    md.append("Share of variance on the first principal component of the z-scored run-averaged "
              "scores (1/K if unrelated, 1 if one notion of difficulty explains all):\n\n")
    md.append(markdown_table(first.rename(columns={"share": "PC1 share"})))
    so = t["score_overlap"]
    off = so[so.score_a != so.score_b].groupby(["arch", "fraction", "side"], as_index=False)[
        "overlap"].mean().rename(columns={"overlap": "mean overlap between scores"})
    md.append("\nTop-k overlap between scores (pruning fraction; chance = fraction):\n\n")
    md.append(markdown_table(off))
  else:
    md.append("(agreement needs at least two scores)\n")
  ro = t["run_overlap"]
  if not ro.empty:
    piv = ro.pivot_table(index=["arch", "score"], columns=["side", "fraction"], values="mean")
    piv.columns = [f"{s} {f:.0%}" for s, f in piv.columns]
    md.append("\nTop-k overlap between two single runs (mean over disjoint pairs of runs; chance = "
              "fraction):\n\n")
    md.append(markdown_table(piv.reset_index()))
  md += [f"\n![correlation]({v})\n" for k, v in figs.items() if k.startswith("correlation_")]
  if "pca_scree.png" in figs:
    md.append(f"\n![scree]({figs['pca_scree.png']})\n")

  md.append("\n## Sensitivity to architecture\n")
  if analysis.sensitivity:
    md.append("Examples whose mean score differs between two architectures (per-example Welch "
              f"t-test, alpha = {analysis.settings['alpha']}; Bonferroni and Benjamini-Hochberg "
              "over the examples of each pair):\n\n")
    md.append(markdown_table(t["sensitivity_counts"]))
    p = analysis.settings["num_permutations"]
    n = len(analysis.example_ids)
    if p and (p + 1) * analysis.settings["alpha"] <= n:
      need = n / analysis.settings["alpha"]
      md.append(f"\nWith {p} permutations a permutation p-value is at least 1/{p + 1}, so it "
                f"cannot pass Bonferroni over {n} examples (that needs more than {need:.0f} "
                "permutations); BH may still find examples when many are sensitive.\n")
    se = t["sensitive_examples"]
    for group in ("most", "least"):
      ids = se[(se.score == analysis.primary_score) & (se.group == group)].example_id.tolist()
      md.append(f"\n{group.capitalize()} architecture-sensitive example ids "
                f"({analysis.primary_score}; ranked by the largest -log10 p of the pairwise Welch "
                f"tests, as the gallery's row): {', '.join(map(str, ids))}\n")
  else:
    md.append("(skipped: needs two or more architectures with 2+ valid runs each)\n")
  md += [f"\n![manhattan]({v})\n" for k, v in figs.items() if k.startswith("manhattan_")]
  ext = t["difficulty_extremes"]
  for group in ("easiest", "hardest"):
    g = ext[ext.group == group]
    ids = g.example_id.tolist()
    tie = ""
    if len(g) and "tied" in g and int(g.tied.iloc[-1]) > 1:
      tie = (f" ({int(g.tied.iloc[-1])} examples share the value at the end of the list; those "
             "listed were drawn from them at random)")
    md.append(f"\n{group.capitalize()} example ids ({analysis.primary_score}, mean over "
              f"architectures): {', '.join(map(str, ids))}{tie}\n")
  if "gallery.png" in figs:
    md.append(f"\n![gallery]({figs['gallery.png']})\n")
  md.append("\n## Files\n\n")
  md += [f"- `tables/{n}.csv` (and `.json`)\n" for n in t]
  md += [f"- `per_example/sensitivity_{_safe(n)}.npz`\n" for n in analysis.sensitivity]
  md.append("\nTimings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in analysis.timings.items())
            + "\n")
  path = os.path.join(out, "report.md")
  store.atomic_write_text(path, "".join(md))
  return path


def write_report(analysis: Analysis, out: str, *, x: np.ndarray | None = None,
                 kind: str | None = None, figures: bool = True,
                 notes: Sequence[str] = ()) -> list[str]:
  """Writes the report folder `out`: tables, per-example arrays, figures and report.md (last)."""
  os.makedirs(out, exist_ok=True)
  t0 = time.perf_counter()
  written = write_tables(analysis, out)
  analysis.timings["write_tables"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  figs = write_figures(analysis, out, x=x, kind=kind) if figures else []
  analysis.timings["figures"] = time.perf_counter() - t0
  written += figs
  store.atomic_write_json(os.path.join(out, "analysis.json"),
                          dict(settings=analysis.settings, inputs=analysis.inputs,
                               primary_score=analysis.primary_score, timings=analysis.timings,
                               dropped=analysis.dropped))
  written.append(write_markdown(analysis, out, figures=figs, notes=notes))
  return written

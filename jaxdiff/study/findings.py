"""The study's findings, computed from the objects the stages return.

Each `*_findings` returns a dict of the numbers its report section states, from the `Analysis`
(`analysis.analyze`, or `stages.load_analysis` when the stage was up to date: the same object
type either way), the fingerprint's `Report` and the pruning results.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

import ml_collections
import numpy as np
import pandas as pd

from jaxdiff import fingerprint as fingerprint_lib
from jaxdiff import pruning
from jaxdiff import store
from jaxdiff import workdir as workdir_lib
from jaxdiff.analysis import Analysis
from jaxdiff.fingerprint import selection
from jaxdiff.report.tables import pct
from jaxdiff.study.config import StudyError, model_label


def final_accuracy(wd: str) -> dict:
  """Test accuracy of a training workdir's last epoch: mean and std over the runs that did not
  diverge, the epoch and the number of diverged runs."""
  acc = pruning.read_test_accuracy(wd)
  ok = acc[~acc.diverged].test_acc.to_numpy()
  return dict(test_acc_mean=float(ok.mean()), test_acc_std=float(ok.std(ddof=1)) if ok.size > 1
              else float("nan"), epochs=int(acc.epoch.iloc[0]), diverged=int(acc.diverged.sum()))


def reliability_findings(analysis: Analysis, primary: str, archs: Sequence[str],
                         targets: Sequence[float] = (0.9, 0.95)) -> dict:
  """Finding 1 from the analysis' reliability and runs-needed tables: split-half Spearman of
  single runs and n-run means, and runs needed (Spearman-Brown from the single-run value, and as
  measured), per architecture."""
  rel, need = analysis.tables["reliability"], analysis.tables["runs_needed"]
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


def agreement_findings(analysis: Analysis, primary: str, archs: Sequence[str]) -> dict:
  """Finding 2: first principal component's share of the Spearman correlation matrix of the
  run-averaged scores, per architecture, and the correlation matrix averaged over architectures
  (`Analysis.agreement`; each architecture's matrix in the first one's score order)."""
  per_arch = {}
  mats = []
  names = None
  for a in archs:
    res = analysis.agreement.get(a)
    if res is None or "spearman" not in res["corr"] or "spearman" not in res["pca"]:
      continue
    names = names or list(res["names"])
    pos = [list(res["names"]).index(n) for n in names]
    m = res["corr"]["spearman"][np.ix_(pos, pos)]
    mats.append(m)
    k = len(names)
    off = m[~np.eye(k, dtype=bool)]
    shares = res["pca"]["spearman"].shares
    per_arch[a] = dict(pc1_share=float(shares[0]), num_scores=len(shares),
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


def sensitivity_findings(sets: Mapping[str, store.ScoreSet], score: str,
                         analysis: Analysis, alpha: float) -> dict:
  """Finding 3: architecture-sensitive examples for `score`.

  Counts (a) examples whose mean score differs across all architectures by a one-way ANOVA F-test
  (Fisher; `fingerprint.selection.anova_log_pvalues`) with Bonferroni over the N examples, and
  (b) examples significant for at least one architecture pair by per-pair Welch t-tests with
  Benjamini-Hochberg (the analysis' `sensitivity_counts`); "how sensitive" is the largest
  |Hedges' g| over pairs of each sensitive example. The most sensitive example ids are the
  analysis' ranking (largest -log10 p of the pairwise Welch tests), the one its gallery shows.
  """
  archs = list(sets)
  x = np.concatenate([sets[a].get(score) for a in archs]).astype(np.float64)
  y = np.concatenate([np.full(int(sets[a].valid_runs.sum()), i) for i, a in enumerate(archs)])
  n = x.shape[1]
  log_p, f_stat = selection.anova_log_pvalues(x, y)
  anova_sig = log_p < math.log(alpha / n)
  res = analysis.sensitivity[score]
  bh, bonf, g, pairs = res.bh(), res.bonferroni(), res.hedges_g, res.pairs
  max_g = np.abs(g).max(axis=0)
  bh_any = bh.any(axis=0)
  eff = max_g[anova_sig]
  ids = sets[archs[0]].example_ids
  # The most sensitive examples as the analysis ranks them (and its gallery row shows them): by
  # the largest -log10 p of the pairwise Welch tests, ties by the largest |Hedges' g|; the
  # analysis lists its first top_m.
  listed = analysis.example_ids[res.ranking()[:min(10, int(analysis.settings["top_m"]))]]
  neg_log10_p = -log_p / math.log(10)
  per_example = pd.DataFrame(dict(example_id=ids, label=sets[archs[0]].labels,
                                  anova_neg_log10_p=neg_log10_p, anova_f=f_stat,
                                  anova_bonferroni=anova_sig, bh_any_pair=bh_any,
                                  max_abs_hedges_g=max_g))
  pair_rows = [dict(pair=f"{r['arch_a']} vs {r['arch_b']}", bonferroni=r["bonferroni"],
                    bh=r["bh"]) for r in res.counts()]
  best = max(pair_rows, key=lambda r: r["bh"]) if pair_rows else None
  return dict(score=score, num_examples=int(n), alpha=alpha, num_archs=len(archs),
              anova_bonferroni=int(anova_sig.sum()), anova_fraction=float(anova_sig.mean()),
              bh_any_pair=int(bh_any.sum()), bh_any_fraction=float(bh_any.mean()),
              bonferroni_any_pair=int(bonf.any(axis=0).sum()), num_pairs=len(pairs),
              median_max_abs_g=float(np.median(eff)) if eff.size else float("nan"),
              q90_max_abs_g=float(np.quantile(eff, 0.9)) if eff.size else float("nan"),
              median_max_abs_g_all=float(np.median(max_g)),
              most_sensitive_ids=[int(i) for i in listed], pairs=pair_rows,
              most_separated_pair=best, per_example=per_example, neg_log10_p=neg_log10_p)


def fingerprint_findings(fingerprint: fingerprint_lib.Report, classifier: str = "logreg") -> dict:
  """Finding 4: test accuracy of the fingerprint on held-out runs versus k (selected examples), for
  each selection method against random selection, the dataset-mean baseline and chance.

  Args:
    fingerprint: the fingerprint stage's `Report` (its accuracy-versus-k table is read).
    classifier: whose accuracy.
  """
  df = fingerprint.accuracy_vs_k
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
  pr = config.pruning
  summary = pruning.summarize(results)
  effect = pruning.averaging_effect(results)
  overlap = pruning.subset_overlap(sets[pr.arch].get(score), tuple(pr.fractions), tuple(pr.keep),
                                   single_run=pr.single_run, seed=pr.seed)
  return dict(arch=pr.arch, score=score, seeds=int(pr.num_seeds), epochs=int(pr.num_epochs),
              single_run=int(pr.single_run), results=results, summary=summary, effect=effect,
              overlap=overlap)


def load_findings(path: str) -> dict:
  """report/findings.json of a study (give the study workdir or its report folder)."""
  for p in (os.path.join(path, "findings.json"),
            os.path.join(workdir_lib.study_report_dir(path), "findings.json")):
    if os.path.exists(p):
      with open(p) as f:
        return json.load(f)
  raise StudyError(f"no findings.json in {path!r} or {path!r}/report")


def study_findings(config: ml_collections.ConfigDict, sets: Mapping[str, store.ScoreSet],
                   workdirs: Mapping[str, str], *, num_examples: int, scores: Sequence[str],
                   dropped: Mapping[str, str], primary: str, analysis: Analysis,
                   fingerprint: fingerprint_lib.Report | None = None,
                   pruning_results: pd.DataFrame | None = None, pruning_score: str = "") -> dict:
  """Every finding of the study, with the inputs table of its architectures.

  Args:
    config: the study config.
    sets, workdirs: arch -> score set, arch -> training workdir (in report order).
    num_examples: training examples; scores, dropped, primary: see `scores.usable_scores`.
    analysis: the analysis stage's `Analysis`; fingerprint: the fingerprint stage's `Report`
      (None: disabled).
    pruning_results: per-seed results of the pruning stage (None: disabled), ranked by
      `pruning_score`.
  """
  names = list(workdirs)
  arch_rows = []
  for a in names:
    acc = final_accuracy(workdirs[a])
    arch_rows.append(dict(arch=a, model=model_label(config.archs[a]),
                          runs=int(sets[a].valid_runs.sum()), epochs=acc["epochs"],
                          test_acc=f"{pct(acc['test_acc_mean'])} ± {pct(acc['test_acc_std'])}",
                          test_acc_mean=acc["test_acc_mean"], test_acc_std=acc["test_acc_std"],
                          diverged=acc["diverged"]))
  return dict(
      dataset=sets[names[0]].meta.get("dataset"), num_examples=int(num_examples), archs=names,
      runs=int(config.train.num_runs), scores=list(scores), dropped_scores=dropped,
      primary=primary,
      arch_table=pd.DataFrame(arch_rows).drop(columns=["test_acc_mean", "test_acc_std"]),
      arch_accuracy=pd.DataFrame(arch_rows),
      reliability=reliability_findings(analysis, primary, names),
      agreement=agreement_findings(analysis, primary, names),
      sensitivity=(sensitivity_findings(sets, primary, analysis, config.analysis.alpha)
                   if len(names) >= 2 else None),
      fingerprint=fingerprint_findings(fingerprint) if fingerprint is not None else None,
      pruning=(pruning_findings(pruning_results, sets, pruning_score, config)
               if pruning_results is not None else None))

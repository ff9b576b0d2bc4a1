"""The analysis report page: an `Analysis` as tables, per-example arrays, figures and report.md.

`write_report(analysis, out)` writes tables/*.csv|json, per_example/*.npz, figures/*.png and
report.md (last); `analysis.analyze` computed everything before.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Sequence

import numpy as np
import pandas as pd

from jaxdiff import store
from jaxdiff.analysis import reliability, sensitivity
from jaxdiff.analysis.report import Analysis
from jaxdiff.report import figures as plots
from jaxdiff.report.tables import fmt as _fmt
from jaxdiff.report.tables import markdown_table
from jaxdiff.report.tables import safe_name as _safe


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

"""The study report page: report.md with one section per finding, its figures, tables/*.csv|json
and findings.json (every number of report.md, machine-readable)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np
import pandas as pd

from jaxdiff import store
from jaxdiff.analysis import reliability as rel_lib
from jaxdiff.report import figures as plots
from jaxdiff.report import fingerprint as fingerprint_report
from jaxdiff.report import pruning as pruning_report
from jaxdiff.report.tables import markdown_table, num, pct, runs, write_table

SECTIONS = ("Reliability of single runs and of n-run means", "Agreement between scores",
            "Architecture-sensitive examples", "Architecture fingerprint", "Dataset pruning")


def write_report(f: dict, out: str, reliability: pd.DataFrame, analysis_dir: str) -> dict:
  """Writes the study report folder `out` from the findings `f`: figures, tables, report.md and
  findings.json (last). Adds "report" (the report.md path) and "summary" (`summary_lines`) to `f`
  and returns it. `reliability`, `analysis_dir`: see `write_figures`."""
  figs = write_figures(f, out, reliability, analysis_dir)
  write_table(out, "archs", f["arch_accuracy"])
  write_table(out, "reliability_all_scores", f["reliability"]["all_scores"])
  if f["sensitivity"] is not None:
    write_table(out, "sensitivity_per_example", f["sensitivity"]["per_example"])
    write_table(out, "sensitivity_pairs", pd.DataFrame(f["sensitivity"]["pairs"]))
  if f["agreement"].get("mean_corr") is not None:
    write_table(out, "agreement_mean_spearman", pd.DataFrame(
        f["agreement"]["mean_corr"], index=f["agreement"]["names"],
        columns=f["agreement"]["names"]).reset_index(names="score"))
  if f["fingerprint"] is not None:
    write_table(out, "fingerprint_accuracy", f["fingerprint"]["frame"])
  if f["pruning"] is not None:
    for name in ("results", "summary", "effect", "overlap"):
      write_table(out, f"pruning_{name}", f["pruning"][name])
  f["report"] = write_markdown(f, out, figs)
  f["summary"] = summary_lines(f)
  store.atomic_write_json(os.path.join(out, "findings.json"), _json_ready(_public(f)))
  return f


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
        f"{num(lo)}-{num(hi)} across architectures; means of {nmax} runs agree at "
        f"{num(min(rn))}-{num(max(rn))}. By Spearman-Brown, averaging {rel['score']} over "
        f"{runs(med['0.9'])} runs reaches 0.9 and over {runs(med['0.95'])} runs 0.95 (median "
        "over architectures).")
  ag = f.get("agreement")
  if ag and ag["archs"]:
    lo, hi = ag["pc1_range"]
    k = ag["num_scores"]
    lines.append(f"(2) Agreement: the first principal component of {k} run-averaged scores "
                 f"explains {pct(lo)}-{pct(hi)} of their variance (1/K = {pct(1 / k)}); mean "
                 "|Spearman| between scores "
                 f"{num(min(r['mean_abs_corr'] for r in ag['archs'].values()), 2)}-"
                 f"{num(max(r['mean_abs_corr'] for r in ag['archs'].values()), 2)}.")
  se = f.get("sensitivity")
  if se:
    lines.append(
        f"(3) Sensitivity: {se['anova_bonferroni']} of {se['num_examples']} examples "
        f"({pct(se['anova_fraction'])}) have a {se['score']} that differs across the "
        f"{se['num_archs']} architectures (ANOVA, Bonferroni alpha={se['alpha']:g}); "
        f"{se['bh_any_pair']} ({pct(se['bh_any_fraction'])}) differ for at least one pair (Welch, "
        f"BH); their largest |Hedges' g| has median {num(se['median_max_abs_g'], 2)}.")
  fp = f.get("fingerprint")
  if fp and fp.get("selection"):
    t = fp["table"]
    k = 10 if 10 in fp["ks"] else fp["ks"][len(fp["ks"]) // 2]
    sel = t[fp["selection"]][k]["accuracy"]
    rnd = t.get("random", {}).get(k, {}).get("accuracy", float("nan"))
    base = t.get("mean_score", {}).get(k, {}).get("accuracy", float("nan"))
    lines.append(
        f"(4) Fingerprint: with k={k} examples chosen by {fp['selection']}, the architecture of "
        f"{pct(sel)} of {fp['n_test']} held-out runs is named correctly, vs {pct(rnd)} with k "
        f"random examples, {pct(base)} from the dataset-mean score, chance {pct(fp['chance'])}"
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
            cell.append(f"{m}/{k} {pct(r['mean'].iloc[0])}")
      r = row[row.method == "random"]
      if len(r):
        cell.append(f"random {pct(r['mean'].iloc[0])}")
      parts.append(f"pruning {pct(frac, 0)}: " + ", ".join(cell))
    head = (f"(5) Pruning ({pr['arch']}, {pr['score']}, mean test accuracy of {pr['seeds']} "
            f"seeds" + (f"; full data {pct(full['mean'])}" if full is not None else "") + "): ")
    lines.append(head + "; ".join(parts) + ".")
    eff = pr["effect"]
    if len(eff):
      lines.append(
          "    Averaging the score over runs instead of one run changes the pruned accuracy by "
          f"{pct(eff.mean_minus_single.min(), 2)} to {pct(eff.mean_minus_single.max(), 2)} "
          f"(smallest paired p = {num(eff.p_value.min(), 3)}).")
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


def _public(f: Mapping[str, Any]) -> dict:
  """The findings without bulky per-example arrays (those are in the tables)."""
  drop = {"per_example", "neg_log10_p", "frame", "results", "all_scores"}
  return {k: ({kk: vv for kk, vv in v.items() if kk not in drop} if isinstance(v, Mapping) else v)
          for k, v in f.items() if k not in ("arch_table", "report")}


def write_figures(f: Mapping[str, Any], out: str, reliability: pd.DataFrame,
                  analysis_dir: str) -> dict[str, str]:
  """The report's figures under out/figures; returns name -> path.

  Args:
    f: the findings.
    out: the report folder.
    reliability: the analysis' reliability table (the curves of the reliability figure).
    analysis_dir: the analysis report folder; its gallery is linked when it exists.
  """
  figs = {}
  fig_dir = os.path.join(out, "figures")
  rel = f["reliability"]
  table = reliability
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
  if f.get("fingerprint") is not None:
    figs["fingerprint"] = fingerprint_report.plot_accuracy_vs_k(
        f["fingerprint"]["frame"], os.path.join(fig_dir, "fingerprint.png"),
        title=f"fingerprint from {f['primary']}: held-out runs")
  if f.get("pruning") is not None:
    p = f["pruning"]
    figs["pruning"] = pruning_report.plot_pruning(
        p["summary"], os.path.join(fig_dir, "pruning.png"),
        title=f"{p['arch']} retrained on pruned data ({p['score']}; {p['seeds']} seeds)")
  gallery = os.path.join(analysis_dir, "figures", "gallery.png")
  if os.path.exists(gallery):
    figs["gallery"] = gallery
  return figs


def _sensitivity_markdown(se: Mapping[str, Any]) -> list[str]:
  return [summary_lines({"sensitivity": se})[0][4:] + "\n\n",
          f"Among the ANOVA-sensitive examples the largest |Hedges' g| over pairs has median "
          f"{num(se['median_max_abs_g'], 2)} and 90th percentile {num(se['q90_max_abs_g'], 2)} "
          f"(median over all examples: {num(se['median_max_abs_g_all'], 2)}). Most sensitive "
          "example ids (ranked by the largest -log10 p of the pairwise Welch tests, as the "
          "gallery's \"most arch-sensitive\" row; the ANOVA above counts, it does not rank): "
          f"{', '.join(map(str, se['most_sensitive_ids']))}. Per pair (Welch, "
          f"alpha {se['alpha']:g}; Bonferroni and BH over the examples of the pair):\n\n",
          markdown_table(pd.DataFrame(se["pairs"]))]


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
  md.append(markdown_table(f["arch_table"]))
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
    rows.append({"arch": a, "single run": f"{num(r['rho1'])} [{num(r['rho1_lo'])}, "
                 f"{num(r['rho1_hi'])}]",
                 "mean of n runs": f"n={r['n_max']}: {num(r['rho_n_max'])} "
                 f"[{num(r['rho_n_max_lo'])}, {num(r['rho_n_max_hi'])}]",
                 "runs for 0.9": f"{runs(r['runs_for_0.9'])} (measured "
                 f"{runs(r['runs_measured_0.9'])})",
                 "runs for 0.95": f"{runs(r['runs_for_0.95'])} (measured "
                 f"{runs(r['runs_measured_0.95'])})"})
  md.append(markdown_table(pd.DataFrame(rows)))
  if rel["least_reliable_scores"]:
    md.append("\nOver all scores (median single-run Spearman over architectures): least reliable "
              + ", ".join(f"`{n}` {num(v)}" for n, v in rel["least_reliable_scores"])
              + "; most reliable " + ", ".join(f"`{n}` {num(v)}"
                                               for n, v in rel["most_reliable_scores"])
              + ". Every architecture x score: `tables/reliability_all_scores.csv`.\n")
  if "reliability" in figs:
    md.append(f"\n![reliability]({rel_path(figs['reliability'])})\n")

  ag = f["agreement"]
  md.append(f"\n## 2. {SECTIONS[1]}\n\n")
  if ag["archs"]:
    md.append(summary_lines({"agreement": ag})[0][4:] + "\n\n")
    md.append(markdown_table(pd.DataFrame([dict(arch=a, scores=r["num_scores"],
                                           **{"PC1 share": pct(r["pc1_share"]),
                                              "mean abs Spearman": num(r["mean_abs_corr"], 3)})
                                      for a, r in ag["archs"].items()])))
    if ag["closest_to_primary"]:
      md.append(f"\nScores closest to `{f['primary']}` (mean Spearman over architectures): "
                + ", ".join(f"`{n}` {num(v, 2)}" for n, v in ag["closest_to_primary"]) + ".\n")
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
      rows.append({"selection": label, **{f"k={k}": pct(t[k]["accuracy"]) + (
          f" ± {pct(t[k]['sd'])}" if m == "random" else "") for k in fp["ks"] if k in t}})
    rows.append({"selection": "chance", **{f"k={k}": pct(fp["chance"]) for k in fp["ks"]}})
    md.append(markdown_table(pd.DataFrame(rows)))
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
    md.append(markdown_table(pd.DataFrame([{
        "condition": r.condition, "kept": r.kept, "test accuracy": f"{pct(r.mean, 2)} ± "
        f"{pct(r.std, 2)}", "min-max": f"{pct(r.min, 1)}-{pct(r.max, 1)}",
        "vs full": pct(r.vs_full, 2)} for r in s.itertuples()])))
    if len(pr["effect"]):
      md.append("\nMean-score minus single-run-score accuracy, paired by seed (two-sided paired "
                "t-test):\n\n")
      md.append(markdown_table(pd.DataFrame([{
          "pruned": pct(r.fraction, 0), "keep": r.keep, "difference": pct(r.mean_minus_single, 2),
          "std": pct(r.std, 2), "p": num(r.p_value, 3)} for r in pr["effect"].itertuples()])))
    md.append("\nOverlap of the kept sets chosen by the single-run and the averaged score (chance "
              "= kept fraction):\n\n")
    md.append(markdown_table(pd.DataFrame([{
        "pruned": pct(r.fraction, 0), "keep": r.keep, "kept": r.kept, "overlap": pct(r.overlap),
        "chance": pct(r.chance)} for r in pr["overlap"].itertuples()])))
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



"""The fingerprint report page: accuracy-versus-k table and figure, report.md, CSV tables, the
saved fingerprint (`write_report` of an `evaluate.Report`)."""

from __future__ import annotations

import os

from matplotlib.figure import Figure
import numpy as np
import pandas as pd

from jaxdiff import store
from jaxdiff.fingerprint import evaluate, selection
from jaxdiff.fingerprint.evaluate import BASELINE
from jaxdiff.report import figures
from jaxdiff.report.tables import markdown_table


def accuracy_table_markdown(df: pd.DataFrame) -> str:
  """Markdown table of accuracy vs k: one row per (method, classifier), one column per k.

  Cells show the accuracy, "+- sd" over random repeats, and "(n=..)" when fewer than k examples were
  selected (Bonferroni).
  """
  ks = sorted(df["k"].unique())
  rows = []
  for method in dict.fromkeys(df["method"]):
    for clf in dict.fromkeys(df.loc[df["method"] == method, "classifier"]):
      label = "dataset-mean score (baseline)" if method == BASELINE else method
      cells = {"selection": label, "classifier": clf}
      for k in ks:
        row = df[(df["method"] == method) & (df["classifier"] == clf) & (df["k"] == k)]
        if row.empty:
          cells[f"k={k}"] = ""
          continue
        r = row.iloc[0]
        cell = f"{r['accuracy']:.3f}"
        if r["repeats"] > 1:
          cell += f" ± {r['accuracy_sd']:.3f}"
        if method != BASELINE and r["n_selected"] < k:
          cell += f" (n={int(r['n_selected'])})"
        cells[f"k={k}"] = cell
      rows.append(cells)
  return markdown_table(pd.DataFrame(rows, columns=["selection", "classifier"] +
                                     [f"k={k}" for k in ks]), cell=str, empty=None)


def frame_markdown(df: pd.DataFrame) -> str:
  """A small table as markdown, floats with 3 decimals."""
  return markdown_table(df, cell=_three_decimals, empty=None)


def _three_decimals(v) -> str:
  return f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v)


def plot_accuracy_vs_k(df: pd.DataFrame, path: str, title: str = "") -> str:
  """Saves the accuracy-versus-k figure: one line per selection method (solid: logistic regression,
  dashed: k-means), the dataset-mean-score baseline dotted, chance grey; written atomically."""
  fig = Figure(figsize=(7.5, 4))
  ax = fig.add_subplot()
  styles = {"logreg": "-", "kmeans": "--"}
  colors = dict(zip(list(selection.SELECTION_METHODS) + [BASELINE],
                    ["C0", "C1", "C2", "C3", "0.3"]))
  for (method, clf), g in df.groupby(["method", "classifier"], sort=False):
    g = g.sort_values("k")
    ls = (":" if clf == "logreg" else "-.") if method == BASELINE else styles.get(clf, "-")
    label = f"{'dataset-mean score' if method == BASELINE else method} / {clf}"
    ax.errorbar(g["k"], g["accuracy"], yerr=g["accuracy_sd"] if (g["repeats"] > 1).any() else None,
                ls=ls, marker="o" if method != BASELINE else None, ms=3,
                color=colors.get(method), label=label, capsize=2)
  ax.axhline(float(df["chance"].iloc[0]), color="0.6", lw=1, label="chance")
  ax.set_xscale("log")
  ks = sorted(df["k"].unique())
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.set_xlabel("k (selected examples)")
  ax.set_ylabel("test accuracy (held-out runs)")
  ax.set_ylim(0, 1.02)
  if title:
    ax.set_title(title, fontsize=9)
  ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  return figures.save_figure(fig, path, dpi=150)


def write_report(report: evaluate.Report, out_dir: str) -> dict[str, str]:
  """Writes report.md, accuracy_vs_k.{csv,md,png}, accuracy_vs_fit_runs.csv, holdout.csv and
  fingerprint/ under `out_dir`, each atomically. Returns name -> path."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {}

  def put(name, text):
    paths[name] = os.path.join(out_dir, name)
    store.atomic_write_text(paths[name], text)

  table = accuracy_table_markdown(report.accuracy_vs_k)
  put("accuracy_vs_k.csv", report.accuracy_vs_k.to_csv(index=False))
  put("accuracy_vs_k.md", table)
  put("accuracy_vs_fit_runs.csv", report.accuracy_vs_fit_runs.to_csv(index=False))
  runs = report.accuracy_vs_fit_runs[["fit_runs_per_arch", "method", "classifier", "k",
                                      "n_selected", "accuracy", "accuracy_sd", "n_test"]]
  md = ["# Architecture fingerprint report", "", report.header, "",
        "## Test accuracy vs k", "", table, "## Test accuracy vs fit runs per architecture", "",
        frame_markdown(runs)]
  if report.holdout is not None:
    put("holdout.csv", report.holdout.to_csv(index=False))
    md += ["## Hold one architecture out", "",
           "Trained without the held-out architecture; `flagged_fraction` is how many of its runs "
           "the 'none of these' distance rule flags, `known_false_flag` how many test runs of "
           "known architectures it flags.", "", frame_markdown(report.holdout)]
  paths["figure"] = os.path.join(out_dir, "accuracy_vs_k.png")
  plot_accuracy_vs_k(report.accuracy_vs_k, paths["figure"], title=report.title)
  paths["fingerprint"] = os.path.join(out_dir, "fingerprint")
  report.fingerprint.save(paths["fingerprint"])
  fp = report.fingerprint
  md += ["## Saved fingerprint", "",
         f"`fingerprint/`: {len(fp.example_ids)} examples chosen by {fp.info['method']} on fit "
         f"runs only; example ids {fp.example_ids.tolist()[:20]}; L2 = {fp.classifier.l2:g}; "
         f"'none of these' threshold {fp.classifier.threshold:.3f}. Apply with "
         "`jaxdiff.fingerprint.load_fingerprint(dir).predict(jaxdiff.store.load_scores(...))`.", ""]
  put("report.md", "\n".join(md))
  return paths

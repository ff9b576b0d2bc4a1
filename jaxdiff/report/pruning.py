"""The pruning figure: test accuracy of ensembles retrained on pruned data, per method and side."""

from __future__ import annotations

from matplotlib.figure import Figure
import numpy as np
import pandas as pd

from jaxdiff import pruning
from jaxdiff.report import figures


def plot_pruning(summary: pd.DataFrame, path: str, *, title: str = "") -> str:
  """Test accuracy (mean +- std over seeds) against the pruned fraction: one panel per kept side,
  one line per method, the full-data accuracy as a band. Written atomically as PNG."""
  return figures.save_figure(pruning_figure(summary, title=title), path)


def pruning_figure(summary: pd.DataFrame, *, title: str = ""):
  """The `matplotlib.figure.Figure` of `plot_pruning`. The x axis is ticked at the pruned
  fractions only; the methods' points are set slightly apart around each so that their error bars
  do not hide each other."""
  sides = [k for k in pruning.KEEP if (summary.keep == k).any()] or ["random"]
  fig = Figure(figsize=(5 * len(sides), 3.8))
  axes = fig.subplots(1, len(sides), squeeze=False, sharey=True)[0]
  full = summary[summary.method == "full"]
  colors = {"single": "C3", "mean": "C0", "random": "0.4"}
  pct = np.unique(100 * summary.fraction[summary.method != "full"].to_numpy(np.float64))
  for ax, side in zip(axes, sides):
    if len(full):
      m, s = float(full["mean"].iloc[0]), float(np.nan_to_num(full["std"].iloc[0]))
      ax.axhspan(m - s, m + s, color="C2", alpha=0.15, lw=0)
      ax.axhline(m, color="C2", lw=1, label="full data")
    for method in pruning.METHODS:
      g = summary[(summary.method == method) & ((summary.keep == side) | (method == "random"))]
      if g.empty:
        continue
      g = g.sort_values("fraction")
      label = {"single": "single-run score", "mean": "score averaged over runs",
               "random": "random"}[method]
      dodge = {"single": -0.8, "mean": 0.0, "random": 0.8}[method]  # keep error bars apart
      ax.errorbar(100 * g.fraction + dodge, g["mean"], yerr=np.nan_to_num(g["std"]), marker="o",
                  ms=4, capsize=3, color=colors[method], label=label)
    ax.set_xticks(pct, [f"{p:g}%" for p in pct])
    if pct.size:
      span = max(float(np.ptp(pct)), 20.0)  # one fraction: a window around it, not +-1%
      ax.set_xlim(pct.min() - 0.15 * span, pct.max() + 0.15 * span)
    ax.set_xlabel("% of training set pruned")
    ax.set_title(f"keep the {side}" if side in pruning.KEEP else "random", fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy (mean ± std over seeds)")
  axes[-1].legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  return fig

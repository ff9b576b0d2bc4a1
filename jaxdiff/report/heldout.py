"""The held-out report page: C-score histogram, summary.md and the label-noise AUROC table.

`write_report(workdir, out_dir)` computes the report (`heldout.load_report`), then writes the arrays
(`heldout.save_result`), the figure and the markdown.
"""

from __future__ import annotations

import os
from typing import Any

from matplotlib.figure import Figure
import numpy as np
import pandas as pd

from jaxdiff import heldout
from jaxdiff import store
from jaxdiff.report import figures
from jaxdiff.report.tables import markdown_table


def plot_c_scores(c: heldout.CScores, path: str, noise_mask: Any = None, title: str = "") -> str:
  """Histogram of C-scores per subset fraction (clean and flipped labels apart when given).

  Args:
    c: CScores.
    path: output PNG (written atomically).
    noise_mask: optional bool `[N]`.
    title: figure title.
  """
  nf = len(c.fractions)
  fig = Figure(figsize=(4.2 * nf, 3.2))
  for i, frac in enumerate(c.fractions):
    ax = fig.add_subplot(1, nf, i + 1)
    v = c.estimate.mean[i]
    ok = np.isfinite(v)
    # A C-score from m held-out members is a multiple of 1/m: one bin per multiple of 1/m for the
    # median m (finer bins alias into empty and full ones).
    m = max(int(np.median(c.estimate.count[i][ok])) if ok.any() else 1, 1)
    bins = (np.arange(m + 2) - 0.5) / m
    if noise_mask is None:
      ax.hist(v[ok], bins=bins, color="C0")
    else:
      noisy = np.asarray(noise_mask, bool)
      ax.hist([v[ok & ~noisy], v[ok & noisy]], bins=bins, color=["C0", "C3"], stacked=True,
              label=[f"clean ({int((ok & ~noisy).sum())})", f"flipped ({int((ok & noisy).sum())})"])
      ax.legend(fontsize=7)
    ax.set_xlabel("C-score (held-out accuracy)")
    ax.set_ylabel("examples")
    ax.set_title(f"subset fraction {frac:g}; median held-out members "
                 f"{int(np.median(c.estimate.count[i]))}", fontsize=8)
    if (~ok).any():
      ax.text(0.02, 0.95, f"{int((~ok).sum())} flagged (too few held-out)", fontsize=7,
              transform=ax.transAxes, va="top")
  if title:
    fig.suptitle(title, fontsize=9)
  return figures.save_figure(fig, path)


def _nanmean(x) -> float:
  x = np.asarray(x, np.float64)
  return float(np.mean(x[~np.isnan(x)])) if (~np.isnan(x)).any() else float("nan")


def _table(rows: list[dict]) -> str:
  """Rows of formatted cells as a markdown table, without its final newline (a line of the page)."""
  return markdown_table(pd.DataFrame(rows), cell=str).rstrip("\n")


def summary_markdown(w: heldout.WorkdirArrays, result: heldout.HeldoutResult,
                     auroc_rows: list[dict] | None = None, *, min_holdout: int = 2,
                     figure: str | None = None) -> str:
  """A markdown summary: setup (R, fractions, epochs), held-out counts, C-score and memorisation
  distributions (clean vs flipped labels when known), and the label-noise AUROC table."""
  m = w.meta
  runs = w.mask.shape[0]
  lines = ["# Held-out ensemble: C-scores, memorisation, out-of-sample probabilities", "",
           f"Workdir `{w.workdir}`: dataset {m.get('dataset')}, arch {m.get('arch')}, "
           f"R={runs} members ({int(w.valid.sum())} not diverged), {m.get('num_epochs')} epochs, "
           f"subset fractions {sorted(set(w.fractions.tolist()))}, N={w.mask.shape[1]}"
           + (f", label noise {w.noise_mask.mean():.1%} ({int(w.noise_mask.sum())} flipped)"
              if w.noise_mask is not None else "") + ".", ""]
  if figure:
    lines += [f"![C-score histogram]({figure})", ""]
  rows = []
  for i, f in enumerate(result.c.fractions):
    cnt = result.c.estimate.count[i]
    rows.append({"subset fraction": f"{f:g}",
                 "held-out members per example (min / median / max)":
                     f"{cnt.min()} / {np.median(cnt):g} / {cnt.max()}",
                 f"flagged (< {min_holdout})": str(int((~result.c.estimate.enough[i]).sum())),
                 "mean C-score": f"{_nanmean(result.c.estimate.mean[i]):.3f}",
                 "mean memorisation": f"{_nanmean(result.mem.value[i]):.3f}"})
  lines += [_table(rows), ""]
  if w.noise_mask is not None:
    noisy = w.noise_mask
    py = heldout.label_prob(result.oos_probs, result.labels)
    mem = result.mem.value.mean(0)
    lines += [_table([{"examples": f"{name} ({int(sel.sum())})",
                       "mean integrated C-score": f"{_nanmean(result.c.integrated[sel]):.3f}",
                       "mean memorisation": f"{_nanmean(mem[sel]):.3f}",
                       "mean OOS p_y": f"{_nanmean(py[sel]):.3f}"}
                      for name, sel in (("clean labels", ~noisy), ("flipped labels", noisy))]),
              ""]
  if auroc_rows:
    lines += ["Label-noise AUROC (higher = ranks flipped labels above clean ones; every score "
              "oriented higher-is-harder; `examples`: those with every estimate defined, or, for "
              "a score defined on fewer than half, its own). `held-out` "
              "scores use only members that did not train on the example, `in-sample` only "
              "members that did; `stored` rows are the per-member scores of scores/ averaged "
              "over members"
              + (" (with subsets, each member's score mixes examples it trained on and examples "
                 "it held out)" if w.has_subsets else "") + "; `full-data` rows, when present, "
              "are the stored scores of an ensemble trained on every example (purely "
              "in-sample).", "",
              _table([{"score": r["score"], "kind": r["kind"], "AUROC": f"{r['auroc']:.3f}",
                       "examples": str(r["examples"])} for r in auroc_rows]), ""]
  return "\n".join(lines)


def write_report(workdir: str, out_dir: str, *, min_holdout: int = 2,
                 full_data_workdir: str | None = None) -> str:
  """The held-out report of a workdir trained on subsets, written to `out_dir`.

  Files: the arrays of `heldout.save_result`, c_score_hist.png, summary.md and, with label noise,
  noise_auroc.{json,md} (with the stored scores of `full_data_workdir`, an ensemble trained on
  every example of the same data, as its "full-data" rows). Every input is read and checked, and
  everything computed, before the first file is written: a refused input leaves `out_dir` as it
  was.

  Returns:
    the markdown summary.

  Raises:
    ValueError (store.StoreError for files): see `heldout.load_report`.
  """
  rep = heldout.load_report(workdir, min_holdout=min_holdout, full_data_workdir=full_data_workdir)
  w, res, rows = rep.workdir, rep.result, rep.auroc_rows
  text = summary_markdown(w, res, rows, min_holdout=min_holdout, figure="c_score_hist.png")
  # Inputs checked and results computed: only now write.
  heldout.save_result(res, out_dir, w.example_ids)
  plot_c_scores(res.c, os.path.join(out_dir, "c_score_hist.png"), w.noise_mask,
                title=f"{w.meta.get('arch')}, R={w.mask.shape[0]}, "
                      f"{w.meta.get('num_epochs')} epochs")
  if rows is not None:
    store.atomic_write_json(os.path.join(out_dir, "noise_auroc.json"), rows)
  store.atomic_write_text(os.path.join(out_dir, "summary.md"), text)
  if rows:
    store.atomic_write_text(os.path.join(out_dir, "noise_auroc.md"),
                            text[text.index("Label-noise AUROC"):])
  return text

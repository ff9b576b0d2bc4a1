"""The figure primitives of every report: reliability curves, heatmaps, scree, Manhattan, galleries.

Each function takes plain arrays and an output path and writes a PNG through `save_figure`, the one
atomic figure writer of jaxdiff. Figures are built on `matplotlib.figure.Figure`, whose `savefig`
renders with the Agg canvas: no pyplot state and no global backend (`matplotlib.use`) is touched.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from jaxdiff import store

KINDS = ("signal", "image")


def save_figure(fig: Figure, path: str, dpi: int = 110) -> str:
  """Writes `fig` as a PNG atomically (temporary file, then rename); returns `path`."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
  store.atomic_write_bytes(path, buf.getvalue())
  return path


def reliability_plot(ns: Sequence[int], curves: Mapping[str, tuple], path: str, *,
                     predicted: Mapping[str, np.ndarray] | None = None, title: str = "",
                     ylabel: str = "correlation between disjoint n-run means") -> str:
  """Correlation versus number of runs n (log2 axis), one line per curve with its interval.

  Args:
    ns: `[K]` numbers of runs.
    curves: label -> (mean `[K]`, lo `[K]`, hi `[K]`).
    path: output PNG.
    predicted: label -> `[K]` predictions (e.g. Spearman-Brown), drawn dashed.
    title, ylabel: text.
  """
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  ns = np.asarray(ns)
  for i, (label, (mean, lo, hi)) in enumerate(curves.items()):
    color = f"C{i}"
    ax.plot(ns, mean, "o-", color=color, label=label)
    ax.fill_between(ns, lo, hi, color=color, alpha=0.2, lw=0)
  for i, (label, pred) in enumerate((predicted or {}).items()):
    ax.plot(ns, pred, "--", color=f"C{i}", alpha=0.8, label=label)
  ax.set_xscale("log", base=2)
  ax.set_xticks(ns, [str(int(n)) for n in ns])
  ax.set_xlabel("number of runs n")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, path)


def heatmap(matrix: np.ndarray, names: Sequence[str], path: str, *, title: str = "",
            vmin: float = -1.0, vmax: float = 1.0, annotate: bool = True) -> str:
  """A `[K, K]` matrix (e.g. correlations between scores) as a labelled heatmap."""
  matrix = np.asarray(matrix, np.float64)
  k = matrix.shape[0]
  size = max(4.0, 0.55 * k + 2.0)
  fig = Figure(figsize=(size + 1, size))
  ax = fig.add_subplot()
  im = ax.imshow(matrix, cmap="RdBu_r", vmin=vmin, vmax=vmax)
  ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
  ax.set_yticks(range(k), names, fontsize=8)
  if annotate and k <= 20:
    for i in range(k):
      for j in range(k):
        if np.isfinite(matrix[i, j]):
          ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6)
  fig.colorbar(im, ax=ax, shrink=0.8)
  ax.set_title(title)
  return save_figure(fig, path)


def scree_plot(shares: Mapping[str, np.ndarray], path: str, *, title: str = "") -> str:
  """Share of variance per principal component, one line per label (e.g. architecture)."""
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for label, s in shares.items():
    s = np.asarray(s)
    ax.plot(np.arange(1, s.size + 1), s, "o-", label=f"{label} (PC1 {s[0]:.0%})")
  ax.set_xlabel("principal component")
  ax.set_ylabel("share of variance")
  ax.set_ylim(0, 1)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, path)


def manhattan_plot(neg_log10_p: np.ndarray, panel_names: Sequence[str], path: str, *,
                   labels: np.ndarray | None = None,
                   thresholds: Sequence[Mapping[str, float]] | None = None, title: str = "") -> str:
  """Per-example -log10 p, one panel per test (architecture pair); examples grouped by class label.

  Args:
    neg_log10_p: `[P, N]`; +inf (p = 0 exactly) is drawn at the top of the axis as a triangle.
    panel_names: `[P]` names.
    path: output PNG.
    labels: `[N]` class labels: examples are ordered by label (then index), classes alternate
      between two colours (named in the legend) and each class's block is labelled on the x axis.
    thresholds: per panel, name -> -log10 threshold (e.g. Bonferroni, BH), drawn as lines.
    title: figure title.
  """
  return save_figure(manhattan_figure(neg_log10_p, panel_names, labels=labels,
                                      thresholds=thresholds, title=title), path)


def manhattan_figure(neg_log10_p: np.ndarray, panel_names: Sequence[str], *,
                     labels: np.ndarray | None = None,
                     thresholds: Sequence[Mapping[str, float]] | None = None,
                     title: str = "") -> Figure:
  """The `Figure` of `manhattan_plot` (same arguments, no path)."""
  v = np.atleast_2d(np.asarray(neg_log10_p, np.float64))
  p, n = v.shape
  order = np.argsort(labels, kind="stable") if labels is not None else np.arange(n)
  classes, first, inverse = (np.unique(np.asarray(labels)[order], return_index=True,
                                       return_inverse=True) if labels is not None
                             else (np.zeros(1), np.zeros(1, int), np.zeros(n, int)))
  colors = inverse % 2  # alternate colours by class block (the k-th class in sorted order)
  names = {0: "classes " + ", ".join(str(c) for c in classes[0::2]),
           1: "classes " + ", ".join(str(c) for c in classes[1::2])}
  fig = Figure(figsize=(10, 2.2 * p + 0.6))
  axes = fig.subplots(p, 1, squeeze=False, sharex=True)[:, 0]
  finite = v[np.isfinite(v)]
  top = (finite.max() if finite.size else 1.0) * 1.05 + 1.0
  for i, ax in enumerate(axes):
    y = v[i, order]
    inf = ~np.isfinite(y)
    pos = np.arange(n)
    for parity, color in ((0, "tab:blue"), (1, "tab:red")):
      # One Line2D per colour: far cheaper to draw than a per-point coloured scatter.
      sel = ~inf & (colors == parity)
      label = names[parity] if labels is not None and parity < len(classes) else None
      ax.plot(pos[sel], y[sel], ".", ms=2, color=color, rasterized=True, label=label)
    if inf.any():
      ax.scatter(np.nonzero(inf)[0], np.full(inf.sum(), top), marker="^", s=6, c="k")
    for j, (name, value) in enumerate((thresholds[i] if thresholds else {}).items()):
      ax.axhline(value, color=f"C{j + 2}", lw=0.8, ls="--", label=f"{name} ({value:.1f})", zorder=3)
    ax.set_ylabel("-log10 p", fontsize=8)
    ax.set_title(panel_names[i], fontsize=9)
    if thresholds or labels is not None:
      ax.legend(fontsize=7, loc="upper right", markerscale=4)
  if labels is not None:  # each class's block labelled at its centre
    ends = np.append(first[1:], n)
    axes[-1].set_xticks((first + ends - 1) / 2.0, [str(c) for c in classes], fontsize=7)
  axes[-1].set_xlabel("example, grouped by class label" if labels is not None else "example")
  fig.suptitle(title)
  return fig


def spread_plot(mean: np.ndarray, std: np.ndarray, path: str, *,
                bins: Sequence[Mapping[str, float]] | None = None, title: str = "") -> str:
  """Per-example std across runs against mean score (hexbin density), with binned medians."""
  fig = Figure(figsize=(5.5, 4))
  ax = fig.add_subplot()
  ax.hexbin(mean, std, gridsize=60, bins="log", cmap="viridis", mincnt=1)
  if bins:
    ax.plot([b["mean_difficulty"] for b in bins], [b["median_std"] for b in bins], "o-", c="C3",
            label="median std per bin")
    ax.legend(fontsize=7)
  ax.set_xlabel("mean score over runs (higher = harder)")
  ax.set_ylabel("std over runs")
  ax.set_title(title)
  return save_figure(fig, path)


def gallery(x: np.ndarray, kind: str, groups: Mapping[str, Sequence[int]], path: str, *,
            captions: Mapping[str, Sequence[str]] | None = None, title: str = "") -> str:
  """Examples drawn as the data is: 1-D signals as line plots, images with imshow.

  Args:
    x: `[M, ...]` inputs, indexed by the indices in `groups`: signals `[M, L]` or `[M, L, C]`
      (channels last), images `[M, H, W]` or `[M, H, W, C]` with C in {1, 3}.
    kind: "signal" or "image".
    groups: row title -> indices into x (one row of the figure per group, e.g. easiest/hardest).
    path: output PNG.
    captions: row title -> one caption per index (e.g. "id 12, y=3").
    title: figure title.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown data kind {kind!r}; valid choices are {KINDS}")
  x = np.asarray(x)
  if kind == "signal" and x.ndim not in (2, 3):
    raise ValueError(f"signals must be [M, L] or [M, L, C], got shape {x.shape}")
  if kind == "image" and (x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3))):
    raise ValueError(f"images must be [M, H, W] or [M, H, W, C] with C in (1, 3), got {x.shape}")
  rows = [(name, list(idx)) for name, idx in groups.items() if len(idx)]
  if not rows:
    raise ValueError("gallery needs at least one non-empty group")
  cols = max(len(idx) for _, idx in rows)
  fig = Figure(figsize=(1.6 * cols, 1.9 * len(rows) + 0.5))
  axes = fig.subplots(len(rows), cols, squeeze=False)
  for r, (name, idx) in enumerate(rows):
    caps = (captions or {}).get(name, [])
    for c in range(cols):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if c >= len(idx):
        ax.axis("off")
        continue
      xi = np.asarray(x[idx[c]], np.float64)
      if kind == "signal":
        ax.plot(xi, lw=1)  # [L] or [L, C]: one line per channel
      else:
        if xi.ndim == 3 and xi.shape[-1] == 1:
          xi = xi[..., 0]
        lo, hi = xi.min(), xi.max()
        ax.imshow((xi - lo) / (hi - lo) if hi > lo else np.zeros_like(xi), cmap="gray",
                  vmin=0, vmax=1)
      if c < len(caps):
        ax.set_title(caps[c], fontsize=6)
      if c == 0:
        ax.set_ylabel(name, fontsize=8)
  fig.suptitle(title)
  return save_figure(fig, path)

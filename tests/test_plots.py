"""Tests of jaxdiff.plots: every figure writes a decodable, non-blank PNG; bad input is refused."""

import matplotlib.image
import numpy as np
import pytest

from jaxdiff.report import figures as plots


def _png(path):
  img = matplotlib.image.imread(str(path))
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
  assert img[..., :3].std() > 0.01  # something was drawn
  return img


def test_reliability_scree_heatmap_spread(tmp_path):
  ns = np.array([1, 2, 4, 8])
  mean = ns / (ns + 1.0)
  _png(plots.reliability_plot(ns, {"loss": (mean, mean - 0.05, mean + 0.05)}, tmp_path / "r.png",
                              predicted={"loss (SB)": mean}))
  _png(plots.scree_plot({"mlp": np.array([0.7, 0.2, 0.1])}, tmp_path / "s.png"))
  c = np.array([[1.0, 0.5, np.nan], [0.5, 1.0, np.nan], [np.nan, np.nan, np.nan]])
  _png(plots.heatmap(c, ["a", "b", "c"], tmp_path / "h.png"))
  rng = np.random.default_rng(0)
  m = rng.standard_normal(500)
  _png(plots.spread_plot(m, np.abs(m) + 0.1, tmp_path / "sp.png",
                         bins=[dict(mean_difficulty=0.0, median_std=1.0)]))


def test_manhattan_draws_infinite_values(tmp_path):
  v = np.abs(np.random.default_rng(1).standard_normal((2, 300)))
  v[0, 5] = np.inf
  path = plots.manhattan_plot(v, ["a vs b", "a vs c"], tmp_path / "m.png",
                              labels=np.arange(300) % 10,
                              thresholds=[{"Bonferroni": 3.8, "BH": 2.0}] * 2)
  _png(path)


def test_gallery_signals_and_images_differ(tmp_path):
  rng = np.random.default_rng(2)
  sig = _png(plots.gallery(rng.standard_normal((10, 40)), "signal", {"hard": [0, 3], "easy": [5]},
                           tmp_path / "g1.png", captions={"hard": ["id 0", "id 3"]}))
  img = _png(plots.gallery(rng.uniform(size=(10, 8, 8, 1)), "image", {"hard": [0, 3], "easy": [5]},
                           tmp_path / "g2.png"))
  _png(plots.gallery(rng.uniform(size=(4, 8, 8, 3)), "image", {"x": [1]}, tmp_path / "g3.png"))
  assert sig.shape != img.shape or np.abs(sig - img).mean() > 0.01


def test_gallery_rejects_bad_input(tmp_path):
  with pytest.raises(ValueError, match="unknown data kind 'audio'"):
    plots.gallery(np.zeros((3, 4)), "audio", {"a": [0]}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="images must be"):
    plots.gallery(np.zeros((3, 4)), "image", {"a": [0]}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="at least one non-empty group"):
    plots.gallery(np.zeros((3, 4)), "signal", {"a": []}, tmp_path / "x.png")


def _captured(monkeypatch):
  """Figures handed to plots.save_figure (by any module), instead of writing them."""
  figs = []
  monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=110: figs.append(fig) or path)
  return figs


def test_manhattan_legend_names_the_class_colours(monkeypatch):
  figs = _captured(monkeypatch)
  v = np.abs(np.random.default_rng(3).standard_normal((1, 60)))
  plots.manhattan_plot(v, ["a vs b"], "m.png", labels=np.arange(60) % 4,
                       thresholds=[{"Bonferroni": 3.0}])
  ax = figs[0].axes[0]
  texts = [t.get_text() for t in ax.get_legend().get_texts()]
  assert "classes 0, 2" in texts and "classes 1, 3" in texts and "Bonferroni (3.0)" in texts
  # Each class's block of 15 examples is labelled at its centre.
  assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
  np.testing.assert_allclose(ax.get_xticks(), [7, 22, 37, 52])


def test_pruning_plot_ticks_only_the_pruned_fractions(monkeypatch):
  import pandas as pd  # pylint: disable=g-import-not-at-top
  from jaxdiff.report import pruning  # pylint: disable=g-import-not-at-top
  figs = _captured(monkeypatch)
  rows = [dict(method="full", keep="all", fraction=0.0, mean=0.9, std=0.01)]
  rows += [dict(method=m, keep=k, fraction=0.3, mean=0.8, std=0.02)
           for m, k in (("single", "hardest"), ("mean", "hardest"), ("single", "easiest"),
                        ("mean", "easiest"), ("random", "random"))]
  pruning.plot_pruning(pd.DataFrame(rows), "p.png")
  for ax in figs[0].axes:
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["30%"], labels  # one fraction, one tick (not three jittered ones)
    lo, hi = ax.get_xlim()
    assert lo < 29 and hi > 31
  rows += [dict(r, fraction=0.5) for r in rows[1:]]
  pruning.plot_pruning(pd.DataFrame(rows), "p.png")
  assert [t.get_text() for t in figs[1].axes[0].get_xticklabels()] == ["30%", "50%"]

"""Tests of jaxdiff.plots: every figure writes a decodable, non-blank PNG; bad input is refused."""

import matplotlib.image
import numpy as np
import pytest

from jaxdiff import plots


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

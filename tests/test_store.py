"""Tests of jaxdiff.store: round trip, atomic writes, and refusal of corrupt or mixed data."""

import json
import os

import numpy as np
import pytest

from jaxdiff import store


def _save(d, runs=3, n=5, **meta):
  rng = np.random.default_rng(0)
  scores = {"loss": rng.normal(size=(runs, n)), "el2n": rng.normal(size=(runs, n))}
  store.save_scores(str(d), scores, example_ids=np.arange(n), labels=np.arange(n) % 2,
                    meta={"dataset": "mnist1d", "arch": "mlp", **meta})
  return scores


def test_round_trip_readable_with_plain_numpy(tmp_path):
  scores = _save(tmp_path, diverged=[False, True, False])
  s = store.load_scores(str(tmp_path))
  np.testing.assert_array_equal(s.scores["loss"], scores["loss"].astype(np.float32))
  np.testing.assert_array_equal(s.get("loss"), scores["loss"].astype(np.float32)[[0, 2]])
  assert s.get("loss", include_diverged=True).shape == (3, 5)
  # No jaxdiff needed: plain numpy + json.
  assert np.load(tmp_path / "el2n.npy").shape == (3, 5)
  assert json.loads((tmp_path / "meta.json").read_text())["score_names"] == ["el2n", "loss"]
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
  with pytest.raises(KeyError, match="unknown score 'aum'.*'el2n', 'loss'"):
    s.get("aum")


def test_truncated_and_missing_files_are_refused(tmp_path):
  _save(tmp_path)
  data = (tmp_path / "loss.npy").read_bytes()
  (tmp_path / "loss.npy").write_bytes(data[: len(data) // 2])
  with pytest.raises(store.StoreError, match="corrupt or truncated file .*loss.npy"):
    store.load_scores(str(tmp_path))
  (tmp_path / "meta.json").write_text("{not json")
  with pytest.raises(store.StoreError, match="corrupt .*meta.json"):
    store.load_scores(str(tmp_path))
  os.unlink(tmp_path / "meta.json")
  with pytest.raises(store.StoreError, match="no meta.json.*interrupted"):
    store.load_scores(str(tmp_path))


def test_bad_shapes_and_mixed_sets(tmp_path):
  with pytest.raises(store.StoreError, match="one shape"):
    store.save_scores(str(tmp_path / "x"), {"a": np.zeros((2, 3)), "b": np.zeros((2, 4))},
                      example_ids=np.arange(3), labels=np.zeros(3))
  assert not (tmp_path / "x" / "meta.json").exists()
  _save(tmp_path / "a")
  _save(tmp_path / "b", n=6)
  _save(tmp_path / "c")
  sets = {k: store.load_scores(str(tmp_path / k)) for k in "abc"}
  with pytest.raises(store.StoreError, match="different example ids"):
    store.check_compatible({"a": sets["a"], "b": sets["b"]})
  sets["c"].meta["dataset"] = "cifar10"
  with pytest.raises(store.StoreError, match="on dataset 'cifar10'"):
    store.check_compatible({"a": sets["a"], "c": sets["c"]})


def test_failed_write_leaves_old_file(tmp_path, monkeypatch):
  path = tmp_path / "f.json"
  store.atomic_write_json(str(path), {"v": 1})
  def boom(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(OSError, match="disk full"):
    store.atomic_write_json(str(path), {"v": 2})
  assert json.loads(path.read_text()) == {"v": 1}
  assert os.listdir(tmp_path) == ["f.json"]

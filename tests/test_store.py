"""Tests of jaxdiff.store: round trip, atomic writes, and refusal of corrupt or mixed data."""

import json
import os
import re

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


# ------------------------------------------------------------------------------------------------
# Checksums, one loader that names the file, file permissions, data identity (issue 16).


def test_flipped_byte_in_a_score_file_is_refused_naming_it(tmp_path):
  _save(tmp_path)
  meta = json.loads((tmp_path / "meta.json").read_text())
  # The recorded digests are the SHA-256 of the files' bytes (hashlib reference).
  import hashlib  # pylint: disable=g-import-not-at-top
  for f in ("loss.npy", "el2n.npy", "labels.npy", "example_ids.npy"):
    assert meta["sha256"][f] == hashlib.sha256((tmp_path / f).read_bytes()).hexdigest()
  data = bytearray((tmp_path / "el2n.npy").read_bytes())
  data[-3] ^= 0x01  # one bit of a float: still a well-formed .npy of the right shape
  (tmp_path / "el2n.npy").write_bytes(bytes(data))
  assert np.load(tmp_path / "el2n.npy").shape == (3, 5)
  with pytest.raises(store.StoreError, match=r"el2n\.npy.*SHA-256"):
    store.load_scores(str(tmp_path))


def test_directories_without_checksums_still_load(tmp_path):
  scores = _save(tmp_path)
  meta = json.loads((tmp_path / "meta.json").read_text())
  del meta["sha256"]  # as written before checksums existed
  (tmp_path / "meta.json").write_text(json.dumps(meta))
  np.testing.assert_array_equal(store.load_scores(str(tmp_path)).scores["loss"],
                                scores["loss"].astype(np.float32))


def test_load_npy_names_the_path_and_the_problem(tmp_path):
  path = tmp_path / "logits.npy"
  np.save(path, np.arange(24, dtype=np.float32).reshape(2, 3, 4))
  np.testing.assert_array_equal(store.load_npy(str(path), (2, 3, None)),
                                np.arange(24, dtype=np.float32).reshape(2, 3, 4))
  with pytest.raises(store.StoreError, match=r"logits\.npy.* has shape \(2, 3, 4\), expected "
                                             r"\(2, 5, C\)"):
    store.load_npy(str(path), (2, 5, None), names=(None, None, "C"))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 7])
  with pytest.raises(store.StoreError, match=r"corrupt or truncated file .*logits\.npy"):
    store.load_npy(str(path))
  with pytest.raises(store.StoreError, match=r"nope\.npy.* is missing"):
    store.load_npy(str(tmp_path / "nope.npy"))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_permissions_open_would_give(tmp_path, umask, mode):
  old = os.umask(umask)
  try:
    store.atomic_write_json(str(tmp_path / "a.json"), {"v": 1})
    store.atomic_save_npy(str(tmp_path / "b.npy"), np.zeros(3))
    with open(tmp_path / "ref.txt", "w") as f:  # the reference: what open() creates
      f.write("x")
  finally:
    os.umask(old)
  assert (tmp_path / "ref.txt").stat().st_mode & 0o777 == mode
  for f in ("a.json", "b.npy"):
    assert (tmp_path / f).stat().st_mode & 0o777 == mode, f
  assert sorted(os.listdir(tmp_path)) == ["a.json", "b.npy", "ref.txt"]


def _fp(**over):
  fp = {"name": "mnist1d", "num_train": 5, "num_test": 2, "num_classes": 2, "input_shape": [4],
        "num_noisy": 1, "data": {"name": "mnist1d", "seed": 42, "label_noise": 0.2,
                                 "noise_seed": 0},
        "x_train_sha256": "a" * 64, "labels_sha256": "3fa2" + "0" * 60,
        "noise_mask_sha256": "c" * 64, "test_sha256": "d" * 64}
  for k, v in over.items():
    if k.startswith("data_"):
      fp["data"] = dict(fp["data"], **{k[5:]: v})
    else:
      fp[k] = v
  return fp


def test_sets_trained_on_different_data_are_refused_naming_the_fields(tmp_path):
  _save(tmp_path / "mlp", dataset_fingerprint=_fp())
  _save(tmp_path / "cnn", dataset_fingerprint=_fp(labels_sha256="91b0" + "0" * 60,
                                                   data_noise_seed=1))
  _save(tmp_path / "same", dataset_fingerprint=_fp())
  sets = {k: store.load_scores(str(tmp_path / k)) for k in ("mlp", "cnn", "same")}
  store.check_compatible({"mlp": sets["mlp"], "same": sets["same"]})
  with pytest.raises(store.StoreError,
                     match=r"'cnn' and 'mlp' were trained on different data \(.*"
                           r"labels_sha256: 91b0.* vs 3fa2.*data\.noise_seed: 1 vs 0"):
    store.check_compatible({"mlp": sets["mlp"], "cnn": sets["cnn"]})


def test_older_sets_compare_what_both_have_with_a_warning(tmp_path):
  old = {k: v for k, v in _fp().items() if k in ("name", "num_train", "num_test", "num_classes",
                                                  "input_shape", "num_noisy")}
  _save(tmp_path / "old", dataset_fingerprint=old)
  _save(tmp_path / "new", dataset_fingerprint=_fp())
  _save(tmp_path / "older", dataset_fingerprint=dict(old, num_noisy=3))
  sets = {k: store.load_scores(str(tmp_path / k)) for k in ("old", "new", "older")}
  with pytest.warns(UserWarning, match="'old'.*older jaxdiff.*labels_sha256"):
    store.check_compatible({"new": sets["new"], "old": sets["old"]})
  with pytest.raises(store.StoreError, match="num_noisy: 3 vs 1"):
    store.check_compatible({"old": sets["old"], "older": sets["older"]})


def test_same_example_ids_but_other_labels_are_refused_without_fingerprints(tmp_path):
  _save(tmp_path / "a")
  rng = np.random.default_rng(0)
  store.save_scores(str(tmp_path / "b"), {"loss": rng.normal(size=(3, 5))},
                    example_ids=np.arange(5), labels=np.array([0, 1, 1, 1, 0]),
                    meta={"dataset": "mnist1d", "arch": "cnn"})
  sets = {k: store.load_scores(str(tmp_path / k)) for k in "ab"}
  with pytest.raises(store.StoreError, match=r"'a' and 'b' were trained with different labels .*1 of 5 "
                                           r"examples, first id 2: 0 vs 1"):
    store.check_compatible({"b": sets["b"], "a": sets["a"]})


def test_the_same_directory_twice_is_refused_in_any_spelling(tmp_path, monkeypatch):
  (tmp_path / "wd").mkdir()
  (tmp_path / "other").mkdir()
  os.symlink(tmp_path / "wd", tmp_path / "link")
  monkeypatch.chdir(tmp_path)
  store.check_distinct_paths(["wd", "other"])
  for spelling in ("wd", "./wd/", str(tmp_path / "wd"), "link", "other/../wd"):
    with pytest.raises(store.StoreError, match=re.escape(f"workdir {spelling!r} is given twice")):
      store.check_distinct_paths(["wd", "other", spelling])

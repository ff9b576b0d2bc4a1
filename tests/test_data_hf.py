"""Tests of jaxdiff/data/hf.py: Hugging Face datasets (in memory or saved with save_to_disk) as a
data source, on datasets the tests build offline, compared with the arrays they were built from."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxdiff import data as data_lib

datasets = pytest.importorskip("datasets")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(rng, n):
  return rng.integers(0, 256, size=(n, 6, 5)).astype(np.uint8)  # [N, H, W] grayscale


def _image_dict(rng):
  """A DatasetDict of uint8 6x5 images with ClassLabel(4) labels of which only 0..2 occur, in
  the columns "pixels" / "target", and the arrays it was built from."""
  feats = datasets.Features({"pixels": datasets.Array2D((6, 5), "uint8"),
                             "target": datasets.ClassLabel(num_classes=4)})
  built = {}
  splits = {}
  for split, n in (("train", 30), ("test", 12)):
    x, y = _images(rng, n), rng.integers(0, 3, n)
    built[split] = (x, y)
    splits[split] = datasets.Dataset.from_dict({"pixels": list(x), "target": y.tolist()},
                                               features=feats)
  return datasets.DatasetDict(splits), built


def test_saved_dataset_dict_gives_the_built_arrays(tmp_path):
  ddict, built = _image_dict(np.random.default_rng(0))
  path = str(tmp_path / "imgs")
  ddict.save_to_disk(path)
  cfg = {"name": "hf", "path": path, "hf_image_column": "pixels", "hf_label_column": "target"}
  ds = data_lib.load_dataset(cfg)
  (x_tr, y_tr), (x_te, y_te) = built["train"], built["test"]
  # Row order, a channel axis added to [N, H, W], float32 values as stored (not standardised).
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  np.testing.assert_array_equal(ds.x_train, x_tr[..., None].astype(np.float32))
  np.testing.assert_array_equal(ds.y_train, y_tr)
  np.testing.assert_array_equal(ds.x_test, x_te[..., None].astype(np.float32))
  np.testing.assert_array_equal(ds.y_test, y_te)
  np.testing.assert_array_equal(ds.example_ids, np.arange(30))
  assert ds.kind == "image" and ds.num_classes == 4  # the ClassLabel's, not max label + 1
  assert ds.name == f"hf:{os.path.abspath(path)}"
  assert ds.fingerprint()["data"]["image_column"] == "pixels"
  # normalize=True: per-channel standardisation with the training set's statistics, by hand.
  norm = data_lib.load_dataset({**cfg, "normalize": True})
  xf = x_tr.astype(np.float64)
  mean, std = xf.mean(), xf.std() + 1e-6
  np.testing.assert_allclose(norm.x_train[..., 0], (xf - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(norm.x_test[..., 0], (x_te - mean) / std, rtol=1e-5, atol=1e-5)
  # The same DatasetDict passed in memory gives the same arrays.
  mem = data_lib.load_dataset({**cfg, "path": ""}, ddict)
  np.testing.assert_array_equal(mem.x_train, ds.x_train)
  np.testing.assert_array_equal(mem.y_test, ds.y_test)
  assert mem.name == "hf"


def test_single_dataset_of_signals_is_its_own_test_set(tmp_path):
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(25, 7)).astype(np.float32), rng.integers(0, 3, 25)
  d = datasets.Dataset.from_dict({"image": list(x), "label": y.tolist()})
  ds = data_lib.load_dataset({"name": "hf"}, d)  # default columns "image" / "label"
  assert ds.kind == "signal" and ds.num_classes == 3
  np.testing.assert_array_equal(ds.x_train, x)
  np.testing.assert_array_equal(ds.x_test, x)
  np.testing.assert_array_equal(ds.y_train, y)


@pytest.mark.parametrize("cfg,expect", [
    ({"hf_image_column": "img"}, r"split 'train' has no column\(s\) \['img'\] \(columns: "
                                 r"\['pixels', 'target'\]\); set data.hf_image_column"),
    ({"hf_test_split": "validation"}, r"has no split\(s\) \['validation'\] \(splits: "
                                      r"\['test', 'train'\]\)"),
    ({"path": "/nonexistent/hf"}, r"directory '/nonexistent/hf' does not exist"),
    ({"path": ""}, r"needs data.path .* or the dataset passed in Python"),
])
def test_bad_hf_config_is_one_line_naming_the_value(tmp_path, cfg, expect):
  ddict, _ = _image_dict(np.random.default_rng(2))
  path = str(tmp_path / "imgs")
  ddict.save_to_disk(path)
  base = {"name": "hf", "path": path, "hf_image_column": "pixels", "hf_label_column": "target"}
  with pytest.raises(data_lib.DataError, match=expect) as e:
    data_lib.load_dataset({**base, **cfg})
  assert "\n" not in str(e.value)


def test_missing_datasets_package_names_the_pip_command(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
  with pytest.raises(data_lib.DataError, match=r"not installed: pip install datasets"):
    data_lib.load_dataset({"name": "hf", "path": str(tmp_path)})


def test_train_script_on_a_saved_hf_dataset(tmp_path):
  """experiments/train.py trains 2 members for 1 epoch on a saved DatasetDict of signals; the
  score store's fingerprint hashes exactly the arrays the test built."""
  rng = np.random.default_rng(3)
  splits, built = {}, {}
  for split, n in (("train", 200), ("test", 50)):
    x = rng.normal(size=(n, 40)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0)
    built[split] = (x, y)
    splits[split] = datasets.Dataset.from_dict({"x": list(x), "y": y.tolist()})
  path = str(tmp_path / "sig")
  datasets.DatasetDict(splits).save_to_disk(path)
  wd = str(tmp_path / "wd")
  args = [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
          f"--config={os.path.join(ROOT, 'experiments', 'configs', 'default.py')}",
          f"--workdir={wd}", "--config.data.name=hf", f"--config.data.path={path}",
          "--config.data.hf_image_column=x", "--config.data.hf_label_column=y",
          "--config.num_runs=2", "--config.num_epochs=1", "--config.model.width=8",
          "--config.batch_size=50", "--config.scores.representation=False",
          "--config.scores.grand=False", "--config.scores.vog=False",
          "--config.progress=False", "--config.cpu_devices=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(wd, "scores", "meta.json")) as f:
    meta = json.load(f)
  fp = meta["dataset_fingerprint"]
  x_tr, y_tr = built["train"]
  assert fp["x_train_sha256"] == hashlib.sha256(x_tr.astype("<f4").tobytes()).hexdigest()
  assert fp["labels_sha256"] == hashlib.sha256(y_tr.astype("<i4").tobytes()).hexdigest()
  assert fp["num_classes"] == 4 and fp["num_test"] == 50 and meta["num_examples"] == 200
  np.testing.assert_array_equal(np.load(os.path.join(wd, "scores", "labels.npy")), y_tr)
  assert np.isfinite(np.load(os.path.join(wd, "scores", "loss.npy"))).all()

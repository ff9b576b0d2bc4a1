"""Workdirs are combined only when they were trained on the same data, and each only once.

Score directories carry `meta["dataset_fingerprint"]` (`data.Dataset.fingerprint`); every place
that combines them (`analysis.load_workdirs`, `fingerprint.load_workdirs` + `collect_runs`,
`heldout --full_data_workdir`) refuses two trained on other data, naming the difference.
"""

import json
import os

import numpy as np
import pytest

from jaxdiff import analysis
from jaxdiff import data as data_lib
from jaxdiff import fingerprint
from jaxdiff import store
from jaxdiff import train
from conftest import tiny_config

BASE = {"name": "mnist1d", "num_samples": 500, "seed": 42, "label_noise": 0.1, "noise_seed": 0}


def _workdir(path, arch, **data_over):
  """A score directory as train.py writes it, on MNIST-1D with `BASE` changed by `data_over`."""
  ds = data_lib.load_dataset(dict(BASE, **data_over))
  rng = np.random.default_rng(len(arch))
  store.save_scores(os.path.join(path, "scores"), {"loss": rng.normal(size=(3, ds.num_train))},
                    example_ids=ds.example_ids, labels=ds.y_train,
                    meta={"dataset": ds.name, "dataset_fingerprint": ds.fingerprint(),
                          "arch": arch})
  return str(path)


def _loaders():
  return {"analysis": analysis.load_workdirs,
          "fingerprint": lambda wds: fingerprint.collect_runs(fingerprint.load_workdirs(wds),
                                                              ["loss"])}


@pytest.mark.parametrize("loader", ["analysis", "fingerprint"])
@pytest.mark.parametrize("over,match", [
    ({"seed": 43}, r"'cnn' and 'mlp' were trained on different data \(.*x_train_sha256: "
                   r"[0-9a-f]{8}\.\. vs [0-9a-f]{8}\.\..*data\.seed: 43 vs 42"),
    ({"noise_seed": 1}, r"'cnn' and 'mlp' were trained on different data \(labels_sha256: "
                        r"[0-9a-f]{8}\.\. vs [0-9a-f]{8}\.\.; noise_mask_sha256: .*"
                        r"data\.noise_seed: 1 vs 0\)"),
])
def test_workdirs_on_other_data_are_refused(tmp_path, loader, over, match):
  a = _workdir(tmp_path / "mlp", "mlp")
  b = _workdir(tmp_path / "cnn", "cnn", **over)
  with pytest.raises(store.StoreError, match=match):
    _loaders()[loader]([a, b])


@pytest.mark.parametrize("loader", ["analysis", "fingerprint"])
def test_workdirs_on_the_same_data_pass(tmp_path, loader):
  a = _workdir(tmp_path / "mlp", "mlp")
  b = _workdir(tmp_path / "cnn", "cnn")
  _loaders()[loader]([a, b])


@pytest.mark.parametrize("loader", ["analysis", "fingerprint"])
def test_the_same_workdir_twice_is_refused(tmp_path, loader, monkeypatch):
  _workdir(tmp_path / "mlp", "mlp")
  _workdir(tmp_path / "cnn", "cnn")
  os.symlink(tmp_path / "mlp", tmp_path / "alias")
  monkeypatch.chdir(tmp_path)
  for twice in ("./mlp/", "alias", str(tmp_path / "mlp")):
    with pytest.raises(store.StoreError, match=f"workdir '{twice}' is given twice"):
      _loaders()[loader](["mlp", "cnn", twice])


def test_a_real_run_records_the_fingerprint_of_its_data(tmp_path):
  c = tiny_config("mlp", num_runs=2, num_epochs=1,
                  **{"data.label_noise": 0.1, "data.noise_seed": 1, "scores.grand": False,
                     "scores.representation": False, "scores.vog": False})
  train.train_and_evaluate(c, str(tmp_path / "w"))
  meta = json.loads((tmp_path / "w" / "scores" / "meta.json").read_text())
  fp = meta["dataset_fingerprint"]
  assert fp == data_lib.load_dataset(c.data).fingerprint()
  import hashlib  # pylint: disable=g-import-not-at-top
  labels = np.load(tmp_path / "w" / "scores" / "labels.npy")
  assert fp["labels_sha256"] == hashlib.sha256(labels.astype("<i4").tobytes()).hexdigest()
  mask = np.load(tmp_path / "w" / "noise_mask.npy")
  assert fp["noise_mask_sha256"] == hashlib.sha256(mask.astype("u1").tobytes()).hexdigest()
  assert fp["data"]["noise_seed"] == 1 and fp["data"]["seed"] == 42
  # Scored next to a set on the noise seed 0: refused.
  other = _workdir(tmp_path / "other", "cnn", noise_seed=0)
  with pytest.raises(store.StoreError, match=r"data\.noise_seed: 0 vs 1"):
    analysis.load_workdirs([str(tmp_path / "w"), other])

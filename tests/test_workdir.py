"""Tests for jaxdiff/workdir.py on a workdir written by hand (no training): its paths, metrics,
lock, labels and reading it back."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from jaxdiff import analysis
from jaxdiff import fingerprint
from jaxdiff import store
from jaxdiff import workdir as W


def _workdir(path, arch, runs=3, n=5, dataset="synthetic"):
  """A hand-made finished workdir: config.json, metrics.jsonl, scores/, logits, masks."""
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(runs * 7 + n)
  store.save_scores(os.path.join(path, "scores"), {"loss": rng.normal(size=(runs, n))},
                    example_ids=np.arange(n), labels=np.arange(n) % 2,
                    meta={"dataset": dataset, "arch": arch, "diverged": [False] * runs})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"seed": 0, "data": {"name": "arrays"}, "model": {"name": "mlp"}}, f)
  return str(path)


def test_paths_are_the_documented_layout(tmp_path):
  wd = str(tmp_path / "w")
  expected = {"config": "config.json", "metrics": "metrics.jsonl", "checkpoints": "checkpoints",
              "corrupt_checkpoints": "corrupt_checkpoints", "lock": ".lock", "scores": "scores",
              "ensemble_scores": "ensemble_scores.npz", "logits": "logits.npy",
              "subset_mask": "subset_mask.npy", "noise_mask": "noise_mask.npy",
              "source_ids": "source_ids.npy", "history": "history", "snapshots": "snapshots"}
  for name, rel in expected.items():
    assert W.path(wd, name) == wd + "/" + rel
  assert W.scores_dir(wd) == wd + "/scores"
  assert W.checkpoints_dir(wd) == os.path.abspath(wd) + "/checkpoints"
  assert W.checkpoint_dir(wd, 7) == os.path.abspath(wd) + "/checkpoints/7"
  assert W.corrupt_checkpoint_dir(wd, 7) == wd + "/corrupt_checkpoints/7"
  assert W.history_file(wd, 3) == wd + "/history/epoch_0003.npz"
  assert W.snapshot_file(wd, "loss_e2") == wd + "/snapshots/loss_e2.npy"
  assert W.LOCK_FILE == ".lock"
  with pytest.raises(KeyError, match="unknown workdir file 'logit'; valid: config, metrics"):
    W.path(wd, "logit")


def test_history_saved_epochs_and_scores_complete(tmp_path):
  wd = str(tmp_path / "w")
  assert W.history_paths(wd) == [] and W.saved_epochs(wd) == [] and not W.scores_complete(wd)
  for e in (10, 2, 100):
    os.makedirs(W.checkpoint_dir(wd, e))
    os.makedirs(W.path(wd, "history"), exist_ok=True)
    open(W.history_file(wd, e), "w").close()
  os.makedirs(os.path.join(W.checkpoints_dir(wd), "tmp_orbax"))  # not a step
  open(os.path.join(W.path(wd, "history"), "epoch_12.npz"), "w").close()  # not 4 digits
  assert W.saved_epochs(wd) == [2, 10, 100]
  assert W.history_paths(wd) == [W.history_file(wd, e) for e in (2, 10, 100)]
  _workdir(wd, "mlp")
  assert W.scores_complete(wd)
  os.remove(os.path.join(W.scores_dir(wd), "meta.json"))  # meta.json is written last
  assert not W.scores_complete(wd)


def test_metrics_log_resumes_and_reads_back(tmp_path):
  wd = str(tmp_path / "w")
  log = W.MetricsLog(wd, 0)
  log.write([{"epoch": 1, "member": 1, "loss": 1.0}, {"epoch": 1, "member": 0, "loss": 2.0}])
  log.write([{"epoch": 2, "member": 0, "loss": float("nan")}])
  text = open(os.path.join(wd, "metrics.jsonl")).read()
  assert text == ('{"epoch": 1, "loss": 1.0, "member": 1}\n{"epoch": 1, "loss": 2.0, "member": 0}'
                  '\n{"epoch": 2, "loss": null, "member": 0}\n')
  assert log.last_epoch() == [{"epoch": 2, "member": 0, "loss": None}]
  assert W.read_metrics(wd) == [{"epoch": 1, "loss": 1.0, "member": 1},
                                {"epoch": 1, "loss": 2.0, "member": 0},
                                {"epoch": 2, "loss": None, "member": 0}]
  # A resume from the checkpoint of epoch 1 drops epoch 2 (and a torn line).
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"epoch": 3, "mem')
  resumed = W.MetricsLog(wd, 1)
  assert [json.loads(l)["member"] for l in resumed.lines] == [1, 0]
  assert resumed.last_epoch() == [{"epoch": 1, "loss": 2.0, "member": 0},
                                  {"epoch": 1, "loss": 1.0, "member": 1}]


def test_lock_refuses_a_second_holder(tmp_path):
  wd = str(tmp_path / "w")
  code = ("import sys; from jaxdiff import workdir as W\n"
          "try:\n  cm = W.lock(sys.argv[1]); cm.__enter__(); print('got')\n"
          "except W.WorkdirInUseError as e:\n  print('refused:', e)\n")
  with W.lock(wd):
    out = subprocess.run([sys.executable, "-c", code, wd], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith(f"refused: workdir '{wd}' is in use by another running job")
  assert os.listdir(wd) == [".lock"]
  out = subprocess.run([sys.executable, "-c", code, wd], capture_output=True, text=True,
                       check=True).stdout
  assert out == "got\n"  # released on exit of the `with`


def test_labels():
  assert W.model_label({"name": "cnn", "width": 32, "depth": 3}) == "cnn(depth=3,width=32)"
  assert W.model_label({"name": "linear"}) == "linear"
  cfg = ml_collections.ConfigDict({"model": {"name": "mlp", "width": 8}, "arch_label": ""})
  assert W.arch_label(cfg) == "mlp(width=8)"
  cfg.arch_label = "small"
  assert W.arch_label(cfg) == "small"
  assert W.arch_name({"arch": "small"}, "folder") == "small"
  assert W.arch_name({"arch": {"name": "cnn", "width": 3}}, "folder") == "cnn"
  assert W.arch_name({"arch": ""}, "folder") == "folder"
  assert W.arch_name({}, "folder") == "folder"


@pytest.mark.parametrize("load", [W.load_workdirs, analysis.load_workdirs,
                                  fingerprint.load_workdirs])
def test_load_workdirs_names_repeated_architectures_arch_at_folder(tmp_path, load):
  a = _workdir(tmp_path / "a", "cnn")
  b = _workdir(tmp_path / "b", "mlp")
  c = _workdir(tmp_path / "c", "cnn")
  d = _workdir(tmp_path / "d", "")
  sets = load([a, b, c, d])
  assert list(sets) == ["cnn@a", "mlp", "cnn@c", "d"]
  for name, wd in zip(sets, [a, b, c, d]):
    np.testing.assert_array_equal(sets[name].scores["loss"],
                                  store.load_scores(os.path.join(wd, "scores")).scores["loss"])
  assert list(load([b, a])) == ["mlp", "cnn"]
  # Same architecture in two folders of the same name: no name tells them apart.
  e = _workdir(tmp_path / "x" / "a", "cnn")
  with pytest.raises(ValueError, match=r"both hold architecture 'cnn' in a folder named 'a'"):
    load([a, e])


def test_load_workdirs_names_and_checks(tmp_path):
  a, b = _workdir(tmp_path / "a", "cnn"), _workdir(tmp_path / "b", "cnn")
  assert list(W.load_workdirs([a, b], names=["x", "y"])) == ["x", "y"]
  with pytest.raises(ValueError, match=r"need one distinct name per workdir; got names \['x', "
                                       r"'x'\] for 2 workdirs"):
    W.load_workdirs([a, b], names=["x", "x"])
  with pytest.raises(ValueError, match="no workdirs given"):
    W.load_workdirs([])
  other = _workdir(tmp_path / "o", "mlp", dataset="cifar10")
  with pytest.raises(store.StoreError, match="dataset"):
    W.load_workdirs([a, other])


def test_read_config_and_read_workdir(tmp_path):
  wd = _workdir(tmp_path / "w", "mlp", runs=2, n=4)
  assert W.read_config(wd).model.name == "mlp"
  with pytest.raises(W.WorkdirError, match="no such workdir"):
    W.read_config(str(tmp_path / "nothing"))
  logits = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
  store.atomic_save_npy(W.path(wd, "logits"), logits)
  store.atomic_save_npy(W.path(wd, "subset_mask"), np.array([[1, 0, 1, 1], [1, 1, 0, 1]], bool))
  w = W.read_workdir(wd)
  np.testing.assert_array_equal(w.logits, logits)
  np.testing.assert_array_equal(w.labels, [0, 1, 0, 1])
  assert w.has_subsets and w.noise_mask is None and w.history == []

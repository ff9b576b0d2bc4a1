"""Tests of the training loop: learning, logs, resume == uninterrupted, refusals, the script."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxdiff import store
from jaxdiff import train
from conftest import ROOT, tiny_config


def test_trains_logs_and_saves_scores(tmp_path):
  c = tiny_config("mlp", num_epochs=4)
  res = train.train_and_evaluate(c, str(tmp_path))
  recs = train.read_metrics(str(tmp_path))
  assert len(recs) == 4 * 3 and {r["member"] for r in recs} == {0, 1, 2}
  loss = {e: np.mean([r["train_loss"] for r in recs if r["epoch"] == e]) for e in (1, 4)}
  assert loss[4] < 0.8 * loss[1]
  acc = [r["test_acc"] for r in recs if r["epoch"] == 4]
  assert min(acc) > 0.2  # well above chance (0.1) after 4 tiny epochs
  s = store.load_scores(str(tmp_path / "scores"))
  assert s.meta["dataset"] == "mnist1d" and s.meta["diverged"] == [False] * 3
  # Saved final scores agree with the logged final-epoch metrics.
  np.testing.assert_allclose(s.scores["loss"].mean(1), [r["train_loss"] for r in recs
                                                        if r["epoch"] == 4], rtol=1e-4)
  np.testing.assert_allclose(1 - np.asarray(res["test_acc"]), 1 - np.asarray(acc), atol=1e-6)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model"]["width"] == 16


def test_resume_equals_uninterrupted(tmp_path):
  c = tiny_config("mlp", num_epochs=4, checkpoint_every=2)
  full = tmp_path / "full"
  train.train_and_evaluate(c, str(full))
  cut = tmp_path / "cut"
  train.train_and_evaluate(c, str(cut))
  # Simulate a kill right after the epoch-2 checkpoint: drop what came later.
  shutil.rmtree(cut / "checkpoints" / "4")
  shutil.rmtree(cut / "scores")
  train.train_and_evaluate(c, str(cut))
  a, b = store.load_scores(str(full / "scores")), store.load_scores(str(cut / "scores"))
  for name in a.scores:
    np.testing.assert_array_equal(a.scores[name], b.scores[name])
  assert train.read_metrics(str(full)) == train.read_metrics(str(cut))


def test_resume_refuses_other_config(tmp_path):
  train.train_and_evaluate(tiny_config("mlp", num_epochs=1), str(tmp_path))
  with pytest.raises(train.ConfigError, match=r"model.width: workdir has 16, config has 32"):
    train.train_and_evaluate(tiny_config("mlp", num_epochs=1, **{"model.width": 32}),
                             str(tmp_path))


def test_workdir_older_than_a_default_field_resumes_while_it_keeps_its_default(tmp_path):
  c = tiny_config("mlp", num_epochs=2)
  train.train_and_evaluate(c, str(tmp_path))
  # A workdir written before `batch_size`'s neighbour `member_chunk` existed (a field added later).
  path = tmp_path / "config.json"
  old = json.loads(path.read_text())
  del old["member_chunk"]
  path.write_text(json.dumps(old))
  before = train.read_metrics(str(tmp_path))
  train.train_and_evaluate(c, str(tmp_path))  # the default value: the same config (rewritten)
  assert train.read_metrics(str(tmp_path)) == before
  with pytest.raises(train.ConfigError, match=r"member_chunk: workdir has 0, config has 4"):
    train.train_and_evaluate(tiny_config("mlp", num_epochs=2, member_chunk=4), str(tmp_path))


@pytest.mark.parametrize("overrides,match", [
    ({"model.name": "transformer"}, "unknown architecture 'transformer'; valid: cnn, linear, mlp"),
    ({"optim.name": "lamb"}, "unknown optimiser 'lamb'"),
    ({"num_runs": -2}, r"num_runs=-2: must be a positive integer"),
    ({"batch_size": 0}, r"batch_size=0"),
    ({"data.name": "imagenet21k"}, "unknown dataset 'imagenet21k'"),
    ({"model.width": -5}, r"model.width=-5: must be positive"),
    ({"member_chunk": -1}, r"config.member_chunk=-1: must be a non-negative integer"),
    # Values that used to fail only after training (issue 16, defects 4 and 7).
    ({"scores.knn_k": 100000}, r"scores.knn_k=100000: must be below the 400 training examples"),
    ({"scores.snapshot_epochs": (1, 5)}, r"scores.snapshot_epochs=\[1, 5\]: \[5\] outside the "
                                         r"trained epochs 1..2"),
    ({"optim.schedule": "step", "optim.milestones": (0.5, 1.5)},
     r"optim.milestones=\[0.5, 1.5\]: fractions of training, each in \(0, 1\)"),
    ({"optim.warmup_epochs": 2}, r"optim.warmup_epochs=2: must be an integer in \[0, num_epochs=2\)"),
    ({"scores.num_prototypes": 500}, r"scores.num_prototypes=500: k-means needs at most one "
                                     r"cluster per training example, and the data has 400"),
])
def test_bad_config_is_refused_before_writing(tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(tiny_config("mlp", **overrides), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_all_members_diverging_stops_with_clear_error(tmp_path):
  c = tiny_config("mlp", num_epochs=2, **{"optim.name": "sgd", "optim.lr": 1e12})
  with pytest.raises(train.DivergenceError, match="all 3 members diverged"):
    train.train_and_evaluate(c, str(tmp_path))


def test_script_runs_and_refuses_bad_arch(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
         f"--config={os.path.join(ROOT, 'experiments', 'configs', 'default.py')}",
         f"--workdir={tmp_path / 'w'}", "--config.num_runs=2", "--config.num_epochs=1",
         "--config.data.num_samples=300", "--config.model.width=8", "--config.progress=False"]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert store.load_scores(str(tmp_path / "w" / "scores")).num_runs == 2
  r = subprocess.run(cmd[:3] + [f"--workdir={tmp_path / 'v'}", "--config.model.name=rnn"],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "unknown architecture 'rnn'" in r.stderr
  assert not (tmp_path / "v").exists()


def test_diverging_member_is_flagged_and_others_unchanged(tmp_path):
  """An over-large learning rate for member 1 only: it is flagged, its scores are NaN, and the
  other members' scores equal those of a run where nobody diverged, bit for bit."""
  base = {"optim.name": "sgd", "optim.lr": 0.1}
  clean = tiny_config("mlp", **base)
  train.train_and_evaluate(clean, str(tmp_path / "clean"))
  bad = tiny_config("mlp", **base, **{"optim.member_lr_scale": (1.0, 1e9, 1.0)})
  train.train_and_evaluate(bad, str(tmp_path / "bad"))
  a, b = store.load_scores(str(tmp_path / "clean" / "scores")), store.load_scores(
      str(tmp_path / "bad" / "scores"))
  assert b.meta["diverged"] == [False, True, False] and b.meta["diverged_step"][1] >= 0
  assert a.meta["diverged"] == [False] * 3
  for name in ("loss", "grand", "forgetting_events", "prediction_depth"):
    assert np.isnan(b.scores[name][1]).all()
    np.testing.assert_array_equal(a.scores[name][[0, 2]], b.scores[name][[0, 2]])
    np.testing.assert_array_equal(b.get(name), a.scores[name][[0, 2]])  # excluded by default
  recs = [r for r in train.read_metrics(str(tmp_path / "bad")) if r["member"] == 1]
  assert all(r["diverged"] for r in recs)


def test_subset_fraction_trains_each_member_on_its_own_subset(tmp_path):
  c = tiny_config("mlp", num_epochs=2, subset_fraction=0.5, **{"scores.save_history": True})
  train.train_and_evaluate(c, str(tmp_path))
  mask = np.load(tmp_path / "subset_mask.npy")
  assert mask.shape == (3, 400) and (mask.sum(1) == 200).all()
  assert not np.array_equal(mask[0], mask[1])
  # Only subset examples were ever presented in training (minibatch bookkeeping).
  s = store.load_scores(str(tmp_path / "scores"))
  presented = s.scores["mb_presentations"] > 0
  assert not (presented & ~mask).any() and presented.sum() == 3 * 200
  assert s.scores["mb_presentations"].sum() == 3 * 2 * 200  # every subset example, each epoch
  assert s.meta["subset_fractions"] == [0.5] * 3
  # Member 1's mask depends only on the seed and its id: same in a 1-member run as member 1.
  c1 = tiny_config("mlp", num_epochs=1, num_runs=1, first_member=1, subset_fraction=0.5)
  train.train_and_evaluate(c1, str(tmp_path / "one"))
  np.testing.assert_array_equal(np.load(tmp_path / "one" / "subset_mask.npy")[0], mask[1])
  assert np.load(tmp_path / "logits.npy").shape == (3, 400, 10)
  with pytest.raises(train.ConfigError, match="subset_fraction=1.5"):
    train.train_and_evaluate(tiny_config("mlp", subset_fraction=1.5), str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists()


_IDENTITY_SCRIPT = """
import json, os, sys, tempfile
import numpy as np
sys.path.insert(0, {root!r})
from jaxdiff import ensemble
assert ensemble.split_cpu(0) == 2  # the scripts' default: one JAX device per core
import jax
from experiments.configs import default
from jaxdiff import checkpoints, store, train

def run(num_runs, first):
  c = default.get_config()  # the default configuration, on a smaller training set
  c.num_runs, c.first_member, c.num_epochs, c.progress = num_runs, first, 3, False
  c.data.num_samples = 600
  wd = tempfile.mkdtemp()
  train.train_and_evaluate(c, wd)
  scores = store.load_scores(os.path.join(wd, "scores"))
  ckpt = checkpoints.restore(os.path.join(wd, "checkpoints", "3"))
  metrics = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  return scores, ckpt, metrics

singles = {{}}
for num_runs, members in {cases!r}:
  ens_scores, ens_ckpt, ens_metrics = run(num_runs, 0)
  for i in members:
    if i not in singles:
      singles[i] = run(1, i)
    scores, ckpt, metrics = singles[i]
    for name, value in scores.scores.items():
      assert np.array_equal(ens_scores.scores[name][i], value[0], equal_nan=True), (num_runs, i, name)
    pairs = zip(jax.tree_util.tree_leaves_with_path(ens_ckpt), jax.tree_util.tree_leaves(ckpt))
    n = 0
    for (path, a), b in pairs:
      if a.ndim and a.shape[0] == num_runs:  # per-member leaves (parameters, optimiser, scores)
        assert np.array_equal(a[i], b[0], equal_nan=True), (num_runs, i, jax.tree_util.keystr(path))
        n += 1
    assert n > 10, n
    mine = [dict(m, member=0) for m in ens_metrics if m["member"] == i]
    assert mine == metrics, (num_runs, i)
print("OK")
"""


@pytest.mark.parametrize("cases", [((2, (1,)), (4, (0, 3))), ((16, (0, 9, 15)),)],
                         ids=["R2,R4", "R16"])
def test_member_equals_its_one_member_run_in_the_default_configuration(cases):
  """Member i of an ensemble trained as users run it (default config, the CPU split into one JAX
  device per core, members sharded and chunked) equals the 1-member run with first_member=i, bit
  for bit: parameters, optimiser state and score accumulators in the final checkpoint, every
  stored score and every metrics line."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-c", _IDENTITY_SCRIPT.format(root=ROOT, cases=cases)],
                     capture_output=True, text=True, env=env, timeout=900)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_data_dependent_options_are_refused_before_training(tmp_path):
  """A 5-example dataset with the default knn_k=30, and a label of 999 (1000 prototype clusters
  for 40 examples): refused before the first step, not after training (nothing written)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 40)).astype(np.float32)
  c = tiny_config("mlp", **{"data.name": "arrays", "batch_size": 5})
  with pytest.raises(train.ConfigError, match=r"scores.knn_k=30: must be below the 5 training"):
    train.train_and_evaluate(c, str(tmp_path / "a"), arrays={"x_train": x, "y_train": np.arange(5)})
  assert not (tmp_path / "a").exists()
  x = rng.normal(size=(40, 40)).astype(np.float32)
  y = np.r_[np.arange(39) % 10, 999]
  with pytest.raises(train.ConfigError, match=r"num_prototypes=0 \(= the 1000 classes of labels "
                                              r"0..999\).*the data has 40"):
    train.train_and_evaluate(c, str(tmp_path / "b"), arrays={"x_train": x, "y_train": y})
  assert not (tmp_path / "b").exists()


def test_diverged_member_metrics_are_strict_json(tmp_path):
  """A diverged member's non-finite losses are written as null (strict JSON parsers reject NaN)."""
  c = tiny_config("mlp", num_epochs=1, **{"optim.name": "sgd", "optim.lr": 0.1,
                                          "optim.member_lr_scale": (1.0, 1e9, 1.0),
                                          "scores.representation": False})
  train.train_and_evaluate(c, str(tmp_path))
  text = (tmp_path / "metrics.jsonl").read_text()
  assert "NaN" not in text and "Infinity" not in text
  strict = [json.loads(l, parse_constant=lambda name: pytest.fail(f"non-JSON {name}"))
            for l in text.splitlines()]
  bad = [r for r in strict if r["member"] == 1]
  assert bad[0]["diverged"] and bad[0]["train_loss"] is None


def _snapshot(wd):
  return {p.relative_to(wd).as_posix(): p.read_bytes() for p in wd.rglob("*")
          if p.is_file() and p.name != ".lock"}


def test_rerun_on_finished_workdir_is_a_no_op(tmp_path, monkeypatch, caplog):
  c = tiny_config("mlp", num_epochs=2)
  train.train_and_evaluate(c, str(tmp_path))
  before = _snapshot(tmp_path)
  # A rerun neither trains nor scores again: any scoring would fail here.
  monkeypatch.setattr(train.recording.Recorder, "finalize", lambda *a, **k: pytest.fail("scored"))
  monkeypatch.setattr(train.recording.Recorder, "on_epoch", lambda *a, **k: pytest.fail("trained"))
  with caplog.at_level("INFO"):
    res = train.train_and_evaluate(c, str(tmp_path))
  assert "nothing to do" in caplog.text
  assert _snapshot(tmp_path) == before
  assert len(res["test_acc"]) == 3


def test_changed_scores_section_on_finished_workdir_computes_only_those(tmp_path, monkeypatch):
  """grand off -> on, knn_k 30 -> 10 on a finished workdir: GraNd and the representation scores
  come from the final checkpoint, equal to a run trained with those options from the start, bit
  for bit; the other scores are not recomputed; options recorded during training are refused."""
  off = tiny_config("mlp", num_epochs=2, **{"scores.grand": False})
  train.train_and_evaluate(off, str(tmp_path / "w"))
  on = tiny_config("mlp", num_epochs=2, **{"scores.knn_k": 10})
  train.train_and_evaluate(on, str(tmp_path / "ref"))
  calls = []
  real = train.recording.Recorder.finalize
  monkeypatch.setattr(train.recording.Recorder, "finalize",
                      lambda self, state, only=None: calls.append(only) or real(self, state, only))
  train.train_and_evaluate(on, str(tmp_path / "w"))
  assert calls == [{"grand", "representation"}]
  a = store.load_scores(str(tmp_path / "w" / "scores"))
  b = store.load_scores(str(tmp_path / "ref" / "scores"))
  assert sorted(a.scores) == sorted(b.scores)
  for name in b.scores:
    np.testing.assert_array_equal(a.scores[name], b.scores[name], err_msg=name)
  with open(tmp_path / "w" / "config.json") as f:
    assert json.load(f)["scores"]["knn_k"] == 10
  calls.clear()
  train.train_and_evaluate(on, str(tmp_path / "w"))  # now complete: nothing to do
  assert calls == []
  with pytest.raises(train.ConfigError, match=r"scores.minibatch: workdir has True, config has "
                                              r"False.*recorded during training"):
    train.train_and_evaluate(tiny_config("mlp", num_epochs=2, **{"scores.knn_k": 10,
                                                                 "scores.minibatch": False}),
                             str(tmp_path / "w"))


def test_unknown_fields_from_python_are_refused_like_the_command_line(tmp_path):
  """`config.num_run = 4` on an unlocked config (a notebook) is refused with the close match and
  the valid names, as `--config.num_run=4` is; nothing is written."""
  c = tiny_config("mlp")
  c.num_run = 4
  with pytest.raises(train.ConfigError, match=r"unknown config option\(s\) \['num_run'\] \(did you "
                                              r"mean 'num_runs'\?\); valid: \["):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  c = tiny_config("mlp")
  c.optim.momentun = 0.5
  with pytest.raises(train.ConfigError, match=r"unknown optim option\(s\) \['momentun'\] \(did you "
                                              r"mean 'momentum'\?\)"):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_one_defaults_table():
  """The optimiser's and the recorder's defaults are the default config's (they disagreed: SGD
  lr 0.1 in make_optimizer against Adam 1e-2 in the config)."""
  from experiments.configs import default
  from jaxdiff import config as config_lib, ensemble, recording
  c = default.get_config()
  assert dict(c.scores) == recording.DEFAULTS
  assert c.optim.name == config_lib.OPTIM["name"] == "adam" and c.optim.lr == 1e-2
  # make_optimizer({}) is the config's optimiser: Adam's first step moves by lr * sign(grad).
  import jax.numpy as jnp
  tx = ensemble.make_optimizer({}, 10, 1)
  upd, _ = tx.update({"w": jnp.array([3.0, -0.5])}, tx.init({"w": jnp.zeros(2)}))
  np.testing.assert_allclose(upd["w"], [-1e-2, 1e-2], rtol=1e-4)

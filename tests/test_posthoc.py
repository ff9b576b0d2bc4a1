"""jaxdiff/posthoc.py and experiments/score.py: a trained ensemble and its scores read back from a
workdir after the run, on another device count than it was trained on.

One workdir is trained in a subprocess with the CPU split into 2 devices (the runs axis sharded);
the tests load it in this process (1 device) and check against slow references: the training
run's own scores and logits, per-example loops, Orbax's plain restore."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxdiff import checkpoints
from jaxdiff import cli
from jaxdiff import data
from jaxdiff import models
from jaxdiff import posthoc
from jaxdiff import scores as S
from jaxdiff import store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORE_PY = os.path.join(ROOT, "experiments", "score.py")
EPOCHS = 3


def _env():
  e = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
  e.pop(cli.TRACEBACK_ENV, None)
  e.pop("XLA_FLAGS", None)
  return e


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-member, 3-epoch workdir trained over 2 CPU devices (members sharded), with
  representation scores and training's own snapshots of epoch 2."""
  wd = str(tmp_path_factory.mktemp("posthoc") / "wd")
  script = textwrap.dedent(f"""
      import json, sys
      sys.path.insert(0, {ROOT!r})
      from jaxdiff import ensemble
      assert ensemble.split_cpu(2) == 2
      from tests.conftest import tiny_config
      from jaxdiff import train
      # member_chunk=1: one chunk per member, so the engine shards the 2 members over 2 devices
      c = tiny_config(num_runs=2, num_epochs={EPOCHS}, member_chunk=1)
      c.scores.snapshot_epochs = (2,)
      out = train.train_and_evaluate(c, {wd!r})
      leaf = out["state"].params["head"]["kernel"]
      print(json.dumps({{"devices": len(leaf.sharding.device_set)}}))
      """)
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(),
                     timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout.strip().splitlines()[-1])["devices"] == 2  # sharded for real
  return wd


def _copy(wd, tmp_path):
  dest = str(tmp_path / "wd")
  shutil.copytree(wd, dest)
  return dest


def _digests(wd):
  """{relative path: SHA-256} of every file under `wd`."""
  out = {}
  for dirpath, _, files in os.walk(wd):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, wd)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _member_params(wd, epoch):
  """Member r's parameters `[r][...]` by a path independent of posthoc: numpy leaves."""
  tree = checkpoints.restore(os.path.join(wd, "checkpoints", str(epoch)))
  params = tree["state"]["params"]
  return [jax.tree_util.tree_map(lambda a, r=r: a[r], params) for r in range(2)]


def test_load_ensemble_restores_a_sharded_checkpoint_on_one_device(trained):
  path = os.path.join(trained, "checkpoints", str(EPOCHS), "default")
  if jax.device_count() != 2:  # the problem: Orbax refuses another topology without a target
    with pytest.raises(ValueError, match="Topology mismatch"):
      ocp.StandardCheckpointer().restore(path)
  e = posthoc.load_ensemble(trained)
  assert e.epoch == EPOCHS and e.num_runs == 2 and e.member_ids.tolist() == [0, 1]
  assert e.config.num_epochs == EPOCHS and e.config.model.width == 16
  ref_params = _member_params(trained, EPOCHS)
  final_logits = np.load(os.path.join(trained, "logits.npy"))  # the training run's, [R, N, C]
  for r in range(2):
    member = e.member(r)
    assert set(member) == {"params"}
    for a, b in zip(jax.tree_util.tree_leaves(member["params"]),
                    jax.tree_util.tree_leaves(ref_params[r])):
      np.testing.assert_array_equal(np.asarray(a), b)
    logits, out = e.apply_fn(member, e.data.x_train)
    assert "pre_logits" in out
    np.testing.assert_allclose(np.asarray(logits), final_logits[r], rtol=0, atol=1e-5)
  np.testing.assert_allclose(e.logits(e.data.x_train), final_logits, rtol=0, atol=1e-5)
  direct = e.model.apply(e.member(1), e.data.x_train[:7], train=False)[0]
  np.testing.assert_array_equal(np.asarray(direct), np.asarray(e.apply_fn(e.member(1),
                                                                          e.data.x_train[:7])[0]))


def test_score_script_final_epoch_equals_the_training_run(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  before = store.load_scores(os.path.join(trained, "scores"))
  r = subprocess.run([sys.executable, SCORE_PY, f"--workdir={wd}"], capture_output=True,
                     text=True, env=_env(), timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "restoring epoch 3" in r.stderr and "wrote 13 scores of epoch 3" in r.stderr
  after = store.load_scores(os.path.join(wd, "scores"))
  recomputed = [n for g in ("point", "grand", "representation") for n in posthoc.GROUP_SCORES[g]]
  assert set(after.scores) == set(before.scores) | {"input_grad_norm"}
  for name in before.scores:  # recomputed ones equal training's; the others are untouched
    np.testing.assert_allclose(after.scores[name], before.scores[name], rtol=0,
                               atol=1e-6 if name in recomputed else 0, err_msg=name)
  keep = lambda m: {k: v for k, v in m.items() if k not in ("sha256", "score_names", "posthoc",
                                                             "definitions")}
  assert keep(after.meta) == keep(before.meta)  # same metadata, same negated list
  assert set(after.meta["posthoc"]) == set(recomputed) | {"input_grad_norm"}
  assert after.meta["posthoc"]["loss"]["epoch"] == EPOCHS
  # input_grad_norm against a per-example loop of jax.grad of p_y (member 1, 20 examples).
  model, x, y = _model_and_data(wd)
  p1 = _member_params(wd, EPOCHS)[1]
  p_y = lambda xi, yi: jax.nn.softmax(model.apply({"params": p1}, xi[None], train=False)[0])[0, yi]
  grad = jax.jit(jax.grad(p_y))
  ref = [float(jnp.linalg.norm(grad(x[i], y[i]))) for i in range(20)]
  np.testing.assert_allclose(after.scores["input_grad_norm"][1, :20], ref, rtol=1e-4, atol=1e-7)


def _model_and_data(wd):
  """The workdir's model and training data, built from its config.json without posthoc."""
  cfg = posthoc.read_config(wd)
  ds = data.load_dataset(cfg.data)
  return models.build_model(cfg.model, ds.num_classes), ds.x_train, ds.y_train


def test_non_final_epoch_scores_get_the_epoch_suffix(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  before = store.load_scores(os.path.join(wd, "scores"))
  written = posthoc.score_workdir(wd, epoch=2, groups=["point", "grand"])
  assert written == {**{f"{n}_e2": "point" for n in S.point.POINT_SCORE_NAMES}, "grand_e2": "grand"}
  after = store.load_scores(os.path.join(wd, "scores"))
  for name in before.scores:  # the final scores stay as training wrote them
    np.testing.assert_array_equal(after.scores[name], before.scores[name])
  # loss_e2 against a per-example loop of optax's cross-entropy over the restored members'
  # logits (parameters restored by checkpoints.restore, model applied directly).
  model, x, y = _model_and_data(wd)
  for r, params in enumerate(_member_params(wd, 2)):
    logits = np.asarray(model.apply({"params": params}, x, train=False)[0])
    ref = [float(optax.softmax_cross_entropy_with_integer_labels(logits[i], y[i]))
           for i in range(len(y))]
    np.testing.assert_allclose(after.scores["loss_e2"][r], ref, rtol=1e-5, atol=1e-6)
    p_y = [float(jax.nn.softmax(logits[i])[y[i]]) for i in range(len(y))]
    np.testing.assert_allclose(after.scores["p_y_e2"][r], -np.asarray(p_y), atol=1e-6)  # negated
  # ... and training's own snapshots of epoch 2 (scores.snapshot_epochs).
  for name in ("loss_e2", "el2n_e2", "grand_e2"):
    snap = np.load(os.path.join(wd, "snapshots", f"{name}.npy"))
    np.testing.assert_allclose(after.scores[name], snap, rtol=0, atol=1e-6, err_msg=name)
  negated = set(after.meta["negated"])
  assert {"p_y_e2", "correct_e2", "margin_logit_e2"} <= negated and "loss_e2" not in negated
  assert after.meta["posthoc"]["loss_e2"]["epoch"] == 2


def _script(*args):
  p = subprocess.run([sys.executable, SCORE_PY, *args], capture_output=True, text=True,
                     env=_env(), timeout=120, check=False)
  return p.returncode, p.stderr.strip().splitlines()


@pytest.mark.parametrize("args,expect", [
    (["--scores=point,bogus"], "unknown score group(s) ['bogus']; valid: ['point', 'grand', "
                               "'input_grad', 'representation']"),
    (["--epoch=1"], "epoch 1 has no checkpoint in '{wd}'; saved epochs: [2, 3]"),
])
def test_score_script_refuses_bad_input_and_writes_nothing(trained, tmp_path, args, expect):
  wd = _copy(trained, tmp_path)
  before = _digests(wd)
  rc, lines = _script(f"--workdir={wd}", *args)
  assert rc == cli.BAD_INPUT and len(lines) == 1, lines
  assert lines[0] == "error: " + expect.format(wd=wd)
  assert _digests(wd) == before


def test_refusals_name_the_value(trained, tmp_path):
  missing = str(tmp_path / "nope")
  rc, lines = _script(f"--workdir={missing}")
  assert rc == cli.BAD_INPUT and lines == [f"error: no such workdir {missing!r}"]
  assert not os.path.exists(missing)
  wd = _copy(trained, tmp_path)
  with pytest.raises(posthoc.WorkdirError, match=r"unknown option\(s\) \['knn'\]; valid"):
    posthoc.score_workdir(wd, knn=3)
  # A workdir trained on arrays passed in Python needs them, and the same ones.
  cfg = json.load(open(os.path.join(wd, "config.json")))
  cfg["data"]["name"] = "arrays"
  store.atomic_write_json(os.path.join(wd, "config.json"), cfg)
  before = _digests(wd)
  with pytest.raises(posthoc.WorkdirError, match="data.name='arrays'.*pass the same ones"):
    posthoc.load_ensemble(wd)
  with pytest.raises(posthoc.WorkdirError, match="data.name='arrays'"):
    posthoc.score_workdir(wd)
  rng = np.random.default_rng(0)
  other = {"x_train": rng.normal(size=(400, 40)).astype(np.float32),
           "y_train": np.arange(400) % 10}
  with pytest.raises(posthoc.WorkdirError, match="trained on different data"):
    posthoc.load_ensemble(wd, arrays=other)
  assert _digests(wd) == before
  # The arrays it was trained on restore it (no score store here to compare fingerprints with).
  shutil.rmtree(os.path.join(wd, "scores"))
  _, x, y = _model_and_data(trained)
  e = posthoc.load_ensemble(wd, arrays={"x_train": x, "y_train": y})
  assert e.data.name == "arrays"
  np.testing.assert_allclose(e.logits(x), np.load(os.path.join(wd, "logits.npy")), rtol=0,
                             atol=1e-5)


# ----------------------------------------------------------------------------- score_members


def test_score_members_equals_the_training_run_bit_for_bit(trained, tmp_path):
  """A jaxdiff workdir's restored apply_fn and variables through `score_members` give the run's
  own scores exactly: the same kernels over the same member chunks and example chunks (the
  training's member_chunk and chunk_size), so the same XLA programs; the list of per-member
  variables equals the stacked form."""
  e = posthoc.load_ensemble(trained)
  before = store.load_scores(os.path.join(trained, "scores"))
  c = e.config.scores
  kw = dict(scores=("point", "grand", "representation"), chunk_size=c.chunk_size,
            grand_method=c.grand_method, knn_k=c.knn_k, num_prototypes=c.num_prototypes,
            member_chunk=e.config.member_chunk, progress=False)
  x, y = e.data.x_train, e.data.y_train
  out = posthoc.score_members(e.apply_fn, e.variables, x, y, str(tmp_path / "stacked"), **kw)
  names = [n for g in ("point", "grand", "representation") for n in posthoc.GROUP_SCORES[g]]
  assert sorted(out) == sorted(names)
  for name in names:
    np.testing.assert_array_equal(out[name], before.scores[name], err_msg=name)
  members = [e.member(r) for r in range(e.num_runs)]
  kw["scores"] = ("point", "grand")  # stacking is what differs: the cheap groups show it
  listed = posthoc.score_members(e.apply_fn, members, x, y, str(tmp_path / "list"), **kw)
  for name in listed:
    np.testing.assert_array_equal(listed[name], out[name], err_msg=name)
  # The store is a jaxdiff run's: same ids, labels, orientation; logits and ensemble scores too.
  got = store.load_scores(str(tmp_path / "stacked" / "scores"))
  np.testing.assert_array_equal(got.example_ids, before.example_ids)
  np.testing.assert_array_equal(got.labels, before.labels)
  assert set(got.meta["negated"]) == set(before.meta["negated"]) & set(names)
  assert got.meta["dataset_fingerprint"]["x_train_sha256"] == (
      before.meta["dataset_fingerprint"]["x_train_sha256"])
  np.testing.assert_array_equal(np.load(str(tmp_path / "stacked" / "logits.npy")),
                                np.load(os.path.join(trained, "logits.npy")))
  ens_new = np.load(str(tmp_path / "stacked" / "ensemble_scores.npz"))
  ens_old = np.load(os.path.join(trained, "ensemble_scores.npz"))
  for k in ens_old.files:
    np.testing.assert_array_equal(ens_new[k], ens_old[k], err_msg=k)


def _linear(rng, n=60, d=5, c=3, members=3):
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, c, n).astype(np.int32)
  params = [{"w": rng.normal(size=(d, c)).astype(np.float32),
             "b": rng.normal(size=(c,)).astype(np.float32)} for _ in range(members)]
  return x, y, params


def _linear_apply(p, x):  # bare logits: no (logits, out) pair
  return x @ p["w"] + p["b"]


def test_score_members_bare_logits_match_a_numpy_loop(tmp_path):
  """Point scores, GraNd and the input-gradient norm of a bare-logits linear model against a
  per-example numpy loop (softmax, loss, margins, EL2N by hand; the gradient of CE w.r.t. (W, b)
  is (x, 1) (p - e_y), so GraNd = ||p - e_y|| sqrt(||x||^2 + 1))."""
  x, y, params = _linear(np.random.default_rng(0))
  out_dir = str(tmp_path / "linear")
  out = posthoc.score_members(_linear_apply, params, x, y, out_dir,
                              scores=("point", "grand", "input_grad"), chunk_size=16,
                              arch="linear", progress=False)
  for r, p in enumerate(params):
    for i in range(len(y)):
      z = x[i].astype(np.float64) @ p["w"] + p["b"]
      q = np.exp(z - z.max())
      q /= q.sum()
      other = np.delete(np.arange(3), y[i])
      onehot = np.eye(3)[y[i]]
      ref = {"loss": -np.log(q[y[i]]), "correct": -float(np.argmax(z) == y[i]),
             "p_y": -q[y[i]], "max_p": -q.max(), "entropy": -(q * np.log(q)).sum(),
             "margin_prob": -(q[y[i]] - q[other].max()),
             "margin_logit": -(z[y[i]] - z[other].max()),
             "el2n": np.linalg.norm(q - onehot),
             "grand": np.linalg.norm(q - onehot) * np.sqrt(x[i] @ x[i] + 1.0),
             # d p_y / d x = p_y (W[:, y] - W p)
             "input_grad_norm": np.linalg.norm(q[y[i]] * (p["w"][:, y[i]] - p["w"] @ q))}
      for name, value in ref.items():  # negated where higher is easier
        np.testing.assert_allclose(out[name][r, i], value, rtol=2e-5, atol=2e-6,
                                   err_msg=f"{name} member {r} example {i}")
  stacked = jax.tree_util.tree_map(lambda *a: np.stack(a), *params)
  again = posthoc.score_members(_linear_apply, stacked, x, y, str(tmp_path / "stacked"),
                                scores=("point", "grand", "input_grad"), chunk_size=16,
                                progress=False)
  for name in out:
    np.testing.assert_array_equal(again[name], out[name], err_msg=name)
  # The analysis reads the store (keyed by its arch).
  from jaxdiff import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  sets = workdir_lib.load_workdirs([out_dir])
  assert list(sets) == ["linear"] and sets["linear"].num_runs == 3


def test_score_members_representation_needs_features(tmp_path):
  x, y, params = _linear(np.random.default_rng(1))
  out_dir = tmp_path / "refused"
  with pytest.raises(ValueError, match=r"need intermediate features.*bare logits.*pass "
                     r"features_fn=.*or leave 'representation' out of scores="):
    posthoc.score_members(_linear_apply, params, x, y, str(out_dir), progress=False)
  assert not out_dir.exists()  # refused before anything is written
  # With features_fn: prototypes on the given penultimate features, as the kernel computes them
  # on features built by hand.
  feats = lambda p, xx: [jnp.tanh(xx @ p["w"]), xx @ p["w"] + p["b"]]
  out = posthoc.score_members(_linear_apply, params, x, y, str(tmp_path / "rep"),
                              scores=("point", "representation"), features_fn=feats, knn_k=5,
                              progress=False)
  pen = np.stack([np.asarray(_linear_apply(p, x)) for p in params])
  ref = S.prototype_scores(pen, y, 3, seed=0, member_ids=np.arange(3))
  for name in ("proto_supervised", "proto_selfsup"):
    np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
  assert out["prediction_depth"].shape == (3, len(y))
  # knn_reference reaches prediction depth: the probes on 8 sampled examples per member give
  # other depths than exact, and the store records the option.
  sub = posthoc.score_members(_linear_apply, params, x, y, str(tmp_path / "sub"),
                              scores=("representation",), features_fn=feats, knn_k=5,
                              knn_reference=8, progress=False)
  assert not np.array_equal(sub["prediction_depth"], out["prediction_depth"])
  meta = store.read_meta(str(tmp_path / "sub" / "scores"))
  assert "knn_reference" in json.dumps(meta) and '"knn_reference": 8' in json.dumps(meta)


@pytest.mark.parametrize("params,apply_fn,expect", [
    ("mixed", _linear_apply, r"params\[1\] has another structure"),
    ("unstacked", _linear_apply, r"params: .*same leading members axis R; found leading "
                                 r"sizes \['2', '5'\] \(or pass a list"),
    ("ok", lambda p, x: (x @ p["w"])[:, :2], r"gives 2 logits per example but there are 3"),
])
def test_score_members_refuses_bad_input(tmp_path, params, apply_fn, expect):
  x, y, good = _linear(np.random.default_rng(2))
  given = {"mixed": [good[0], {"w": good[1]["w"]}],
           "unstacked": {"w": good[0]["w"], "b": good[0]["b"][:2]}, "ok": good}[params]
  with pytest.raises(ValueError, match=expect):
    posthoc.score_members(apply_fn, given, x, y, str(tmp_path / "o"), scores=("point",),
                          progress=False)
  assert not (tmp_path / "o").exists()


def test_score_members_progress_lines(tmp_path, caplog):
  """progress=True logs each stage as training's final scoring does; progress=False logs none
  of them."""
  x, y, params = _linear(np.random.default_rng(3), n=20, members=2)
  with caplog.at_level("INFO", logger="absl"):
    posthoc.score_members(_linear_apply, params, x, y, str(tmp_path / "a"),
                          scores=("point", "grand"), progress=True)
    shown = [r.getMessage() for r in caplog.records]
    caplog.clear()
    posthoc.score_members(_linear_apply, params, x, y, str(tmp_path / "b"),
                          scores=("point", "grand"), progress=False)
    quiet = [r.getMessage() for r in caplog.records]
  stages = ("scoring 2 members trained elsewhere on 20 examples: point, grand",
            "final scoring: point done", "final scoring: grand done", "wrote 9 scores of 2")
  for line in stages:
    assert any(m.startswith(line) for m in shown), (line, shown)
    assert not any(m.startswith(line) for m in quiet), (line, quiet)


def test_score_members_flax_variables_get_grand_over_params_only(tmp_path):
  """A Flax variables dict with batch statistics and bare logits: GraNd differentiates
  "params" only (the batch statistics are constants in evaluation), as a per-example jax.grad
  loop does."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.BatchNorm(use_running_average=True)(nn.Dense(6)(x))
      return nn.Dense(3)(nn.relu(h))

  rng = np.random.default_rng(4)
  x = rng.normal(size=(24, 5)).astype(np.float32)
  y = rng.integers(0, 3, 24).astype(np.int32)
  net = Net()
  members = []
  for r in range(2):
    v = jax.tree_util.tree_map(np.asarray, net.init(jax.random.key(r), x[:1]))
    v["batch_stats"] = jax.tree_util.tree_map(  # non-trivial statistics
        lambda a: a + rng.uniform(0.5, 1.5, a.shape).astype(np.float32), v["batch_stats"])
    members.append(v)
  out = posthoc.score_members(net.apply, members, x, y, str(tmp_path / "bn"),
                              scores=("point", "grand"), progress=False)
  for r, v in enumerate(members):
    loss = lambda p, xi, yi, v=v: optax.softmax_cross_entropy_with_integer_labels(
        net.apply({**v, "params": p}, xi[None])[0], yi)
    grad = jax.jit(jax.grad(loss))
    ref = [float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree_util.tree_leaves(
        grad(v["params"], x[i], y[i]))))) for i in range(len(y))]
    np.testing.assert_allclose(out["grand"][r], ref, rtol=1e-4, atol=1e-6)


def test_hf_workdir_without_a_path_needs_the_dataset(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  cfg = json.load(open(os.path.join(wd, "config.json")))
  cfg["data"].update(name="hf", path="")
  store.atomic_write_json(os.path.join(wd, "config.json"), cfg)
  with pytest.raises(posthoc.WorkdirError, match=r"Hugging Face dataset passed in Python .*"
                     r"pass the same one: arrays=<datasets.Dataset or DatasetDict>"):
    posthoc.load_ensemble(wd)

"""Tests of a user's own Flax model in the engine (jaxdiff/user_models.py): models defined only
here (a GRU, bare-logits and (logits, aux) MLPs, batch norm + dropout), trained through
experiments/train.py with an import string and through `train_and_evaluate(model=...)`."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import tiny_config
from jaxdiff import checkpoints, ensemble, models, store, train, user_models
from jaxdiff.scores import grand

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Written to tmp_path and imported by name ("usermods_test:gru"): nothing of it is in jaxdiff/.
USER_MODULE = textwrap.dedent('''
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    class GRU(nn.Module):
      """A GRU over the signal's positions, its last state -> Dense -> dropout -> classes."""
      num_classes: int
      hidden: int = 8

      @nn.compact
      def __call__(self, x, train: bool = False):
        h = nn.RNN(nn.GRUCell(self.hidden))(x[..., None])     # [B, L, H]
        d = nn.relu(nn.Dense(self.hidden)(h[:, -1]))
        d = nn.Dropout(0.2, deterministic=not train)(d)
        return nn.Dense(self.num_classes)(d)                   # bare logits

    def gru(config, num_classes, input_shape):
      assert input_shape == (40,), input_shape
      return GRU(num_classes, hidden=config["hidden"])

    class Plain(nn.Module):
      """Bare logits; its layers are Dense_0 and Dense_1's outputs (pre-activation)."""
      num_classes: int
      aux: bool = False

      @nn.compact
      def __call__(self, x):
        a0 = nn.Dense(12)(x)
        a1 = nn.Dense(12)(nn.relu(a0))
        logits = nn.Dense(self.num_classes)(nn.relu(a1))
        return (logits, {"layers": [a0, a1], "pre_logits": a1}) if self.aux else logits

    def plain(config, num_classes, input_shape):
      return Plain(num_classes)

    def with_aux(config, num_classes, input_shape):
      return Plain(num_classes, aux=True)

    def not_a_module(config, num_classes, input_shape):
      return "mlp"

    def wrong_classes(config, num_classes, input_shape):
      return Plain(num_classes + 1)

    class MemberShape(nn.Module):
      """A width drawn from the member's key: a shape that depends on the member."""
      @nn.compact
      def __call__(self, x):
        width = int(jax.random.randint(self.make_rng("params"), (), 2, 9))
        return nn.Dense(10)(nn.Dense(width)(x))

    def member_shape(config, num_classes, input_shape):
      return MemberShape()

    class SideEffect(nn.Module):
      """Looks at its traced input in NumPy (a Python side effect on traced values)."""
      @nn.compact
      def __call__(self, x):
        print(np.asarray(x).mean())
        return nn.Dense(10)(x)

    def side_effect(config, num_classes, input_shape):
      return SideEffect()

    class Sows(nn.Module):
      """sow() into its own collection: one more value per call, no fixed-shape state."""
      @nn.compact
      def __call__(self, x):
        self.sow("losses", "sum", x.sum())
        return nn.Dense(10)(x)

    def sows(config, num_classes, input_shape):
      return Sows()

    class IntCounter(nn.Module):
      """An int32 step counter in its own collection."""
      @nn.compact
      def __call__(self, x, train: bool = False):
        count = self.variable("stats", "count", lambda: jnp.zeros((), jnp.int32))
        if train:
          count.value += 1
        return nn.Dense(10)(x)

    def int_counter(config, num_classes, input_shape):
      return IntCounter()

    class TwoInputs(nn.Module):
      """A Dense on the signal and one on a meta vector, concatenated -> classes."""
      num_classes: int

      @nn.compact
      def __call__(self, signal, meta, train: bool = False):
        h = jnp.concatenate([nn.relu(nn.Dense(12)(signal)), nn.relu(nn.Dense(4)(meta))], -1)
        return nn.Dense(self.num_classes)(h), {"layers": [h], "pre_logits": h}

    def two_inputs(config, num_classes, input_shape):
      assert input_shape == (40,) and set(config) == {"hidden"}, (input_shape, config)
      return TwoInputs(num_classes)

    class Sliced(nn.Module):
      """TwoInputs on one input that it slices itself: the first 37 values, the last 3."""
      num_classes: int

      @nn.compact
      def __call__(self, x, train: bool = False):  # the same layers (names, so init keys)
        signal, meta = x[:, :37], x[:, 37:]
        h = jnp.concatenate([nn.relu(nn.Dense(12)(signal)), nn.relu(nn.Dense(4)(meta))], -1)
        return nn.Dense(self.num_classes)(h), {"layers": [h], "pre_logits": h}

    def sliced(config, num_classes, input_shape):
      return Sliced(num_classes)
''')
MOD = "usermods_test"


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  (tmp_path / f"{MOD}.py").write_text(USER_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  yield str(tmp_path)
  sys.modules.pop(MOD, None)


def _train_script(workdir, module_dir, *flags, cache=None):
  """experiments/train.py in a subprocess, the user's module on PYTHONPATH; `cache`: a JAX
  persistent compilation cache shared by the runs of one test (the 1-member run then loads the
  ensemble run's compiled programs, the same programs as it would compile: 27 s -> 7 s CPU)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=module_dir)
  env.pop("XLA_FLAGS", None)
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  if not any(f.startswith("--config=") for f in flags):
    flags = (f"--config={os.path.join(ROOT, 'experiments', 'configs', 'default.py')}",) + flags
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "train.py"), f"--workdir={workdir}",
       *flags],
      capture_output=True, text=True, env=env, timeout=600)


def _assert_member_equals(ens_wd, one_wd, i, num_runs, epoch):
  """Member i of `ens_wd` equals member 0 of `one_wd` bit for bit: every stored score and every
  per-member leaf of the final checkpoint (parameters, optimiser state, score accumulators)."""
  ens, one = store.load_scores(os.path.join(ens_wd, "scores")), store.load_scores(
      os.path.join(one_wd, "scores"))
  assert set(ens.scores) == set(one.scores)
  for name, value in one.scores.items():
    np.testing.assert_array_equal(ens.scores[name][i], value[0], err_msg=name)
  a = checkpoints.restore(os.path.join(ens_wd, "checkpoints", str(epoch)))
  b = checkpoints.restore(os.path.join(one_wd, "checkpoints", str(epoch)))
  n = 0
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    if x.ndim and x.shape[0] == num_runs:
      np.testing.assert_array_equal(x[i], y[0], err_msg=jax.tree_util.keystr(path))
      n += 1
  assert n > 10, n


def test_gru_from_an_import_string_members_are_independent(user_module, tmp_path):
  """A GRU (flax.linen.RNN + GRUCell, dropout in training) defined only in this test, trained by
  experiments/train.py from `model.name="usermods_test:gru"` with `model.layers` for the
  representation scores: every score is written, and member 1 of a 3-member run equals the
  1-member run with first_member=1 bit for bit (scores and checkpoint leaves)."""
  cfg = tmp_path / "gru_config.py"  # model.layers is a tuple: set in a config file
  cfg.write_text(textwrap.dedent(f'''
      import ml_collections
      from jaxdiff import config as config_lib

      def get_config():
        c = config_lib.defaults()
        c.model = ml_collections.ConfigDict(dict(name="{MOD}:gru", hidden=8,
                                                 layers=("RNN_0", "Dense_0")))
        return c
  '''))
  common = [f"--config={cfg}", "--config.data.num_samples=250", "--config.num_epochs=2",
            "--config.batch_size=50", "--config.progress=False", "--config.scores.knn_k=5"]
  ens_wd, one_wd = str(tmp_path / "ens"), str(tmp_path / "one")
  cache = str(tmp_path / "jax_cache")
  p = _train_script(ens_wd, user_module, *common, "--config.num_runs=3", cache=cache)
  assert p.returncode == 0, p.stderr[-3000:]
  p = _train_script(one_wd, user_module, *common, "--config.num_runs=1",
                    "--config.first_member=1", cache=cache)
  assert p.returncode == 0, p.stderr[-3000:]
  s = store.load_scores(os.path.join(ens_wd, "scores"))
  for name in ("loss", "el2n", "grand", "forgetting_events", "vog", "prediction_depth",
               "proto_supervised"):
    assert s.scores[name].shape == (3, 200) and np.isfinite(s.scores[name]).all(), name
  assert s.meta["arch"].startswith(f"{MOD}:gru(")
  # Members differ (their own init, data order and dropout).
  assert not np.array_equal(s.scores["loss"][0], s.scores["loss"][1])
  _assert_member_equals(ens_wd, one_wd, 1, 3, 2)


def test_bare_logits_model_through_layers_equals_the_aux_model(user_module, tmp_path):
  """A bare-logits model whose `model.layers` names Dense_0 and Dense_1 (Flax's
  capture_intermediates) gives exactly the scores of the same network returning
  `(logits, {"layers": [a0, a1]})`, prediction depth and prototypes included; one is given as an
  import string, the other as a Python factory (`train_and_evaluate(model=...)`)."""
  import usermods_test  # pylint: disable=g-import-not-at-top
  # Scores from outputs and gradients only (GraNd, VoG) are off: the GRU test covers them on a
  # bare-logits model; here the features are what differs.
  opts = {"scores.knn_k": 5, "data.num_samples": 250, "scores.grand": False, "scores.vog": False}
  base = tiny_config("mlp", num_runs=2, **opts)
  c1 = tiny_config("mlp", num_runs=2, **opts)
  c1.model = ml_collections.ConfigDict(dict(name=f"{MOD}:plain", layers=("Dense_0", "Dense_1")))
  train.train_and_evaluate(c1, str(tmp_path / "bare"))
  base.model = ml_collections.ConfigDict(dict(name="ignored"))
  train.train_and_evaluate(base, str(tmp_path / "aux"), model=usermods_test.with_aux)
  a = store.load_scores(str(tmp_path / "bare" / "scores"))
  b = store.load_scores(str(tmp_path / "aux" / "scores"))
  assert b.meta["arch"] == f"python:{MOD}.with_aux"
  assert "prediction_depth" in a.scores and "proto_selfsup" in a.scores
  assert set(a.scores) == set(b.scores)
  for name in a.scores:
    np.testing.assert_array_equal(a.scores[name], b.scores[name], err_msg=name)


def test_bare_logits_without_layers_is_refused_before_anything_is_written(user_module, tmp_path):
  """Representation scores on a bare-logits model with no `model.layers`: one line naming the
  options to set (exit status 2) and no workdir; with scores.representation=False it is set up."""
  wd = tmp_path / "wd"
  p = _train_script(str(wd), user_module, f"--config.model.name={MOD}:plain",
                    "--config.num_epochs=1", "--config.data.num_samples=250",
                    "--config.num_runs=2", "--config.progress=False")
  assert p.returncode == 2, p.stderr[-2000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: model '{MOD}:plain' returns bare logits"), last
  assert "model.layers" in last and "scores.representation=False" in last
  assert not wd.exists()
  c = tiny_config("mlp", **{"scores.representation": False})
  c.model.name = f"{MOD}:plain"
  train.validate_config(c)
  m = models.build_model(c.model, 10, np.zeros((2, 40), np.float32), need_features=False)
  assert m.layers == () and m.name == f"{MOD}:plain"


@pytest.mark.parametrize("name, match", [
    ("no_such_module_xyz:f", r"model.name='no_such_module_xyz:f': module 'no_such_module_xyz' "
                             r"not found .*built-in models: cnn, linear, mlp, resnet, vgg"),
    (f"{MOD}:nothing", rf"module '{MOD}' has no attribute 'nothing'; built-in models: cnn"),
    ("gru", r"unknown architecture 'gru'; valid: cnn, linear, mlp, resnet, vgg, or an import "
            r"string 'package.module:factory'"),
])
def test_bad_import_strings_are_one_clear_line(user_module, name, match):
  c = tiny_config("mlp")
  c.model.name = name
  with pytest.raises(train.ConfigError, match=match):
    train.validate_config(c)


@pytest.mark.parametrize("factory, match", [
    ("not_a_module", r"model 'usermods_test:not_a_module': the factory returned a str, not a "
                     r"flax.linen.Module"),
    ("wrong_classes", r"returns logits of shape \(2, 11\) in training mode on inputs \(2, 40\); "
                      r"need \[batch, 10\] for the 10 classes"),
    ("member_shape", r"model 'usermods_test:member_shape' cannot be vmapped over members .*"
                     r"ConcretizationTypeError"),
    ("side_effect", r"model 'usermods_test:side_effect' cannot be vmapped over members .*"
                    r"TracerArrayConversionError"),
    ("sows", r"model 'usermods_test:sows': a training step changes the structure or shapes of "
             r"its collection\(s\) \['losses'\] \(sow\(\) appending"),
    ("int_counter", r"model 'usermods_test:int_counter': mutable collection leaves "
                    r"\['stats/count \(int32\)'\] are not floats"),
])
def test_bad_user_models_are_refused_naming_the_model(user_module, tmp_path, factory, match):
  c = tiny_config("mlp", **{"scores.representation": False})
  c.model = ml_collections.ConfigDict(dict(name=f"{MOD}:{factory}"))
  with pytest.raises(train.ConfigError, match=match):
    train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_layer_paths_that_are_not_called_are_refused(user_module):
  import usermods_test  # pylint: disable=g-import-not-at-top
  x = np.zeros((2, 40), np.float32)
  with pytest.raises(user_models.ModelError, match=r"model.layers names 'Dense_9', which is not"):
    models.build_model({"name": "m", "layers": ("Dense_0", "Dense_9")}, 10, x,
                       model=usermods_test.Plain(10), need_features=True)
  m = models.build_model({"name": "m", "layers": "Dense_1"}, 10, x, model=usermods_test.Plain(10))
  v = m.init(jax.random.key(0), x)
  assert set(v) == {"params"} and set(v["params"]) == {"Dense_0", "Dense_1", "Dense_2"}
  logits, out = m.apply(v, x + 1.0)
  p = v["params"]
  a0 = (x + 1.0) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  a1 = np.maximum(a0, 0) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  np.testing.assert_allclose(out["pre_logits"], a1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, np.maximum(a1, 0) @ p["Dense_2"]["kernel"]
                             + p["Dense_2"]["bias"], rtol=1e-5, atol=1e-6)


class _BNDropout(nn.Module):
  """Batch norm (running statistics) and dropout, both switched by `train`."""
  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(16)(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.8)(h)
    h = nn.Dropout(0.3, deterministic=not train)(nn.relu(h))
    return nn.Dense(10)(h)


def test_batch_norm_and_dropout_train_as_in_a_flax_loop():
  """The engine's vmapped members (batch statistics updated, a dropout key per member and step)
  equal a plain Flax/Optax loop over each member, step by step, with the same keys."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 40)).astype(np.float32)
  y = rng.integers(0, 10, 64).astype(np.int32)
  model = models.build_model({"name": "bn"}, 10, x[:2], model=_BNDropout())
  tx = optax.sgd(0.1, momentum=0.9)
  eng = ensemble.Engine(model, tx)
  init_keys, _, aug_keys = ensemble.member_keys(0, np.arange(2))
  state = eng.init(init_keys, x)
  idx = jnp.asarray(rng.integers(0, 64, (2, 3, 16)), jnp.int32)  # [R, S, B]
  state, _ = eng.train_epoch(state, jnp.asarray(x), jnp.asarray(y), idx, aug_keys, 5)
  assert set(state.batch_stats) == {"BatchNorm_0"}
  module = _BNDropout()

  @jax.jit
  def ref_step(params, bs, opt, xb, yb, key):
    def loss(p):
      logits, upd = module.apply({"params": p, "batch_stats": bs}, xb, train=True,
                                 mutable=["batch_stats"], rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd
    g, upd = jax.grad(loss, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), upd["batch_stats"], opt

  for r in range(2):
    v = module.init(init_keys[r], x[:1])
    params, bs, opt = v["params"], v["batch_stats"], tx.init(v["params"])
    for s in range(3):
      xb, yb = x[np.asarray(idx[r, s])], y[np.asarray(idx[r, s])]
      key = jax.random.fold_in(jax.random.fold_in(aug_keys[r], 5 + s), 0x64726F70)
      params, bs, opt = ref_step(params, bs, opt, xb, yb, key)
    for a, b in zip(jax.tree_util.tree_leaves((params, bs)),
                    jax.tree_util.tree_leaves((state.params, state.batch_stats))):
      np.testing.assert_allclose(b[r], a, rtol=2e-5, atol=2e-6)


def test_grand_ghost_equals_vmap_on_a_gru(user_module):
  """GraNd's ghost method on the GRU: its top-level Dense layers are exact per-layer norms, the
  GRU cell's parameters (inside nn.RNN's scan) fall back to per-example gradients; the total
  equals the per-example-gradient reference."""
  import usermods_test  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 40)).astype(np.float32)
  y = rng.integers(0, 10, 12).astype(np.int32)
  m = models.build_model({"name": "gru"}, 10, x[:2], model=usermods_test.GRU(10, hidden=6))
  eng = ensemble.Engine(m, optax.sgd(0.1))
  state = eng.init(ensemble.member_keys(0, np.arange(2))[0], x)
  v = eng.variables(state)
  plan = grand.layer_plan(eng.apply_fn, jax.tree_util.tree_map(lambda a: a[0], v), x[:1])
  assert [l.path for l in plan] == [("Dense_0",), ("Dense_1",)]
  ghost = grand.grand_scores(eng.apply_fn, v, x, y, method="ghost")
  ref = grand.grand_scores(eng.apply_fn, v, x, y, method="vmap")
  np.testing.assert_allclose(ghost, ref, rtol=1e-5, atol=1e-6)


def _readme_blocks(section: str) -> list[str]:
  """The fenced code blocks of README's `## <section>`, in order."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
  return [b.split("\n", 1)[1] for b in body.split("```")[1::2]]


def test_readme_own_flax_model_example_runs_as_written(tmp_path):
  """README's "Your own Flax model": its mymodels.py and myconfig.py, and its command (with a
  tiny run's overrides appended), train a GRU with representation scores from `model.layers`."""
  models_py, config_py, command = _readme_blocks("Your own Flax model")[:3]
  assert models_py.startswith("# mymodels.py") and config_py.startswith("# myconfig.py")
  (tmp_path / "mymodels.py").write_text(models_py)
  (tmp_path / "myconfig.py").write_text(config_py)
  args = command.strip().split()
  assert args[:3] == ["PYTHONPATH=.", "python", "experiments/train.py"], args
  workdir = tmp_path / "gru"
  flags = [a for a in args[3:] if not a.startswith("--workdir")] + [
      f"--workdir={workdir}", "--config.num_runs=2", "--config.num_epochs=1",
      "--config.data.num_samples=300", "--config.scores.grand=False",
      "--config.scores.vog=False", "--config.progress=False"]
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train.py"), *flags],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  s = store.load_scores(str(workdir / "scores"))
  assert s.scores["loss"].shape == (2, 240)
  # The README's model.layers gave prediction depth: depths in 0..len(layers) (+ input).
  depth = s.scores["prediction_depth"]
  assert np.isfinite(depth).all() and depth.min() >= 0 and depth.max() <= 3


class _BNStats(nn.Module):
  """Batch norm and dropout, plus a collection "stats" of its own: an exponential moving
  average of the input's mean (subtracted from the input in both modes) and a float step
  counter, both updated in training only."""
  @nn.compact
  def __call__(self, x, train: bool = False):
    ema = self.variable("stats", "mean", lambda: jnp.zeros(x.shape[-1], jnp.float32))
    count = self.variable("stats", "count", lambda: jnp.zeros((), jnp.float32))
    if train:
      ema.value = 0.7 * ema.value + 0.3 * x.mean(0)
      count.value += 1
    h = nn.Dense(16)(x - ema.value)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.8)(h)
    h = nn.Dropout(0.3, deterministic=not train)(nn.relu(h))
    return nn.Dense(10)(h)


def test_other_mutable_collections_train_as_in_a_flax_loop(tmp_path):
  """A module with batch norm AND its own mutable collection "stats", trained by
  `train_and_evaluate` (2 vmapped members, GraNd's ghost norms on its BatchNorm, layers from
  model.layers), equals a plain jitted Flax/Optax loop per member that passes
  `mutable=["batch_stats", "stats"]` and keeps both: the same data order and dropout keys; the
  checkpointed parameters and collections and the final logits agree."""
  from jaxdiff import data as data_lib  # pylint: disable=g-import-not-at-top
  # SGD, not Adam: Dense_0's bias (before batch norm) has a zero gradient up to rounding, which
  # Adam would scale up to +-lr in a direction set by the rounding.
  c = tiny_config("mlp", num_runs=2, **{"scores.knn_k": 5, "scores.vog": False,
                                        "optim.name": "sgd", "optim.lr": 0.1})
  c.model = ml_collections.ConfigDict(dict(name="ignored", layers=("Dense_0", "Dense_1")))
  wd = str(tmp_path / "wd")
  train.train_and_evaluate(c, wd, model=_BNStats())
  saved = checkpoints.restore(os.path.join(wd, "checkpoints", "2"))["state"]
  assert set(saved["batch_stats"]) == {"BatchNorm_0", "collection:stats"}  # packed (docstring)
  logits = np.load(os.path.join(wd, "logits.npy"))
  scores = store.load_scores(os.path.join(wd, "scores"))
  assert np.isfinite(scores.scores["grand"]).all() and "prediction_depth" in scores.scores

  ds = data_lib.load_dataset(c.data)
  x, y = np.asarray(ds.x_train), np.asarray(ds.y_train)
  steps = x.shape[0] // c.batch_size
  init_keys, data_keys, aug_keys = ensemble.member_keys(c.seed, np.arange(2))
  module, tx = _BNStats(), optax.sgd(c.optim.lr, momentum=c.optim.momentum)

  @jax.jit
  def ref_step(params, cols, opt, xb, yb, key):
    def loss(p):
      logits, upd = module.apply({"params": p, **cols}, xb, train=True,
                                 mutable=["batch_stats", "stats"], rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd
    g, upd = jax.grad(loss, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), dict(upd), opt

  for r in range(2):
    v = module.init(init_keys[r], x[:1])
    params, opt = v["params"], tx.init(v["params"])
    cols = {"batch_stats": v["batch_stats"], "stats": v["stats"]}
    for epoch in (1, 2):
      idx = np.asarray(data_lib.epoch_permutations(data_keys, epoch, x.shape[0], c.batch_size,
                                                   None, steps))
      for s in range(steps):
        key = jax.random.fold_in(jax.random.fold_in(aug_keys[r], (epoch - 1) * steps + s),
                                 0x64726F70)
        params, cols, opt = ref_step(params, cols, opt, x[idx[r, s]], y[idx[r, s]], key)
    assert int(cols["stats"]["count"]) == 2 * steps
    got = jax.tree_util.tree_map(lambda a: np.asarray(a)[r], saved)
    want = {"params": params, "batch_stats": {**cols["batch_stats"],
                                              "collection:stats": cols["stats"]}}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want),
                            jax.tree_util.tree_leaves({k: got[k] for k in want})):
      np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))
    ref_logits = module.apply({"params": params, **cols}, x)
    np.testing.assert_allclose(logits[r], ref_logits, rtol=2e-5, atol=2e-5)


def test_packed_variables_are_the_modules_own_collections():
  """`UserModel.pack`/`unpack` move the module's own collections into "batch_stats" and back;
  apply on either layout equals the module's own evaluation pass (plain Flax), and a model with
  only batch statistics keeps its own layout (nothing packed)."""
  x = np.random.default_rng(1).normal(size=(6, 40)).astype(np.float32)
  m = models.build_model({"name": "m"}, 10, x[:2], model=_BNStats())
  assert m.collections == ("stats",)
  own = _BNStats().init(jax.random.key(3), x[:1])
  own = {**own, "stats": {"mean": jnp.full((40,), 0.5), "count": jnp.int32(3)}}
  packed = m.pack(own)
  assert set(packed) == {"params", "batch_stats"}
  np.testing.assert_array_equal(packed["batch_stats"]["collection:stats"]["mean"], 0.5)
  assert jax.tree_util.tree_structure(m.unpack(packed)) == jax.tree_util.tree_structure(own)
  want = _BNStats().apply(own, x)
  np.testing.assert_array_equal(m.apply(packed, x)[0], want)
  np.testing.assert_array_equal(m.apply(own, x)[0], want)  # e.g. posthoc.score_members
  bn = models.build_model({"name": "bn"}, 10, x[:2], model=_BNDropout())
  assert bn.collections == () and set(bn.init(jax.random.key(0), x)["batch_stats"]) == {
      "BatchNorm_0"}


def test_pack_inputs_is_the_flattened_concatenation():
  """pack_inputs against a hand-built concatenation (and the names' order), and the adapter's
  split of that x gives back the original arrays."""
  rng = np.random.default_rng(0)
  signal = rng.normal(size=(5, 4, 3))
  meta = rng.integers(0, 9, (5, 2))
  x, spec = user_models.pack_inputs({"signal": signal, "meta": meta})
  assert spec == ("signal:4x3", "meta:2") and x.dtype == np.float32
  np.testing.assert_array_equal(
      x, np.concatenate([signal.reshape(5, 12), meta], 1).astype(np.float32))
  x2, spec2 = user_models.pack_inputs({"signal": signal, "meta": meta}, names=("meta", "signal"))
  assert spec2 == ("meta:2", "signal:4x3")
  np.testing.assert_array_equal(
      x2, np.concatenate([meta, signal.reshape(5, 12)], 1).astype(np.float32))
  m = user_models.UserModel(module=nn.Dense(2), name="m",
                            inputs=user_models.parse_inputs(spec))
  a, b = m.split(jnp.asarray(x))
  np.testing.assert_array_equal(a, signal.astype(np.float32))
  np.testing.assert_array_equal(b, meta.astype(np.float32))
  assert user_models.parse_inputs("signal:4x3, meta:2") == (("signal", (4, 3)), ("meta", (2,)))
  assert user_models.parse_inputs([("signal", (4, 3)), ("meta", 2)]) == m.inputs
  with pytest.raises(user_models.ModelError, match=r"the same leading N; got \{'signal': 5, "):
    user_models.pack_inputs({"signal": signal, "meta": meta[:4]})


def _two_input_config(tmp_path):
  cfg = tmp_path / "two_config.py"  # model.inputs is a tuple: declared in a config file
  cfg.write_text(textwrap.dedent(f'''
      import ml_collections
      from jaxdiff import config as config_lib

      def get_config():
        c = config_lib.defaults()
        c.model = ml_collections.ConfigDict(dict(name="{MOD}:two_inputs", hidden=3, inputs=()))
        return c
  '''))
  return [f"--config={cfg}", "--config.data.num_samples=250", "--config.num_epochs=2",
          "--config.batch_size=50", "--config.progress=False", "--config.scores.knn_k=5",
          "--config.num_runs=2"]


def test_two_inputs_equal_the_module_that_slices_x_itself(user_module, tmp_path):
  """A module of two inputs `(signal [B, 37], meta [B, 3])` trained by experiments/train.py
  with `--config.model.inputs=('signal:37','meta:3')` gives bit-identical scores and final
  logits to the same layers in a module that slices MNIST-1D's x [B, 40] itself."""
  common = _two_input_config(tmp_path)
  cache = str(tmp_path / "jax_cache")
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  p = _train_script(two, user_module, *common, "--config.model.inputs=('signal:37','meta:3')",
                    cache=cache)
  assert p.returncode == 0, p.stderr[-3000:]
  p = _train_script(one, user_module, *common, f"--config.model.name={MOD}:sliced", cache=cache)
  assert p.returncode == 0, p.stderr[-3000:]
  a, b = (store.load_scores(os.path.join(w, "scores")) for w in (two, one))
  assert a.meta["arch"] == f"{MOD}:two_inputs(hidden=3,inputs=('signal:37', 'meta:3'))"
  assert {"grand", "vog", "prediction_depth", "proto_supervised"} <= set(a.scores)
  assert set(a.scores) == set(b.scores)
  for name in a.scores:
    np.testing.assert_array_equal(a.scores[name], b.scores[name], err_msg=name)
  np.testing.assert_array_equal(np.load(os.path.join(two, "logits.npy")),
                                np.load(os.path.join(one, "logits.npy")))
  assert not np.array_equal(a.scores["loss"][0], a.scores["loss"][1])


def test_inputs_that_do_not_add_up_are_refused_before_anything_is_written(user_module,
                                                                          tmp_path):
  wd = tmp_path / "wd"
  p = _train_script(str(wd), user_module, *_two_input_config(tmp_path),
                    "--config.model.inputs=('signal:37','meta:4')")
  assert p.returncode == 2, p.stderr[-2000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last == (f"error: model '{MOD}:two_inputs': model.inputs=('signal:37', 'meta:4') holds "
                  "41 values per example, the data 40 (inputs (40,)); the spec's sizes must add "
                  "up to the data's (user_models.pack_inputs builds both)"), last
  assert not wd.exists()


@pytest.mark.parametrize("spec, bad", [
    (("signal:37", "meta:3x"), "'meta:3x'"),
    (("signal", "meta:3"), "'signal'"),
    (("signal:37", ("meta", "three")), r"\('meta', 'three'\)"),
    (("signal:0", "meta:40"), "'signal:0'"),
])
def test_bad_input_specs_are_one_line(user_module, tmp_path, spec, bad):
  c = tiny_config("mlp", **{"scores.representation": False})
  c.model = ml_collections.ConfigDict(dict(name=f"{MOD}:two_inputs", hidden=3, inputs=spec))
  with pytest.raises(train.ConfigError, match=rf"^model.inputs: bad entry {bad} in .*; need "
                                              r"'name:d1xd2...' strings"):
    train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()

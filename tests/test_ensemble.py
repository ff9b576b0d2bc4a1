"""Tests of the ensemble engine: independent members, strategies, divergence, sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import data as data_lib
from jaxdiff import ensemble as ens
from jaxdiff import models
from conftest import ROOT, tiny_config


def _setup(arch="mlp", num_runs=3, member_strategy="vmap", epoch_loop="scan", first=0, lr=1e-2):
  c = tiny_config(arch)
  ds = data_lib.load_dataset(c.data)
  model = models.build_model(c.model, ds.num_classes)
  steps = ds.num_train // c.batch_size
  tx = ens.make_optimizer(dict(name="sgd", lr=lr, momentum=0.9, weight_decay=1e-4,
                               schedule="cosine"), steps, 2)
  engine = ens.Engine(model, tx, member_strategy=member_strategy, epoch_loop=epoch_loop)
  ids = np.arange(first, first + num_runs)
  ik, dk, ak = ens.member_keys(0, ids)
  state = engine.init(ik, ds.x_train)
  return engine, state, ds, dk, ak, c.batch_size


def _run_epochs(engine, state, ds, dk, ak, bs, epochs=2):
  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  steps = ds.num_train // bs
  for e in range(1, epochs + 1):
    idx = data_lib.epoch_permutations(dk, e, ds.num_train, bs)
    state, _ = engine.train_epoch(state, x, y, idx, ak, (e - 1) * steps)
  return state


def _member(tree, i):
  return jax.tree_util.tree_map(lambda a: np.asarray(a[i]), tree)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_members_start_different():
  _, state, *_ = _setup(num_runs=3)
  k = [np.asarray(l) for l in jax.tree_util.tree_leaves(state.params)]
  for leaf in k:
    if leaf[0].ndim >= 2:  # kernels (biases start at zero)
      assert not np.allclose(leaf[0], leaf[1]) and not np.allclose(leaf[1], leaf[2])
  # Different data orders too.
  _, _, ds, dk, _, bs = _setup(num_runs=3)
  idx = np.asarray(data_lib.epoch_permutations(dk, 1, ds.num_train, bs))
  assert not np.array_equal(idx[0], idx[1])
  # Each member's permutation covers distinct examples (no repeats within an epoch).
  assert all(len(np.unique(idx[r])) == idx[r].size for r in range(3))


@pytest.mark.parametrize("arch,strategy,loop", [("mlp", "vmap", "scan"), ("cnn", "vmap", "python"),
                                                ("cnn", "loop", "python")])
def test_member_equals_single_run(arch, strategy, loop):
  """Member 1 of a 3-member ensemble ends where a 1-member run with member 1's seeds ends."""
  eng, st, ds, dk, ak, bs = _setup(arch, 3, strategy, loop)
  st = _run_epochs(eng, st, ds, dk, ak, bs)
  eng1, st1, ds, dk1, ak1, bs = _setup(arch, 1, strategy, loop, first=1)
  st1 = _run_epochs(eng1, st1, ds, dk1, ak1, bs)
  _assert_trees_close(_member(st.params, 1), _member(st1.params, 0), rtol=2e-5, atol=2e-6)
  # And it moved: the trained params differ from the initial ones.
  _, init1, *_ = _setup(arch, 1, strategy, loop, first=1)
  assert not np.allclose(jax.tree_util.tree_leaves(init1.params)[0],
                         jax.tree_util.tree_leaves(st1.params)[0])


ALL_STRATEGIES = [("vmap", "scan"), ("vmap", "python"), ("loop", "python"), ("loop", "scan")]


@pytest.mark.parametrize("arch,strategies", [("cnn", ALL_STRATEGIES),
                                             ("resnet", ALL_STRATEGIES[1:3])])
def test_strategies_agree(arch, strategies):
  """vmap+scan, vmap+python, loop+python and loop+scan give the same numbers (ResNet: the two
  step-by-step ones; convolutions in scan are very slow to run on CPU)."""
  results = []
  for strategy, loop in strategies:
    eng, st, ds, dk, ak, bs = _setup(arch, 2, strategy, loop)
    results.append(_run_epochs(eng, st, ds, dk, ak, bs, epochs=1))
  for other in results[1:]:
    _assert_trees_close(results[0].params, other.params, rtol=1e-4, atol=1e-5)
    _assert_trees_close(results[0].batch_stats, other.batch_stats, rtol=1e-4, atol=1e-5)


def test_member_chunk_is_validated():
  with pytest.raises(ValueError, match="member_chunk=-2"):
    ens.Engine(None, None, member_chunk=-2)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_member_chunks_pad_and_keep_every_member_exact(arch):
  """5 members in chunks of 2 (the last chunk padded with a copy of member 4) end, bit for bit,
  where each member trained alone in a chunk of 2 ends; per-example outputs too; and the
  padding's results are dropped (5 members out, not 6)."""
  eng, st, ds, dk, ak, bs = _setup(arch, 5)
  eng.member_chunk = 2
  st = eng.init(ens.member_keys(0, np.arange(5))[0], ds.x_train)
  assert eng.chunk_size(5) == 2
  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  idx = data_lib.epoch_permutations(dk, 1, ds.num_train, bs)
  st, out = eng.train_epoch(st, x, y, idx, ak, 0)
  assert out["loss"].shape[0] == 5 and st.diverged.shape == (5,)
  for i in (0, 3, 4):
    eng1, st1, ds1, dk1, ak1, _ = _setup(arch, 1, first=i)
    eng1.member_chunk = 2
    st1 = eng1.init(ens.member_keys(0, np.array([i]))[0], ds.x_train)
    idx1 = data_lib.epoch_permutations(dk1, 1, ds.num_train, bs)
    st1, out1 = eng1.train_epoch(st1, x, y, idx1, ak1, 0)
    for a, b in zip(jax.tree_util.tree_leaves((st.params, out)),
                    jax.tree_util.tree_leaves((st1.params, out1))):
      np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b)[0])


def _engine(model_cfg, **kw):
  return ens.Engine(models.build_model(model_cfg, 10), ens.make_optimizer(dict(name="sgd"), 4, 1),
                    **kw)


def test_auto_strategy_follows_the_convolution_implementation():
  """On CPU: patch convolutions (the CNN's "auto") vmap and scan like dense layers; XLA
  convolutions loop over members step by step."""
  keys = ens.member_keys(0, np.arange(2))[0]
  x = np.zeros((1, 40), np.float32)
  cases = [({"name": "mlp"}, ("vmap", "scan")), ({"name": "cnn"}, ("vmap", "scan")),
           ({"name": "cnn", "conv_impl": "xla"}, ("loop", "python")),
           ({"name": "resnet", "depth": 8, "width": 2}, ("loop", "python"))]
  for cfg, want in cases:
    eng = _engine(cfg)
    eng.init(keys, x)
    assert (eng.resolved_member_strategy, eng.resolved_epoch_loop) == want, cfg
  assert ens.resolve_strategy("auto", "auto", "gpu", True) == ("vmap", "scan")
  # A wide dense member fills the CPU alone: loop over members, each epoch in one scan.
  assert ens.resolve_strategy("auto", "auto", "cpu", False, 2**20) == ("loop", "scan")
  assert ens.resolve_strategy("auto", "auto", "gpu", False, 2**20) == ("vmap", "scan")
  eng = _engine({"name": "mlp", "width": 1024})
  eng.init(keys, x)
  assert (eng.resolved_member_strategy, eng.resolved_epoch_loop) == ("loop", "scan")


def test_patch_conv_ensemble_trains_like_xla_conv_loop():
  """The CNN's CPU default (patch convolutions, vmapped, scanned) and the plain way (XLA
  convolutions, a loop over members, step by step) end an epoch at the same parameters."""
  c = tiny_config("cnn")
  ds = data_lib.load_dataset(c.data)
  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  ik, dk, ak = ens.member_keys(0, np.arange(2))
  idx = data_lib.epoch_permutations(dk, 1, ds.num_train, c.batch_size)
  out = []
  for impl, strategy, loop in [("patches", "auto", "auto"), ("xla", "loop", "python")]:
    eng = ens.Engine(models.build_model(dict(c.model, conv_impl=impl), ds.num_classes),
                     ens.make_optimizer(dict(name="sgd", lr=0.05, momentum=0.9), idx.shape[1], 1),
                     member_strategy=strategy, epoch_loop=loop)
    st, _ = eng.train_epoch(eng.init(ik, ds.x_train), x, y, idx, ak, 0)
    out.append(st.params)
  _assert_trees_close(out[0], out[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy,loop", [("vmap", "scan"), ("loop", "python")])
def test_nan_member_does_not_affect_others(strategy, loop):
  eng, st, ds, dk, ak, bs = _setup("mlp", 3, strategy, loop)
  clean = _run_epochs(eng, st, ds, dk, ak, bs)
  eng, st, ds, dk, ak, bs = _setup("mlp", 3, strategy, loop)
  # Blow up member 1: huge weights make its loss non-finite at the first step.
  poisoned = jax.tree_util.tree_map(lambda a: a.at[1].multiply(1e30), st.params)
  st = st.replace(params=poisoned)
  poisoned = jax.tree_util.tree_map(np.asarray, poisoned)  # the step donates its input buffers
  bad = _run_epochs(eng, st, ds, dk, ak, bs)
  assert np.asarray(bad.diverged).tolist() == [False, True, False]
  assert np.asarray(bad.diverged_step).tolist() == [-1, 0, -1]
  for i in (0, 2):  # bit for bit
    for a, b in zip(jax.tree_util.tree_leaves(_member(clean.params, i)),
                    jax.tree_util.tree_leaves(_member(bad.params, i))):
      np.testing.assert_array_equal(a, b)
  # The diverged member was frozen at its last finite state (its poisoned init), not NaN.
  for a, b in zip(jax.tree_util.tree_leaves(_member(poisoned, 1)),
                  jax.tree_util.tree_leaves(_member(bad.params, 1))):
    np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("strategy,loop,compiled", [
    # Every chunk (here one, padded) through one epoch program; one take and one join.
    ("vmap", "scan", {"chunk_epoch": 1, "take_chunk": 1, "join": 1}),
    # Members one by one: one program for every member (the member index is traced).
    ("loop", "scan", {"member": 1, "take": 1, "put": 1})])
def test_no_recompilation_after_first_epoch(strategy, loop, compiled):
  eng, st, ds, dk, ak, bs = _setup("mlp", 3, strategy, loop)
  st = _run_epochs(eng, st, ds, dk, ak, bs, epochs=1)
  sizes = {k: f._cache_size() for k, f in eng._compiled.items()}  # pylint: disable=protected-access
  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  for e in (2, 3):
    idx = data_lib.epoch_permutations(dk, e, ds.num_train, bs)
    st, _ = eng.train_epoch(st, x, y, idx, ak, e * 8)
  assert {k: f._cache_size() for k, f in eng._compiled.items()} == sizes == compiled


def test_optimizer_and_strategy_errors():
  with pytest.raises(ValueError, match="unknown optimiser 'rmsprop'.*sgd, adam, adamw"):
    ens.make_optimizer(dict(name="rmsprop"), 10, 1)
  with pytest.raises(ValueError, match="unknown schedule 'linear'"):
    ens.make_optimizer(dict(name="sgd", schedule="linear"), 10, 1)
  with pytest.raises(ValueError, match="lr=-0.1"):
    ens.make_optimizer(dict(name="sgd", lr=-0.1), 10, 1)
  with pytest.raises(ValueError, match="unknown member_strategy 'threads'"):
    ens.Engine(None, None, member_strategy="threads")


def test_step_schedule_decays_at_milestones():
  tx = ens.make_optimizer(dict(name="sgd", lr=0.1, momentum=0.0, schedule="step"), 10, 4)
  params = {"w": jnp.zeros(())}
  opt = tx.init(params)
  lrs = []
  for _ in range(40):  # gradient 1 -> update = -lr
    upd, opt = tx.update({"w": jnp.ones(())}, opt, params)
    lrs.append(-float(upd["w"]))
  np.testing.assert_allclose(lrs[:20], 0.1, rtol=1e-6)
  np.testing.assert_allclose(lrs[20:30], 0.01, rtol=1e-5)
  np.testing.assert_allclose(lrs[30:], 0.001, rtol=1e-5)


def test_sharded_run_equals_single_device(tmp_path):
  """4 CPU devices sharding the runs axis give the same scores as 1 device."""
  script = textwrap.dedent(f"""
      import os, sys
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
      sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
      import jax, numpy as np
      assert len(jax.devices()) == 4, jax.devices()
      from conftest import tiny_config
      from jaxdiff import train
      out = {{}}
      for nd in (4, 1):
        # Chunks of one member: one chunk per device (the engine uses no more devices than chunks).
        c = tiny_config("mlp", num_runs=4, num_devices=nd, member_chunk=1)
        res = train.train_and_evaluate(c, os.path.join({str(tmp_path)!r}, f"d{{nd}}"))
        leaf = jax.tree_util.tree_leaves(res["state"].params)[0]
        out[nd] = (leaf, np.load(os.path.join({str(tmp_path)!r}, f"d{{nd}}", "scores", "loss.npy")))
        if nd == 4:
          assert len(leaf.sharding.device_set) == 4, leaf.sharding
      np.testing.assert_allclose(np.asarray(out[4][0]), np.asarray(out[1][0]), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(out[4][1], out[1][1], rtol=1e-5, atol=1e-6)
      print("OK")
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                     timeout=300)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def _run_script(body, xla_flags=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  r = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r})\n" +
                      textwrap.dedent(body)], capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_split_cpu_gives_devices_and_looped_members_stay_on_one():
  """split_cpu before JAX starts; looping members drop the mesh; k-NN probes on 2 devices."""
  _run_script("""
      import jax, numpy as np, pytest
      from jaxdiff import ensemble as ens, models
      with pytest.raises(ValueError, match="cpu_devices=-1"):
        ens.split_cpu(-1)
      assert ens.split_cpu(2) == 2
      assert len(jax.devices()) == 2, jax.devices()
      assert ens.split_cpu(3) is None and len(jax.devices()) == 2  # too late: backends started
      tx = ens.make_optimizer({"name": "sgd", "lr": 0.1}, 1, 1)
      ik = ens.member_keys(0, np.arange(4))[0]
      x = np.zeros((2, 40), np.float32)
      # XLA convolutions loop over members on CPU: one device, not a vmapped sharded program.
      conv = models.build_model(dict(name="cnn", width=4, depth=2, kernel_size=3, stride=2,
                                     pool=False, head="flatten", conv_impl="xla"), 10)
      e = ens.Engine(conv, tx, mesh=ens.make_mesh(4))
      assert e.mesh is not None
      st = e.init(ik, x)
      assert e.mesh is None and e.resolved_member_strategy == "loop"
      assert len(jax.tree_util.tree_leaves(st.params)[0].devices()) == 1
      # Dense members are vmapped and sharded over both devices (4 members in chunks of 2: one
      # chunk per device; in chunks of 8 they would be one padded chunk on one device).
      mlp = models.build_model(dict(name="mlp", width=8, depth=1), 10)
      e = ens.Engine(mlp, tx, mesh=ens.make_mesh(4), member_chunk=8)
      st = e.init(ik, x)
      assert e.mesh is None and len(jax.tree_util.tree_leaves(st.params)[0].devices()) == 1
      e = ens.Engine(mlp, tx, mesh=ens.make_mesh(4), member_chunk=2)
      st = e.init(ik, x)
      assert e.resolved_member_strategy == "vmap"
      assert len(jax.tree_util.tree_leaves(st.params)[0].devices()) == 2
      # Sharded, in chunks of one member per device at a time: the same as on one device.
      import jax.numpy as jnp
      from jaxdiff import data as data_lib
      rng = np.random.default_rng(0)
      xs, ys = rng.normal(size=(64, 40)).astype(np.float32), rng.integers(0, 10, 64)
      idx = data_lib.epoch_permutations(ens.member_keys(0, np.arange(4))[1], 1, 64, 16)
      ends = []
      for mesh, chunk in ((ens.make_mesh(4), 1), (None, 4)):
        e = ens.Engine(mlp, tx, mesh=mesh, member_chunk=chunk)
        st = e.init(ik, x)
        st, out = e.train_epoch(st, e.replicate(jnp.asarray(xs)), e.replicate(jnp.asarray(ys)),
                                e.shard(idx), e.shard(ik), 0)
        ends.append(jax.device_get((st.params, out["loss"])))
      for a, b in zip(jax.tree_util.tree_leaves(ends[0]), jax.tree_util.tree_leaves(ends[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      # k-NN probes spread members over both devices, with the same predictions as on one.
      from jaxdiff.scores import representation as rep
      rng = np.random.default_rng(0)
      layers = [rng.normal(size=(3, 60, 4)).astype(np.float32) for _ in range(3)]
      labels, final = rng.integers(0, 3, 60), rng.integers(0, 3, (3, 60))
      run = lambda: (rep.prediction_depth(layers, labels, None, final, k=5, chunk_size=16),
                     rep.knn_predict(layers[1], labels, layers[2], k=5, chunk_size=16))
      two = run()
      rep._member_devices = lambda: jax.devices()[:1]
      one = run()
      np.testing.assert_array_equal(two[0], one[0])
      np.testing.assert_array_equal(two[1], one[1])
      print("OK")
  """)
  # An explicit XLA_FLAGS device count wins.
  _run_script("""
      import jax
      from jaxdiff import ensemble as ens
      assert ens.split_cpu(2) is None and len(jax.devices()) == 3, jax.devices()
      print("OK")
  """, xla_flags="--xla_force_host_platform_device_count=3")


def test_logits_loop_equals_vmap():
  """`Engine.logits` member by member (the loop strategy) against all members vmapped, and against
  one member's own forward pass; with a chunk that does not divide the examples."""
  eng, st, ds, dk, ak, bs = _setup("mlp", 3, "loop", "scan")
  st = _run_epochs(eng, st, ds, dk, ak, bs, epochs=1)
  x = ds.x_train[:70]
  looped = np.asarray(eng.logits(st, x, chunk_size=32))
  vmapped = ens.Engine(eng.model, eng.tx, member_strategy="vmap")
  vmapped.resolve(st.params)
  np.testing.assert_allclose(looped, np.asarray(vmapped.logits(st, x, chunk_size=32)),
                             rtol=1e-5, atol=1e-5)
  one = eng.apply_fn(_member(eng.variables(st), 2), jnp.asarray(x))[0]
  np.testing.assert_allclose(looped[2], np.asarray(one), rtol=1e-5, atol=1e-5)

"""Member chunks sized from memory (jaxdiff/memory.py and Engine.chunk_size with a budget)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import config as config_lib
from jaxdiff import data as data_lib
from jaxdiff import ensemble as ens
from jaxdiff import memory
from jaxdiff import models
from jaxdiff import train


# ------------------------------------------------------------------ the pure functions

def test_chunk_for_budget_by_hand():
  # 0.8 * 1000 = 800 usable; 800 - 100 fixed - 2*4*5 held = 660; 660 // 200 = 3 fit;
  # 4 members in ceil(4/3) = 2 chunks of ceil(4/2) = 2.
  assert memory.chunk_for_budget(100, 200, 1000, 4, held_per_member_bytes=5) == 2
  # 64 members, 40 fit: 2 chunks of 32 (not 40 + a padded 24).
  assert memory.chunk_for_budget(0, 10, 500, 64, safety=0.8) == 32
  # everything fits: capped by the members, then by max_chunk
  assert memory.chunk_for_budget(0, 1, 10**9, 6) == 6
  assert memory.chunk_for_budget(0, 1, 10**9, 20, max_chunk=8) == 7  # 3 chunks of 7, not 8+8+4
  # exactly at the edge: 0.5 * 1000 = 500 = 100 + 4 * 100 fits 4
  assert memory.chunk_for_budget(100, 100, 1000, 4, safety=0.5) == 4
  assert memory.chunk_for_budget(101, 100, 1000, 4, safety=0.5) == 2  # 3 fit -> 2 chunks of 2


def test_chunk_for_budget_too_small_and_bad_input(caplog):
  assert memory.chunk_for_budget(1000, 100, 1000, 4) == 1
  assert "more than 80% of the" in caplog.text
  with pytest.raises(ValueError, match="budget_bytes=0"):
    memory.chunk_for_budget(0, 100, 0, 4)


class _FakeDevice:
  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    return self.stats


def test_free_bytes():
  a = _FakeDevice({"bytes_limit": 16 * 2**30, "bytes_in_use": 2**30, "peak_bytes_in_use": 0})
  b = _FakeDevice({"bytes_limit": 16 * 2**30, "bytes_in_use": 3 * 2**30})
  assert memory.free_bytes([a, b]) == 13 * 2**30
  assert memory.free_bytes([a, _FakeDevice(None)]) is None  # XLA:CPU reports nothing
  assert memory.free_bytes(jax.devices()[:1]) is None


def test_program_need_by_hand():
  # a + b, float32 [1000] each, b already resident: arguments 8000 + output 4000 - resident 4000
  f = jax.jit(lambda a, b: a + b)
  s = jax.ShapeDtypeStruct((1000,), jnp.float32)
  need, out = memory.program_need(f.lower(s, s).compile(), resident_bytes=4000)
  assert (need, out) == (8000, 4000)
  # the donated argument is reused for the output: 4000 + 4000 - 4000 aliased
  g = jax.jit(lambda a: a * 2, donate_argnums=(0,))
  assert memory.program_need(g.lower(s).compile()) == (4000, 4000)


def test_shape_chunk():
  key = jax.random.split(jax.random.key(0), 5)
  tree = {"w": np.zeros((5, 3, 2), np.float32)}
  out = memory.shape_chunk((tree, np.zeros((7, 4)), key, jnp.int32(3)), (True, False, True, False), 2)
  assert out[0]["w"].shape == (2, 3, 2) and out[1].shape == (7, 4)
  assert out[2].shape == (2,) and out[2].dtype == key.dtype and out[3].shape == ()


# ------------------------------------------------------------------ the engine with a fake budget

R, N, B = 4, 256, 64


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(N, 40)).astype(np.float32),
          rng.integers(0, 10, N).astype(np.int32))


def _train(data, epoch_loop="scan", epochs=1, **engine_kw):
  x, y = data
  model = models.build_model({"name": "mlp", "width": 32, "depth": 2}, 10)
  eng = ens.Engine(model, ens.make_optimizer({"name": "adam", "lr": 1e-2}, N // B, epochs),
                   epoch_loop=epoch_loop, **engine_kw)
  ik, dk, ak = ens.member_keys(0, np.arange(R))
  st = eng.init(ik, x[:1])
  for e in range(1, epochs + 1):
    idx = data_lib.epoch_permutations(dk, e, N, B)
    st, out = eng.train_epoch(st, jnp.asarray(x), jnp.asarray(y), idx, ak, (e - 1) * (N // B))
  return eng, jax.device_get(st), jax.device_get(out)


def _by_hand(eng, state, data, epoch_loop):
  """(fixed, per member, held per member) from the engine's chunk program compiled at 1 and 2
  members, read straight from `memory_analysis()`."""
  x, y = data
  fn = eng._compiled["chunk_epoch"]  # pylint: disable=protected-access
  steps = (N // B,) if epoch_loop == "scan" else ()
  sizes = []
  for c in (1, 2):
    st = jax.tree_util.tree_map(lambda a, c=c: jax.ShapeDtypeStruct((c,) + a.shape[1:], a.dtype),
                                state)
    keys = jax.ShapeDtypeStruct((c,), jax.random.key(0).dtype)
    idx = jax.ShapeDtypeStruct((c,) + steps + (B,), jnp.int32)
    m = fn.lower(st, x, y, idx, keys, jnp.int32(0)).compile().memory_analysis()
    sizes.append((m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                  + m.temp_size_in_bytes + m.generated_code_size_in_bytes - x.nbytes - y.nbytes,
                  m.output_size_in_bytes))
  (n1, o1), (n2, o2) = sizes
  return n1 - (n2 - n1), n2 - n1, o2 - o1


@pytest.mark.parametrize("epoch_loop", ["scan", "python"])
def test_engine_chunks_from_budget(data, epoch_loop):
  big, st_big, out_big = _train(data, epoch_loop, memory_budget=2**40)
  assert big.resolved_member_chunk == 4 and big.chunk_size(R) == 4
  fixed, per, held = _by_hand(big, st_big, data, epoch_loop)
  plan = big.chunk_plan
  assert (plan.fixed_bytes, plan.per_member_bytes, plan.held_per_member_bytes) == (fixed, per, held)
  assert per > 0 and held > 0
  # A budget that holds 3 members' chunk program (and the 4 members' held outputs, twice):
  # 4 members then run as 2 chunks of 2.
  budget = int((fixed + 3.5 * per + 2 * R * held) / memory.SAFETY)
  small, st_small, out_small = _train(data, epoch_loop, memory_budget=budget)
  assert small.resolved_member_chunk == 2 and small.chunk_size(R) == 2
  # Chunks of 1-4 members round alike on XLA:CPU: the same members, bit for bit.
  for a, b in zip(jax.tree_util.tree_leaves((st_big, out_big)),
                  jax.tree_util.tree_leaves((st_small, out_small))):
    np.testing.assert_array_equal(a, b)
  if epoch_loop == "python":
    return
  # and the same as explicit member chunks of 2 (the chunking, not the budget, sets the numbers)
  _, st_two, _ = _train(data, epoch_loop, member_chunk=2)
  for a, b in zip(jax.tree_util.tree_leaves(st_small), jax.tree_util.tree_leaves(st_two)):
    np.testing.assert_array_equal(a, b)


def test_engine_without_budget_on_cpu_keeps_fixed_chunks(data):
  model = models.build_model({"name": "mlp", "width": 8, "depth": 1}, 10)
  for kw, chunk in (({}, ens.CPU_MEMBER_CHUNK), ({"member_chunk": 3, "memory_budget": 1}, 3)):
    eng = ens.Engine(model, ens.make_optimizer({"name": "sgd", "lr": 0.1}, 1, 1), **kw)
    eng.init(ens.member_keys(0, np.arange(R))[0], data[0][:1])
    assert eng.chunk_size(R, program=(None, ())) == chunk and eng.chunk_plan is None


def test_bad_budget_is_refused():
  model = models.build_model({"name": "mlp", "width": 8, "depth": 1}, 10)
  eng = ens.Engine(model, ens.make_optimizer({"name": "sgd", "lr": 0.1}, 1, 1), memory_budget=-5)
  with pytest.raises(ValueError, match="memory_budget=-5"):
    eng.init(ens.member_keys(0, np.arange(2))[0], np.zeros((1, 40), np.float32))
  config = config_lib.defaults()
  config.memory_budget_bytes = -1
  with pytest.raises(train.ConfigError, match="memory_budget_bytes=-1"):
    train.validate_config(config)

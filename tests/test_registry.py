"""The score registry: every entry documented, oriented, referenced, tested and produced by code."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import heldout, posthoc, recording
from jaxdiff import scores as S
from jaxdiff.scores import probs, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("entry", registry.REGISTRY, ids=lambda e: e.name)
def test_every_entry_is_documented_oriented_referenced_and_tested(entry):
  assert entry.family in registry.FAMILIES
  assert entry.definition.strip() and "\n" not in entry.definition
  assert entry.paper.strip()  # a paper, registry.STANDARD or registry.BOOKKEEPING
  assert entry.higher in (registry.HARDER, registry.EASIER, registry.NEITHER)
  assert entry.negated == (entry.higher == registry.EASIER)
  assert (entry.kernel is not None) == (entry.family == "point")  # point scores: their kernel
  if entry.bookkeeping:
    assert entry.higher == registry.NEITHER
  path, _, test = entry.test.partition("::")
  with open(os.path.join(ROOT, path)) as f:
    assert f"def {test}(" in f.read(), f"{entry.name}: {entry.test} not found"


def test_registry_names_are_unique_and_families_used():
  assert len(registry.ENTRIES) == len(registry.REGISTRY)
  assert {e.family for e in registry.REGISTRY} == set(registry.FAMILIES)
  with pytest.raises(ValueError, match=r"unknown score family\(ies\) \['pont'\]; valid: "):
    registry.names("pont")


def _tiny_model(rng, runs=2, d=3, h=4, c=3):
  def apply_fn(v, x):
    hidden = jnp.tanh(x @ v["params"]["w1"])
    return hidden @ v["params"]["w2"], {"layers": [hidden], "pre_logits": hidden}
  variables = {"params": {"w1": jnp.asarray(rng.normal(size=(runs, d, h)), jnp.float32),
                          "w2": jnp.asarray(rng.normal(size=(runs, h, c)), jnp.float32)}}
  return apply_fn, variables


class _Engine:
  """What the Recorder asks of an engine: every member vmapped at once."""
  resolved_member_strategy = "vmap"

  def __init__(self, apply_fn):
    self.apply_fn = apply_fn

  def variables(self, state):
    return state.variables

  def map_members(self, fn, v):
    return fn(v)

  def chunk_size(self, runs):
    return runs


def test_every_family_is_produced_by_its_code_path():
  rng = np.random.default_rng(0)
  runs, n, c = 2, 12, 3
  apply_fn, variables = _tiny_model(rng, runs, c=c)
  x = rng.normal(size=(n, 3)).astype(np.float32)
  y = np.arange(n) % c
  ds = types.SimpleNamespace(x_train=x, y_train=y, x_test=x[:4], y_test=y[:4], num_train=n,
                             num_classes=c)
  state = types.SimpleNamespace(variables=variables, diverged=np.zeros(runs, bool))
  rec = recording.Recorder({"grand_method": "vmap", "knn_k": 3, "vog": True}, _Engine(apply_fn),
                           ds, runs)
  idx = np.stack([rng.permutation(n).reshape(3, 4) for _ in range(runs)])  # [R, S, B]
  seen = {"correct": rng.random((runs, 3, 4)) < 0.5, "loss": rng.random((runs, 3, 4))}
  for epoch in (1, 2):
    rec.on_epoch(epoch, state, idx, seen)
  per_member, ensemble = rec.finalize(state)
  assert set(per_member) == set(registry.names(*(f.name for f in recording.FAMILIES)))
  assert all(v.shape == (runs, n) for v in per_member.values())
  assert set(ensemble) == set(registry.names("ensemble"))
  # Recomputing a group from a checkpoint writes exactly that group's family.
  only, _ = rec.finalize(state, only={"representation"})
  assert set(only) == set(registry.names("point", "representation"))
  norms = posthoc.input_grad_norms(apply_fn, variables, x, y, chunk_size=8)
  assert norms.shape == (runs, n) and posthoc.GROUP_SCORES["input_grad"] == ("input_grad_norm",)
  result = _heldout_result(rng, n, c)
  held, insample = heldout.heldout_difficulty(result)
  assert list(held) == [registry.heldout_name(k) for k in registry.names("heldout")]
  assert list(insample) == [registry.heldout_name(k) for k in registry.names("insample")]
  legacy = S.orient({k: np.ones(2) for k in registry.names("legacy")}, strict=False)
  assert all((v == -1).all() for v in legacy.values())


def test_derived_lists_equal_the_hand_written_ones_they_replace():
  assert recording.RECORDED_IN_TRAINING == ("minibatch", "vog", "snapshot_epochs", "save_history")
  assert recording.OPTION_GROUPS == {
      "grand": "grand", "grand_method": "grand", "representation": "representation",
      "knn_k": "representation", "knn_reference": "representation",
      "num_prototypes": "representation", "chunk_size": None}
  assert recording.GROUP_SCORES == {
      "grand": ("grand",),
      "representation": ("prediction_depth", "proto_supervised", "proto_selfsup")}
  # The hand-written lists before the registry, still in it (a new entry adds to them).
  old_point = ("loss", "correct", "p_y", "max_p", "entropy", "margin_prob", "margin_logit", "el2n")
  assert S.point.POINT_SCORE_NAMES[:len(old_point)] == old_point
  old_negated = {"correct", "p_y", "max_p", "margin_prob", "margin_logit", "mean_p_y",
                 "mean_correct", "aum", "aum_prob", "unforgettable", "mb_unforgettable",
                 "dichotomous", "frac_correct"}
  assert old_negated <= S.NEGATED and all(registry.ENTRIES[n].negated for n in S.NEGATED)
  assert S.BOOKKEEPING == {"mb_presentations"}
  # Every switchable family has a default in the config's scores section.
  assert all(f.switch in recording.DEFAULTS for f in recording.FAMILIES if f.switch)


def _heldout_result(rng, n, c, fractions=2):
  def cs():
    est = heldout.HoldoutEstimate(*(rng.random((fractions, n)) for _ in range(2)),
                                  np.full((fractions, n), 3), np.ones((fractions, n), bool))
    return heldout.CScores(np.array([0.25, 0.5]), est, rng.random(n))
  p_out, p_in = (rng.dirichlet(np.ones(c), n) for _ in range(2))
  p_out[0] = np.nan  # an example no member held out
  mem = types.SimpleNamespace(value=rng.random((fractions, n)) - 0.5)
  return heldout.HeldoutResult(c=cs(), c_soft=cs(), mem=mem, oos_probs=p_out,
                               oos_count=np.full(n, 3), in_probs=p_in, labels=np.arange(n) % c)


def test_heldout_difficulty_matches_a_loop():
  rng = np.random.default_rng(1)
  n, c = 7, 4
  r = _heldout_result(rng, n, c)
  held, insample = heldout.heldout_difficulty(r)
  for i in range(n):
    y = r.labels[i]
    for name, p, table in (("oos", r.oos_probs[i], held), ("in", r.in_probs[i], insample)):
      other = max(p[k] for k in range(c) if k != y) if not np.isnan(p).any() else np.nan
      np.testing.assert_equal(table[f"neg_{name}_p_y"][i], -p[y])
      np.testing.assert_equal(table[f"{name}_margin"][i], other - p[y])
    assert held["neg_c_score"][i] == -r.c.integrated[i]
    assert held["neg_c_score_soft"][i] == -r.c_soft.integrated[i]
    assert held["memorisation"][i] == (r.mem.value[0, i] + r.mem.value[1, i]) / 2


def test_probs_helpers_match_a_loop_with_ties():
  z = np.array([[[2.0, 2.0, 0.0], [0.0, 1.0, 3.0]], [[1.0, 0.0, 1.0], [5.0, 5.0, 5.0]]])
  y = np.array([1, 2])
  p = probs.softmax(z)
  m = probs.margins(z, y)
  for r in range(2):
    for i in range(2):
      e = [np.exp(v - max(z[r, i])) for v in z[r, i]]
      np.testing.assert_allclose(p[r, i], np.array(e) / sum(e), rtol=1e-15)
      others = [k for k in range(3) if k != y[i]]
      best = max(others, key=lambda k: (z[r, i, k], -k))  # ties -> lowest class
      assert m["other_idx"][r, i] == best and m["other"][r, i] == z[r, i, best]
      assert m["margin"][r, i] == z[r, i, y[i]] - z[r, i, best]
      assert probs.correctness(z, y)[r, i] == float(int(np.argmax(z[r, i])) == y[i])
  np.testing.assert_array_equal(probs.label_prob(p, y), m["target"] * 0 + p[:, [0, 1], y])


@pytest.mark.parametrize("name, base, negated", [
    ("loss_e10", "loss", False), ("p_y_e3", "p_y", True), ("c_score_s0.5", "c_score", True),
    ("c_score_s1e-05", "c_score", True), ("forgetting_events", "forgetting_events", False),
    ("mb_learning_time_inf", "mb_learning_time_inf", False), ("nope_e1", "nope_e1", False)])
def test_base_name_of_suffixed_names(name, base, negated):
  assert registry.base_name(name) == base and registry.is_negated(name) == negated

"""Score recording during training: per-epoch evaluation, metrics and trajectory accumulators.

The Recorder turns each end-of-epoch evaluation (all training examples, no augmentation) into
per-member metrics (metrics.jsonl), feeds the online trajectory accumulators (epoch level, the
members' own minibatches, VoG), and `finalize` returns every score as `[R, N]` for store.py.
Its `state` is a pytree of arrays, checkpointed with the model so that resuming is exact.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

from jaxdiff import config as config_lib
from jaxdiff import distributed
from jaxdiff import progress as progress_lib
from jaxdiff import scores as S
from jaxdiff import store
from jaxdiff import workdir as workdir_lib

# Default recording options (the `scores` config section), from the one defaults table.
DEFAULTS = dict(config_lib.SCORES)


# The registry's families the recorder computes, in order: "epoch" ones accumulate over training,
# "final" ones come from the final state (point first: the others use its logits).
FAMILIES = tuple(f for f in S.registry.FAMILIES.values() if f.stage in ("epoch", "final"))
# Options whose scores are recorded epoch by epoch during training (fixed once trained).
RECORDED_IN_TRAINING = (*(o for f in FAMILIES if f.stage == "epoch" for o in f.options),
                        "snapshot_epochs", "save_history")
# Options computed from the final state -> the group of final scores they change (None: none).
OPTION_GROUPS = {**{o: f.name for f in FAMILIES if f.stage == "final" for o in f.options},
                 "chunk_size": None}
GROUP_SCORES = {f.name: S.registry.names(f.name) for f in FAMILIES
                if f.stage == "final" and f.switch}


def validate(config: Mapping[str, Any], num_epochs: int | None = None) -> None:
  """Raises ValueError naming unknown options or bad values of the `scores` config section
  (`snapshot_epochs` are checked against `num_epochs` when given)."""
  config = dict(config or {})
  unknown = sorted(set(config) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown scores option(s) {unknown}; valid: {sorted(DEFAULTS)}")
  opts = {**DEFAULTS, **config}
  if opts["grand_method"] not in S.grand.METHODS:
    raise ValueError(f"unknown scores.grand_method {opts['grand_method']!r}; valid: "
                     f"{list(S.grand.METHODS)}")
  if opts["vog"] not in (True, False, "auto"):
    raise ValueError(f"scores.vog={opts['vog']!r}: valid values are True, False, 'auto'")
  if int(opts["knn_k"]) <= 0:
    raise ValueError(f"scores.knn_k={opts['knn_k']}: must be positive")
  ref = opts["knn_reference"]
  if isinstance(ref, bool) or not isinstance(ref, int) or ref < 0 or 0 < ref <= int(opts["knn_k"]):
    raise ValueError(f"scores.knn_reference={ref!r}: valid values are 0 (all training examples) "
                     f"or an int above knn_k={opts['knn_k']}")
  if int(opts["chunk_size"]) < 0:
    raise ValueError(f"scores.chunk_size={opts['chunk_size']}: must be positive (or 0 = auto)")
  snaps = list(opts["snapshot_epochs"] or ())
  bad = [e for e in snaps if not isinstance(e, int) or e < 1
         or (num_epochs is not None and e > num_epochs)]
  if bad:
    raise ValueError(f"scores.snapshot_epochs={snaps}: {bad} outside the trained epochs "
                     f"1..{num_epochs if num_epochs is not None else 'num_epochs'}")


class Recorder:
  """Per-epoch evaluation and score accumulation for one ensemble.

  Attributes:
    state: pytree of arrays (accumulators) saved in every checkpoint.
  """

  def __init__(self, config: Mapping[str, Any], engine, ds, num_runs: int,
               workdir: str | None = None, member_ids: Any = None, progress: bool = True):
    self.opts = {**DEFAULTS, **dict(config or {})}
    self.progress = progress  # log each stage of `finalize` (absl INFO)
    self.member_ids = np.arange(num_runs) if member_ids is None else np.asarray(member_ids)
    self.engine = engine
    self.ds = ds
    self.num_runs = num_runs
    self.workdir = workdir
    # 0: chosen on first use (needs variables), for forward passes and for backward passes.
    self._chunk = self._grad_chunk = int(self.opts["chunk_size"])
    n = ds.num_train
    per_example = int(np.prod(ds.x_train.shape[1:]))
    vog = self.opts["vog"]
    self.vog = bool(vog) if vog != "auto" else num_runs * n * per_example * 16 < 2 * 2**30
    # family -> computed (its `scores` switch on, "auto" VoG resolved).
    self.enabled = {f.name: f.switch is None or bool(self.vog if f.switch == "vog"
                                                     else self.opts[f.switch])
                    for f in FAMILIES}
    self.state = {"epoch": S.EpochAccumulator.init(num_runs, n)}
    if self.enabled["minibatch"]:
      self.state["minibatch"] = S.MinibatchForgetting.init(num_runs, n)
    if self.enabled["vog"]:
      self.state["vog"] = _vog_init(num_runs, n, per_example)
    # One apply function object, so the jitted score kernels compile once.
    self.apply_fn = engine.apply_fn
    # Score kernels vmap over members; where the engine loops over members (convolutions on CPU,
    # where a vmapped convolution is a slow grouped one), score one member at a time as well.
    self.final_logits = None
    self.timings = {}
    self.loop_members = getattr(engine, "resolved_member_strategy", "vmap") == "loop"

  def _members(self, fn, v, *args, **kwargs):
    """`fn(v, *args)` over all members: in the engine's fixed member chunks (so a member's
    scores do not depend on the ensemble around it), or one member at a time when
    `loop_members`."""
    if not self.loop_members:
      return self.engine.map_members(lambda c: fn(c, *args, **kwargs), v)
    outs = [fn(jax.tree_util.tree_map(lambda a: a[r:r + 1], v), *args, **kwargs)  # pylint: disable=cell-var-from-loop
            for r in range(self.num_runs)]
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a, axis=0), *outs)

  def _variables(self, state):
    v = self.engine.variables(state)
    if not self._chunk:
      members = 1 if self.loop_members else self.engine.chunk_size(self.num_runs)
      v0 = jax.tree_util.tree_map(lambda a: a[0], v)
      self._chunk, self._grad_chunk = (
          S.point.auto_chunk_size(self.apply_fn, v0, self.ds.x_train, members, backward=b)
          for b in (False, True))
      if self.progress:
        logging.info("scoring in chunks of %d examples, %d with gradients (scores.chunk_size=0: "
                     "auto)", self._chunk, self._grad_chunk)
    return v

  @property
  def chunk(self) -> int:
    """Examples per jitted scoring call (set once variables are known when chunk_size=0)."""
    return self._chunk

  @property
  def grad_chunk(self) -> int:
    """Examples per jitted call of the kernels with a backward pass (GraNd, input gradients)."""
    return self._grad_chunk

  def on_epoch(self, epoch: int, state, idx, seen) -> list[dict]:
    """Evaluates every member after `epoch` and updates the accumulators.

    Args:
      epoch: 1-based epoch just finished.
      state: stacked MemberState.
      idx: int `[R, S, B]` the examples of each member's minibatches this epoch.
      seen: {"correct": [R, S, B], "loss": [R, S, B]} as the members saw them in training.
    Returns:
      per-member metric records for metrics.jsonl.
    """
    v = self._variables(state)
    grads = None
    if self.vog:  # one forward pass for the point scores and VoG's input gradients
      pts, logits, grads = self._members(lambda vv: S.input_grad.point_scores_and_input_grad(
          self.apply_fn, vv, self.ds.x_train, self.ds.y_train, self.grad_chunk), v)
    else:
      pts, logits = self._members(self._point, v, self.ds.x_train, self.ds.y_train, True)
    test = self._members(self._point, v, self.ds.x_test, self.ds.y_test, False)
    self.state["epoch"] = S.EpochAccumulator.update(self.state["epoch"], pts, epoch)
    if "minibatch" in self.state:
      self.state["minibatch"] = S.MinibatchForgetting.update_steps(
          self.state["minibatch"], idx, seen["correct"], (epoch - 1) * idx.shape[1])
    if grads is not None:
      self.state["vog"] = S.VoGAccumulator.update(dict(self.state["vog"]), grads)
    if self.opts["save_history"] and self.workdir:
      _save_history(self.workdir, epoch, logits)
    snaps = {}
    if epoch in tuple(self.opts["snapshot_epochs"]):
      snaps = self._snapshot(v, pts, epoch)
    if snaps and self.workdir:
      for name, value in snaps.items():
        store.atomic_save_npy(workdir_lib.snapshot_file(self.workdir, name), value)
    diverged = distributed.gather(state.diverged)
    mb_loss = distributed.gather(seen["loss"]).mean((1, 2))
    mb_acc = distributed.gather(seen["correct"]).mean((1, 2))
    return [{"epoch": epoch, "member": r, "train_loss": float(pts["loss"][r].mean()),
             "train_acc": float(pts["correct"][r].mean()),
             "test_loss": float(test["loss"][r].mean()),
             "test_acc": float(test["correct"][r].mean()),
             "minibatch_loss": float(mb_loss[r]), "minibatch_acc": float(mb_acc[r]),
             "diverged": bool(diverged[r])}
            for r in range(self.num_runs)]

  def _snapshot(self, v, pts, epoch) -> dict[str, np.ndarray]:
    out = {f"el2n_e{epoch}": pts["el2n"], f"loss_e{epoch}": pts["loss"]}
    if self.opts["grand"]:
      out[f"grand_e{epoch}"] = self._grand(v)
    return out

  def _point(self, v, x, y, return_logits):
    return S.compute_point_scores(self.apply_fn, v, x, y, self.chunk, return_logits=return_logits)

  # The final scores of each family after the point scores: (variables, logits [R, N, C], timer)
  # -> {name: [R, N]} in natural orientation.

  def _final_grand(self, v, logits, timer) -> dict[str, np.ndarray]:
    del logits
    out = {"grand": self._grand(v)}
    timer.done("grand")
    return out

  def _final_trajectory(self, v, logits, timer) -> dict[str, np.ndarray]:
    del v, logits, timer
    return S.EpochAccumulator.finalize(self.state["epoch"])

  def _final_minibatch(self, v, logits, timer) -> dict[str, np.ndarray]:
    del v, logits, timer
    return S.MinibatchForgetting.finalize(distributed.gather(self.state["minibatch"]))

  def _final_vog(self, v, logits, timer) -> dict[str, np.ndarray]:
    del v, logits, timer
    return S.VoGAccumulator.finalize(dict(self.state["vog"]), self.ds.y_train)

  def _final_representation(self, v, logits, timer) -> dict[str, np.ndarray]:
    x, y = self.ds.x_train, self.ds.y_train
    layers, _ = self._members(lambda vv: S.representation.features(
        self.apply_fn, vv, x, self.chunk, include_input=True, return_logits=True), v)
    timer.done("features")
    out = {"prediction_depth": S.prediction_depth(layers, y, None, logits.argmax(-1),
                                                  k=int(self.opts["knn_k"]),
                                                  on_layer=functools.partial(
                                                      timer.step, "prediction_depth",
                                                      part="layer", verb="probed",
                                                      upper_bound=True),
                                                  reference=int(self.opts["knn_reference"]),
                                                  member_ids=self.member_ids,
                                                  on_members=functools.partial(
                                                      _members_probed, timer))}
    timer.done("prediction_depth")
    k = int(self.opts["num_prototypes"]) or self.ds.num_classes
    out.update(S.prototype_scores(layers[-1], y, k, seed=0, member_ids=self.member_ids))
    timer.done("prototypes")
    return out

  def _grand(self, v) -> np.ndarray:
    # Member by member: per-example gradients as one plain vmap over a chunk (convolutions inside
    # lax.map are very slow on CPU).
    kw = {"batch_size": self.grad_chunk} if self.loop_members else {}
    return self._members(lambda vv: S.grand_scores(
        self.apply_fn, vv, self.ds.x_train, self.ds.y_train, chunk_size=self.grad_chunk,
        method=self.opts["grand_method"], **kw), v)

  def finalize(self, state, only=None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """All scores at the end of training.

    Args:
      state: the stacked MemberState.
      only: None for every score; or a set of `GROUP_SCORES` groups: the point scores, the
        ensemble scores and those groups only (no trajectory scores), for a finished workdir
        whose score options changed.

    Returns:
      (per-member scores `{name: float32 [R, N]}`, higher = harder (see `scores.NEGATED`), NaN for
       diverged members; ensemble scores `{name: [N]}` over the non-diverged members).
    """
    families = [f.name for f in FAMILIES if f.name != "point" and self.enabled[f.name] and (
        only is None if f.stage == "epoch" else only is None or f.name in only)]
    timer = progress_lib.Stages(
        "final scoring", ["point", *(s for f in families for s in _STAGES.get(f, ()))],
        self.progress, min_interval=0.0)
    timer.plan(f"{self.ds.num_train} examples x {self.num_runs} members")
    v = self._variables(state)
    pts, logits = self._members(self._point, v, self.ds.x_train, self.ds.y_train, True)
    self.final_logits = np.asarray(logits)
    timer.done("point")
    out = dict(pts)
    for f in families:
      out.update(getattr(self, f"_final_{f}")(v, logits, timer))
    self.timings = timer.times
    if self.progress:
      logging.info("final scoring times (s): %s", timer.times)
    diverged = distributed.gather(state.diverged)
    out = S.orient(out, strict=False)
    out = {k: np.where(diverged[:, None], np.nan, val).astype(np.float32) for k, val in out.items()}
    ok = ~diverged
    probs = np.asarray(jax.nn.softmax(logits[ok], axis=-1)) if ok.any() else None
    ens = S.ensemble_scores(probs, self.ds.y_train) if probs is not None else {}
    return out, ens


# Seconds between two progress lines within one layer of prediction depth (the layer lines
# always print; at 50,000 examples one exact layer takes minutes).
MEMBER_PROGRESS_INTERVAL = 15.0


def _members_probed(timer, layers_done, num_layers, done, total) -> None:
  """Prediction depth's line within a layer: `done` of its `total` member probes finished (the
  layer's own line says when all are)."""
  if done < total:
    timer.fraction(f"prediction_depth layer {layers_done + 1}/{num_layers}: members "
                   f"{done}/{total} probed", (layers_done + done / total) / num_layers,
                   upper_bound=True, min_interval=MEMBER_PROGRESS_INTERVAL)


# The timed stages of each family's `_final_*` (the others only read accumulators: instant).
_STAGES = {"grand": ("grand",), "representation": ("features", "prediction_depth", "prototypes")}


def _vog_init(num_runs, n, per_example):
  st = S.VoGAccumulator.init(num_runs, n)
  # Fix the gradient shape up front so the checkpointed pytree has constant shapes.
  st["mean"] = np.zeros((num_runs, n, per_example))
  st["m2"] = np.zeros((num_runs, n, per_example))
  return st


def _save_history(workdir, epoch, logits):
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.savez(buf, logits=np.asarray(logits, np.float32))
  store.atomic_write_bytes(workdir_lib.history_file(workdir, epoch),
                           buf.getvalue())

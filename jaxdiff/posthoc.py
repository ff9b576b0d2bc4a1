"""Trained ensembles and their scores, read back from a training workdir after the run.

`load_ensemble` restores a workdir's checkpoint on any device count as the model, its stacked
variables, the data and the config; `score_workdir` (experiments/score.py) computes the scores
that need only a checkpoint and adds them to the workdir's score store.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Callable, Iterable, Mapping

from absl import logging
import jax
import ml_collections
import numpy as np

from jaxdiff import ensemble as ens
from jaxdiff import scores as S
from jaxdiff import store
from jaxdiff import train
from jaxdiff import workdir as workdir_lib
from jaxdiff.workdir import WorkdirError, read_config, saved_epochs  # re-exported

# Score groups that need only a checkpoint; trajectory scores (forgetting, AUM, VoG, ...) need
# every epoch and are recorded during training only.
GROUPS = ("point", "grand", "input_grad", "representation")
# The scores each group writes (before a non-final epoch's `_e<epoch>` suffix): the registry's
# family of that name.
GROUP_SCORES = {g: S.registry.names(g) for g in GROUPS}
# `score_workdir` options: scores-section fields that change how scores are computed.
OPTIONS = ("knn_k", "grand_method", "chunk_size")
INPUT_GRAD_NORM = S.registry.ENTRIES["input_grad_norm"].definition


@dataclasses.dataclass
class Ensemble:
  """A trained ensemble restored from a workdir (`load_ensemble`).

  Attributes:
    model: the Flax module; `model.apply(member_variables, x, train=False)` -> `(logits, out)`.
    variables: stacked `{"params": ..., "batch_stats": ...}` (no "batch_stats" without batch
      norm), every leaf `[R, ...]`, laid out on this process's devices.
    apply_fn: `(variables_of_one_member, x [B, ...]) -> (logits [B, C], out)` in evaluation
      mode (`out["layers"]`, `out["pre_logits"]`: see docs/ARCHITECTURE.md).
    state: the stacked `ensemble.MemberState` (optimiser state, `diverged` `[R]`, ...).
    data: the `data.Dataset` the workdir was trained on (after label noise).
    config: the workdir's resolved config (`config.json`).
    epoch: the epoch of the restored checkpoint.
    member_ids: int `[R]`, the members' ids (row r is member `member_ids[r]`).
    engine: the `ensemble.Engine` (devices and member chunks as in training).
  """
  model: Any
  variables: dict
  apply_fn: Callable[[Any, Any], Any]
  state: ens.MemberState
  data: Any
  config: ml_collections.ConfigDict
  epoch: int
  member_ids: np.ndarray
  engine: ens.Engine

  @property
  def num_runs(self) -> int:
    return int(self.member_ids.size)

  def member(self, r: int) -> dict:
    """The variables of row `r` (member `member_ids[r]`), leaves without the `[R]` axis."""
    return jax.tree_util.tree_map(lambda a: a[r], self.variables)

  def logits(self, x: np.ndarray, chunk_size: int = 1024) -> np.ndarray:
    """Evaluation logits of every member, float32 `[R, N, C]` for inputs `x` `[N, ...]`."""
    return np.asarray(self.engine.logits(self.state, x, chunk_size))


def _check_epoch(workdir: str, epoch: int | None) -> int:
  saved = saved_epochs(workdir)
  if not saved:
    raise WorkdirError(f"{workdir!r} has no checkpoint (nothing under "
                       f"{workdir_lib.path(workdir, 'checkpoints')})")
  if epoch is None:
    return saved[-1]
  if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch not in saved:
    raise WorkdirError(f"epoch {epoch!r} has no checkpoint in {workdir!r}; saved epochs: {saved}")
  return int(epoch)


def _setup(workdir, epoch, arrays, scores_options=None):
  """(Ensemble, train.Run with its recorder's state restored) of a workdir's checkpoint."""
  config = read_config(workdir)
  epoch = _check_epoch(workdir, epoch)
  if config.data.get("name") == "arrays" and arrays is None:
    raise WorkdirError(f"{workdir!r} was trained on arrays passed in Python (data.name='arrays'); "
                       "pass the same ones: arrays={'x_train': ..., 'y_train': ...[, 'x_test', "
                       "'y_test']}")
  run_config = copy.deepcopy(config)
  if scores_options:
    with run_config.unlocked():
      run_config.scores.update(scores_options)
  run = train.setup(run_config, arrays)
  _check_data(workdir, run.ds)
  epoch, state, run.recorder.state = train.restore(run, workdir, epoch)
  run.state = state
  ensemble = Ensemble(model=run.model, variables=run.engine.variables(state),
                      apply_fn=run.engine.apply_fn, state=state, data=run.ds, config=config,
                      epoch=epoch, member_ids=run.member_ids, engine=run.engine)
  return ensemble, run


def _check_data(workdir: str, ds) -> None:
  """Refuses data other than the workdir's (arrays or files changed since), by the fingerprint
  its score store records."""
  if not workdir_lib.scores_complete(workdir):
    return
  meta = store.read_meta(workdir_lib.scores_dir(workdir))
  try:
    store.check_same_data("the data given", {"dataset_fingerprint": ds.fingerprint()}, workdir,
                          meta)
  except store.StoreError as e:
    raise WorkdirError(str(e)) from e


def load_ensemble(workdir: str, epoch: int | None = None,
                  arrays: Mapping[str, np.ndarray] | None = None) -> Ensemble:
  """Restores a training workdir's ensemble: model, stacked parameters, data and config.

  Works on any device count: a checkpoint saved with the runs axis sharded over 2 devices (or
  8 accelerators) restores on one CPU, because the restore target is built from the config on
  this process's devices (Orbax's target-less restore refuses it: "Topology mismatch").
  Checkpoint checksums are verified first (`jaxdiff.checksums`).

  Example::

    e = load_ensemble("/tmp/jaxdiff/mlp")
    logits = e.logits(e.data.x_test)                      # [R, N_test, C]
    out = e.apply_fn(e.member(0), e.data.x_train[:8])     # member 0: (logits [8, C], out)

  Args:
    workdir: a directory written by `train.train_and_evaluate` (experiments/train.py).
    epoch: the epoch of the checkpoint (`saved_epochs(workdir)`); None = the newest, the final
      one once training finished.
    arrays: for a workdir trained on `data.name="arrays"`, the same arrays (x_train, y_train
      `[N, ...]`, optional x_test, y_test); checked against the data fingerprint of the
      workdir's score store.

  Returns:
    the `Ensemble` (variables `[R, ...]`, `data.x_train` `[N, ...]`).

  Raises:
    WorkdirError: no such workdir or epoch (naming the saved epochs), arrays missing or not the
      workdir's.
    train.CheckpointError: the checkpoint cannot be read (a checksum mismatch, a lost file).
  """
  return _setup(workdir, epoch, arrays)[0]


def input_grad_norms(apply_fn, variables, x: np.ndarray, y: np.ndarray,
                     chunk_size: int) -> np.ndarray:
  """`||d p_y / d x||_2` of every member on every example (`scores.input_grad.input_grad_py`).

  Only the norms are kept: the gradients of one block of `chunk_size` examples at a time.

  Args:
    apply_fn: `(member_variables, x [B, ...]) -> (logits [B, C], out)`.
    variables: stacked variables, leaves `[R, ...]`.
    x: float inputs `[N, ...]`.
    y: int labels `[N]`.
    chunk_size: examples per jitted call.

  Returns:
    float32 `[R, N]`.
  """
  n = x.shape[0]
  chunk = min(chunk_size, n)
  pad = -n % chunk  # every block the same shape: one compilation
  xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
  yp = np.concatenate([y, np.zeros(pad, y.dtype)]) if pad else y
  blocks = []
  for start in range(0, n + pad, chunk):
    g = S.input_grad_py(apply_fn, variables, xp[start:start + chunk], yp[start:start + chunk],
                        chunk)
    blocks.append(np.sqrt(np.square(g.reshape(g.shape[:2] + (-1,))).sum(-1)))
  return np.concatenate(blocks, axis=1)[:, :n].astype(np.float32)


def check_groups(groups: Iterable[str]) -> list[str]:
  """`groups` as a list of `GROUPS` names, or WorkdirError naming the unknown ones."""
  groups = [groups] if isinstance(groups, str) else list(groups)
  unknown = [g for g in groups if g not in GROUPS]
  if unknown or not groups:
    raise WorkdirError(f"unknown score group(s) {unknown or groups}; valid: {list(GROUPS)}")
  return list(dict.fromkeys(groups))


def score_workdir(workdir: str, epoch: int | None = None, groups: Iterable[str] = GROUPS,
                  arrays: Mapping[str, np.ndarray] | None = None, **options) -> dict[str, str]:
  """Computes scores from a saved checkpoint and adds them to the workdir's score store.

  Only scores that need nothing but the parameters of one epoch: the point scores (loss,
  margins, EL2N, ...), GraNd, the input-gradient norm and the representation scores (prediction
  depth, prototypes). The final epoch's scores replace the stored ones of the same name (equal
  to them, up to float rounding if `chunk_size` differs from training's); a non-final epoch's
  get the suffix `_e<epoch>` (`loss_e10`, as `scores.snapshot_epochs` names its snapshots).
  Every other stored score is kept; `scores/meta.json` keeps its metadata, lists the new
  higher-is-easier names in "negated" (stored negated, like every score) and records in
  "posthoc" the epoch, group and options of each new score. Nothing is written when an input
  is bad; the workdir's lock is held while it runs (a live training run refuses it).

  Scores: `[R, N]`, NaN for members that had diverged by that epoch. The input-gradient norm
  `input_grad_norm` is ||d p_y / d x||_2 (see `INPUT_GRAD_NORM`).

  Args:
    workdir: a finished training workdir (with `scores/meta.json`).
    epoch: a saved epoch (`saved_epochs`); None = the newest.
    groups: some of `GROUPS`.
    arrays: the training arrays of a `data.name="arrays"` workdir (see `load_ensemble`).
    **options: `knn_k`, `grand_method`, `chunk_size` (default: the workdir's `scores` section).

  Returns:
    {stored name: group} of the scores written.

  Raises:
    WorkdirError: no such workdir, epoch or group, unknown option, no score store.
    train.ConfigError: a bad option value, or a training run holds the workdir.
  """
  groups = check_groups(groups)
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise WorkdirError(f"unknown option(s) {unknown}; valid: {list(OPTIONS)}")
  options = {k: v for k, v in options.items() if v is not None}
  config = read_config(workdir)
  epoch = _check_epoch(workdir, epoch)
  scores_dir = workdir_lib.scores_dir(workdir)
  if not workdir_lib.scores_complete(workdir):
    raise WorkdirError(f"{workdir!r} has no score store ({scores_dir}/meta.json): its training "
                       "has not finished; resume it with experiments/train.py first")
  with train.workdir_lock(workdir):
    t0 = time.perf_counter()
    logging.info("restoring epoch %d of %s", epoch, workdir)
    wanted = {"grand": "grand" in groups, "representation": "representation" in groups}
    ensemble, run = _setup(workdir, epoch, arrays, {**options, **wanted})
    existing = store.load_scores(scores_dir)
    _check_store(existing, ensemble, scores_dir)
    logging.info("restored %d members (epoch %d) in %.1f s", ensemble.num_runs, epoch,
                 time.perf_counter() - t0)
    t0 = time.perf_counter()
    # Point scores are always computed; grand and representation when asked (trajectory
    # scores are not: they need every epoch).
    computed, _ = run.recorder.finalize(run.state, only={g for g in groups if g in wanted})
    logging.info("%s scores in %.1f s", "+".join(["point"] + [g for g in groups if g in wanted]),
                 time.perf_counter() - t0)
    new = {}
    for g in groups:
      if g != "input_grad":
        new.update({name: (g, computed[name]) for name in GROUP_SCORES[g]})
    if "input_grad" in groups:
      t0 = time.perf_counter()
      v, ds = ensemble.variables, ensemble.data
      norms = run.engine.map_members(lambda vv: input_grad_norms(
          ensemble.apply_fn, vv, ds.x_train, ds.y_train, run.recorder.grad_chunk), v)
      diverged = np.asarray(ensemble.state.diverged)
      new["input_grad_norm"] = ("input_grad", np.where(diverged[:, None], np.nan, norms))
      logging.info("input gradients in %.1f s", time.perf_counter() - t0)
    final = epoch == int(config.num_epochs)
    suffix = "" if final else f"_e{epoch}"
    written = {f"{name}{suffix}": g for name, (g, _) in new.items()}
    all_scores = dict(existing.scores)
    all_scores.update({f"{name}{suffix}": np.asarray(val, np.float32)
                       for name, (_, val) in new.items()})
    meta = _updated_meta(existing.meta, new, suffix, epoch, options)
    store.save_scores(scores_dir, all_scores, example_ids=existing.example_ids,
                      labels=existing.labels, meta=meta)
    logging.info("wrote %d scores of epoch %d to %s: %s", len(written), epoch, scores_dir,
                 sorted(written))
  return written


def _check_store(existing: store.ScoreSet, ensemble: Ensemble, scores_dir: str) -> None:
  ds = ensemble.data
  if existing.num_runs != ensemble.num_runs or not np.array_equal(existing.example_ids,
                                                                  ds.example_ids):
    raise WorkdirError(f"{scores_dir!r} holds {existing.num_runs} runs x "
                       f"{existing.example_ids.size} examples, but the checkpoint has "
                       f"{ensemble.num_runs} x {ds.num_train}: not this workdir's score store")
  if not np.array_equal(existing.labels, ds.y_train):
    raise WorkdirError(f"{scores_dir!r} was written with other labels than the workdir's data")


# Fields `store.save_scores` writes itself.
_STORE_FIELDS = ("format_version", "num_runs", "num_examples", "score_names", "sha256")


def _updated_meta(meta: Mapping[str, Any], new: Mapping[str, Any], suffix: str, epoch: int,
                  options: Mapping[str, Any]) -> dict:
  out = {k: v for k, v in meta.items() if k not in _STORE_FIELDS}
  negated = set(out.get("negated", ())) | {name + suffix for name in new if name in S.NEGATED}
  out["negated"] = sorted(negated)
  posthoc = dict(out.get("posthoc", {}))
  for name, (group, _) in new.items():
    posthoc[name + suffix] = {"epoch": epoch, "group": group, "options": dict(options),
                              "by": "jaxdiff.posthoc.score_workdir"}
  out["posthoc"] = posthoc
  if "input_grad_norm" in new:
    out.setdefault("definitions", {})["input_grad_norm"] = INPUT_GRAD_NORM
  return out

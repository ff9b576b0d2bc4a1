"""Scores after the fact: of a training workdir's checkpoints, or of members trained elsewhere.

`load_ensemble` restores a workdir's checkpoint on any device count as the model, its stacked
variables, the data and the config; `score_workdir` (experiments/score.py) computes the scores
that need only a checkpoint and adds them to the workdir's score store; `score_members` computes
them for any apply function and stacked parameters (members trained outside jaxdiff) into a new
score store, through the engine's member chunks and the recorder's kernels.

Why one module of ~550 lines: both entry points share the scoring path (engine, recorder
kernels, the score store's meta) and differ only in where members come from.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import time
from typing import Any, Callable, Iterable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdiff import data as data_lib
from jaxdiff import ensemble as ens
from jaxdiff import recording
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
OPTIONS = ("knn_k", "knn_reference", "grand_method", "chunk_size")
INPUT_GRAD_NORM = S.registry.ENTRIES["input_grad_norm"].definition


@dataclasses.dataclass
class Ensemble:
  """A trained ensemble restored from a workdir (`load_ensemble`).

  Attributes:
    model: the Flax module; `model.apply(member_variables, x, train=False)` -> `(logits, out)`.
    variables: stacked `{"params": ..., "batch_stats": ...}` (no "batch_stats" without batch
      norm; a user model's other mutable collections packed into it, `user_models.UserModel`),
      every leaf `[R, ...]`, laid out on this process's devices.
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
  if config.data.get("name") == "hf" and not config.data.get("path") and arrays is None:
    raise WorkdirError(f"{workdir!r} was trained on a Hugging Face dataset passed in Python "
                       "(data.name='hf', no data.path); pass the same one: arrays=<datasets."
                       "Dataset or DatasetDict>")
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
    **options: `knn_k`, `knn_reference`, `grand_method`, `chunk_size` (default: the workdir's
      `scores` section).

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
      new["input_grad_norm"] = ("input_grad", _input_grad_scores(run.recorder, ensemble.state))
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


def _input_grad_scores(recorder, state, progress: bool = True) -> np.ndarray:
  """`input_grad_norm` `[R, N]` of the recorder's members (NaN where diverged), in the engine's
  member chunks and the recorder's chunks of examples with gradients."""
  t0 = time.perf_counter()
  ds, engine = recorder.ds, recorder.engine
  norms = engine.map_members(lambda vv: input_grad_norms(
      recorder.apply_fn, vv, ds.x_train, ds.y_train, recorder.grad_chunk),
                             engine.variables(state))
  if progress:
    logging.info("input gradients in %.1f s", time.perf_counter() - t0)
  return np.where(np.asarray(state.diverged)[:, None], np.nan, norms)


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


# ----------------------------------------------------------------------------- members trained
# elsewhere


class _GivenEngine(ens.Engine):
  """The engine's member machinery (member chunks, devices, `map_members`) around a given
  function: `model` is `(member_variables, x) -> (logits, out)` and a state's `params` holds the
  members' variables as given (every Flax collection, not only "params")."""

  def variables(self, st: ens.MemberState):
    return st.params

  def apply_fn(self, variables, x):
    return self.model(variables, x)


def _stack_members(params) -> Any:
  """A list/tuple of per-member pytrees -> one pytree with leaves `[R, ...]`; a pytree whose
  leaves already share a leading `[R]` axis is returned as it is."""
  if isinstance(params, (list, tuple)):
    if not params:
      raise ValueError("params is an empty list: give one pytree per member, or a pytree "
                       "stacked on a leading members axis")
    structure = jax.tree_util.tree_structure(params[0])
    for r, p in enumerate(params[1:], 1):
      if jax.tree_util.tree_structure(p) != structure:
        raise ValueError(f"params[{r}] has another structure than params[0]: "
                         f"{jax.tree_util.tree_structure(p)} vs {structure}")
    return jax.tree_util.tree_map(lambda *a: np.stack([np.asarray(x) for x in a]), *params)
  try:
    S.point.num_members(params)
  except ValueError as e:
    raise ValueError(f"params: {e} (or pass a list of per-member pytrees to stack them)") from e
  return params


def _normalized_apply(apply_fn, features_fn, wrapped: bool):
  """`(member_variables, x) -> (logits, out)` from the user's `apply_fn` (bare logits or
  jaxdiff's pair); `features_fn`'s layers go into `out["layers"]`."""
  def fn(variables, x):
    v = variables["params"] if wrapped else variables
    res = apply_fn(v, x)
    logits, out = res if isinstance(res, tuple) else (res, {})
    if features_fn is not None:
      out = {**out, "layers": list(features_fn(v, x))}
    return logits, out
  return fn


def _check_apply(apply_fn, fn, member0, x, num_classes: int, want_layers: bool) -> None:
  """Traces one member on one example: bare logits `[B, C]` or `(logits, {"layers": ...})`,
  C = num_classes, layers present when representation scores are asked."""
  try:
    raw = jax.eval_shape(lambda v, xx: fn(v, xx)[0], member0, x[:1])
    out = jax.eval_shape(lambda v, xx: fn(v, xx)[1], member0, x[:1])
  except Exception as e:  # the user's function: any error, named with its call
    raise ValueError(f"apply_fn{_name(apply_fn)} failed on one member and x[:1] of shape "
                     f"{x[:1].shape}: {type(e).__name__}: {e}") from e
  if not hasattr(raw, "shape") or len(raw.shape) != 2 or raw.shape[0] != 1:
    raise ValueError(f"apply_fn{_name(apply_fn)} returned {raw!r} for x[:1]; expected logits "
                     "[B, C] or (logits [B, C], {'layers': [...], ...})")
  if raw.shape[1] != num_classes:
    raise ValueError(f"apply_fn{_name(apply_fn)} gives {raw.shape[1]} logits per example but "
                     f"there are {num_classes} classes (num_classes, else max(y) + 1)")
  if want_layers and not (isinstance(out, Mapping) and out.get("layers")):
    raise ValueError(f"representation scores (prediction depth, prototypes) need intermediate "
                     f"features, but apply_fn{_name(apply_fn)} returns bare logits (no "
                     "out['layers']): pass features_fn=(params, x) -> [layer features [B, ...], "
                     "...] (the last one the penultimate layer), or leave 'representation' out "
                     "of scores=")


def _name(fn) -> str:
  return f" ({getattr(fn, '__qualname__', type(fn).__name__)})"


def score_members(apply_fn: Callable[[Any, Any], Any], params: Any, x: np.ndarray,
                  y: np.ndarray, out_dir: str, *, scores: Iterable[str] = GROUPS,
                  features_fn: Callable[[Any, Any], Any] | None = None, chunk_size: int = 0,
                  grand_method: str = "ghost", knn_k: int = 30, knn_reference: int = 0,
                  num_prototypes: int = 0,
                  example_ids: np.ndarray | None = None, num_classes: int | None = None,
                  member_ids: Iterable[int] | None = None, member_chunk: int = 0,
                  num_devices: int = 0, arch: str = "", dataset: str = "arrays",
                  progress: bool = True) -> dict[str, np.ndarray]:
  """Scores members trained anywhere (their apply function and parameters) into a score store.

  The members run through the engine's member machinery (`ensemble.Engine.map_members`: fixed
  chunks of `member_chunk` members, each device's block in a thread) and the recorder's kernels
  (`recording.Recorder.finalize`, the registry's families), in chunks of `chunk_size` examples
  (0 = sized to the model's activations on CPU, as in training): the same programs, chunking and
  memory bounds as a jaxdiff run, so for a jaxdiff model the scores equal the run's own
  (tests/test_posthoc.py). Writes, as a training run does, `<out_dir>/scores/` (store.py: every
  score `[R, N]` float32, higher = harder, meta.json last), `<out_dir>/logits.npy` (under 1 GiB)
  and `<out_dir>/ensemble_scores.npz`; `experiments/analyze.py --workdirs=<out_dir>` and
  `workdir.load_workdirs` read it. A member whose parameters are not all finite is marked
  diverged (NaN scores, left out by the analysis).

  Example::

    params = [model.init(jax.random.key(i), x[:1]) for i in range(4)]   # trained elsewhere
    out = posthoc.score_members(model.apply, params, x, y, "/tmp/jaxdiff/mine",
                                scores=("point", "grand"))             # bare logits

  Args:
    apply_fn: `(member_params, x [B, ...]) -> logits [B, C]`, or jaxdiff's `(logits, {"layers":
      [...], "pre_logits": ...})`; evaluation mode (no dropout, batch statistics not updated).
      `member_params` is one member's slice of `params`, as given.
    params: one pytree with a leading members axis `[R, ...]` on every leaf, or a list of R
      per-member pytrees (stacked here). A Flax variables dict (`{"params": ..., "batch_stats":
      ...}`) gets gradients (GraNd) w.r.t. its "params" only; any other pytree w.r.t. all of it.
    x: inputs `[N, ...]` as `apply_fn` takes them.
    y: int labels `[N]` in `0..C-1`.
    out_dir: a new or scored directory (not a training workdir: `score_workdir` scores those).
    scores: groups of `GROUPS`: "point" (always computed), "grand", "input_grad",
      "representation" (needs `out["layers"]` or `features_fn`).
    features_fn: for an `apply_fn` of bare logits, `(member_params, x) -> [features [B, ...]]`
      in depth order, the last the penultimate layer (prototypes); prediction depth probes each.
    chunk_size: examples per jitted scoring call (0 = auto, `scores.chunk_size`).
    grand_method, knn_k, knn_reference, num_prototypes: as the `scores` config section.
    example_ids: int `[N]` distinct ids (default `arange(N)`).
    num_classes: C (default `max(y) + 1`).
    member_ids: the members' ids `[R]` (default `0..R-1`), recorded in meta["member_ids"].
    member_chunk: members per vmapped chunk (0 = the engine's default; use the training's for
      scores equal bit for bit to a jaxdiff run's).
    num_devices: shard the members over this many devices (0 = all).
    arch: architecture label (meta["arch"], the analysis's name for the set).
    dataset: dataset name (meta["dataset"]).
    progress: log each stage (absl INFO, as training's final scoring does).

  Returns:
    the stored scores `{name: float32 [R, N]}`, higher = harder (`scores.NEGATED` negated).

  Raises:
    ValueError naming the bad value (params not stacked or of mixed structures, an apply_fn whose
    output is not `[B, C]`, representation scores without features, bad labels or options), and
    nothing is written.
  """
  groups = check_groups(scores)
  stacked = _stack_members(params)
  num_runs = S.point.num_members(stacked)
  x = np.asarray(x)
  y = np.asarray(y)
  if y.ndim != 1 or x.ndim < 1 or x.shape[0] != y.shape[0] or not y.size:
    raise ValueError(f"x {x.shape} and y {y.shape} must hold the same N > 0 examples ([N, ...] "
                     "and [N])")
  if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
    raise ValueError(f"y must hold int labels >= 0; got dtype {y.dtype}, min {y.min()}")
  num_classes = int(num_classes or int(y.max()) + 1)
  if int(y.max()) >= num_classes:
    raise ValueError(f"label {int(y.max())} is out of range for num_classes={num_classes}")
  ids = np.arange(y.size, dtype=np.int64) if example_ids is None else np.asarray(example_ids)
  if (ids.shape != y.shape or not np.issubdtype(ids.dtype, np.integer)
      or np.unique(ids).size != ids.size):
    raise ValueError(f"example_ids must be {y.size} distinct ints; got shape {ids.shape}, "
                     f"dtype {ids.dtype}")
  member_ids = (np.arange(num_runs) if member_ids is None
                else np.asarray(list(member_ids), np.int64))
  if member_ids.shape != (num_runs,) or np.unique(member_ids).size != num_runs:
    raise ValueError(f"member_ids {member_ids.tolist()}: need {num_runs} distinct ids")
  if os.path.exists(os.path.join(out_dir, "config.json")):
    raise WorkdirError(f"{out_dir!r} is a training workdir (it has config.json): score its "
                       "checkpoints with score_workdir (experiments/score.py), or choose "
                       "another out_dir")
  opts = {"chunk_size": chunk_size, "grand": "grand" in groups, "grand_method": grand_method,
          "representation": "representation" in groups, "knn_k": knn_k,
          "knn_reference": knn_reference,
          "num_prototypes": num_prototypes, "vog": False, "minibatch": False}
  recording.validate(opts)
  # A Flax variables dict is passed as it is (GraNd differentiates its "params"); any other
  # pytree is the "params" of one.
  wrapped = not (isinstance(stacked, Mapping) and "params" in stacked)
  variables = {"params": stacked} if wrapped else stacked
  fn = _normalized_apply(apply_fn, features_fn, wrapped)
  member0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), variables)
  _check_apply(apply_fn, fn, member0, x, num_classes, "representation" in groups)
  diverged = np.zeros(num_runs, bool)
  for leaf in jax.tree_util.tree_leaves(variables):
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.inexact):
      diverged |= ~np.isfinite(a.reshape(num_runs, -1)).all(1)

  engine = _GivenEngine(fn, optax.identity(), mesh=ens.make_mesh(num_runs, num_devices),
                        member_chunk=member_chunk)
  engine.resolve(variables)  # member strategy and chunk
  state = ens.MemberState(params=engine.shard(jax.tree_util.tree_map(jnp.asarray, variables)),
                          batch_stats={}, opt_state=(), diverged=jnp.asarray(diverged),
                          diverged_step=jnp.full(num_runs, -1, jnp.int32),
                          lr_scale=jnp.ones(num_runs, jnp.float32))
  kind = {2: "signal", 4: "image"}.get(x.ndim, f"[N{', ...' * (x.ndim - 1)}]")
  ds = data_lib.Dataset(name=dataset, x_train=x, y_train=y.astype(np.int32), x_test=x,
                        y_test=y.astype(np.int32), num_classes=num_classes, kind=kind,
                        example_ids=ids.astype(np.int64), y_train_clean=y.astype(np.int32),
                        noise_mask=np.zeros(y.size, bool), source={"name": dataset})
  recorder = recording.Recorder(opts, engine, ds, num_runs, member_ids=member_ids,
                                progress=progress)
  with workdir_lib.lock(out_dir):
    if progress:
      logging.info("scoring %d members trained elsewhere on %d examples: %s", num_runs, y.size,
                   ", ".join(groups))
    final, ensemble_scores = recorder.finalize(
        state, only={g for g in groups if g in ("grand", "representation")})
    keep = set(S.registry.names(*[g for g in groups if g != "input_grad"]))
    final = {k: v for k, v in final.items() if k in keep}
    if "input_grad" in groups:
      final["input_grad_norm"] = _input_grad_scores(recorder, state, progress).astype(np.float32)
    options = {k: opts[k] for k in ("chunk_size", "grand_method", "knn_k", "knn_reference",
                                    "num_prototypes")}
    meta = {"dataset": dataset, "dataset_fingerprint": ds.fingerprint(), "arch": arch,
            "member_ids": member_ids.tolist(), "diverged": diverged.tolist(),
            "orientation": ("higher is harder: scores whose natural value is higher-is-easier "
                            "are stored negated (listed in 'negated')"),
            "negated": sorted(k for k in final if S.registry.is_negated(k)),
            "posthoc": {k: {"group": S.registry.ENTRIES[k].family, "options": options,
                            "by": "jaxdiff.posthoc.score_members"} for k in final}}
    if "input_grad_norm" in final:
      meta["definitions"] = {"input_grad_norm": INPUT_GRAD_NORM}
    logits = recorder.final_logits
    if logits is not None and logits.nbytes < 2**30:
      store.atomic_save_npy(workdir_lib.path(out_dir, "logits"), logits.astype(np.float32))
    if ensemble_scores:
      buf = io.BytesIO()
      np.savez(buf, **{k: np.asarray(v) for k, v in ensemble_scores.items()})
      store.atomic_write_bytes(workdir_lib.path(out_dir, "ensemble_scores"), buf.getvalue())
    store.save_scores(workdir_lib.scores_dir(out_dir), final, example_ids=ids, labels=y,
                      meta=meta)
    if progress:
      logging.info("wrote %d scores of %d members to %s", len(final), num_runs,
                   workdir_lib.scores_dir(out_dir))
  return final

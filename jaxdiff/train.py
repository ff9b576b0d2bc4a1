"""The training loop: epochs over an ensemble, evaluation, checkpoints, logs and score recording.

`train_and_evaluate(config, workdir)` is what `experiments/train.py` and the notebooks call.
Rerunning it on the same workdir resumes from the latest Orbax checkpoint and gives the same result
as an uninterrupted run; a workdir written with a different config is refused.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
import time
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import checkpoints
from jaxdiff import config as config_lib
from jaxdiff import data as data_lib
from jaxdiff import distributed
from jaxdiff import ensemble as ens
from jaxdiff import models
from jaxdiff import recording
from jaxdiff import scores as scores_lib
from jaxdiff import store
from jaxdiff import user_models
from jaxdiff import workdir as workdir_lib

# Config fields that may change between a run and its resumption without changing its numbers.
# member_chunk, member_strategy and epoch_loop change the programs members run through, so
# their rounding: a resumed run would drift from one never stopped; so does memory_budget_bytes,
# which sizes the chunks. (A workdir older than a field resumes while the field keeps its
# default: check_workdir.)
RESUME_SAFE_FIELDS = frozenset({"checkpoint_every", "progress", "num_devices", "cpu_devices",
                                "eval_chunk_size", "scores.chunk_size"})


class _QuietOrbax:
  """Drops Orbax's per-checkpoint INFO chatter from absl logs (warnings still pass)."""

  def filter(self, record):
    return record.levelno >= 30 or "orbax" not in record.pathname


logging.get_absl_logger().addFilter(_QuietOrbax())


class ConfigError(ValueError):
  """Invalid configuration, or a workdir that belongs to another configuration."""


class DivergenceError(RuntimeError):
  """Every member of the ensemble diverged."""


CheckpointError = checkpoints.CheckpointError  # where callers have caught it


def flatten_config(d: Mapping[str, Any], prefix="") -> dict:
  """Nested config dict -> {"a.b.c": value}, tuples as lists (as JSON reads them back)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks sizes and names before any work; errors name the value and the valid range."""
  unknown = config_lib.unknown_fields(config)
  if unknown:
    raise ConfigError("; ".join(unknown))
  for field in ("num_runs", "batch_size", "num_epochs"):
    v = config.get(field)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ConfigError(f"config.{field}={v!r}: must be a positive integer")
  for field in ("checkpoint_every", "first_member", "cpu_devices", "member_chunk",
                "memory_budget_bytes"):
    v = config.get(field, 0)
    if not isinstance(v, int) or v < 0:
      raise ConfigError(f"config.{field}={v!r}: must be a non-negative integer")
  try:
    models.check_name(config.model.get("name"))  # built in, or "package.module:factory"
  except ValueError as e:
    raise ConfigError(str(e)) from e
  ens.make_optimizer(config.optim, 1, 1)  # raises on unknown names / bad values
  for field, valid in (("member_strategy", ens.MEMBER_STRATEGIES), ("epoch_loop", ens.EPOCH_LOOPS)):
    if config.get(field, "auto") not in valid:
      raise ConfigError(f"config.{field}={config.get(field)!r}; valid: {', '.join(valid)}")
  try:
    recording.validate(config.get("scores", {}), num_epochs=config.num_epochs)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  optim = config.optim
  milestones = list(optim.get("milestones", ()) or ())
  if optim.get("schedule", "constant") == "step" and not all(0 < m < 1 for m in milestones):
    raise ConfigError(f"optim.milestones={milestones}: fractions of training, each in (0, 1)")
  warmup = optim.get("warmup_epochs", 0) or 0
  if not isinstance(warmup, int) or warmup < 0 or warmup >= config.num_epochs:
    raise ConfigError(f"optim.warmup_epochs={warmup!r}: must be an integer in "
                      f"[0, num_epochs={config.num_epochs})")


def check_workdir(workdir: str, config: ml_collections.ConfigDict, write: bool = True
                  ) -> dict | None:
  """Writes config.json in a new workdir; refuses a workdir written by another config.

  The `scores` section alone may change on a finished workdir (trained to `num_epochs`, scores
  written): the scores it changes are then computed from the final checkpoint, and config.json
  is rewritten once they are. Options recorded during training (`recording.RECORDED_IN_TRAINING`)
  cannot change after it.

  Returns:
    None, or for such a change `{"groups": score groups to compute, "drop": stored scores they
    replace}`. With `write=False` (the other processes of a multi-process run, once the primary
    has checked and written) nothing is written.
  """
  path = workdir_lib.path(workdir, "config")
  resolved = json.loads(config.to_json_best_effort())
  rescore = None
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConfigError(f"{path} is corrupt ({e}); remove the workdir or fix the file") from e
    a, b = flatten_config(old), flatten_config(resolved)
    # A field the workdir's config predates counts as unchanged while it keeps its default.
    table = flatten_config(json.loads(config_lib.defaults().to_json_best_effort()))
    a.update({k: table[k] for k in set(b) - set(a) if k in table and b[k] == table[k]})
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUME_SAFE_FIELDS)
    describe = lambda keys: "; ".join(f"{k}: workdir has {a.get(k)!r}, config has {b.get(k)!r}"
                                      for k in keys[:8])
    if any(not k.startswith("scores.") for k in diff):
      raise ConfigError(f"workdir {workdir!r} was written by a different config ({describe(diff)})."
                        " Use a new --workdir, or the original config to resume.")
    if diff:
      rescore = _rescore_plan(workdir, config, diff, describe)
  if not write:
    return rescore
  os.makedirs(workdir, exist_ok=True)
  # Temporaries of writes cut short by a kill (checkpoints/ is Orbax's to manage).
  for stale in store.remove_stale_temporaries(workdir, skip=(workdir_lib.FILES["checkpoints"],)):
    logging.info("removed %s, left by an interrupted run", stale)
  if rescore is None:
    store.atomic_write_json(path, resolved)
  return rescore


def _rescore_plan(workdir, config, diff, describe) -> dict:
  """What a change of the `scores` section on a finished workdir recomputes (see check_workdir)."""
  if (config.num_epochs not in workdir_lib.saved_epochs(workdir)
      or not workdir_lib.scores_complete(workdir)):
    raise ConfigError(f"workdir {workdir!r} was written with other score options "
                      f"({describe(diff)}) and is not finished: resume it with its own config "
                      "first; the scores section may change once training is done")
  options = [k.split(".", 1)[1].split(".")[0] for k in diff]
  fixed = [k for k, o in zip(diff, options) if o in recording.RECORDED_IN_TRAINING]
  if fixed:
    raise ConfigError(f"{describe(fixed)}: these scores are recorded during training and cannot "
                      "change on a trained workdir; use a new --workdir")
  groups = {recording.OPTION_GROUPS[o] for o in options if recording.OPTION_GROUPS.get(o)}
  drop = {name for g in groups for name in recording.GROUP_SCORES[g]}
  logging.info("scores section changed (%s): computing %s from the final checkpoint",
               describe(diff), sorted(groups) or "nothing")
  return {"groups": groups, "drop": drop}


def validate_against_data(config: ml_collections.ConfigDict, ds: data_lib.Dataset) -> None:
  """Checks the options whose valid range depends on the data, before the first step (a value
  that only fails in the final scoring would cost the whole training)."""
  n = ds.num_train
  if config.batch_size > n:
    raise ConfigError(f"batch_size={config.batch_size} exceeds the {n} training examples")
  opts = {**recording.DEFAULTS, **dict(config.get("scores", {}) or {})}
  if opts["representation"]:
    if int(opts["knn_k"]) >= n:
      raise ConfigError(f"scores.knn_k={opts['knn_k']}: must be below the {n} training examples "
                        "(the k-NN probes of prediction depth leave each example out); or set "
                        "scores.representation=False")
    k = int(opts["num_prototypes"]) or ds.num_classes
    if k > n:
      what = (f"scores.num_prototypes={opts['num_prototypes']}" if opts["num_prototypes"] else
              f"scores.num_prototypes=0 (= the {ds.num_classes} classes of labels 0.."
              f"{ds.num_classes - 1})")
      raise ConfigError(f"{what}: k-means needs at most one cluster per training example, and "
                        f"the data has {n}; set scores.num_prototypes <= {n}")


LOCK_FILE = workdir_lib.LOCK_FILE
read_metrics = workdir_lib.read_metrics


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """`workdir.lock`: refuses a workdir that another live run holds with a ConfigError."""
  with contextlib.ExitStack() as held:
    try:
      held.enter_context(workdir_lib.lock(workdir))
    except workdir_lib.WorkdirInUseError as e:
      raise ConfigError(str(e)) from e
    yield


def _progress(epoch, num_epochs, records, seconds, enabled):
  test = np.array([r["test_acc"] for r in records if not r["diverged"]] or [np.nan])
  train = np.array([r["train_loss"] for r in records if not r["diverged"]] or [np.nan])
  ndiv = sum(r["diverged"] for r in records)
  width = 20
  done = int(width * epoch / num_epochs)
  msg = (f"[{'=' * done}{' ' * (width - done)}] epoch {epoch}/{num_epochs}  "
         f"train loss {np.mean(train):.4f}  test acc {np.mean(test):.4f} +- {np.std(test):.4f}  "
         f"{seconds:.2f}s/epoch" + (f"  diverged {ndiv}" if ndiv else ""))
  if enabled:
    print(msg, file=sys.stderr, flush=True)
  else:
    logging.info(msg)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       arrays: Mapping[str, np.ndarray] | None = None, model: Any = None) -> dict:
  """Trains `config.num_runs` members, records scores and writes everything to `workdir`.

  Args:
    config: see experiments/configs/default.py.
    workdir: output directory (created; resumed when it holds a checkpoint of the same config).
    arrays: training data for `config.data.name == "arrays"`.
    model: your own `flax.linen.Module`, or a factory `(model_config, num_classes, input_shape)
      -> Module`, instead of `config.model.name` (which the run then records as
      "python:<qualified name>"; see jaxdiff/user_models.py).

  Returns:
    a summary dict: final per-member test accuracy `[R]`, diverged `[R]`, dataset fingerprint.

  Raises:
    ConfigError: a bad config, a workdir of another config, or one another live run holds.
  """
  with contextlib.ExitStack() as held:  # the workdir's lock, once taken
    return _train_and_evaluate(config, workdir, arrays, held, model)


@dataclasses.dataclass
class Run:
  """Everything a config builds before its first step (`setup`).

  Attributes:
    config: the validated config.
    ds: the dataset (after label noise).
    model: the Flax module.
    engine: the ensemble engine (devices, member chunks, strategy resolved).
    member_ids: int `[R]`, the members' ids (`first_member` ..).
    fractions: float `[R]`, each member's training-subset fraction.
    subset_mask: bool `[R, N]` of the examples each member trains on, or None (all).
    steps_per_epoch: optimiser steps per epoch.
    state: the initial MemberState `[R]`, laid out on the engine's devices.
    recorder: the score recorder, its accumulators laid out likewise.
    data_keys, aug_keys: `[R]` per-member keys of data order and augmentation.
  """
  config: ml_collections.ConfigDict
  ds: data_lib.Dataset
  model: Any
  engine: ens.Engine
  member_ids: np.ndarray
  fractions: np.ndarray
  subset_mask: np.ndarray | None
  steps_per_epoch: int
  state: ens.MemberState
  recorder: recording.Recorder
  data_keys: jax.Array
  aug_keys: jax.Array

  @property
  def num_runs(self) -> int:
    return int(self.member_ids.size)

  def target(self) -> dict:
    """The checkpointed pytree of this run, as restore targets."""
    return {"state": self.state, "recorder": self.recorder.state}


def setup(config: ml_collections.ConfigDict, arrays: Mapping[str, np.ndarray] | None = None,
          workdir: str | None = None, model: Any = None) -> Run:
  """Validates `config` (also against its data) and builds the run's data, model, engine and
  initial state, as training does before its first step (`model`: see train_and_evaluate)."""
  if model is not None and not str(config.model.get("name")).startswith("python:"):
    config = copy.deepcopy(config)
    config.model.name = user_models.label(model)
  validate_config(config)
  ds = data_lib.load_dataset(config.data, arrays)
  validate_against_data(config, ds)
  need_features = bool({**recording.DEFAULTS, **dict(config.get("scores", {}) or {})}
                       ["representation"])
  try:
    model = models.build_model(config.model, ds.num_classes, ds.x_train[:2], model=model,
                               need_features=need_features)
  except user_models.ModelError as e:
    raise ConfigError(str(e)) from e
  num_runs, bs, num_epochs = config.num_runs, config.batch_size, config.num_epochs
  member_ids = np.arange(config.get("first_member", 0), config.get("first_member", 0) + num_runs)
  fractions = member_fractions(config.get("subset_fraction", 1.0), member_ids)
  if np.all(fractions == 1.0):
    subset_mask, steps_per_epoch = None, ds.num_train // bs
  else:
    subset_mask = data_lib.subset_masks(config.seed, member_ids, fractions, ds.num_train)
    smallest = int(subset_mask.sum(1).min())
    if smallest < bs:
      raise ConfigError(f"subset_fraction={config.subset_fraction} leaves a member {smallest} "
                        f"training examples, fewer than batch_size={bs}")
    steps_per_epoch = smallest // bs
  tx = ens.make_optimizer(config.optim, steps_per_epoch, num_epochs)
  mesh = ens.make_mesh(num_runs, config.get("num_devices", 0))
  engine = ens.Engine(model, tx, augment=bool(config.get("augment", False)) and ds.kind == "image",
                      member_strategy=config.get("member_strategy", "auto"),
                      epoch_loop=config.get("epoch_loop", "auto"), mesh=mesh,
                      member_chunk=config.get("member_chunk", 0),
                      memory_budget=config.get("memory_budget_bytes", 0))
  init_keys, data_keys, aug_keys = ens.member_keys(config.seed, member_ids)
  scales = list(config.optim.get("member_lr_scale", ()) or ())
  state = engine.init(init_keys, ds.x_train[:1], np.asarray(scales) if scales else None)
  recorder = recording.Recorder(config.get("scores", {}), engine, ds, num_runs,
                                workdir if distributed.is_primary() else None,
                                member_ids=member_ids, progress=bool(config.get("progress", True)))
  recorder.state = engine.place(recorder.state, num_runs)
  return Run(config=config, ds=ds, model=model, engine=engine, member_ids=member_ids,
             fractions=fractions, subset_mask=subset_mask, steps_per_epoch=steps_per_epoch,
             state=state, recorder=recorder, data_keys=engine.shard(data_keys),
             aug_keys=engine.shard(aug_keys))


def restore(run: Run, workdir: str, epoch: int | None = None):
  """The checkpoint of `epoch` (the newest if None) of `workdir`, laid out as `run`'s state, on
  any device count; its checksums are verified first.

  Returns:
    (epoch, MemberState `[R]`, recorder state).

  Raises:
    CheckpointError: no such checkpoint (naming the saved epochs), or it cannot be read.
  """
  target = run.target()
  epoch, restored = checkpoints.restore_epoch(workdir, target, epoch)
  return epoch, *_place_restored(run, restored, target)


def _place_restored(run: Run, restored, target):
  """Every restored array where the array it replaces lives (Orbax restores onto the target's
  shardings, but a leaf can come back committed to one device, and a sharded run then fails)."""
  state = run.engine.place(restored["state"], run.num_runs)
  rec = jax.tree_util.tree_map(_like, restored["recorder"], target["recorder"])
  return state, run.engine.place(rec, run.num_runs)


def _train_and_evaluate(config, workdir, arrays, held: contextlib.ExitStack, model=None) -> dict:
  run = setup(config, arrays, workdir, model)
  config = run.config  # with a Python model, its "python:..." name
  ds, engine, recorder = run.ds, run.engine, run.recorder
  num_runs, bs, num_epochs = config.num_runs, config.batch_size, config.num_epochs
  steps_per_epoch, data_keys, aug_keys = run.steps_per_epoch, run.data_keys, run.aug_keys
  state = run.state
  x_train, y_train = engine.replicate(jnp.asarray(ds.x_train)), engine.replicate(jnp.asarray(ds.y_train))
  mask_dev = None if run.subset_mask is None else engine.shard(jnp.asarray(run.subset_mask))
  primary = distributed.is_primary()  # the process that writes (every process in one alone)

  def check():  # the lock and config.json: the primary's, only once everything above validated
    if primary:
      held.enter_context(workdir_lock(workdir))
    return check_workdir(workdir, config, write=primary)
  rescore = distributed.run_primary_first("checking the workdir", check)

  ckpts = checkpoints.Checkpoints(workdir)
  start_epoch = 0
  target = run.target()
  restored_epoch, restored = ckpts.restore_newest(target)
  if restored is not None:
    start_epoch = restored_epoch
    state, recorder.state = _place_restored(run, restored, target)
    logging.info("resumed %s from epoch %d", workdir, start_epoch)
  log = workdir_lib.MetricsLog(workdir, start_epoch, write=primary)
  if start_epoch == num_epochs and rescore is None and workdir_lib.scores_complete(workdir):
    logging.info("%s is complete (%d epochs trained, scores written): nothing to do", workdir,
                 num_epochs)
    _progress_done(workdir, config.get("progress", True))
    return _summary(run, state, log)
  every = config.get("checkpoint_every", 1) or num_epochs

  for epoch in range(start_epoch + 1, num_epochs + 1):
    t0 = time.perf_counter()
    idx = engine.shard(data_lib.epoch_permutations(data_keys, epoch, ds.num_train, bs, mask_dev,
                                                   steps_per_epoch))
    state, seen = engine.train_epoch(state, x_train, y_train, idx, aug_keys,
                                     (epoch - 1) * steps_per_epoch)
    records = recorder.on_epoch(epoch, state, idx, seen)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    log.write(records)
    _progress(epoch, num_epochs, records, seconds, config.get("progress", True) and primary)
    diverged = distributed.gather(state.diverged)
    if diverged.all():
      raise DivergenceError(
          f"all {num_runs} members diverged (non-finite loss) by epoch {epoch}; first at steps "
          f"{distributed.gather(state.diverged_step).tolist()}. Lower optim.lr={config.optim.lr}?")
    if epoch % every == 0 or epoch == num_epochs:
      ckpts.save(epoch, {"state": state, "recorder": recorder.state})
  ckpts.finish()

  if rescore is not None and start_epoch == num_epochs and workdir_lib.scores_complete(workdir):
    # A finished workdir whose scores section changed: only the changed score groups.
    kept = workdir_lib.load_scores(workdir).scores
    final, ensemble_scores = recorder.finalize(state, only=rescore["groups"])
    final = {**{k: v for k, v in kept.items() if k not in rescore["drop"]}, **final}
    logging.info("computed %s from the final checkpoint", sorted(rescore["groups"]) or "nothing")
  else:
    final, ensemble_scores = recorder.finalize(state)
  # Gathered on every process (a collective) before the primary alone writes.
  state = state.replace(diverged=distributed.gather(state.diverged),
                        diverged_step=distributed.gather(state.diverged_step))
  if primary:
    write_scores(run, workdir, state, final, ensemble_scores)
    if rescore is not None:
      store.atomic_write_json(workdir_lib.path(workdir, "config"),
                              json.loads(config.to_json_best_effort()))
  distributed.barrier("scores written")  # every process returns once the workdir is complete
  return _summary(run, state, log)


def write_scores(run: Run, workdir: str, state, final: Mapping[str, np.ndarray],
                 ensemble_scores: Mapping[str, np.ndarray]) -> None:
  """Writes the score store (`<workdir>/scores`), subset mask, final logits, ensemble scores and
  noise mask of a finished run."""
  config, ds = run.config, run.ds
  meta = {"dataset": ds.name, "dataset_fingerprint": ds.fingerprint(),
          "arch": workdir_lib.arch_label(config), "seed": config.seed,
          "member_ids": run.member_ids.tolist(), "num_epochs": config.num_epochs,
          "diverged": distributed.gather(state.diverged).tolist(),
          "diverged_step": distributed.gather(state.diverged_step).tolist(),
          "subset_fractions": run.fractions.tolist()}
  meta["orientation"] = ("higher is harder: scores whose natural value is higher-is-easier are "
                         "stored negated (listed in 'negated')")
  # Scores at other epochs (`loss_e10`, experiments/score.py) keep their score's orientation.
  meta["negated"] = sorted(k for k in final if scores_lib.registry.is_negated(k))
  if workdir_lib.scores_complete(workdir):  # kept: what experiments/score.py recorded of its scores
    old_meta = store.read_meta(workdir_lib.scores_dir(workdir))  # the meta alone, no arrays
    meta.update({k: old_meta[k] for k in ("posthoc", "definitions") if k in old_meta})
  store.save_scores(workdir_lib.scores_dir(workdir), dict(final), example_ids=ds.example_ids,
                    labels=ds.y_train, meta=meta)
  store.atomic_save_npy(workdir_lib.path(workdir, "subset_mask"),
                        np.ones((run.num_runs, ds.num_train), bool) if run.subset_mask is None
                        else run.subset_mask)
  logits = run.recorder.final_logits
  if logits is not None and logits.nbytes < 2**30:
    store.atomic_save_npy(workdir_lib.path(workdir, "logits"), logits.astype(np.float32))
  if ensemble_scores:  # one value per example, over the non-diverged members
    store.atomic_write_bytes(workdir_lib.path(workdir, "ensemble_scores"),
                             _npz_bytes(ensemble_scores))
  if ds.noise_mask.any():
    store.atomic_save_npy(workdir_lib.path(workdir, "noise_mask"), ds.noise_mask)
  if getattr(ds, "source_ids", None) is not None:  # ids in the source dataset (tfds, digits)
    store.atomic_save_npy(workdir_lib.path(workdir, "source_ids"), np.asarray(ds.source_ids))


def _summary(run: Run, state, log) -> dict:
  test_acc = np.array([r["test_acc"] for r in log.last_epoch()])
  return {"test_acc": test_acc, "scoring_seconds": run.recorder.timings,
          "diverged": distributed.gather(state.diverged), "state": state,
          "dataset": run.ds.fingerprint(), "engine": run.engine}


def _progress_done(workdir, enabled):
  msg = f"{workdir} is complete: nothing to do (a new --workdir trains again)"
  if enabled:
    print(msg, file=sys.stderr, flush=True)


def member_fractions(subset_fraction, member_ids: np.ndarray) -> np.ndarray:
  """Training-subset fraction of each member: one value, or a tuple assigned by member id
  (cyclically), so member i keeps its fraction in any ensemble that contains it."""
  values = (np.atleast_1d(np.asarray(subset_fraction, np.float64))
            if not isinstance(subset_fraction, str) else None)
  if values is None or values.size == 0 or not np.all((values > 0) & (values <= 1)):
    raise ConfigError(f"subset_fraction={subset_fraction!r}: need a fraction in (0, 1] or a "
                      "tuple of them")
  return values[np.asarray(member_ids) % values.size]


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  return buf.getvalue()


def _like(restored, live):
  """A restored leaf as the kind of array the live leaf is (host NumPy stays NumPy)."""
  return restored if isinstance(live, jax.Array) else np.asarray(restored)

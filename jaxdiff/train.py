"""The training loop: epochs over an ensemble, evaluation, checkpoints, logs and score recording.

`train_and_evaluate(config, workdir)` is what `experiments/train.py` and the notebooks call.
Rerunning it on the same workdir resumes from the latest Orbax checkpoint and gives the same result
as an uninterrupted run; a workdir written with a different config is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Mapping

try:
  import fcntl
except ImportError:  # Windows
  fcntl = None

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxdiff import checksums
from jaxdiff import data as data_lib
from jaxdiff import ensemble as ens
from jaxdiff import models
from jaxdiff import recording
from jaxdiff import scores as scores_lib
from jaxdiff import store

# Config fields that may change between a run and its resumption without changing its numbers.
RESUME_SAFE_FIELDS = frozenset({"checkpoint_every", "progress", "num_devices", "cpu_devices",
                                "member_strategy", "member_chunk",
                                "epoch_loop", "eval_chunk_size", "scores.chunk_size"})


class _QuietOrbax:
  """Drops Orbax's per-checkpoint INFO chatter from absl logs (warnings still pass)."""

  def filter(self, record):
    return record.levelno >= 30 or "orbax" not in record.pathname


logging.get_absl_logger().addFilter(_QuietOrbax())


class ConfigError(ValueError):
  """Invalid configuration, or a workdir that belongs to another configuration."""


class DivergenceError(RuntimeError):
  """Every member of the ensemble diverged."""


class CheckpointError(RuntimeError):
  """The workdir has checkpoints, but none of them can be read back."""


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
  for field in ("num_runs", "batch_size", "num_epochs"):
    v = config.get(field)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ConfigError(f"config.{field}={v!r}: must be a positive integer")
  for field in ("checkpoint_every", "first_member", "cpu_devices", "member_chunk"):
    v = config.get(field, 0)
    if not isinstance(v, int) or v < 0:
      raise ConfigError(f"config.{field}={v!r}: must be a non-negative integer")
  if config.model.get("name") not in models.MODELS:
    raise ConfigError(f"unknown architecture {config.model.get('name')!r}; valid: "
                      f"{', '.join(sorted(models.MODELS))}")
  ens.make_optimizer(config.optim, 1, 1)  # raises on unknown names / bad values
  for field, valid in (("member_strategy", ens.MEMBER_STRATEGIES), ("epoch_loop", ens.EPOCH_LOOPS)):
    if config.get(field, "auto") not in valid:
      raise ConfigError(f"config.{field}={config.get(field)!r}; valid: {', '.join(valid)}")
  recording.validate(config.get("scores", {}))


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json in a new workdir; refuses a workdir written by another config."""
  path = os.path.join(workdir, "config.json")
  resolved = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ConfigError(f"{path} is corrupt ({e}); remove the workdir or fix the file") from e
    a, b = flatten_config(old), flatten_config(resolved)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUME_SAFE_FIELDS)
    if diff:
      details = "; ".join(f"{k}: workdir has {a.get(k)!r}, config has {b.get(k)!r}" for k in diff[:8])
      raise ConfigError(f"workdir {workdir!r} was written by a different config ({details}). "
                        "Use a new --workdir, or the original config to resume.")
  os.makedirs(workdir, exist_ok=True)
  # Temporaries of writes cut short by a kill (checkpoints/ is Orbax's to manage).
  for stale in store.remove_stale_temporaries(workdir, skip=("checkpoints",)):
    logging.info("removed %s, left by an interrupted run", stale)
  store.atomic_write_json(path, resolved)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive `flock` on `<workdir>/.lock` while a run writes the workdir.

  A second run on the same workdir (a notebook cell run twice, two shells) would interleave
  checkpoints, metrics and scores, and delete the first's temporaries as stale; it is refused
  instead. The kernel releases the lock when its holder exits, however it dies (SIGKILL too), so
  a killed run never blocks its resumption. Without `fcntl` (Windows) nothing is locked.
  """
  os.makedirs(workdir, exist_ok=True)
  if fcntl is None:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      raise ConfigError(f"workdir {workdir!r} is in use by another running job (it holds a lock "
                        f"on {path}); wait for it to finish, or use another --workdir") from e
    yield
  finally:
    os.close(fd)  # releases the lock


class _MetricsLog:
  """metrics.jsonl: rewritten atomically each epoch, so a kill never leaves half a line, and a
  resumed run drops epochs after its checkpoint."""

  def __init__(self, path: str, resume_epoch: int):
    self.path = path
    self.lines = []
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            rec = json.loads(line)
          except json.JSONDecodeError:
            continue
          if rec.get("epoch", 0) <= resume_epoch:
            self.lines.append(line.rstrip("\n"))

  def write(self, records):
    self.lines += [json.dumps(r, sort_keys=True) for r in records]
    store.atomic_write_text(self.path, "\n".join(self.lines) + "\n")


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
                       arrays: Mapping[str, np.ndarray] | None = None) -> dict:
  """Trains `config.num_runs` members, records scores and writes everything to `workdir`.

  Args:
    config: see experiments/configs/default.py.
    workdir: output directory (created; resumed when it holds a checkpoint of the same config).
    arrays: training data for `config.data.name == "arrays"`.

  Returns:
    a summary dict: final per-member test accuracy `[R]`, diverged `[R]`, dataset fingerprint.

  Raises:
    ConfigError: a bad config, a workdir of another config, or one another live run holds.
  """
  with contextlib.ExitStack() as held:  # the workdir's lock, once taken
    return _train_and_evaluate(config, workdir, arrays, held)


def _train_and_evaluate(config, workdir, arrays, held: contextlib.ExitStack) -> dict:
  validate_config(config)
  ds = data_lib.load_dataset(config.data, arrays)
  model = models.build_model(config.model, ds.num_classes)

  num_runs, bs, num_epochs = config.num_runs, config.batch_size, config.num_epochs
  if bs > ds.num_train:
    raise ConfigError(f"batch_size={bs} exceeds the {ds.num_train} training examples")
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
                      member_chunk=config.get("member_chunk", 0))
  init_keys, data_keys, aug_keys = ens.member_keys(config.seed, member_ids)
  scales = list(config.optim.get("member_lr_scale", ()) or ())
  state = engine.init(init_keys, ds.x_train[:1], np.asarray(scales) if scales else None)
  data_keys, aug_keys = engine.shard(data_keys), engine.shard(aug_keys)
  x_train, y_train = engine.replicate(jnp.asarray(ds.x_train)), engine.replicate(jnp.asarray(ds.y_train))
  mask_dev = None if subset_mask is None else engine.shard(jnp.asarray(subset_mask))
  recorder = recording.Recorder(config.get("scores", {}), engine, ds, num_runs, workdir,
                                member_ids=member_ids)
  recorder.state = engine.place(recorder.state, num_runs)
  held.enter_context(workdir_lock(workdir))  # only once everything above has validated
  check_workdir(workdir, config)

  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2,
                                                                              create=True))
  start_epoch = 0
  target = {"state": state, "recorder": recorder.state}
  restored_epoch, restored = _restore_newest_readable(mngr, target, workdir)
  if restored is not None:
    start_epoch = restored_epoch
    # Every restored array where the array it replaces lives (Orbax restores onto the target's
    # shardings, but a leaf can come back committed to one device; a sharded run then fails).
    state = engine.place(restored["state"], num_runs)
    recorder.state = jax.tree_util.tree_map(_like, restored["recorder"], target["recorder"])
    recorder.state = engine.place(recorder.state, num_runs)
    logging.info("resumed %s from epoch %d", workdir, start_epoch)
  log = _MetricsLog(os.path.join(workdir, "metrics.jsonl"), start_epoch)
  every = config.get("checkpoint_every", 1) or num_epochs
  unsealed = None  # the step saved last, whose checksums are not written yet

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
    _progress(epoch, num_epochs, records, seconds, config.get("progress", True))
    diverged = np.asarray(state.diverged)
    if diverged.all():
      raise DivergenceError(
          f"all {num_runs} members diverged (non-finite loss) by epoch {epoch}; first at steps "
          f"{np.asarray(state.diverged_step).tolist()}. Lower optim.lr={config.optim.lr}?")
    if epoch % every == 0 or epoch == num_epochs:
      _seal(mngr, unsealed)  # the previous save, finished by now or waited for here
      mngr.save(epoch, args=ocp.args.StandardSave({"state": state, "recorder": recorder.state}))
      unsealed = epoch
  _seal(mngr, unsealed)

  meta = {"dataset": ds.name, "dataset_fingerprint": ds.fingerprint(),
          "arch": config.get("arch_label") or _arch_label(config.model), "seed": config.seed,
          "member_ids": member_ids.tolist(), "num_epochs": num_epochs,
          "diverged": np.asarray(state.diverged).tolist(),
          "diverged_step": np.asarray(state.diverged_step).tolist(),
          "subset_fractions": fractions.tolist()}
  final, ensemble_scores = recorder.finalize(state)
  meta["orientation"] = ("higher is harder: scores whose natural value is higher-is-easier are "
                         "stored negated (listed in 'negated')")
  meta["negated"] = sorted(set(final) & scores_lib.NEGATED)
  store.save_scores(os.path.join(workdir, "scores"), final, example_ids=ds.example_ids,
                    labels=ds.y_train, meta=meta)
  store.atomic_save_npy(os.path.join(workdir, "subset_mask.npy"),
                        np.ones((num_runs, ds.num_train), bool) if subset_mask is None
                        else subset_mask)
  logits = recorder.final_logits
  if logits is not None and logits.nbytes < 2**30:
    store.atomic_save_npy(os.path.join(workdir, "logits.npy"), logits.astype(np.float32))
  if ensemble_scores:  # one value per example, over the non-diverged members
    store.atomic_write_bytes(os.path.join(workdir, "ensemble_scores.npz"),
                             _npz_bytes(ensemble_scores))
  if ds.noise_mask.any():
    store.atomic_save_npy(os.path.join(workdir, "noise_mask.npy"), ds.noise_mask)
  test_acc = np.array([r["test_acc"] for r in log_last(log)])
  return {"test_acc": test_acc, "scoring_seconds": recorder.timings, "diverged": np.asarray(state.diverged), "state": state,
          "dataset": ds.fingerprint(), "engine": engine}


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


def _seal(mngr: ocp.CheckpointManager, step: int | None) -> None:
  """Waits for the save of `step` (Orbax saves asynchronously) and writes its checksums."""
  mngr.wait_until_finished()
  if step is not None and step in mngr.all_steps():
    checksums.write(os.path.join(str(mngr.directory), str(step)))


def _restore_newest_readable(mngr: ocp.CheckpointManager, target, workdir: str):
  """Restores the newest checkpoint that reads back, falling back to older ones.

  Orbax writes a step atomically, but a file inside it can still be lost, truncated or changed
  later (a disk error, a copy cut short, a flipped bit). Each step's files are checked against
  the SHA-256 recorded once its save finished (`jaxdiff.checksums`; Orbax keeps no checksums of
  array data) and then restored. A step that fails either is moved to
  `<workdir>/corrupt_checkpoints/<step>` (kept for inspection; its step number is then free to be
  written again) and training resumes from the older step, which gives the same final result
  (training is deterministic), only later. A step without checksums (the run was killed between
  Orbax's write and theirs) is trusted if it restores, and gets them then.

  Returns:
    (epoch, restored pytree), or (0, None) when the workdir has no checkpoint.

  Raises:
    CheckpointError naming every step, its path and why it could not be read, when none can.
  """
  failures = []
  for step in sorted(mngr.all_steps(), reverse=True):
    step_dir = os.path.join(str(mngr.directory), str(step))
    try:
      verified = checksums.verify(step_dir)
      restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # pylint: disable=broad-except  (Orbax/tensorstore raise many types)
      failures.append((step, e))
      continue
    if not verified:
      checksums.write(step_dir)
    for bad, e in failures:
      src = os.path.join(str(mngr.directory), str(bad))
      dest = os.path.join(workdir, "corrupt_checkpoints", str(bad))
      while os.path.exists(dest):
        dest += "_"
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      os.replace(src, dest)
      logging.warning("checkpoint of epoch %d is unreadable (%s: %.300s); moved it to %s and "
                      "resumed from epoch %d", bad, type(e).__name__, e, dest, step)
    if failures:
      mngr.reload()
    return int(step), restored
  if failures:
    details = "; ".join(f"epoch {s} ({os.path.join(str(mngr.directory), str(s))}): "
                        f"{type(e).__name__}: {str(e)[:300]}" for s, e in failures)
    raise CheckpointError(
        f"no checkpoint in {mngr.directory} can be read back: {details}. Delete that directory to "
        "train this workdir again from the start (same result, deterministic), or restore it "
        "from a backup.")
  return 0, None


def _like(restored, live):
  """A restored leaf as the kind of array the live leaf is (host NumPy stays NumPy)."""
  return restored if isinstance(live, jax.Array) else np.asarray(restored)


def log_last(log: _MetricsLog):
  recs = [json.loads(l) for l in log.lines]
  last = max(r["epoch"] for r in recs)
  return sorted((r for r in recs if r["epoch"] == last), key=lambda r: r["member"])


def _arch_label(model_config) -> str:
  items = [f"{k}={v}" for k, v in sorted(dict(model_config).items()) if k != "name"]
  return model_config["name"] + (f"({','.join(items)})" if items else "")


def read_metrics(workdir: str):
  """metrics.jsonl as a list of dicts (pandas: `pd.read_json(path, lines=True)`)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]

"""A workdir's checkpoints: saving, sealing, recovering and reading them back.

`Checkpoints(workdir)` is what training uses: Orbax's CheckpointManager (asynchronous saves,
written collectively by every process of a multi-process run), each step sealed with SHA-256
checksums once written (`jaxdiff.checksums`), and on resume the newest step that reads back, the
unreadable ones moved aside. `restore_epoch` reads one step into a live target (post-hoc scoring).

A checkpoint saved with the runs axis sharded over 2 CPU devices records that topology, and
Orbax refuses to restore it without a target elsewhere ("Topology mismatch"). `restore` builds the
target from the checkpoint's own metadata (shapes and dtypes) on the devices at hand.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdiff import checksums
from jaxdiff import distributed
from jaxdiff import workdir as workdir_lib


class CheckpointError(RuntimeError):
  """The workdir has checkpoints, but none of them can be read back."""


class Checkpoints:
  """The checkpoints of a training run in `<workdir>/checkpoints` (the two newest kept)."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.workdir = workdir
    self.mngr = ocp.CheckpointManager(
        workdir_lib.checkpoints_dir(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
    self.unsealed = None  # the step saved last, whose checksums are not written yet

  def save(self, epoch: int, tree: Any) -> None:
    """Starts saving `tree` as step `epoch` (asynchronously), once the previous save is sealed."""
    self._seal()  # the previous save, finished by now or waited for here
    self.mngr.save(epoch, args=ocp.args.StandardSave(tree))
    self.unsealed = epoch

  def finish(self) -> None:
    """Waits for the last save and seals it."""
    self._seal()

  def _seal(self) -> None:
    """Waits for the save of `unsealed` (Orbax saves asynchronously) and writes its checksums."""
    self.mngr.wait_until_finished()
    step, self.unsealed = self.unsealed, None
    distributed.barrier(f"checkpoint {step} saved")  # every process's part of it written
    if step is not None and step in self.mngr.all_steps() and distributed.is_primary():
      checksums.write(workdir_lib.checkpoint_dir(self.workdir, step))


  def restore_newest(self, target: Any) -> tuple[int, Any]:
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
    for step in sorted(self.mngr.all_steps(), reverse=True):
      step_dir = workdir_lib.checkpoint_dir(self.workdir, step)
      try:
        verified = checksums.verify(step_dir)
        restored = self.mngr.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as e:  # pylint: disable=broad-except  (Orbax/tensorstore raise many types)
        failures.append((step, e))
        continue
      if not verified and distributed.is_primary():
        checksums.write(step_dir)
      for bad, e in failures if distributed.is_primary() else ():
        src = workdir_lib.checkpoint_dir(self.workdir, bad)
        dest = workdir_lib.corrupt_checkpoint_dir(self.workdir, bad)
        while os.path.exists(dest):
          dest += "_"
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(src, dest)
        logging.warning("checkpoint of epoch %d is unreadable (%s: %.300s); moved it to %s and "
                        "resumed from epoch %d", bad, type(e).__name__, e, dest, step)
      if failures:
        distributed.barrier(f"unreadable checkpoints moved before epoch {step}")
        self.mngr.reload()
      return int(step), restored
    if failures:
      details = "; ".join(f"epoch {s} ({workdir_lib.checkpoint_dir(self.workdir, s)}): "
                          f"{type(e).__name__}: {str(e)[:300]}" for s, e in failures)
      raise CheckpointError(
          f"no checkpoint in {self.mngr.directory} can be read back: {details}. Delete that "
          "directory to train this workdir again from the start (same result, deterministic), "
          "or restore it from a backup.")
    return 0, None


def item_dir(step_dir: str) -> str:
  """The Orbax item of a step (`<step>/default`, what StandardSave wrote)."""
  return os.path.join(step_dir, "default")


def abstract_target(path: str, sharding: jax.sharding.Sharding | None = None) -> Any:
  """The checkpoint's tree as `jax.ShapeDtypeStruct` leaves placed on `sharding` (default: the
  first local device)."""
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  meta = ocp.StandardCheckpointer().metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  return jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype), sharding=sharding), tree)


def restore(step_dir: str, numpy: bool = True) -> Any:
  """The pytree saved in `<workdir>/checkpoints/<step>` (a dict of nested dicts), on any device
  count; NumPy leaves with `numpy=True`, else arrays on the first local device.

  Raises:
    FileNotFoundError: `step_dir` holds no checkpoint.
  """
  path = item_dir(step_dir)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{step_dir!r} holds no checkpoint (no {path!r})")
  target = abstract_target(path)
  if numpy:  # host arrays of the saved dtypes (device arrays would cast float64 to float32)
    target = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), target)
  return ocp.StandardCheckpointer().restore(path, target)


def restore_epoch(workdir: str, target: Any, epoch: int | None = None) -> tuple[int, Any]:
  """The checkpoint of `epoch` (the newest if None) of `workdir` restored into `target`'s
  shapes and shardings, its checksums verified first.

  Raises:
    CheckpointError: no such checkpoint (naming the saved epochs), or it cannot be read.
  """
  steps = workdir_lib.saved_epochs(workdir)
  if not steps or (epoch is not None and epoch not in steps):
    raise CheckpointError(f"{workdir_lib.checkpoints_dir(workdir)} has no checkpoint of epoch "
                          f"{epoch if epoch else 'any'} (saved epochs: {steps or 'none'})")
  epoch = steps[-1] if epoch is None else epoch
  step_dir = workdir_lib.checkpoint_dir(workdir, epoch)
  try:
    checksums.verify(step_dir)
    restored = ocp.StandardCheckpointer().restore(item_dir(step_dir), target)
  except Exception as e:  # pylint: disable=broad-except  (Orbax/tensorstore raise many types)
    raise CheckpointError(f"checkpoint {step_dir} cannot be read: {type(e).__name__}: "
                          f"{str(e)[:300]}") from e
  return epoch, restored

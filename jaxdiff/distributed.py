"""Multi-process runs on JAX's multi-controller runtime (`jax.distributed`).

One program runs in every process (one per host, or several on one host); the runs axis is
sharded over the devices of all processes, and each process trains the members on its own
devices (`Engine` runs per-device programs over its addressable shards). What is computed on the
host (metrics, scores) is gathered so that every process holds every member's values; the
primary process (index 0) alone writes the workdir's files and holds its lock, and Orbax writes
checkpoints collectively.

    # on each of N hosts (or N processes of one host), process_id = 0 .. N-1:
    python experiments/train.py --config=... --workdir=/shared/run \
        --coordinator_address=host0:12345 --num_processes=N --process_id=i

On SLURM and TPU pods `--distributed` alone lets JAX detect all three (`jax.distributed`'s
cluster detection).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np


class DistributedError(ValueError):
  """Bad multi-process settings, or a coordinator that cannot be reached."""


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               auto: bool = False, timeout_s: int = 60) -> bool:
  """Starts `jax.distributed` when asked; call before any JAX computation.

  Args:
    coordinator_address: "host:port" of process 0's coordinator; "" with `auto` = detected.
    num_processes: processes in the job (> 1), or 0 with `auto`.
    process_id: this process's index in [0, num_processes), or -1 with `auto`.
    auto: let JAX detect the cluster (SLURM, TPU pods, ...) where the three are not given.
    timeout_s: how long to wait for every process to reach the coordinator.

  Returns:
    True if this is now a multi-process run.

  Raises:
    DistributedError: settings that do not fit together, or no coordinator within `timeout_s`.
  """
  explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
  if not explicit and not auto:
    return False
  if explicit:
    missing = [name for name, unset in (("coordinator_address", not coordinator_address),
                                        ("num_processes", num_processes <= 0),
                                        ("process_id", process_id < 0)) if unset]
    if missing and not auto:
      raise DistributedError(f"multi-process run: {', '.join(missing)} not set (set all of "
                             "coordinator_address, num_processes, process_id, or --distributed "
                             "to detect them on SLURM / TPU pods)")
    if num_processes > 0 and not 0 <= process_id < num_processes:
      raise DistributedError(f"process_id={process_id}: need 0 <= process_id < "
                             f"num_processes={num_processes}")
  # CPU devices of different processes talk through gloo (the default has no CPU collectives);
  # harmless where the devices are accelerators.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address and process_id > 0:
    # XLA aborts the process (no Python error) when it cannot register with the coordinator:
    # wait for its port here first, so that a wrong address is one clear error.
    _wait_for_port(coordinator_address, process_id, num_processes, timeout_s)
  kwargs = dict(coordinator_address=coordinator_address or None,
                num_processes=num_processes if num_processes > 0 else None,
                process_id=process_id if process_id >= 0 else None,
                initialization_timeout=int(timeout_s))
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except  (gRPC/XLA raise their own types)
    where = coordinator_address or "the detected coordinator"
    raise DistributedError(
        f"process {process_id if process_id >= 0 else '?'} of "
        f"{num_processes or '?'} could not join the coordinator at {where} within {timeout_s} s "
        f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); check the address and that "
        "every process was started") from e
  return jax.process_count() > 1


def _wait_for_port(address: str, process_id: int, num_processes: int, timeout_s: float) -> None:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedError(f"coordinator_address={address!r}: need host:port")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
            f"process {process_id} of {num_processes} could not reach the coordinator at "
            f"{address} within {timeout_s:g} s ({e.strerror or e}); start process 0 there, or "
            "fix --coordinator_address") from e
      time.sleep(0.2)


def is_primary() -> bool:
  """The process that writes the workdir (process 0; the only one in a single-process run)."""
  return jax.process_index() == 0


def multi_process() -> bool:
  return jax.process_count() > 1


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing to wait for alone)."""
  if multi_process():
    multihost_utils.sync_global_devices(name)


def agree(ok: bool) -> bool:
  """The primary's `ok`, on every process (a decision only the primary can make, e.g. whether
  the workdir is valid, that the others must follow rather than wait forever)."""
  if not multi_process():
    return ok
  return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(ok))))


def run_primary_first(name: str, fn, *args, **kwargs) -> Any:
  """`fn(*args, **kwargs)` on the primary; if it raises, the others raise too (naming `name`)
  instead of waiting at the next collective; then `fn` on the others (which must not write)."""
  if not multi_process():
    return fn(*args, **kwargs)
  result, error = None, None
  if is_primary():
    try:
      result = fn(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except  (re-raised below)
      error = e
  ok = agree(error is None)
  if error is not None:
    raise error
  if not ok:
    raise DistributedError(f"{name} failed on the primary process (process 0): see its error")
  return result if is_primary() else fn(*args, **kwargs)


def gather(tree) -> Any:
  """NumPy copies of a pytree's arrays, each whole on every process (arrays sharded over other
  processes' devices are all-gathered)."""
  return jax.tree_util.tree_map(
      lambda a: concat_processes(a) if isinstance(a, jax.Array) and not a.is_fully_addressable
      else np.asarray(a), tree)


def concat_processes(tree) -> Any:
  """Every process's pieces of a pytree joined along the leading axis, in process order, on every
  process (NumPy leaves). For a global array: the whole array; for per-process host arrays: their
  concatenation."""
  return jax.tree_util.tree_map(
      lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)

"""Kill harness: runs the real `experiments/train.py` as a subprocess and SIGKILLs it on cue.

A cue is a predicate on the workdir (an Orbax `*.orbax-checkpoint-tmp` directory, a `.tmp` file in
scores/, ...) or a wall-clock delay; `check_workdir_sound` verifies what a kill left behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")
DEFAULT_CONFIG = os.path.join(ROOT, "experiments", "configs", "default.py")

# MNIST-1D 400/100, MLP width 16, 6 epochs, a checkpoint every epoch.
TINY_FLAGS = ("--config.num_epochs=6", "--config.data.num_samples=500",
              "--config.model.width=16", "--config.batch_size=50", "--config.checkpoint_every=1",
              "--config.progress=False")
# How the members lie on devices. "split": what users run, the default CPU split (one JAX device
# per core) with the quick start's 16 members, so the runs axis is sharded over 2 devices (8
# members each: one member chunk per device; fewer than 9 members would share one device);
# "single": one device (3 members, cpu_devices=1).
LAYOUTS = {"split": ("--config.num_runs=16",),
           "single": ("--config.num_runs=3", "--config.cpu_devices=1")}


def checkpoint_devices(workdir: str, step: int) -> set[int]:
  """The device ids the parameters of checkpoint `step` were laid out on (Orbax's _sharding)."""
  with open(os.path.join(workdir, "checkpoints", str(step), "default", "_sharding")) as f:
    shardings = json.load(f)
  return {d["id"] for spec in shardings.values()
          for d in json.loads(spec).get("device_mesh", {}).get("mesh", [])}
ORBAX_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
TMP_NAME = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.tmp$")  # store.atomic_write_bytes' temporaries


def train_command(workdir: str, *flags: str, config: str = DEFAULT_CONFIG,
                  layout: str = "split") -> list[str]:
  return [sys.executable, TRAIN, f"--config={config}", f"--workdir={workdir}", *TINY_FLAGS,
          *LAYOUTS[layout], *flags]


def child_env(cache_dir: str, hash_seed: int = 0) -> dict:
  """CPU only; a shared persistent compilation cache (the same executables, so the same numbers,
  minus most of the compile time of every rerun); a per-run PYTHONHASHSEED so that set/dict-order
  nondeterminism across processes would show up as a mismatch."""
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONHASHSEED=str(hash_seed),
              JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=ROOT)


# ----------------------------------------------------------------------------- cues


def _read(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _ls(path):
  try:
    return os.listdir(path)
  except (FileNotFoundError, NotADirectoryError):
    return []


class Cue:
  """Decides, from the workdir and the time since start, when to kill. Subclasses keep state."""
  name = "cue"

  def __call__(self, workdir: str, elapsed: float) -> bool:
    raise NotImplementedError


class Delay(Cue):
  def __init__(self, seconds):
    self.seconds = seconds
    self.name = f"after {seconds:.2f}s"

  def __call__(self, workdir, elapsed):
    return elapsed >= self.seconds


class CheckpointWrite(Cue):
  """Fires while Orbax writes the checkpoint of `step` (its temporary directory exists)."""

  def __init__(self, step):
    self.step = step
    self.name = f"during the epoch-{step} checkpoint write"

  def __call__(self, workdir, elapsed):
    return any((m := ORBAX_TMP.match(n)) and int(m.group(1)) == self.step
               for n in _ls(os.path.join(workdir, "checkpoints")))


class TmpFile(Cue):
  """Fires once the `nth` write (name starting with `prefix`) in `subdir` has begun: its
  `store.atomic_write_bytes` temporary `.<name>.<8 chars>.tmp` was seen. With `count_done`, counts
  distinct files instead, and also files replaced since the run started (a poll can miss a
  temporary that lives a millisecond; counting finished files keeps the cue from never firing)."""

  def __init__(self, subdir, nth, label, prefix="", count_done=False):
    self.subdir, self.nth, self.prefix, self.count_done = subdir, nth, prefix, count_done
    self.started, self.t0 = set(), None
    self.name = f"during {label} (file #{nth})"

  def __call__(self, workdir, elapsed):
    if self.t0 is None:
      self.t0 = time.time() - elapsed
    d = os.path.join(workdir, self.subdir)
    for n in _ls(d):
      m = TMP_NAME.match(n)
      if m and m.group(1).startswith(self.prefix):
        # Distinct files with count_done; otherwise distinct writes (of possibly one file).
        self.started.add(m.group(1) if self.count_done else n)
      elif (self.count_done and not n.startswith(".") and n.startswith(self.prefix)
            and (_mtime(os.path.join(d, n)) or 0) >= self.t0):
        self.started.add(n)
    return len(self.started) >= self.nth


class Watch(Cue):
  """Never fires; records when each entry of the workdir, checkpoints/ and scores/ first appears."""
  name = "none"

  def __init__(self):
    self.first_seen = {}

  def __call__(self, workdir, elapsed):
    for sub in ("", "checkpoints", "scores"):
      for n in _ls(os.path.join(workdir, sub)):
        self.first_seen.setdefault(os.path.join(sub, n), elapsed)
    return False


@dataclasses.dataclass
class Outcome:
  cue: str
  killed: bool           # False: the run ended on its own before the cue fired
  returncode: int
  seconds: float
  landed: str            # where the kill landed, read from the workdir afterwards
  stderr_tail: str


def run(cmd: list[str], env: dict, workdir: str, cue: Cue | None, log_path: str,
        timeout: float = 300.0, poll_s: float = 0.0005) -> Outcome:
  """Runs `cmd`; SIGKILLs it as soon as `cue` fires (never, for cue=None)."""
  t0, wall0 = time.perf_counter(), time.time()
  with open(log_path, "wb") as log:
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    killed = False
    try:
      while p.poll() is None:
        elapsed = time.perf_counter() - t0
        if elapsed > timeout:
          raise TimeoutError(f"{cmd} ran over {timeout}s")
        if cue is not None and cue(workdir, elapsed):
          os.kill(p.pid, signal.SIGKILL)
          killed = True
          break
        time.sleep(poll_s)
    finally:
      if p.poll() is None and not killed:
        p.kill()
      p.wait()
  with open(log_path, "rb") as f:
    tail = f.read()[-3000:].decode("utf-8", "replace")
  return Outcome(cue.name if cue else "none", killed, p.returncode, time.perf_counter() - t0,
                 f"[{phase(workdir, wall0)}] {describe(workdir)}", tail)


# ----------------------------------------------------------------------------- inspection


def _mtime(path):
  try:
    return os.stat(path).st_mtime
  except FileNotFoundError:
    return None


def phase(workdir: str, since: float) -> str:
  """What a run started at wall time `since` had done to the workdir when it stopped.

  Every run rewrites config.json after its imports and data loading, then metrics.jsonl after
  each epoch, then scores/ at the end.
  """
  def touched(rel):
    t = _mtime(os.path.join(workdir, rel))
    return t is not None and t >= since
  if not touched("config.json"):
    return "startup: imports and data, workdir not yet touched"
  sd = os.path.join(workdir, "scores")
  if any(touched(os.path.join("scores", n)) for n in _ls(sd)):
    return "writing scores" if "meta.json" not in _ls(sd) or not touched("scores/meta.json") \
        else "after the score write"
  if touched("metrics.jsonl"):
    return "training: epochs ended in this run"
  return "restore, compile or the first epoch of this run (no epoch ended)"


def describe(workdir: str) -> str:
  """The state of a workdir (what a kill left behind), in words."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return "no config.json yet"
  parts = []
  ck = _ls(os.path.join(workdir, "checkpoints"))
  done = sorted(int(n) for n in ck if n.isdigit())
  tmp = sorted(n for n in ck if ORBAX_TMP.match(n))
  parts.append(f"checkpoints {done}" + (f" + unfinished {tmp}" if tmp else ""))
  try:
    lines = _read(os.path.join(workdir, "metrics.jsonl")).splitlines()
    parts.append(f"metrics to epoch {max(json.loads(l)['epoch'] for l in lines)}")
  except FileNotFoundError:
    parts.append("no metrics")
  except ValueError as e:
    parts.append(f"metrics.jsonl unreadable ({e})")
  sd = os.path.join(workdir, "scores")
  if os.path.isdir(sd):
    names = _ls(sd)
    npy = [n for n in names if n.endswith(".npy") and not n.startswith(".")]
    tmps = [n for n in names if n.endswith(".tmp")]
    state = "complete" if "meta.json" in names else "incomplete (no meta.json)"
    parts.append(f"scores {state}: {len(npy)} .npy" + (f", tmp {tmps}" if tmps else ""))
  root_tmps = [n for n in _ls(workdir) if n.endswith(".tmp")]
  if root_tmps:
    parts.append(f"tmp {root_tmps}")
  return "; ".join(parts)


def output_files(workdir: str, ignore: tuple[str, ...] = ()) -> dict[str, str]:
  """Relative path -> absolute path of every file outside checkpoints/ and the `ignore`d top-level
  folders (temporaries included)."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(workdir):
    rel = os.path.relpath(dirpath, workdir)
    if rel.split(os.sep)[0] in ("checkpoints",) + tuple(ignore):
      dirnames[:] = []
      continue
    for f in filenames:
      out[os.path.normpath(os.path.join(rel, f))] = os.path.join(dirpath, f)
  return out


def checkpoint_steps(workdir: str) -> tuple[list[int], list[str]]:
  """(finished steps, unfinished Orbax temporary directories) under checkpoints/."""
  ck = _ls(os.path.join(workdir, "checkpoints"))
  return sorted(int(n) for n in ck if n.isdigit()), sorted(n for n in ck if ORBAX_TMP.match(n))


def restore_step(workdir: str, step: int):
  """The raw checkpoint pytree (numpy leaves) of `step`, read on this process's devices
  whatever the device count it was saved with."""
  from jaxdiff import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.restore(os.path.join(workdir, "checkpoints", str(step)))


def trees_equal(a, b) -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  return ta == tb and all(x.dtype == y.dtype and x.shape == y.shape and
                          x.tobytes() == y.tobytes() for x, y in zip(la, lb))


def check_workdir_sound(workdir: str, reference: str) -> tuple[list[str], list[str]]:
  """What a (killed) run left in `workdir`, judged against a finished `reference`.

  Every visible file must be complete and byte-identical to the reference's file of that name
  (writes are atomic and the run is deterministic); metrics.jsonl must parse line by line, each
  line equal to a reference line; a score directory with meta.json must load; the latest
  finished checkpoint must restore, and equal the reference's step where the reference kept it.
  Hidden `.tmp` files (a write cut short) are allowed here; the next run must remove them.

  Returns:
    (problems, notes). Notes: older checkpoint steps that do not restore, which is what a kill
    during Orbax's deletion of an old step (max_to_keep) leaves; resuming never reads them.
  """
  from jaxdiff import store  # pylint: disable=g-import-not-at-top
  problems, notes = [], []
  ref_files = output_files(reference)
  for rel, path in output_files(workdir).items():
    base = os.path.basename(rel)
    if base.startswith(".") and base.endswith(".tmp"):
      continue
    data = _read(path)
    if rel == "metrics.jsonl":
      ref_lines = set(_read(ref_files[rel]).splitlines())
      for i, line in enumerate(data.splitlines()):
        try:
          json.loads(line)
        except json.JSONDecodeError as e:
          problems.append(f"metrics.jsonl line {i + 1} does not parse: {e}")
        if line not in ref_lines:
          problems.append(f"metrics.jsonl line {i + 1} differs from the reference: {line[:80]!r}")
      continue
    if rel not in ref_files:
      problems.append(f"unexpected file {rel}")
    elif data != _read(ref_files[rel]):
      problems.append(f"{rel} differs from the reference ({len(data)} bytes)")
  if os.path.exists(os.path.join(workdir, "config.json")):
    json.loads(_read(os.path.join(workdir, "config.json")))
  if os.path.exists(os.path.join(workdir, "scores", "meta.json")):
    try:
      store.load_scores(os.path.join(workdir, "scores"))
    except store.StoreError as e:
      problems.append(f"scores/ has meta.json but does not load: {e}")
  ref_steps = set(checkpoint_steps(reference)[0])
  steps = checkpoint_steps(workdir)[0]
  for step in reversed(steps):
    try:
      tree = restore_step(workdir, step)
    except Exception as e:  # pylint: disable=broad-except
      msg = f"checkpoint {step} does not restore: {type(e).__name__}: {str(e)[:200]}"
      (problems if step == steps[-1] else notes).append(msg)
      continue
    if step in ref_steps and not trees_equal(tree, restore_step(reference, step)):
      problems.append(f"checkpoint {step} differs from the reference's")
  return problems, notes


def stale_temporaries(workdir: str) -> list[str]:
  """Leftover temporaries: hidden `.tmp` files and Orbax `*.orbax-checkpoint-tmp*` directories."""
  tmp = [rel for rel in output_files(workdir) if os.path.basename(rel).endswith(".tmp")]
  return tmp + [os.path.join("checkpoints", n) for n in checkpoint_steps(workdir)[1]]


def compare_finished(workdir: str, reference: str, ignore: tuple[str, ...] = ()) -> list[str]:
  """Differences between two finished workdirs: the file set, every byte of every file outside
  checkpoints/ (and `ignore`), and the latest checkpoint (parameters, optimiser and recorder
  state)."""
  problems = []
  a, b = output_files(workdir, ignore), output_files(reference)
  if set(a) != set(b):
    problems.append(f"file sets differ: only here {sorted(set(a) - set(b))}, only in the "
                    f"reference {sorted(set(b) - set(a))}")
  for rel in sorted(set(a) & set(b)):
    if _read(a[rel]) != _read(b[rel]):
      problems.append(f"{rel} differs")
  sa, sb = checkpoint_steps(workdir)[0], checkpoint_steps(reference)[0]
  if not sa or not sb or sa[-1] != sb[-1]:
    problems.append(f"latest checkpoints differ: {sa} vs {sb}")
  elif not trees_equal(restore_step(workdir, sa[-1]), restore_step(reference, sb[-1])):
    problems.append(f"checkpoint {sa[-1]} (final parameters) differs")
  return problems


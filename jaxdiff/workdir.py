"""A training workdir on disk: its paths, its lock, metrics.jsonl, and reading it back.

The only module that knows the layout below; every other module asks it for a path. Everything
in a workdir stays loadable with plain numpy/json/pandas (README, "What a run writes").

```
<workdir>/config.json            the resolved config
<workdir>/metrics.jsonl          one JSON object per member per epoch (`MetricsLog`)
<workdir>/checkpoints/<epoch>/   Orbax steps (written by train.py)
<workdir>/corrupt_checkpoints/   unreadable steps moved aside on resume
<workdir>/.lock                  flock'ed while a run writes the workdir (`lock`)
<workdir>/scores/                the score store (store.save_scores), meta.json written last
<workdir>/ensemble_scores.npz    per-example scores across members
<workdir>/logits.npy             final logits [R, N, C] (when under 1 GiB)
<workdir>/subset_mask.npy        bool [R, N]: which examples each member trained on
<workdir>/noise_mask.npy         bool [N]: flipped labels (only with label noise)
<workdir>/source_ids.npy         ids in the source dataset (tfds, digits)
<workdir>/history/epoch_XXXX.npz per-epoch logits (scores.save_history)
<workdir>/snapshots/<name>.npy   el2n/loss/grand at scores.snapshot_epochs
<workdir>/kept_ids.npy           a pruning condition's kept example ids (pruning.run_pruning)
<workdir>/noise_auroc.{md,json}  label-noise AUROC table (experiments/noise_auroc.py)
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
from typing import Any, Iterable, Mapping, Sequence

try:
  import fcntl
except ImportError:  # Windows
  fcntl = None

import ml_collections
import numpy as np

from jaxdiff import store

# name -> path relative to the workdir.
FILES = {
    "config": "config.json",
    "metrics": "metrics.jsonl",
    "checkpoints": "checkpoints",
    "corrupt_checkpoints": "corrupt_checkpoints",
    "lock": ".lock",
    "scores": "scores",
    "ensemble_scores": "ensemble_scores.npz",
    "logits": "logits.npy",
    "subset_mask": "subset_mask.npy",
    "noise_mask": "noise_mask.npy",
    "source_ids": "source_ids.npy",
    "history": "history",
    "snapshots": "snapshots",
    "kept_ids": "kept_ids.npy",  # a pruning condition's kept training examples (pruning.py)
    "noise_auroc_md": "noise_auroc.md",  # experiments/noise_auroc.py's table
    "noise_auroc_json": "noise_auroc.json",
}
LOCK_FILE = FILES["lock"]


class WorkdirError(ValueError):
  """No such workdir, epoch or score group, or data that is not the workdir's."""


class WorkdirInUseError(WorkdirError):
  """Another live run holds the workdir's lock."""


# ----------------------------------------------------------------------------- paths


def path(workdir: str, name: str) -> str:
  """`<workdir>/<file>` of one of `FILES` (e.g. `path(wd, "logits")`)."""
  if name not in FILES:
    raise KeyError(f"unknown workdir file {name!r}; valid: {', '.join(FILES)}")
  return os.path.join(workdir, FILES[name])


def scores_dir(workdir: str) -> str:
  return path(workdir, "scores")


def checkpoints_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`, absolute (Orbax wants absolute paths)."""
  return path(os.path.abspath(workdir), "checkpoints")


def checkpoint_dir(workdir: str, epoch: int) -> str:
  return os.path.join(checkpoints_dir(workdir), str(epoch))


def corrupt_checkpoint_dir(workdir: str, epoch: int) -> str:
  return os.path.join(path(workdir, "corrupt_checkpoints"), str(epoch))


def history_file(workdir: str, epoch: int) -> str:
  return os.path.join(path(workdir, "history"), f"epoch_{epoch:04d}.npz")


def history_paths(workdir: str) -> list[str]:
  """Per-epoch logits files of a workdir, in epoch order."""
  return sorted(glob.glob(os.path.join(path(workdir, "history"),
                                       "epoch_[0-9][0-9][0-9][0-9].npz")))


def history_epochs(workdir: str) -> list[int]:
  """The epochs of `history_paths`, in order."""
  return [int(os.path.basename(p)[len("epoch_"):-len(".npz")]) for p in history_paths(workdir)]


def snapshot_file(workdir: str, name: str) -> str:
  return os.path.join(path(workdir, "snapshots"), f"{name}.npy")


def score_file(workdir: str, name: str) -> str:
  """`<workdir>/scores/<name>.npy`, one score's array in the score store (jaxdiff/store.py)."""
  return os.path.join(scores_dir(workdir), f"{name}.npy")


def scores_complete(workdir: str) -> bool:
  """The workdir's score store was written to the end (its meta.json, written last, exists):
  the training of the workdir has finished."""
  return os.path.exists(os.path.join(scores_dir(workdir), store.META))


def saved_epochs(workdir: str) -> list[int]:
  """The epochs with a checkpoint in `<workdir>/checkpoints` (Orbax keeps the newest 2)."""
  ckpt_dir = checkpoints_dir(workdir)
  names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else ()
  return sorted(int(n) for n in names if n.isdigit())


# ----------------------------------------------------------------------------- the lock


@contextlib.contextmanager
def lock(workdir: str):
  """Holds an exclusive `flock` on `<workdir>/.lock` while a run writes the workdir.

  A second run on the same workdir (a notebook cell run twice, two shells) would interleave
  checkpoints, metrics and scores, and delete the first's temporaries as stale; it is refused
  instead. The kernel releases the lock when its holder exits, however it dies (SIGKILL too), so
  a killed run never blocks its resumption. Without `fcntl` (Windows) nothing is locked.

  Raises:
    WorkdirInUseError: another live process holds the lock.
  """
  os.makedirs(workdir, exist_ok=True)
  if fcntl is None:
    yield
    return
  lock_path = path(workdir, "lock")
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      raise WorkdirInUseError(
          f"workdir {workdir!r} is in use by another running job (it holds a lock on "
          f"{lock_path}); wait for it to finish, or use another --workdir") from e
    yield
  finally:
    os.close(fd)  # releases the lock


# ----------------------------------------------------------------------------- metrics.jsonl


class MetricsLog:
  """metrics.jsonl: rewritten atomically each epoch, so a kill never leaves half a line, and a
  resumed run drops epochs after its checkpoint."""

  def __init__(self, workdir: str, resume_epoch: int, write: bool = True):
    self.path = path(workdir, "metrics")
    self.lines = []
    self.writes = write  # False: kept in memory only (the non-primary processes of a run)
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            rec = json.loads(line)
          except json.JSONDecodeError:
            continue
          if rec.get("epoch", 0) <= resume_epoch:
            self.lines.append(line.rstrip("\n"))

  def write(self, records: Iterable[Mapping[str, Any]]) -> None:
    # Strict JSON: a diverged member's NaN/inf losses are written as null.
    clean = lambda v: None if isinstance(v, float) and not np.isfinite(v) else v
    self.lines += [json.dumps({k: clean(v) for k, v in r.items()}, sort_keys=True, allow_nan=False)
                   for r in records]
    if self.writes:
      store.atomic_write_text(self.path, "\n".join(self.lines) + "\n")

  def last_epoch(self) -> list[dict]:
    """The records of the newest logged epoch, by member."""
    recs = [json.loads(l) for l in self.lines]
    last = max(r["epoch"] for r in recs)
    return sorted((r for r in recs if r["epoch"] == last), key=lambda r: r["member"])


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl as a list of dicts (pandas: `pd.read_json(path, lines=True)`)."""
  with open(path(workdir, "metrics")) as f:
    return [json.loads(l) for l in f if l.strip()]


# ----------------------------------------------------------------------------- architecture labels


def model_label(model: Mapping[str, Any]) -> str:
  """A model config as one line: "name(field=value,...)", sorted fields ("name" alone without)."""
  m = dict(model)
  items = [f"{k}={v}" for k, v in sorted(m.items()) if k != "name"]
  return str(m.get("name", "?")) + (f"({','.join(items)})" if items else "")


def arch_label(config: Mapping[str, Any]) -> str:
  """The architecture label a training config records in `scores/meta.json["arch"]`:
  `config.arch_label` when set, else `model_label(config.model)`."""
  return config.get("arch_label") or model_label(config["model"])


def arch_name(meta: Mapping[str, Any], fallback: str) -> str:
  """The architecture label of a score set: meta["arch"] (a name, or a config dict with "name"),
  else `fallback`."""
  arch = meta.get("arch")
  if isinstance(arch, str) and arch:
    return arch
  if isinstance(arch, Mapping):
    for key in ("name", "model", "arch"):
      if isinstance(arch.get(key), str) and arch[key]:
        return arch[key]
  return fallback


# ----------------------------------------------------------------------------- reading back


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config of a training workdir (`<workdir>/config.json`).

  Raises:
    WorkdirError: `workdir` is not a training workdir, or its config.json is unreadable.
  """
  config_path = path(workdir, "config")
  if not os.path.isdir(workdir):
    raise WorkdirError(f"no such workdir {workdir!r}")
  if not os.path.isfile(config_path):
    raise WorkdirError(f"{workdir!r} is not a training workdir (it has no config.json)")
  try:
    with open(config_path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise WorkdirError(f"cannot read {config_path!r}: {type(e).__name__}: {e}") from e


def load_scores(workdir: str) -> store.ScoreSet:
  """`<workdir>/scores` as a `store.ScoreSet` (its StoreError names a missing or broken file)."""
  return store.load_scores(scores_dir(workdir))


def load_workdirs(workdirs: Sequence[str], names: Sequence[str] | None = None
                  ) -> dict[str, store.ScoreSet]:
  """Loads `<workdir>/scores` of each workdir, keyed by architecture, checked to be comparable.

  Keys are `names` when given, else each set's architecture (`arch_name`: meta["arch"], or the
  folder name); an architecture that several workdirs share is named `<arch>@<folder>` in each
  (two CNN widths may both say "cnn").

  Raises:
    ValueError (store.StoreError): a missing or broken score directory, a workdir given twice (in
      any spelling: compared by realpath), names that are not one distinct name per workdir, or
      workdirs trained on different data (dataset, example ids, labels, data fingerprint:
      `store.check_compatible`).
  """
  if not workdirs:
    raise ValueError("no workdirs given")
  store.check_distinct_paths(workdirs)
  sets = [load_scores(wd) for wd in workdirs]
  folders = [os.path.basename(os.path.normpath(wd)) for wd in workdirs]
  if names:
    if len(names) != len(workdirs) or len(set(names)) != len(names):
      raise ValueError(f"need one distinct name per workdir; got names {list(names)} for "
                       f"{len(workdirs)} workdirs")
  else:
    archs = [arch_name(s.meta, folder) for s, folder in zip(sets, folders)]
    names = [a if archs.count(a) == 1 else f"{a}@{folder}" for a, folder in zip(archs, folders)]
    for i, name in enumerate(names):
      if names.index(name) != i:  # distinct workdirs (checked above): one folder name and arch
        raise ValueError(f"workdir {workdirs[i]!r} and workdir {workdirs[names.index(name)]!r} "
                         f"both hold architecture {archs[i]!r} in a folder named {folders[i]!r}: "
                         "rename one of the folders")
  out = dict(zip(names, sets))
  store.check_compatible(out)
  return out


@dataclasses.dataclass
class WorkdirArrays:
  """What the held-out estimators and the exports read from a training workdir.

  Attributes:
    workdir: the path.
    logits: float32 `[R, N, C]` final evaluation logits of every member on every example.
    labels: int `[N]` the (possibly noisy) training labels.
    example_ids: int64 `[N]`.
    mask: bool `[R, N]` subset mask (all True for workdirs trained without subsets).
    fractions: float64 `[R]` each member's subset fraction.
    valid: bool `[R]` non-diverged members.
    noise_mask: bool `[N]` flipped labels, or None without label noise.
    meta: scores/meta.json.
    history: sorted paths of history/epoch_XXXX.npz (empty without scores.save_history).
  """
  workdir: str
  logits: np.ndarray
  labels: np.ndarray
  example_ids: np.ndarray
  mask: np.ndarray
  fractions: np.ndarray
  valid: np.ndarray
  noise_mask: np.ndarray | None
  meta: dict
  history: list[str]

  @property
  def has_subsets(self) -> bool:
    return bool((~self.mask[self.valid]).any())


def read_workdir(workdir: str) -> WorkdirArrays:
  """Loads the arrays of a training workdir (any workdir: masks default to all True).

  Logits come from `logits.npy`, else from the last `history/epoch_XXXX.npz` (the same final
  evaluation).

  Raises:
    store.StoreError when the workdir has no scores or no logits.
  """
  sdir = scores_dir(workdir)
  if not scores_complete(workdir):
    raise store.StoreError(f"{workdir!r} has no scores/{store.META}: not a finished training "
                           "workdir")
  meta = store.read_meta(sdir)
  runs, n = int(meta["num_runs"]), int(meta["num_examples"])
  digests = meta.get("sha256") or {}
  labels, example_ids = (store.load_npy(os.path.join(sdir, f), (n,), sha256=digests.get(f))
                         for f in ("labels.npy", "example_ids.npy"))
  history = history_paths(workdir)
  logits_path = path(workdir, "logits")
  shape, names = (runs, n, None), ("R", "N", "C")
  if os.path.exists(logits_path):
    logits = store.load_npy(logits_path, shape, names=names, what="final logits")
  elif history:
    logits = store.load_npz_array(history[-1], "logits", shape, names=names,
                                  what="final logits")
  else:
    raise store.StoreError(f"{workdir!r} has no logits.npy (written when under 1 GiB) and no "
                           "history/: retrain, or with scores.save_history=True")
  mpath = path(workdir, "subset_mask")
  mask = (store.load_npy(mpath, (runs, n), what="subset mask").astype(bool)
          if os.path.exists(mpath) else np.ones((runs, n), bool))
  fractions = np.asarray(meta.get("subset_fractions", [1.0] * runs), np.float64)
  valid = ~np.asarray(meta.get("diverged", [False] * runs), bool)
  npath = path(workdir, "noise_mask")
  noise = (store.load_npy(npath, (n,), what="flipped labels").astype(bool)
           if os.path.exists(npath) else None)
  return WorkdirArrays(workdir=workdir, logits=logits, labels=labels, example_ids=example_ids,
                       mask=mask, fractions=fractions, valid=valid, noise_mask=noise, meta=meta,
                       history=history)


def snapshot_names(workdir: str) -> list[str]:
  """Names of the workdir's snapshots (`snapshot_file(workdir, name)` exists), sorted."""
  names = os.listdir(path(workdir, "snapshots")) if os.path.isdir(path(workdir, "snapshots")) else ()
  return sorted(n[:-len(".npy")] for n in names if n.endswith(".npy") and not n.startswith("."))


@contextlib.contextmanager
def read_lock(workdir: str):
  """A shared `flock` on `<workdir>/.lock` while a finished workdir is read as a whole (a merge
  of member blocks): readers share it, and a run that would write the workdir (`lock`) is
  refused meanwhile. Nothing is created: a workdir without a lock file has no writer.

  Raises:
    WorkdirInUseError: a live run holds the workdir's (exclusive) lock.
  """
  lock_path = path(workdir, "lock")
  if fcntl is None or not os.path.exists(lock_path):
    yield
    return
  fd = os.open(lock_path, os.O_RDONLY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError as e:
      raise WorkdirInUseError(f"workdir {workdir!r} is in use by a running job (it holds a lock "
                              f"on {lock_path}); wait for it to finish") from e
    yield
  finally:
    os.close(fd)


def heldout_dir(workdir: str) -> str:
  """`<workdir>/heldout`: the default folder of a workdir's held-out report
  (experiments/heldout.py)."""
  return os.path.join(workdir, "heldout")


# ----------------------------------------------------------------------------- study folders
# A study folder (jaxdiff.study) holds training workdirs and the study's own files; name -> path
# relative to the study folder.
STUDY_FILES = {
    "config": "study_config.json",  # the resolved study config (study.check_study_workdir)
    "timings": "timings.json",  # compute seconds of every piece of work, summed over invocations
    "runs": "runs",  # runs/<arch>/: one training workdir per architecture
    "pruning": "pruning",  # pruning/<condition>/: one training workdir per pruned training set
    "report": "report",  # report.md, findings.json, figures/, tables/, analysis/, fingerprint/
    "jax_cache": "jax_cache",  # JAX's persistent compilation cache (config.compilation_cache)
}
# Folders of the study report (`<study>/report/<part>`) that a stage writes and caches.
STUDY_REPORT_PARTS = ("analysis", "fingerprint")


def study_path(study_dir: str, name: str) -> str:
  """`<study_dir>/<file>` of one of `STUDY_FILES` (e.g. `study_path(d, "timings")`)."""
  if name not in STUDY_FILES:
    raise KeyError(f"unknown study file {name!r}; valid: {', '.join(STUDY_FILES)}")
  return os.path.join(study_dir, STUDY_FILES[name])


def study_arch_workdir(study_dir: str, arch: str) -> str:
  """`<study_dir>/runs/<arch>`: the training workdir of one architecture."""
  return os.path.join(study_path(study_dir, "runs"), arch)


def study_report_dir(study_dir: str, part: str = "") -> str:
  """`<study_dir>/report`, or its folder `part` (one of `STUDY_REPORT_PARTS`)."""
  if part and part not in STUDY_REPORT_PARTS:
    raise KeyError(f"unknown study report part {part!r}; valid: {', '.join(STUDY_REPORT_PARTS)}")
  return os.path.join(study_path(study_dir, "report"), part) if part else study_path(
      study_dir, "report")

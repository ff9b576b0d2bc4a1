"""Score tensors on disk: save and load `(runs, examples)` arrays with their metadata.

Layout of a score directory (plain numpy + json; no jaxdiff needed to read it)::

    <dir>/meta.json          {"dataset", "arch", "num_runs", "num_examples", "score_names",
                              "seeds", "diverged", "format_version", ...}
    <dir>/example_ids.npy    int64 (examples,)  stable ids (index into the training set)
    <dir>/labels.npy         int32 (examples,)  the (possibly noisy) training labels used
    <dir>/<score>.npy        float32 (runs, examples), one file per score

Every file is written atomically (temporary file in the same directory, fsync, rename), and
`meta.json` is written last, so a directory with a `meta.json` is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from typing import Any, Mapping

import numpy as np

FORMAT_VERSION = 1
META = "meta.json"


class StoreError(ValueError):
  """A score directory is missing, incomplete, corrupt or inconsistent."""


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old file or the new one, never a part."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(e, OSError) and e.errno is not None and e.filename is None:
      # fsync/write errors (ENOSPC, EIO) name no file; OSError(errno, ...) keeps the subclass.
      raise OSError(e.errno, e.strerror, path) from e
    raise


# What atomic_write_bytes leaves behind when the process is killed between mkstemp and rename.
_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(directory: str, skip: tuple[str, ...] = ()) -> list[str]:
  """Deletes temporaries of `atomic_write_bytes` cut short by a kill (SIGKILL skips its cleanup).

  Walks `directory` recursively, except subdirectories named in `skip`. Only names of the form
  `.<file>.<8 random chars>.tmp` are touched; call it before writing, never while another process
  writes the same directory.

  Returns:
    the deleted paths.
  """
  removed = []
  for dirpath, dirnames, filenames in os.walk(directory):
    dirnames[:] = [d for d in dirnames if d not in skip]
    for f in filenames:
      if _TMP_NAME.match(f):
        path = os.path.join(dirpath, f)
        try:
          os.unlink(path)
          removed.append(path)
        except FileNotFoundError:
          pass
  return removed


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_save_npy(path: str, array: np.ndarray) -> None:
  import io
  buf = io.BytesIO()
  np.save(buf, np.asarray(array), allow_pickle=False)
  atomic_write_bytes(path, buf.getvalue())


def _json_default(o):
  if isinstance(o, np.ndarray):
    return o.tolist()
  if isinstance(o, np.generic):
    return o.item()
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclasses.dataclass
class ScoreSet:
  """Scores of one ensemble (one architecture, many runs) on one training set.

  Attributes:
    scores: name -> float array `[runs, examples]`.
    example_ids: int array `[examples]`, stable example ids.
    labels: int array `[examples]`, training labels (after any label noise).
    meta: everything else (dataset, arch, seeds, `diverged` bool list `[runs]`, ...).
  """
  scores: dict[str, np.ndarray]
  example_ids: np.ndarray
  labels: np.ndarray
  meta: dict

  @property
  def num_runs(self) -> int:
    return int(self.meta["num_runs"])

  @property
  def valid_runs(self) -> np.ndarray:
    """Bool `[runs]`: runs that did not diverge (analysis uses only these by default)."""
    diverged = np.asarray(self.meta.get("diverged", [False] * self.num_runs), dtype=bool)
    return ~diverged

  def get(self, name: str, include_diverged: bool = False) -> np.ndarray:
    """Returns score `name` as `[runs, examples]`, without diverged runs unless asked."""
    if name not in self.scores:
      raise KeyError(f"unknown score {name!r}; this directory has {sorted(self.scores)}")
    s = self.scores[name]
    return s if include_diverged else s[self.valid_runs]


def save_scores(directory: str, scores: Mapping[str, np.ndarray], *, example_ids: np.ndarray,
                labels: np.ndarray, meta: Mapping[str, Any] | None = None) -> None:
  """Saves score tensors atomically.

  Args:
    directory: output directory (created).
    scores: name -> array `[runs, examples]` (all with the same shape).
    example_ids: `[examples]` ints.
    labels: `[examples]` ints.
    meta: extra metadata (dataset, arch, seeds, diverged, ...); must be JSON-serialisable.
  """
  if not scores:
    raise StoreError("no scores to save")
  shapes = {k: np.shape(v) for k, v in scores.items()}
  first = next(iter(shapes.values()))
  if len(first) != 2 or any(s != first for s in shapes.values()):
    raise StoreError(f"scores must all have one shape [runs, examples]; got {shapes}")
  runs, n = first
  if np.shape(example_ids) != (n,) or np.shape(labels) != (n,):
    raise StoreError(f"example_ids {np.shape(example_ids)} and labels {np.shape(labels)} "
                     f"must have shape ({n},) to match the scores")
  for name in scores:
    if not name or "/" in name or name.startswith(".") or name in ("meta", "example_ids", "labels"):
      raise StoreError(f"invalid score name {name!r}")
  os.makedirs(directory, exist_ok=True)
  remove_stale_temporaries(directory)
  # Remove meta first so that a crash mid-way leaves a directory marked incomplete.
  meta_path = os.path.join(directory, META)
  if os.path.exists(meta_path):
    os.unlink(meta_path)
  atomic_save_npy(os.path.join(directory, "example_ids.npy"), np.asarray(example_ids, np.int64))
  atomic_save_npy(os.path.join(directory, "labels.npy"), np.asarray(labels, np.int32))
  for name, value in scores.items():
    atomic_save_npy(os.path.join(directory, f"{name}.npy"), np.asarray(value, np.float32))
  full_meta = dict(meta or {})
  full_meta.update(format_version=FORMAT_VERSION, num_runs=int(runs), num_examples=int(n),
                   score_names=sorted(scores))
  full_meta.setdefault("diverged", [False] * int(runs))
  atomic_write_json(meta_path, full_meta)


def load_scores(directory: str) -> ScoreSet:
  """Loads a directory written by `save_scores`, checking it is complete and consistent."""
  meta_path = os.path.join(directory, META)
  if not os.path.isdir(directory):
    raise StoreError(f"score directory {directory!r} does not exist")
  if not os.path.exists(meta_path):
    raise StoreError(f"{directory!r} has no {META}: not a score directory, or its write was "
                     "interrupted (rerun the job that writes it)")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StoreError(f"corrupt {meta_path!r}: {e}") from e
  runs, n = int(meta["num_runs"]), int(meta["num_examples"])

  def _load(fname, shape):
    path = os.path.join(directory, fname)
    try:
      a = np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
      raise StoreError(f"{path!r} is missing") from e
    except (ValueError, OSError, EOFError) as e:
      raise StoreError(f"corrupt or truncated file {path!r}: {e}") from e
    if a.shape != shape:
      raise StoreError(f"{path!r} has shape {a.shape}, expected {shape}")
    return a

  example_ids = _load("example_ids.npy", (n,))
  labels = _load("labels.npy", (n,))
  scores = {name: _load(f"{name}.npy", (runs, n)) for name in meta["score_names"]}
  return ScoreSet(scores=scores, example_ids=example_ids, labels=labels, meta=meta)


def check_compatible(sets: Mapping[str, ScoreSet]) -> None:
  """Raises StoreError unless all score sets share dataset and example ids."""
  items = list(sets.items())
  if not items:
    raise StoreError("no score sets given")
  name0, ref = items[0]
  for name, s in items[1:]:
    if s.meta.get("dataset") != ref.meta.get("dataset"):
      raise StoreError(f"{name!r} is on dataset {s.meta.get('dataset')!r} but {name0!r} is on "
                       f"{ref.meta.get('dataset')!r}; scores can only be compared on one dataset")
    if s.example_ids.shape != ref.example_ids.shape:
      raise StoreError(f"{name!r} and {name0!r} have different example ids "
                       f"({s.example_ids.shape[0]} vs {ref.example_ids.shape[0]} examples)")
    if not np.array_equal(s.example_ids, ref.example_ids):
      i = int(np.argmax(s.example_ids != ref.example_ids))
      raise StoreError(f"{name!r} and {name0!r} have different example ids (first at position "
                       f"{i}: id {s.example_ids[i]} vs {ref.example_ids[i]}); scores can only be "
                       "compared example by example on the same examples")

"""Score tensors on disk: save and load `(runs, examples)` arrays with their metadata.

Layout of a score directory (plain numpy + json; no jaxdiff needed to read it)::

    <dir>/meta.json          {"dataset", "dataset_fingerprint", "arch", "num_runs",
                              "num_examples", "score_names", "seeds", "diverged",
                              "format_version", "sha256": {file: SHA-256 of its bytes}, ...}
    <dir>/example_ids.npy    int64 (examples,)  stable ids (index into the training set)
    <dir>/labels.npy         int32 (examples,)  the (possibly noisy) training labels used
    <dir>/<score>.npy        float32 (runs, examples), one file per score

Every file is written atomically (temporary file in the same directory, fsync, rename) with the
permissions `open()` would give it (0o666 & ~umask), and `meta.json` is written last, so a
directory with a `meta.json` is complete. `load_scores` checks each file against the SHA-256 in
`meta["sha256"]` (directories written before checksums load unchecked).

Score sets are combined (`check_compatible`) only when their example ids, labels and
`meta["dataset_fingerprint"]` (`data.Dataset.fingerprint`: data config and hashes of the inputs,
labels, noise mask and test set) agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import secrets
from typing import Any, Mapping, Sequence
import warnings
import zipfile

import numpy as np

FORMAT_VERSION = 1
META = "meta.json"


class StoreError(ValueError):
  """A score directory is missing, incomplete, corrupt or inconsistent."""


def _create_temporary(directory: str, name: str) -> tuple[int, str]:
  """Creates `.<name>.<8 random chars>.tmp` in `directory`, mode 0o666 filtered by the umask.

  `tempfile.mkstemp` would create it 0o600, which the rename keeps: files nobody else can read.
  """
  while True:
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
      return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
    except FileExistsError:
      continue


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old file or the new one, never a part.

  The file gets the permissions `open(path, "wb")` would give a new file (0o666 & ~umask).
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = _create_temporary(directory, os.path.basename(path))
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


def npy_bytes(array: np.ndarray) -> bytes:
  """The bytes of `array` as a .npy file."""
  buf = io.BytesIO()
  np.save(buf, np.asarray(array), allow_pickle=False)
  return buf.getvalue()


def atomic_save_npy(path: str, array: np.ndarray) -> str:
  """Saves `array` as .npy atomically; returns the SHA-256 of the bytes written."""
  data = npy_bytes(array)
  atomic_write_bytes(path, data)
  return hashlib.sha256(data).hexdigest()


def _check_shape(actual: tuple[int, ...], path: str, label: str,
                 shape: Sequence[int | None] | None, names: Sequence[str | None] | None) -> None:
  if shape is None or (len(actual) == len(shape) and all(
      s is None or d == s for d, s in zip(actual, shape))):
    return
  names = names or [None] * len(shape)
  dims = [str(d) if d is not None else (n or "?") for d, n in zip(shape, names)]
  raise StoreError(f"{path!r}{label} has shape {tuple(actual)}, expected "
                   f"({', '.join(dims)}{',' if len(dims) == 1 else ''})")


def load_npy(path: str, shape: Sequence[int | None] | None = None, *,
             names: Sequence[str | None] | None = None, sha256: str | None = None,
             what: str = "") -> np.ndarray:
  """Loads a .npy file (no pickles), raising StoreError that names the file and the problem.

  Args:
    path: the file.
    shape: expected shape; None entries match any size (`names` labels them in the message).
    names: optional names of the dimensions, e.g. `(None, None, "C")` prints `(R, N, C)` as
      `(16, 4000, C)`.
    sha256: expected SHA-256 of the file's bytes (None: not checked).
    what: what the file holds, for the message (e.g. "final logits").

  Raises:
    StoreError: the file is missing, unreadable, truncated or corrupt, differs from `sha256`, or
      has another shape.
  """
  label = f" ({what})" if what else ""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise StoreError(f"{path!r}{label} is missing") from e
  except OSError as e:
    raise StoreError(f"cannot read {path!r}{label}: {e}") from e
  try:
    a = np.load(io.BytesIO(data), allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise StoreError(f"corrupt or truncated file {path!r}{label}: {e}") from e
  if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
    raise StoreError(f"{path!r}{label} does not match the SHA-256 recorded when it was written: "
                     "its bytes changed on disk (rerun the job that wrote it)")
  _check_shape(a.shape, path, label, shape, names)
  return a


def load_npz(path: str, keys: Sequence[str] | None = None, *, header_only: bool = False,
             what: str = "") -> dict[str, Any]:
  """Reads arrays of a .npz file (no pickles), raising StoreError that names the file.

  Args:
    path: the file.
    keys: the arrays wanted (default: all).
    header_only: return each array's shape instead of reading its data (checks that the file is
      a whole zip with those arrays, cheaply: a cut-off zip loses its central directory).
    what: what the file holds, for the message.

  Returns:
    name -> array (or its shape tuple with `header_only`).
  """
  label = f" ({what})" if what else ""
  try:
    with zipfile.ZipFile(path) as z:
      members = {n[:-4]: n for n in z.namelist() if n.endswith(".npy")}
      missing = [k for k in keys or () if k not in members]
      if missing:
        raise StoreError(f"{path!r}{label} has no array {missing[0]!r} (it has "
                         f"{sorted(members)})")
      out = {}
      for k in keys or sorted(members):
        with z.open(members[k]) as f:
          if header_only:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            out[k] = read(f)[0]
          else:
            out[k] = np.lib.format.read_array(f, allow_pickle=False)
  except FileNotFoundError as e:
    raise StoreError(f"{path!r}{label} is missing") from e
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise StoreError(f"corrupt or truncated file {path!r}{label}: {e}") from e
  return out


def load_npz_array(path: str, key: str, shape: Sequence[int | None] | None = None, *,
                   names: Sequence[str | None] | None = None, header_only: bool = False,
                   what: str = "") -> Any:
  """Array `key` of a .npz file (or its shape with `header_only`), checked against `shape`;
  StoreError names the file (as `load_npy`)."""
  a = load_npz(path, [key], header_only=header_only, what=what)[key]
  _check_shape(a if header_only else a.shape, path, f" ({what})" if what else "", shape, names)
  return a


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
  arrays = {"example_ids.npy": np.asarray(example_ids, np.int64),
            "labels.npy": np.asarray(labels, np.int32)}
  arrays.update({f"{name}.npy": np.asarray(value, np.float32) for name, value in scores.items()})
  digests = {fname: atomic_save_npy(os.path.join(directory, fname), a)
             for fname, a in arrays.items()}
  full_meta = dict(meta or {})
  full_meta.update(format_version=FORMAT_VERSION, num_runs=int(runs), num_examples=int(n),
                   score_names=sorted(scores), sha256=digests)
  full_meta.setdefault("diverged", [False] * int(runs))
  atomic_write_json(meta_path, full_meta)


def read_meta(directory: str) -> dict:
  """The `meta.json` of a score directory, checked to be complete and to hold the run shape.

  Raises:
    StoreError naming the directory or file: missing, interrupted write, corrupt JSON.
  """
  meta_path = os.path.join(directory, META)
  if not os.path.isdir(directory):
    raise StoreError(f"score directory {directory!r} does not exist")
  if not os.path.exists(meta_path):
    raise StoreError(f"{directory!r} has no {META}: not a score directory, or its write was "
                     "interrupted (rerun the job that writes it)")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    int(meta["num_runs"]), int(meta["num_examples"]), list(meta["score_names"])
  except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise StoreError(f"corrupt {meta_path!r}: {type(e).__name__}: {e}") from e
  return meta


def load_scores(directory: str) -> ScoreSet:
  """Loads a directory written by `save_scores`, checking it is complete and consistent."""
  meta = read_meta(directory)
  runs, n = int(meta["num_runs"]), int(meta["num_examples"])
  digests = meta.get("sha256") or {}  # absent in directories written before checksums

  def _load(fname, shape):
    return load_npy(os.path.join(directory, fname), shape, sha256=digests.get(fname))

  example_ids = _load("example_ids.npy", (n,))
  labels = _load("labels.npy", (n,))
  scores = {name: _load(f"{name}.npy", (runs, n)) for name in meta["score_names"]}
  return ScoreSet(scores=scores, example_ids=example_ids, labels=labels, meta=meta)


# Order of the fingerprint fields in messages: the hashes of the data first.
_HASHES = ("x_train_sha256", "labels_sha256", "noise_mask_sha256", "test_sha256")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _show(field: str, value: Any) -> str:
  if field.endswith("_sha256") and isinstance(value, str):
    return value[:8] + ".."
  return str(value)


def _field_order(field: str) -> tuple:
  if field in _HASHES:
    return (0, _HASHES.index(field), field)
  return (1 + ("." in field), 0, field)


def check_same_data(name: str, meta: Mapping[str, Any], ref_name: str,
                    ref_meta: Mapping[str, Any]) -> None:
  """Raises StoreError unless two score sets' metas record the same training data.

  Compares `meta["dataset_fingerprint"]` field by field (nested fields as `data.seed`). Fields only
  one of them records (a directory written by an older jaxdiff) cannot be compared: a
  UserWarning says which.

  Raises:
    StoreError naming every differing field, e.g. `'cnn' and 'mlp' were trained on different
    data (labels_sha256: 3fa2.. vs 91b0..; data.noise_seed: 0 vs 1)`.
  """
  fp, ref = (_flatten(m.get("dataset_fingerprint") or {}) for m in (meta, ref_meta))
  common = sorted(set(fp) & set(ref), key=_field_order)
  diffs = [f"{k}: {_show(k, fp[k])} vs {_show(k, ref[k])}" for k in common if fp[k] != ref[k]]
  if diffs:
    raise StoreError(f"{name!r} and {ref_name!r} were trained on different data "
                     f"({'; '.join(diffs)}); scores can only be compared on the same data")
  for a, fa, b, fb in ((name, fp, ref_name, ref), (ref_name, ref, name, fp)):
    lacking = sorted(set(fb) - set(fa), key=_field_order)
    if lacking:
      warnings.warn(f"{a!r} was written by an older jaxdiff and records no "
                    f"{', '.join(lacking[:4])}{', ...' if len(lacking) > 4 else ''} of its "
                    f"training data: compared with {b!r} on "
                    f"{', '.join(common) if common else 'dataset name'}, example ids and labels "
                    "only", UserWarning, stacklevel=3)
      return


def check_compatible(sets: Mapping[str, ScoreSet]) -> None:
  """Raises StoreError unless all score sets share dataset, example ids, labels and the data
  fingerprint (`check_same_data`)."""
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
    check_same_data(name, s.meta, name0, ref.meta)
    if not np.array_equal(s.labels, ref.labels):
      differ = s.labels != ref.labels
      i = int(np.argmax(differ))
      raise StoreError(f"{name!r} and {name0!r} were trained with different labels (labels.npy "
                       f"differs at {int(differ.sum())} of {differ.size} examples, first id "
                       f"{s.example_ids[i]}: {s.labels[i]} vs {ref.labels[i]}); scores can only "
                       "be compared on the same data")


def check_distinct_paths(paths: Sequence[str], what: str = "workdir") -> None:
  """Raises StoreError when two of `paths` are the same directory (compared by realpath, so
  `wd`, `./wd/` and a symlink to it are one), naming the repeated one."""
  seen = {}
  for p in paths:
    real = os.path.realpath(p)
    if real in seen:
      raise StoreError(f"{what} {p!r} is given twice (as {seen[real]!r} and {p!r}: both are "
                       f"{real!r}); give each {what} once")
    seen[real] = p

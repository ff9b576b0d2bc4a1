"""Hugging Face `datasets` as a data source (`data.name="hf"`): a `datasets.Dataset` or
`DatasetDict` passed in Python, or one saved with `save_to_disk` at `data.path`.

Columns and splits are named by `data.hf_image_column` (inputs), `data.hf_label_column` (int
labels), `data.hf_train_split` and `data.hf_test_split` (of a `DatasetDict`; a single `Dataset` is
the training split, evaluated as the test set too, like user arrays without a test split).
Example `i` of the training split (its row order) is jaxdiff's example id `i`. Inputs are taken
as they are (float32; `[N, L]` signals, `[N, H, W]` or `[N, H, W, C]` images, decoded `Image`
columns included) and not standardised unless `data.normalize=True`, as for `.npz` and arrays.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from jaxdiff.data import sources
from jaxdiff.data.dataset import DataError

PIP = "pip install datasets"


def _import_datasets():
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f"data.name='hf' needs Hugging Face datasets, which is not installed: {PIP} "
                    "(or pip install 'jaxdiff[test]')") from e
  return datasets


def _get(config: Mapping[str, Any], key: str, default: str) -> str:
  value = config.get(key, default)
  return default if value is None else str(value)


def _columns(split, name: str, image_col: str, label_col: str, where: str):
  """(x `[N, ...]`, y `[N]`) of one split, in its row order."""
  missing = [c for c in (image_col, label_col) if c not in split.column_names]
  if missing:
    raise DataError(f"{where}: split {name!r} has no column(s) {missing} (columns: "
                    f"{split.column_names}); set data.hf_image_column / data.hf_label_column")
  rows = split.select_columns([image_col, label_col]).with_format("numpy")[:]
  x, y = np.asarray(rows[image_col]), np.asarray(rows[label_col])
  if x.dtype == object:
    raise DataError(f"{where}: column {image_col!r} of split {name!r} holds examples of "
                    "different shapes (or non-numeric values); every example needs one shape")
  return x, y


def hf_source(config: Mapping[str, Any], arrays: Any = None) -> sources.Loaded:
  """A Hugging Face dataset: `arrays` (a `datasets.Dataset` or `DatasetDict` passed in Python),
  else `datasets.load_from_disk(data.path)`. Labels of a `ClassLabel` column give the number of
  classes (else `data.num_classes`, else max label + 1)."""
  image_col = _get(config, "hf_image_column", "image")
  label_col = _get(config, "hf_label_column", "label")
  train_name = _get(config, "hf_train_split", "train")
  test_name = _get(config, "hf_test_split", "test")
  path = config.get("path") or ""
  if arrays is not None:
    obj, where, full = arrays, "Hugging Face dataset passed in", ""
  elif path:
    datasets = _import_datasets()
    full = os.path.abspath(path)
    if not os.path.isdir(full):
      raise DataError(f"hf dataset: directory {path!r} does not exist (set data.path to a "
                      "directory written by save_to_disk)")
    try:
      obj = datasets.load_from_disk(full)
    except Exception as e:  # datasets raises several types for a directory it cannot read
      raise DataError(f"hf dataset: cannot load {path!r} with datasets.load_from_disk: "
                      f"{type(e).__name__}: {e}") from e
    where = f"hf dataset {path!r}"
  else:
    raise DataError("data.name='hf' needs data.path (a directory written by save_to_disk) or "
                    "the dataset passed in Python (arrays=<datasets.Dataset or DatasetDict>)")
  if isinstance(obj, Mapping):  # DatasetDict (a dict of splits)
    wanted = [s for s in (train_name, test_name) if s]
    absent = [s for s in wanted if s not in obj]
    if absent:
      raise DataError(f"{where} has no split(s) {absent} (splits: {sorted(obj)}); set "
                      "data.hf_train_split / data.hf_test_split ('' = evaluate on the training "
                      "split)")
    train, test = obj[train_name], (obj[test_name] if test_name else None)
  elif hasattr(obj, "column_names") and hasattr(obj, "with_format"):
    train, test, train_name = obj, None, "(the dataset)"
  else:
    raise DataError(f"data.name='hf' was given a {type(obj).__name__}; expected a "
                    "datasets.Dataset or DatasetDict")
  x_tr, y_tr = _columns(train, train_name, image_col, label_col, where)
  given = {"x_train": x_tr, "y_train": y_tr}
  if test is not None:
    given["x_test"], given["y_test"] = _columns(test, test_name, image_col, label_col, where)
  feature = train.features.get(label_col)
  num_classes = getattr(feature, "num_classes", None)
  if num_classes and not config.get("num_classes"):
    config = {**dict(config), "num_classes": int(num_classes)}
  vals = sources.user_arrays(given, config, where)
  options = {"name": "hf", "path": full, "image_column": image_col, "label_column": label_col,
             "train_split": train_name if test is not None else "",
             "test_split": test_name if test is not None else ""}
  return sources.Loaded(*vals, f"hf:{full}" if full else "hf", options)

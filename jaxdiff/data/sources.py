"""The loaders of the registry (`registry.DATASETS`), one function per data source: MNIST-1D and
scikit-learn's digits (both embedded, offline), tfds image datasets, user `.npz` files and arrays
(Hugging Face datasets: `hf.py`).

A loader takes the `data` config section (and, for "arrays", the arrays passed in) and returns a
`Loaded`: the raw splits, the number of classes, the options that decide the data (recorded in
the fingerprint) and, where the source has them, each example's original ids. Normalisation, the
training cap and label noise are the registry's (`registry.load_dataset`), the same for all.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import numpy as np

from jaxdiff.data.dataset import DataError
from jaxdiff.data.dataset import validate_arrays

# tfds names -> (image key, label key). Any other tfds name with "image"/"label" also works.
TFDS_DATASETS = {
    "mnist": ("image", "label"),
    "fashion_mnist": ("image", "label"),
    "cifar10": ("image", "label"),
    "cifar100": ("image", "label"),
    "svhn_cropped": ("image", "label"),
}


@dataclasses.dataclass(frozen=True)
class Loaded:
  """What a loader returns (raw: not normalised, no cap, no label noise).

  Attributes:
    x_train: `[N, L]` signals or `[N, H, W, C]` images (any real dtype).
    y_train: integer `[N]`.
    x_test: `[M, ...]` as x_train.
    y_test: integer `[M]`.
    num_classes: C.
    name: the Dataset's name ("digits", "cifar10", "npz:/abs/path.npz", ...).
    source: the config options that decide the data (`Dataset.source`, before the registry adds
      num_train and label noise).
    source_ids: `[N]` original ids of the training examples, or None (`Dataset.source_ids`).
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  name: str
  source: dict
  source_ids: np.ndarray | None = None


def _get(config: Mapping[str, Any], key: str, default: Any) -> Any:
  value = config.get(key, default)
  return default if value is None else value


# ----------------------------------------------------------------------------- MNIST-1D


@functools.lru_cache(maxsize=4)
def _mnist1d_cached(num_samples: int, train_split: float, seed: int):
  from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=g-import-not-at-top
  args = get_dataset_args()
  args.num_samples = num_samples
  args.train_split = train_split
  args.seed = seed
  # make_dataset seeds NumPy's *global* RNG; keep the caller's global state intact.
  saved = np.random.get_state()
  try:
    d = make_dataset(args)
  finally:
    np.random.set_state(saved)
  return (d["x"].astype(np.float32), d["y"].astype(np.int32), d["x_test"].astype(np.float32),
          d["y_test"].astype(np.int32))


def load_mnist1d(num_samples: int = 5000, train_split: float = 0.8, seed: int = 42):
  """MNIST-1D (Greydanus 2020) from the `mnist1d` generator, offline. 5000/0.8 = the standard
  4,000/1,000 split; 62,500/0.8 gives 50,000 training examples."""
  if num_samples < 20 or num_samples % 10:
    raise DataError(f"mnist1d num_samples={num_samples}: must be a positive multiple of 10 (>= 20)")
  if not 0.0 < train_split < 1.0:
    raise DataError(f"mnist1d train_split={train_split}: must be in (0, 1)")
  arrays = _mnist1d_cached(int(num_samples), float(train_split), int(seed))
  return tuple(a.copy() for a in arrays)


def mnist1d_source(config: Mapping[str, Any], arrays=None) -> Loaded:
  """MNIST-1D: `data.num_samples`, `data.train_split`, `data.seed` (generator seed)."""
  del arrays
  num_samples, split = _get(config, "num_samples", 5000), _get(config, "train_split", 0.8)
  seed = _get(config, "seed", 42)
  x_tr, y_tr, x_te, y_te = load_mnist1d(num_samples, split, seed)
  return Loaded(x_tr, y_tr, x_te, y_te, 10, "mnist1d",
                {"name": "mnist1d", "num_samples": int(num_samples), "train_split": float(split),
                 "seed": int(seed)})


# ----------------------------------------------------------------------------- digits


def digits_source(config: Mapping[str, Any], arrays=None) -> Loaded:
  """scikit-learn's digits: 1,797 real 8x8 handwritten digits (pixel values 0..16), shipped inside
  scikit-learn (`sklearn.datasets.load_digits`, no download), as images `[N, 8, 8, 1]`.

  Split: `perm = np.random.default_rng(data.seed).permutation(1797)`; the first
  `round(data.train_split * 1797)` indices, sorted, are the training set and the rest, sorted,
  the test set (defaults seed 42, train_split 0.8: 1,438 / 359). `source_ids` are the training
  examples' indices into `load_digits()`. The registry standardises the pixels like the tfds
  images (`dataset.normalize`, training-set statistics).
  """
  del arrays
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  seed, split = _get(config, "seed", 42), _get(config, "train_split", 0.8)
  d = load_digits()
  n = d.images.shape[0]
  num_train = int(round(float(split) * n))
  if not 0 < num_train < n:
    raise DataError(f"digits train_split={split}: must leave both splits non-empty (in "
                    f"(0, 1); {n} images)")
  perm = np.random.default_rng(int(seed)).permutation(n)
  train, test = np.sort(perm[:num_train]), np.sort(perm[num_train:])
  x = d.images[..., None]  # [N, 8, 8] -> [N, 8, 8, 1]
  return Loaded(x[train], d.target[train], x[test], d.target[test], 10, "digits",
                {"name": "digits", "seed": int(seed), "train_split": float(split)},
                source_ids=train.astype(np.int64))


# ----------------------------------------------------------------------------- tfds


def load_tfds(name: str, data_dir: str | None = None, train_split: str = "train",
              test_split: str = "test"):
  """Reads a prepared tfds dataset with `tfds.data_source` (no TensorFlow needed to read).

  Preparing (downloading) a dataset the first time needs TensorFlow: `pip install
  'jaxdiff[tfds-prepare]'` then `tfds build <name>` or `tfds.builder(name).download_and_prepare()`.

  Returns:
    (x_train uint8 `[N, H, W, C]`, y_train int64 `[N]`, x_test, y_test, num_classes, train_ids
     `[N]`: the dataset's `id` feature where it has one (str), else the index in the split).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  image_key, label_key = TFDS_DATASETS.get(name, ("image", "label"))

  def read(split):
    try:
      src = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for a missing dataset
      raise DataError(
          f"could not read tfds dataset {name!r} split {split!r} from data_dir={data_dir!r}: {e}. "
          "Prepare it once with TensorFlow installed (pip install 'jaxdiff[tfds-prepare]'; "
          f"tfds build {name}), or point data.data_dir at a prepared copy.") from e
    n = len(src)
    first = src[0]
    x = np.empty((n,) + np.shape(first[image_key]), np.uint8)
    y = np.empty((n,), np.int64)
    ids = [] if "id" in first else None
    for i in range(n):  # data loading, not a hot path; batched reads are not supported by the mock
      ex = src[i]
      x[i] = ex[image_key]
      y[i] = ex[label_key]
      if ids is not None:
        ids.append(ex["id"].decode() if isinstance(ex["id"], bytes) else str(ex["id"]))
    return x, y, (np.asarray(ids, str) if ids is not None else np.arange(n, dtype=np.int64))
  x_tr, y_tr, ids = read(train_split)
  x_te, y_te, _ = read(test_split)
  try:
    num_classes = tfds.builder(name, data_dir=data_dir).info.features[label_key].num_classes
  except Exception:  # pylint: disable=broad-except
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
  return x_tr, y_tr, x_te, y_te, int(num_classes), ids


def tfds_source(name: str, config: Mapping[str, Any], arrays=None) -> Loaded:
  """A tfds image dataset (`name`), read from `data.data_dir`; ids as `load_tfds`."""
  del arrays
  x_tr, y_tr, x_te, y_te, num_classes, ids = load_tfds(name, config.get("data_dir") or None)
  return Loaded(x_tr, y_tr.astype(np.int32), x_te, y_te.astype(np.int32), num_classes, name,
                {"name": name}, source_ids=ids)


# ----------------------------------------------------------------------------- user data


def user_arrays(arrays: Mapping[str, np.ndarray], config: Mapping[str, Any], where: str):
  """Checked (x_tr, y_tr, x_te, y_te, C) from a mapping with x_train, y_train[, x_test, y_test];
  without a test split the training set is evaluated."""
  missing = [k for k in ("x_train", "y_train") if k not in arrays]
  if missing:
    raise DataError(f"{where} is missing {missing}; it must hold x_train, y_train and "
                    f"optionally x_test, y_test (has {sorted(arrays)})")
  vals = validate_arrays(arrays["x_train"], arrays["y_train"], arrays.get("x_test"),
                         arrays.get("y_test"), config.get("num_classes") or None, where)
  if len(vals) == 5:
    return vals
  x_tr, y_tr, num_classes = vals
  return x_tr, y_tr, x_tr, y_tr, num_classes


def npz_source(config: Mapping[str, Any], arrays=None) -> Loaded:
  """A `.npz` file at `data.path` holding x_train, y_train[, x_test, y_test] (layouts as
  `validate_arrays`: `[N, L]` signals, `[N, H, W]` or `[N, H, W, C]` images)."""
  del arrays
  path = config.get("path", "")
  if not path or not os.path.exists(path):
    raise DataError(f"npz dataset: file {path!r} does not exist (set data.path)")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"npz dataset: cannot read {path!r}: {e}") from e
  full = os.path.abspath(path)
  return Loaded(*user_arrays(arrays, config, f"npz file {path!r}"), f"npz:{full}",
                {"name": "npz", "path": full})


def arrays_source(config: Mapping[str, Any], arrays=None) -> Loaded:
  """Arrays passed in Python (`train_and_evaluate(config, workdir, arrays={...})`); the
  Dataset's name is `data.label` (default "arrays")."""
  if arrays is None:
    raise DataError("dataset 'arrays' needs the arrays passed in (arrays={...})")
  label = config.get("label", "arrays")
  return Loaded(*user_arrays(arrays, config, "user arrays"), label,
                {"name": "arrays", "label": label})

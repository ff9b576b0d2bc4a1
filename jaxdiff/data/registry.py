"""The dataset registry: `DATASETS` maps each `data.name` to its loader and its kind, and
`load_dataset` builds a `Dataset` from the `data` section of a config.

Adding a dataset is one loader in `sources.py` (config -> `Loaded`), one line here and one test.
What happens after loading is the same for every entry and lives here: the checked kind,
standardisation (`data.normalize`), the training cap (`data.num_train`) and label noise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import numpy as np

from jaxdiff.data import hf
from jaxdiff.data import sources
from jaxdiff.data.dataset import DataError
from jaxdiff.data.dataset import Dataset
from jaxdiff.data.dataset import KINDS
from jaxdiff.data.dataset import normalize as normalize_inputs
from jaxdiff.data.noise import add_label_noise
from jaxdiff.data.noise import noise_options
from jaxdiff.data.sources import TFDS_DATASETS


@dataclasses.dataclass(frozen=True)
class Source:
  """One registry entry.

  Attributes:
    load: `(data_config, arrays) -> sources.Loaded`.
    kinds: the kinds it can give: one ("signal" or "image"), or both for user data, whose kind is
      `data.kind` or else the arrays' rank (`[N, L]` signals; `[N, H, W(, C)]` images).
    normalize: whether inputs are standardised when `data.normalize` is unset (None).
  """
  load: Callable[..., sources.Loaded]
  kinds: tuple[str, ...]
  normalize: bool


DATASETS: dict[str, Source] = {
    "mnist1d": Source(sources.mnist1d_source, ("signal",), normalize=False),
    "npz": Source(sources.npz_source, KINDS, normalize=False),
    "arrays": Source(sources.arrays_source, KINDS, normalize=False),
    **{name: Source(functools.partial(sources.tfds_source, name), ("image",), normalize=True)
       for name in TFDS_DATASETS},
    # Embedded real images (scikit-learn's digits), listed after the sets that came before it.
    "digits": Source(sources.digits_source, ("image",), normalize=True),
    # Hugging Face datasets (data.path = a save_to_disk directory, or passed in Python).
    "hf": Source(hf.hf_source, KINDS, normalize=False),
}


def source_of(name: str) -> Source:
  """The registry entry of `data.name` ("tfds:<name>" reads any tfds image dataset).

  Raises:
    DataError naming the unknown name and the valid ones.
  """
  if isinstance(name, str) and name.startswith("tfds:") and len(name) > 5:
    return Source(functools.partial(sources.tfds_source, name[5:]), ("image",), normalize=True)
  if name not in DATASETS:
    raise DataError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)} "
                    "(or 'tfds:<name>' for any tfds image dataset)")
  return DATASETS[name]


def load_dataset(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None
                 ) -> Dataset:
  """Builds the Dataset described by `config` (the `data` section of a jaxdiff config).

  Args:
    config: fields `name` (a key of DATASETS, or "tfds:<name>"), and per source: mnist1d
      `num_samples`, `train_split`, `seed`; digits `seed`, `train_split` (its split); tfds
      `data_dir`; npz `path`; hf `path` (or the dataset passed as `arrays`), `hf_image_column`,
      `hf_label_column`, `hf_train_split`, `hf_test_split` (`data/hf.py`); user data (npz,
      arrays, hf) optionally `kind` ("signal" | "image"; default from the rank) and
      `num_classes`; all: `normalize` (None = the entry's default: True for digits and tfds,
      False for mnist1d, npz, arrays and hf; True standardises with the training set's
      statistics, `dataset.normalize`), `label_noise` (fraction), `noise_seed`, `num_train`
      (optional cap: keep the first n training examples; 0 = all).
    arrays: for name="arrays", a mapping with x_train, y_train[, x_test, y_test]; for name="hf",
      optionally a `datasets.Dataset` or `DatasetDict` (in place of `data.path`).

  Raises:
    DataError for an unknown name or invalid data.
  """
  get = (lambda k, d=None: config.get(k, d))
  name = get("name", "mnist1d")
  noise, noise_seed = noise_options(get("label_noise", 0.0), get("noise_seed", 0))
  entry = source_of(name)
  norm = get("normalize")
  if norm is not None and not isinstance(norm, (bool, np.bool_)):
    raise DataError(f"data.normalize={norm!r}: must be True, False or None (the dataset's "
                    "default)")
  loaded = entry.load(config, arrays)
  x_tr, y_tr, x_te, y_te = loaded.x_train, loaded.y_train, loaded.x_test, loaded.y_test
  kind = _kind(entry, get("kind"), x_tr, name)
  source = dict(loaded.source)
  if (entry.normalize if norm is None else bool(norm)):
    x_tr, x_te = normalize_inputs(x_tr, x_te, kind)
  if norm is not None and bool(norm) != entry.normalize:  # the default is part of the name
    source["normalize"] = bool(norm)

  num_train = int(get("num_train", 0) or 0)
  if num_train < 0:
    raise DataError(f"data.num_train={num_train}: must be >= 0 (0 = all)")
  ids = loaded.source_ids
  if num_train:
    if num_train > x_tr.shape[0]:
      raise DataError(f"data.num_train={num_train} exceeds the {x_tr.shape[0]} training examples")
    x_tr, y_tr = x_tr[:num_train], y_tr[:num_train]
    ids = None if ids is None else ids[:num_train]
  y_tr = np.asarray(y_tr, np.int32)
  y_clean = y_tr.copy()
  source.update(num_train=num_train, label_noise=noise)
  num_classes = loaded.num_classes
  if noise:
    if num_classes < 2:
      raise DataError(f"data.label_noise={noise}: flipping labels needs at least 2 classes; this "
                      f"dataset has {num_classes}")
    y_tr, mask = add_label_noise(y_tr, num_classes, noise, noise_seed)
    source["noise_seed"] = noise_seed  # without noise the seed changes nothing
  else:
    mask = np.zeros(y_tr.shape[0], bool)
  return Dataset(name=loaded.name, x_train=np.ascontiguousarray(x_tr, np.float32), y_train=y_tr,
                 x_test=np.ascontiguousarray(x_te, np.float32),
                 y_test=np.asarray(y_te, np.int32), num_classes=int(num_classes), kind=kind,
                 example_ids=np.arange(x_tr.shape[0], dtype=np.int64), y_train_clean=y_clean,
                 noise_mask=mask, source=source, source_ids=ids)


def _kind(entry: Source, requested: Any, x: np.ndarray, name: str) -> str:
  """The Dataset's kind: the entry's own, else `data.kind`, else the rank; checked against it."""
  by_rank = {2: "signal", 4: "image"}.get(x.ndim)
  if requested not in (None, ""):
    if requested not in entry.kinds:
      raise DataError(f"data.kind={requested!r} for dataset {name!r}; valid: "
                      f"{', '.join(entry.kinds)}")
    kind = requested
  else:
    kind = entry.kinds[0] if len(entry.kinds) == 1 else by_rank
  if kind != by_rank:
    raise DataError(f"dataset {name!r} gives inputs of shape {x.shape[1:]}, not {kind}s "
                    f"({'[N, L]' if kind == 'signal' else '[N, H, W, C]'})")
  return kind

"""Datasets for jaxdiff: MNIST-1D (embedded default), tfds image datasets, user arrays/npz.

Also holds label noise (with the mask of flipped labels) and the per-member CIFAR augmentation
(random crop with 4-pixel padding and horizontal flip) applied inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import numbers
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# tfds names -> (label key, image key). Any other tfds name with "image"/"label" also works.
TFDS_DATASETS = {
    "mnist": ("image", "label"),
    "fashion_mnist": ("image", "label"),
    "cifar10": ("image", "label"),
    "cifar100": ("image", "label"),
    "svhn_cropped": ("image", "label"),
}
DATASETS = ("mnist1d", "npz", "arrays") + tuple(TFDS_DATASETS)


class DataError(ValueError):
  """Invalid dataset name, configuration or user arrays."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """An in-memory classification dataset.

  Attributes:
    name: dataset name (e.g. "mnist1d", "cifar10", "npz:/path/file.npz").
    x_train: float32 `[N, ...]` (signals `[N, L]`, images `[N, H, W, C]`), normalised.
    y_train: int32 `[N]` training labels *after* label noise.
    x_test: float32 `[M, ...]`.
    y_test: int32 `[M]`.
    num_classes: number of classes C.
    kind: "signal" (1-D) or "image" (2-D); decides augmentation and how examples are drawn.
    example_ids: int64 `[N]` stable example ids (the index into the original training set).
    y_train_clean: int32 `[N]` labels before label noise.
    noise_mask: bool `[N]`, True where the label was flipped.
    source: the options of the data config that decide the data (name, generator seed, sizes,
      path, label noise and, with noise, its seed), as `fingerprint()` records them.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  kind: str
  example_ids: np.ndarray
  y_train_clean: np.ndarray
  noise_mask: np.ndarray
  source: dict = dataclasses.field(default_factory=dict)

  @property
  def num_train(self) -> int:
    return int(self.y_train.shape[0])

  def fingerprint(self) -> dict:
    """A small JSON-able record identifying the training data (stored in score metadata, so that
    workdirs trained on other data are never combined: `store.check_same_data`).

    Returns:
      {"name", "num_train", "num_test", "num_classes", "input_shape", "num_noisy", "data" (the
       `source` options), and hex SHA-256 digests of the bytes of: "x_train_sha256" (float32
       little-endian inputs), "labels_sha256" (int32 labels actually trained on, after noise),
       "noise_mask_sha256" (uint8 mask), "test_sha256" (x_test float32 then y_test int32)}.
    """
    return dict(self._fingerprint)

  @functools.cached_property
  def _fingerprint(self) -> dict:  # the hashes read every byte of the data once
    def digest(*arrays):
      h = hashlib.sha256()
      for a, dtype in arrays:  # hashed in place through the buffer protocol, no copy
        h.update(np.ascontiguousarray(a, dtype).reshape(-1).view(np.uint8))
      return h.hexdigest()
    return {"name": self.name, "num_train": self.num_train, "num_test": int(self.y_test.shape[0]),
            "num_classes": self.num_classes, "input_shape": list(self.x_train.shape[1:]),
            "num_noisy": int(self.noise_mask.sum()), "data": dict(self.source),
            "x_train_sha256": digest((self.x_train, "<f4")),
            "labels_sha256": digest((self.y_train, "<i4")),
            "noise_mask_sha256": digest((self.noise_mask, "u1")),
            "test_sha256": digest((self.x_test, "<f4"), (self.y_test, "<i4"))}


# ----------------------------------------------------------------------------- validation


def validate_arrays(x_train, y_train, x_test=None, y_test=None, num_classes=None,
                    source="arrays") -> tuple[np.ndarray, ...]:
  """Checks user arrays and returns them as (float32 x, int32 y) pairs.

  Raises:
    DataError naming the bad value: wrong rank, mismatched lengths, non-integer or out-of-range
    labels, NaN/inf inputs.
  """
  out = []
  pairs = [("train", x_train, y_train)]
  if x_test is not None or y_test is not None:
    if x_test is None or y_test is None:
      raise DataError(f"{source}: give both x_test and y_test, or neither")
    pairs.append(("test", x_test, y_test))
  labels_all = []
  for split, x, y in pairs:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim not in (2, 3, 4):
      raise DataError(f"{source}: x_{split} has shape {x.shape}; expected [N, L] signals, "
                      "[N, H, W] or [N, H, W, C] images")
    if y.ndim != 1:
      raise DataError(f"{source}: y_{split} has shape {y.shape}; expected [N] integer labels")
    if x.shape[0] != y.shape[0]:
      raise DataError(f"{source}: x_{split} has {x.shape[0]} examples but y_{split} has "
                      f"{y.shape[0]}")
    if x.shape[0] == 0:
      raise DataError(f"{source}: x_{split} is empty")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
      raise DataError(f"{source}: x_{split} has dtype {x.dtype}; expected real numbers")
    if not np.all(np.isfinite(x)):
      bad = int(np.argmax(~np.isfinite(x).reshape(x.shape[0], -1).all(1)))
      raise DataError(f"{source}: x_{split} contains NaN or inf (first at example {bad})")
    if np.issubdtype(y.dtype, np.floating):
      if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
        bad = int(np.argmax(~(np.isfinite(y) & (y == np.round(y)))))
        raise DataError(f"{source}: y_{split} must hold integer class labels; y_{split}[{bad}] "
                        f"= {y[bad].item()!r}")
    elif not np.issubdtype(y.dtype, np.integer):
      raise DataError(f"{source}: y_{split} has dtype {y.dtype}; expected integer labels")
    if y.min() < 0:
      raise DataError(f"{source}: y_{split} has a negative label {int(y.min())}; labels must be "
                      "0..num_classes-1")
    labels_all.append(y)
    if x.ndim == 3 and split == "train" and x.shape[-1] not in (1, 3):
      pass  # [N, H, W] grayscale; a channel axis is added below
    out.append((x, y))
  if len(labels_all) == 2:  # a class seen only in testing would be added silently
    only_test = np.setdiff1d(np.unique(labels_all[1]), np.unique(labels_all[0]))
    if only_test.size:
      lab = only_test[0].item()
      more = (f"; also labels {[v.item() for v in only_test[1:6]]}" if only_test.size > 1
              else "")
      raise DataError(f"{source}: label {lab} appears only in the test split (y_test has "
                      f"{int((labels_all[1] == lab).sum())} examples of it, y_train none{more}); "
                      "every class needs training examples")
  max_label = max(int(y.max()) for y in labels_all)
  if num_classes is None:
    num_classes = max_label + 1
  elif max_label >= num_classes:
    raise DataError(f"{source}: label {max_label} is out of range for num_classes={num_classes}")
  shapes = {s: a[0].shape[1:] for s, a in zip(("train", "test"), out)}
  if len(set(shapes.values())) > 1:
    raise DataError(f"{source}: train and test examples differ in shape: {shapes}")
  result = []
  for x, y in out:
    x = x.astype(np.float32)
    if x.ndim == 3:  # [N, H, W] -> [N, H, W, 1]
      x = x[..., None]
    result += [x, y.astype(np.int32)]
  return tuple(result) + (int(num_classes),)


# ----------------------------------------------------------------------------- loaders


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


def load_tfds(name: str, data_dir: str | None = None, train_split: str = "train",
              test_split: str = "test"):
  """Reads a prepared tfds dataset with `tfds.data_source` (no TensorFlow needed to read).

  Preparing (downloading) a dataset the first time needs TensorFlow: `pip install
  'jaxdiff[tfds-prepare]'` then `tfds build <name>` or `tfds.builder(name).download_and_prepare()`.
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
    for i in range(n):  # data loading, not a hot path; batched reads are not supported by the mock
      ex = src[i]
      x[i] = ex[image_key]
      y[i] = ex[label_key]
    return x, y
  x_tr, y_tr = read(train_split)
  x_te, y_te = read(test_split)
  try:
    num_classes = tfds.builder(name, data_dir=data_dir).info.features[label_key].num_classes
  except Exception:  # pylint: disable=broad-except
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
  return x_tr, y_tr, x_te, y_te, int(num_classes)


def _normalise(x_train, x_test, kind):
  """Per-channel standardisation with training-set statistics (images from uint8)."""
  x_train = x_train.astype(np.float32)
  x_test = x_test.astype(np.float32)
  axes = tuple(range(x_train.ndim - 1)) if kind == "image" else None
  mean = x_train.mean(axis=axes, keepdims=axes is not None)
  std = x_train.std(axis=axes, keepdims=axes is not None) + 1e-6
  return (x_train - mean) / std, (x_test - mean) / std


def add_label_noise(y: np.ndarray, num_classes: int, fraction: float, seed: int):
  """Flips exactly round(fraction * N) labels, each to a different class chosen uniformly.

  Returns:
    (noisy labels int32 `[N]`, mask bool `[N]` of flipped examples).
  """
  if not 0.0 <= fraction <= 1.0:
    raise DataError(f"label_noise={fraction}: must be a fraction in [0, 1]")
  rng = np.random.default_rng(seed)
  n = y.shape[0]
  idx = rng.choice(n, size=int(round(fraction * n)), replace=False)
  noisy = y.copy()
  # Adding 1..C-1 modulo C always changes the class, uniformly over the other classes.
  noisy[idx] = (y[idx] + rng.integers(1, num_classes, size=idx.shape[0])) % num_classes
  mask = np.zeros(n, bool)
  mask[idx] = True
  return noisy.astype(np.int32), mask


def load_dataset(config: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None
                 ) -> Dataset:
  """Builds the Dataset described by `config` (the `data` section of a jaxdiff config).

  Args:
    config: fields `name` (one of DATASETS), and per source: mnist1d `num_samples`,
      `train_split`, `seed`; tfds `data_dir`; npz `path`; all: `label_noise` (fraction),
      `noise_seed`, `num_train` (optional cap: keep the first n training examples; 0 = all).
    arrays: for name="arrays", a mapping with x_train, y_train[, x_test, y_test].

  Raises:
    DataError for an unknown name or invalid data.
  """
  get = (lambda k, d=None: config.get(k, d))
  name = get("name", "mnist1d")
  noise, noise_seed = _noise_options(get("label_noise", 0.0), get("noise_seed", 0))
  if name == "mnist1d":
    x_tr, y_tr, x_te, y_te = load_mnist1d(get("num_samples", 5000), get("train_split", 0.8),
                                          get("seed", 42))
    num_classes, kind, full_name = 10, "signal", "mnist1d"
    source = {"name": name, "num_samples": int(get("num_samples", 5000)),
              "train_split": float(get("train_split", 0.8)), "seed": int(get("seed", 42))}
  elif name in ("npz", "arrays"):
    if name == "npz":
      path = get("path", "")
      if not path or not os.path.exists(path):
        raise DataError(f"npz dataset: file {path!r} does not exist (set data.path)")
      try:
        with np.load(path, allow_pickle=False) as f:
          arrays = {k: f[k] for k in f.files}
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(f"npz dataset: cannot read {path!r}: {e}") from e
      where = f"npz file {path!r}"
      full_name = f"npz:{os.path.abspath(path)}"
      source = {"name": name, "path": os.path.abspath(path)}
    else:
      if arrays is None:
        raise DataError("dataset 'arrays' needs the arrays passed in (arrays={...})")
      where = "user arrays"
      full_name = get("label", "arrays")
      source = {"name": name, "label": full_name}
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
      raise DataError(f"{where} is missing {missing}; it must hold x_train, y_train and "
                      f"optionally x_test, y_test (has {sorted(arrays)})")
    vals = validate_arrays(arrays["x_train"], arrays["y_train"], arrays.get("x_test"),
                           arrays.get("y_test"), get("num_classes") or None, where)
    if len(vals) == 5:
      x_tr, y_tr, x_te, y_te, num_classes = vals
    else:  # no test split given: evaluate on the training set
      x_tr, y_tr, num_classes = vals
      x_te, y_te = x_tr, y_tr
    kind = "signal" if x_tr.ndim == 2 else "image"
  elif name in TFDS_DATASETS or name.startswith("tfds:"):
    tname = name.split(":", 1)[1] if name.startswith("tfds:") else name
    x_tr, y_tr, x_te, y_te, num_classes = load_tfds(tname, get("data_dir") or None)
    x_tr, x_te = _normalise(x_tr, x_te, "image")
    y_tr, y_te = y_tr.astype(np.int32), y_te.astype(np.int32)
    kind, full_name = "image", tname
    source = {"name": tname}
  else:
    raise DataError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)} "
                    "(or 'tfds:<name>' for any tfds image dataset)")

  num_train = int(get("num_train", 0) or 0)
  if num_train < 0:
    raise DataError(f"data.num_train={num_train}: must be >= 0 (0 = all)")
  if num_train:
    if num_train > x_tr.shape[0]:
      raise DataError(f"data.num_train={num_train} exceeds the {x_tr.shape[0]} training examples")
    x_tr, y_tr = x_tr[:num_train], y_tr[:num_train]
  y_clean = y_tr.copy()
  source.update(num_train=num_train, label_noise=noise)
  if noise:
    if num_classes < 2:
      raise DataError(f"data.label_noise={noise}: flipping labels needs at least 2 classes; this "
                      f"dataset has {num_classes}")
    y_tr, mask = add_label_noise(y_tr, num_classes, noise, noise_seed)
    source["noise_seed"] = noise_seed  # without noise the seed changes nothing
  else:
    mask = np.zeros(y_tr.shape[0], bool)
  return Dataset(name=full_name, x_train=np.ascontiguousarray(x_tr, np.float32), y_train=y_tr,
                 x_test=np.ascontiguousarray(x_te, np.float32), y_test=y_te,
                 num_classes=int(num_classes), kind=kind,
                 example_ids=np.arange(x_tr.shape[0], dtype=np.int64), y_train_clean=y_clean,
                 noise_mask=mask, source=source)


def _noise_options(label_noise: Any, noise_seed: Any) -> tuple[float, int]:
  """Checked `data.label_noise` (a fraction in [0, 1)) and `data.noise_seed` (an integer >= 0)."""
  label_noise = 0.0 if label_noise is None else label_noise
  noise_seed = 0 if noise_seed is None else noise_seed
  if (isinstance(label_noise, bool) or not isinstance(label_noise, numbers.Real)
      or not math.isfinite(label_noise) or not 0.0 <= label_noise < 1.0):
    raise DataError(f"data.label_noise={label_noise!r}: must be a fraction in [0, 1) (the share "
                    "of training labels flipped)")
  if (isinstance(noise_seed, bool) or not isinstance(noise_seed, numbers.Integral)
      or noise_seed < 0):
    raise DataError(f"data.noise_seed={noise_seed!r}: must be a non-negative integer")
  return float(label_noise), int(noise_seed)


# ----------------------------------------------------------------------------- in-step ops


def epoch_permutations(data_keys: jax.Array, epoch: int | jax.Array, num_examples: int,
                       batch_size: int, subset_mask: jax.Array | None = None,
                       num_steps: int | None = None) -> jax.Array:
  """Each member's own shuffled order for one epoch, cut into full batches.

  Args:
    data_keys: `[R]` PRNG keys, one per member.
    epoch: epoch number (folded into each member's key).
    num_examples: N.
    batch_size: B.
    subset_mask: optional bool `[R, N]`: member r only draws examples where it is True.
    num_steps: steps per epoch (default N // B; with subsets, min_r |subset_r| // B).
  Returns:
    int32 `[R, steps, batch_size]` example indices; the last partial batch is dropped (a
    different remainder each epoch, because each epoch has a new permutation).
  """
  steps = num_steps or num_examples // batch_size

  def one(key):
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return perm[:steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)

  def one_subset(key, mask):
    # A uniform random order of the member's subset, followed by the rest (never used).
    u = jax.random.uniform(jax.random.fold_in(key, epoch), (num_examples,))
    perm = jnp.argsort(jnp.where(mask, u, 2.0 + u))
    return perm[:steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)
  if subset_mask is None:
    return jax.vmap(one)(data_keys)
  return jax.vmap(one_subset)(data_keys, subset_mask)


def subset_masks(seed: int, member_ids: np.ndarray, fractions: np.ndarray, num_examples: int
                 ) -> np.ndarray:
  """Per-member random training subsets (for hold-out estimators such as the C-score).

  Member i's subset is the first round(fraction_i * N) examples of a permutation drawn from
  `fold_in(fold_in(key(seed), i), 3)`, so it depends only on the seed and the member's id.

  Returns:
    bool `[R, N]`, True where the member trains on the example.
  """
  base = jax.random.key(seed)

  def one(i, frac_count):
    key = jax.random.fold_in(jax.random.fold_in(base, i), 3)
    ranks = jnp.argsort(jax.random.permutation(key, num_examples))  # position in the permutation
    return ranks < frac_count
  counts = np.round(np.asarray(fractions, np.float64) * num_examples).astype(np.int32)
  return np.asarray(jax.vmap(one)(jnp.asarray(member_ids, jnp.uint32), jnp.asarray(counts)))


def augment_images(key: jax.Array, x: jax.Array, pad: int = 4, flip: bool = True) -> jax.Array:
  """CIFAR augmentation (He et al. 2016): random crop after zero-padding by `pad`, random
  horizontal flip; independently per example. `x`: `[B, H, W, C]`."""
  b, h, w, _ = x.shape
  k_crop, k_flip = jax.random.split(key)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * pad + 1)

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
  out = jax.vmap(crop)(xp, offsets)
  if flip:
    do_flip = jax.random.bernoulli(k_flip, 0.5, (b,))
    out = jnp.where(do_flip[:, None, None, None], out[:, :, ::-1, :], out)
  return out

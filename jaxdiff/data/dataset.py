"""The in-memory dataset (`Dataset`, with the fingerprint that identifies its data), the checks of
user arrays and the standardisation of inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import numpy as np

KINDS = ("signal", "image")  # [N, L] signals, [N, H, W, C] images

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
    kind: "signal" (`[N, L]`) or "image" (`[N, H, W, C]`), set by the registry entry (or, for
      user data, by `data.kind` or the arrays' rank); augmentation and the gallery read it.
    example_ids: int64 `[N]` stable example ids (the index into the loaded training set).
    y_train_clean: int32 `[N]` labels before label noise.
    noise_mask: bool `[N]`, True where the label was flipped.
    source: the options of the data config that decide the data (name, generator seed, sizes,
      path, label noise and, with noise, its seed), as `fingerprint()` records them.
    source_ids: `[N]` each training example's id in its original dataset, to align scores with
      published per-example scores (C-scores, memorisation) that use that order: tfds: the `id`
      feature where the dataset has one (CIFAR-10/100: "train_16399"), else the int64 index in
      the tfds split; digits: the int64 index into `sklearn.datasets.load_digits()`; None where
      `example_ids` already is that index (MNIST-1D, user arrays).
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
  source_ids: np.ndarray | None = None

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


def normalize(x_train: np.ndarray, x_test: np.ndarray, kind: str
              ) -> tuple[np.ndarray, np.ndarray]:
  """Standardises inputs with training-set statistics: `(x - mean) / (std + 1e-6)`.

  Images (`[N, H, W, C]`) per channel (mean and std over N, H, W); signals (`[N, L]`) with one
  scalar mean and std over all training values. The test set uses the training statistics.

  Returns:
    (x_train, x_test) as float32 arrays of the input shapes.
  """
  if kind not in KINDS:
    raise DataError(f"normalize kind={kind!r}; valid: {', '.join(KINDS)}")
  x_train = x_train.astype(np.float32)
  x_test = x_test.astype(np.float32)
  axes = tuple(range(x_train.ndim - 1)) if kind == "image" else None
  mean = x_train.mean(axis=axes, keepdims=axes is not None)
  std = x_train.std(axis=axes, keepdims=axes is not None) + 1e-6
  return (x_train - mean) / std, (x_test - mean) / std

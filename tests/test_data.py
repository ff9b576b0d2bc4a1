"""Tests of jaxdiff.data: MNIST-1D generation, tfds (mock), user arrays, label noise, augmentation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdiff import data as data_lib


def test_mnist1d_standard_split_and_determinism():
  np.random.seed(123)
  before = np.random.get_state()[1].copy()
  ds = data_lib.load_dataset({"name": "mnist1d"})
  # The generator seeds NumPy's global RNG; the loader must restore the caller's state.
  np.testing.assert_array_equal(np.random.get_state()[1], before)
  assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert np.bincount(np.concatenate([ds.y_train, ds.y_test])).tolist() == [500] * 10
  np.testing.assert_array_equal(ds.example_ids, np.arange(4000))
  again = data_lib.load_dataset({"name": "mnist1d"})
  np.testing.assert_array_equal(ds.x_train, again.x_train)
  other = data_lib.load_dataset({"name": "mnist1d", "seed": 7, "num_samples": 500})
  assert other.x_train.shape == (400, 40) and not np.allclose(other.x_train[:5], ds.x_train[:5])


def test_label_noise_flips_exact_fraction_to_other_classes():
  ds = data_lib.load_dataset({"name": "mnist1d", "num_samples": 1000, "label_noise": 0.2,
                              "noise_seed": 3})
  flipped = ds.y_train != ds.y_train_clean
  np.testing.assert_array_equal(flipped, ds.noise_mask)
  assert ds.noise_mask.sum() == 160  # exactly 20% of 800
  again = data_lib.load_dataset({"name": "mnist1d", "num_samples": 1000, "label_noise": 0.2,
                                 "noise_seed": 3})
  np.testing.assert_array_equal(again.y_train, ds.y_train)
  # New labels spread over the other nine classes (not, say, always y+1).
  delta = (ds.y_train - ds.y_train_clean)[ds.noise_mask] % 10
  assert len(np.unique(delta)) >= 7 and 0 not in delta


def test_user_arrays_and_npz(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(30, 8, 8)).astype(np.float64)
  y = rng.integers(0, 4, 30)
  y[:4] = np.arange(4)  # every class in the training part of the npz below
  ds = data_lib.load_dataset({"name": "arrays"}, {"x_train": x, "y_train": y})
  assert ds.kind == "image" and ds.x_train.shape == (30, 8, 8, 1) and ds.num_classes == 4
  np.testing.assert_allclose(ds.x_train[..., 0], x.astype(np.float32))
  path = tmp_path / "d.npz"
  np.savez(path, x_train=x[:20, 0], y_train=y[:20], x_test=x[20:, 0], y_test=y[20:])
  ds = data_lib.load_dataset({"name": "npz", "path": str(path)})
  assert ds.kind == "signal" and ds.x_test.shape == (10, 8)


@pytest.mark.parametrize("arrays,match", [
    ({"x_train": np.zeros((5, 3)), "y_train": np.zeros(4, int)}, "5 examples but y_train has 4"),
    ({"x_train": np.zeros(5), "y_train": np.zeros(5, int)}, r"x_train has shape \(5,\)"),
    ({"x_train": np.zeros((3, 2)), "y_train": np.array([0, 1.5, 2])}, r"y_train\[1\] = 1.5"),
    ({"x_train": np.zeros((3, 2)), "y_train": np.array([0, -1, 2])}, "negative label -1"),
    ({"x_train": np.array([[0, 1.], [np.nan, 0], [1, 1]]), "y_train": np.zeros(3, int)},
     "NaN or inf .first at example 1"),
    ({"x_train": np.zeros((3, 2)), "y_train": np.zeros((3, 1), int)}, r"y_train has shape \(3, 1\)"),
    ({"y_train": np.zeros(3, int)}, r"missing \['x_train'\]"),
])
def test_bad_arrays_are_named(arrays, match):
  with pytest.raises(data_lib.DataError, match=match):
    data_lib.load_dataset({"name": "arrays"}, arrays)


def test_label_out_of_range_and_bad_names(tmp_path):
  with pytest.raises(data_lib.DataError, match="label 5 is out of range for num_classes=3"):
    data_lib.load_dataset({"name": "arrays", "num_classes": 3},
                          {"x_train": np.zeros((2, 2)), "y_train": np.array([0, 5])})
  with pytest.raises(data_lib.DataError, match="unknown dataset 'mnist2d'.*mnist1d.*cifar10"):
    data_lib.load_dataset({"name": "mnist2d"})
  with pytest.raises(data_lib.DataError, match="does not exist"):
    data_lib.load_dataset({"name": "npz", "path": str(tmp_path / "nope.npz")})
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  with pytest.raises(data_lib.DataError, match="cannot read"):
    data_lib.load_dataset({"name": "npz", "path": str(tmp_path / "bad.npz")})
  with pytest.raises(data_lib.DataError, match="num_samples=-10"):
    data_lib.load_dataset({"name": "mnist1d", "num_samples": -10})
  with pytest.raises(data_lib.DataError, match="num_train=-1"):
    data_lib.load_dataset({"name": "mnist1d", "num_train": -1})


@pytest.mark.parametrize("name,shape", [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 1))])
def test_tfds_loads_mock_data(name, shape):
  with tfds.testing.mock_data(num_examples=12):
    ds = data_lib.load_dataset({"name": name})
    raw = tfds.data_source(name, split="train")
    first = np.asarray(raw[3]["image"], np.float32)
  assert ds.x_train.shape == (12,) + shape and ds.kind == "image" and ds.num_classes == 10
  # Standardised per channel with training statistics: example 3 maps back to the raw image.
  mean = first.mean()  # not the dataset mean; check the affine map instead
  del mean
  flat = ds.x_train.reshape(12, -1, shape[-1])
  assert np.allclose(flat.mean((0, 1)), 0, atol=1e-4) and np.allclose(flat.std((0, 1)), 1, atol=1e-3)
  corr = np.corrcoef(first.ravel(), ds.x_train[3].ravel())[0, 1]
  assert corr > 0.99


def test_epoch_permutations_and_augmentation():
  keys = jax.vmap(jax.random.key)(jnp.arange(2))
  idx = np.asarray(data_lib.epoch_permutations(keys, 1, 10, 3))
  assert idx.shape == (2, 3, 3) and all(len(set(idx[r].ravel())) == 9 for r in range(2))
  np.testing.assert_array_equal(idx, np.asarray(data_lib.epoch_permutations(keys, 1, 10, 3)))
  assert not np.array_equal(idx, np.asarray(data_lib.epoch_permutations(keys, 2, 10, 3)))
  # Augmentation: every output is a 4-padded crop of the input, possibly flipped.
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 2))
  out = np.asarray(data_lib.augment_images(jax.random.key(1), x))
  xp = np.pad(np.asarray(x), ((0, 0), (4, 4), (4, 4), (0, 0)))
  flips = 0
  for i in range(16):
    crops = [(xp[i, a:a + 8, b:b + 8], f) for a in range(9) for b in range(9) for f in (0, 1)]
    match = [f for c, f in crops if np.array_equal(out[i], c[:, ::-1] if f else c)]
    assert match, i
    flips += match[0]
  assert 0 < flips < 16


# ------------------------------------------------------------------------------------------------
# What identifies the training data, and the checks of the noise and split options (issue 16).


def _sha(a, dtype):
  import hashlib  # pylint: disable=g-import-not-at-top
  return hashlib.sha256(np.ascontiguousarray(a, dtype).tobytes()).hexdigest()


def test_fingerprint_hashes_the_data_actually_trained_on():
  cfg = {"name": "mnist1d", "num_samples": 500, "seed": 42, "label_noise": 0.1, "noise_seed": 0}
  ds = data_lib.load_dataset(cfg)
  fp = ds.fingerprint()
  assert fp["x_train_sha256"] == _sha(ds.x_train, "<f4")
  assert fp["labels_sha256"] == _sha(ds.y_train, "<i4")  # after noise, not y_train_clean
  assert fp["labels_sha256"] != _sha(ds.y_train_clean, "<i4")
  assert fp["noise_mask_sha256"] == _sha(ds.noise_mask, "u1")
  import hashlib  # pylint: disable=g-import-not-at-top
  ref = hashlib.sha256(np.ascontiguousarray(ds.x_test, "<f4").tobytes()
                       + np.ascontiguousarray(ds.y_test, "<i4").tobytes()).hexdigest()
  assert fp["test_sha256"] == ref
  assert fp["data"] == {"name": "mnist1d", "num_samples": 500, "train_split": 0.8, "seed": 42,
                        "num_train": 0, "label_noise": 0.1, "noise_seed": 0}
  assert fp["num_noisy"] == 40 and json.loads(json.dumps(fp)) == fp  # small and JSON-able
  assert data_lib.load_dataset(dict(cfg)).fingerprint() == fp
  other_seed = data_lib.load_dataset(dict(cfg, seed=43)).fingerprint()
  assert other_seed["x_train_sha256"] != fp["x_train_sha256"]
  assert other_seed["data"]["seed"] == 43
  other_noise = data_lib.load_dataset(dict(cfg, noise_seed=1)).fingerprint()
  assert other_noise["x_train_sha256"] == fp["x_train_sha256"]
  assert other_noise["labels_sha256"] != fp["labels_sha256"]
  assert other_noise["noise_mask_sha256"] != fp["noise_mask_sha256"]
  # Without label noise the noise seed changes nothing, so it is not part of the identity.
  clean = data_lib.load_dataset(dict(cfg, label_noise=0.0)).fingerprint()
  assert clean == data_lib.load_dataset(dict(cfg, label_noise=0.0, noise_seed=5)).fingerprint()
  assert "noise_seed" not in clean["data"]


def test_label_only_in_the_test_split_is_refused():
  x = np.zeros((6, 3))
  with pytest.raises(data_lib.DataError, match="label 7 appears only in the test split"):
    data_lib.load_dataset({"name": "arrays"}, {"x_train": x, "y_train": np.array([0, 1, 2] * 2),
                                              "x_test": x[:3], "y_test": np.array([0, 7, 1])})
  with pytest.raises(data_lib.DataError, match="label 2 appears only in the test split"):
    data_lib.load_dataset({"name": "arrays", "num_classes": 4},
                          {"x_train": x, "y_train": np.array([0, 1, 3] * 2),
                           "x_test": x[:3], "y_test": np.array([2, 1, 0])})


@pytest.mark.parametrize("over,match", [
    ({"noise_seed": -1}, r"data\.noise_seed=-1: must be a non-negative integer"),
    ({"noise_seed": 1.5}, r"data\.noise_seed=1\.5: must be a non-negative integer"),
    ({"label_noise": 1.0}, r"data\.label_noise=1\.0: must be a fraction in \[0, 1\)"),
    ({"label_noise": -0.1}, r"data\.label_noise=-0\.1: must be a fraction in \[0, 1\)"),
    ({"label_noise": float("nan")}, r"data\.label_noise=nan: must be a fraction in \[0, 1\)"),
])
def test_bad_noise_options_name_the_field(over, match):
  with pytest.raises(data_lib.DataError, match=match):
    data_lib.load_dataset(dict({"name": "mnist1d", "num_samples": 500, "label_noise": 0.1}, **over))


# ------------------------------------------------------------------------------------------------
# The registry (issue 18) and scikit-learn's digits, data.normalize, tfds ids (issue 19).


def test_registry_refuses_an_unknown_name_listing_the_valid_ones():
  with pytest.raises(data_lib.DataError) as e:
    data_lib.load_dataset({"name": "digitz"})
  assert str(e.value) == ("unknown dataset 'digitz'; valid: mnist1d, npz, arrays, mnist, "
                          "fashion_mnist, cifar10, cifar100, svhn_cropped, digits, hf (or "
                          "'tfds:<name>' for any tfds image dataset)")
  for name, entry in data_lib.DATASETS.items():  # every entry states its kind(s)
    assert entry.kinds and set(entry.kinds) <= set(data_lib.KINDS), name
  assert data_lib.source_of("tfds:emnist").kinds == ("image",)


def test_digits_are_sklearns_images_split_by_the_documented_seed():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  ref = load_digits()
  ds = data_lib.load_dataset({"name": "digits"})
  assert ds.kind == "image" and ds.num_classes == 10 and ds.name == "digits"
  assert ds.x_train.shape == (1438, 8, 8, 1) and ds.x_test.shape == (359, 8, 8, 1)
  # The documented split: the first round(0.8 * 1797) of default_rng(42).permutation, sorted.
  perm = np.random.default_rng(42).permutation(1797)
  train, test = np.sort(perm[:1438]), np.sort(perm[1438:])
  np.testing.assert_array_equal(ds.source_ids, train)
  np.testing.assert_array_equal(ds.y_train, ref.target[train])
  np.testing.assert_array_equal(ds.y_test, ref.target[test])
  # Standardised with the training pixels' mean and std (one channel), in float64 by hand.
  pixels = [v for i in train for v in ref.images[i].ravel()]
  mean = sum(pixels) / len(pixels)
  std = (sum((v - mean) ** 2 for v in pixels) / len(pixels)) ** 0.5
  np.testing.assert_allclose(ds.x_train[..., 0], (ref.images[train] - mean) / std, atol=1e-5)
  np.testing.assert_allclose(ds.x_test[..., 0], (ref.images[test] - mean) / std, atol=1e-5)
  raw = data_lib.load_dataset({"name": "digits", "normalize": False})
  np.testing.assert_array_equal(raw.x_train[..., 0], ref.images[train])
  # Deterministic; the split seed and fraction are part of the data's identity.
  assert data_lib.load_dataset({"name": "digits"}).fingerprint() == ds.fingerprint()
  assert ds.fingerprint()["data"] == {"name": "digits", "seed": 42, "train_split": 0.8,
                                      "num_train": 0, "label_noise": 0.0}
  other = data_lib.load_dataset({"name": "digits", "seed": 7, "train_split": 0.5})
  assert other.num_train == 898 and not np.array_equal(other.source_ids[:50], train[:50])
  assert other.fingerprint()["x_train_sha256"] != ds.fingerprint()["x_train_sha256"]
  with pytest.raises(data_lib.DataError, match="digits train_split=1.0"):
    data_lib.load_dataset({"name": "digits", "train_split": 1.0})


def test_normalize_is_explicit_for_user_data(tmp_path):
  rng = np.random.default_rng(1)
  x = rng.normal(3.0, 2.0, size=(20, 4, 4, 2))
  y = np.arange(20) % 3
  path = tmp_path / "d.npz"
  np.savez(path, x_train=x[:15], y_train=y[:15], x_test=x[15:], y_test=y[15:])
  plain = data_lib.load_dataset({"name": "npz", "path": str(path)})
  np.testing.assert_allclose(plain.x_train, x[:15], rtol=1e-6)  # user data: untouched by default
  ds = data_lib.load_dataset({"name": "npz", "path": str(path), "normalize": True})
  for c in range(2):  # images: each channel by its own training statistics
    vals = x[:15, ..., c]
    m, s = vals.mean(), vals.std()
    np.testing.assert_allclose(ds.x_train[..., c], (vals - m) / s, atol=1e-5)
    np.testing.assert_allclose(ds.x_test[..., c], (x[15:, ..., c] - m) / s, atol=1e-5)
  assert ds.fingerprint()["data"]["normalize"] is True
  assert "normalize" not in plain.fingerprint()["data"]
  assert "normalize" not in data_lib.load_dataset(
      {"name": "npz", "path": str(path), "normalize": False}).fingerprint()["data"]
  sig = data_lib.load_dataset({"name": "arrays", "normalize": True},
                              {"x_train": x[:, :, 0, 0], "y_train": y})
  v = x[:, :, 0, 0]  # signals: one mean and std over all training values
  np.testing.assert_allclose(sig.x_train, (v - v.mean()) / v.std(), atol=1e-5)
  with pytest.raises(data_lib.DataError, match=r"data\.normalize='yes': must be True, False or None"):
    data_lib.load_dataset({"name": "npz", "path": str(path), "normalize": "yes"})


def test_kind_is_the_entrys_and_checked_against_the_data():
  x, y = np.zeros((6, 5)), np.arange(6) % 2
  assert data_lib.load_dataset({"name": "arrays", "kind": "signal"},
                               {"x_train": x, "y_train": y}).kind == "signal"
  with pytest.raises(data_lib.DataError, match=r"dataset 'arrays' gives inputs of shape \(5,\), "
                     r"not images"):
    data_lib.load_dataset({"name": "arrays", "kind": "image"}, {"x_train": x, "y_train": y})
  with pytest.raises(data_lib.DataError, match="data.kind='signal' for dataset 'digits'; valid: "
                     "image"):
    data_lib.load_dataset({"name": "digits", "kind": "signal"})
  with pytest.raises(data_lib.DataError, match="data.kind='audio'.*valid: signal, image"):
    data_lib.load_dataset({"name": "arrays", "kind": "audio"}, {"x_train": x, "y_train": y})


def test_tfds_keeps_each_examples_original_id():
  with tfds.testing.mock_data(num_examples=12):
    ds = data_lib.load_dataset({"name": "cifar10", "num_train": 10})
    raw = tfds.data_source("cifar10", split="train")
    ids = [raw[i]["id"] for i in range(10)]  # CIFAR-10's own ids ("train_16399" in the real set)
    mnist = data_lib.load_dataset({"name": "mnist"})  # no id feature: the index in the split
  assert ds.source_ids.tolist() == [i.decode() if isinstance(i, bytes) else i for i in ids]
  np.testing.assert_array_equal(mnist.source_ids, np.arange(12))
  assert data_lib.load_dataset({"name": "mnist1d", "num_samples": 500}).source_ids is None


def test_digits_train_a_2d_cnn_for_one_epoch(tmp_path):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from jaxdiff import store  # pylint: disable=g-import-not-at-top
  from jaxdiff import train  # pylint: disable=g-import-not-at-top
  c = tiny_config("cnn", num_epochs=1, num_runs=2, batch_size=64)
  c.data.name = "digits"
  c.scores.update(grand=False, representation=False, vog=False)  # the training is what is tested
  res = train.train_and_evaluate(c, str(tmp_path))
  ds = data_lib.load_dataset(c.data)
  s = store.load_scores(str(tmp_path / "scores"))
  assert s.meta["dataset"] == "digits" and s.meta["dataset_fingerprint"] == ds.fingerprint()
  np.testing.assert_array_equal(s.labels, ds.y_train)
  assert s.scores["loss"].shape == (2, 1438)
  recs = train.read_metrics(str(tmp_path))
  np.testing.assert_allclose(s.scores["loss"].mean(1), [r["train_loss"] for r in recs], rtol=1e-4)
  assert min(res["test_acc"]) > 0.3  # chance is 0.1

"""Prediction depth (k-NN probes) and prototype scores, against brute-force numpy."""

import jax
import numpy as np
import pytest
from scipy import stats

from jaxdiff.scores import representation as rep
from test_scores_models import MLP, member, mlp_apply, stacked_init


def brute_knn(train, labels, query, k, exclude_self, num_classes):
  """One member: full distance matrix, stable sort, majority vote (ties -> lowest class)."""
  out = []
  for i, q in enumerate(query):
    d = np.sqrt(((train - q) ** 2).sum(-1))
    if exclude_self:
      d[i] = np.inf
    nbrs = np.argsort(d, kind="stable")[:k]
    out.append(np.argmax(np.bincount(labels[nbrs], minlength=num_classes)))
  return np.array(out)


def brute_depth(train_layers, labels, query_layers, final, k, exclude_self):
  """Depth by the definition: smallest l with every probe l' >= l agreeing with the final pred."""
  num_layers = len(train_layers)
  r, m = final.shape
  num_classes = max(labels.max(), final.max()) + 1
  probes = np.array([[brute_knn(tl[j], labels, ql[j], k, exclude_self, num_classes)
                      for j in range(r)] for tl, ql in zip(train_layers, query_layers)])
  depth = np.full((r, m), num_layers)
  for j in range(r):
    for i in range(m):
      for l in range(num_layers):
        if all(probes[lp, j, i] == final[j, i] for lp in range(l, num_layers)):
          depth[j, i] = l
          break
  return depth


@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_predict_matches_brute_force(exclude_self):
  rng = np.random.default_rng(0)
  train = rng.normal(size=(2, 60, 5)).astype(np.float32)
  labels = rng.integers(0, 4, 60)
  query = train if exclude_self else rng.normal(size=(2, 25, 5)).astype(np.float32)
  got = rep.knn_predict(train, labels, query, k=7, exclude_self=exclude_self, chunk_size=8)
  for j in range(2):
    np.testing.assert_array_equal(got[j], brute_knn(train[j], labels, query[j], 7, exclude_self, 4))


def test_knn_self_exclusion_matters():
  # Two far-apart clusters; example 0 is the only "1" in cluster A. With itself as a neighbour and
  # k=1 it predicts its own label; without itself, its cluster's label 0.
  train = np.array([[0.0], [0.1], [0.2], [10.0], [10.1]], np.float32)[None]
  labels = np.array([1, 0, 0, 1, 1])
  assert rep.knn_predict(train, labels, train, k=1)[0, 0] == 1
  assert rep.knn_predict(train, labels, train, k=1, exclude_self=True)[0, 0] == 0
  with pytest.raises(ValueError, match=r"k must be an int in \[1, 4\]"):
    rep.knn_predict(train, labels, train, k=5, exclude_self=True)


def gaussian_layers(rng, r, n, classes, dim, spread, scales):
  """Labels `[n]` and layers `[r, n, dim]` of Gaussian classes, more separated with depth (class
  centres times each of `scales`), so that depths spread over 0..L."""
  labels = rng.integers(0, classes, n)
  centres = rng.normal(size=(classes, dim)) * spread
  return labels, [(centres[labels] * s + rng.normal(size=(r, n, dim))).astype(np.float32)
                  for s in scales]


def test_prediction_depth_matches_brute_force():
  rng = np.random.default_rng(1)
  r, n, k = 2, 40, 5
  labels, layers = gaussian_layers(rng, r, n, 3, 4, 3, (0.0, 0.3, 0.6, 1.0))
  final = np.where(rng.uniform(size=(r, n)) < 0.8, labels, rng.integers(0, 3, (r, n)))
  got = rep.prediction_depth(layers, labels, None, final, k=k, chunk_size=16)
  ref = brute_depth(layers, labels, layers, final, k, exclude_self=True)
  np.testing.assert_array_equal(got, ref)
  assert len(np.unique(ref)) >= 3  # the test exercises several depths, including L
  query = [l[:, :10] + 0.1 for l in layers]
  got_q = rep.prediction_depth(layers, labels, query, final[:, :10], k=k)
  np.testing.assert_array_equal(got_q, brute_depth(layers, labels, query, final[:, :10], k, False))


@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_predict_breaks_distance_ties_by_index(exclude_self):
  # Points on a small integer grid: many exactly equal distances (exact in float32), so the
  # neighbours depend on the tie rule (lower training index first, as a stable sort).
  rng = np.random.default_rng(8)
  train = rng.integers(0, 3, size=(2, 50, 2)).astype(np.float32)
  labels = rng.integers(0, 3, 50)
  query = train if exclude_self else rng.integers(0, 3, size=(2, 20, 2)).astype(np.float32)
  got = rep.knn_predict(train, labels, query, k=6, exclude_self=exclude_self, chunk_size=7)
  for j in range(2):
    np.testing.assert_array_equal(got[j], brute_knn(train[j], labels, query[j], 6, exclude_self, 3))


def test_prediction_depth_reuses_shared_and_repeated_layers(monkeypatch):
  # The input layer is the same for every member and the last layer repeats the one before it
  # (a flatten after the last conv); depths equal the brute force, with fewer probes computed.
  rng = np.random.default_rng(9)
  r, n, k = 3, 36, 4
  labels = rng.integers(0, 3, n)
  centres = rng.normal(size=(3, 5)) * 3
  x = (centres[labels] * 0.2 + rng.normal(size=(n, 5))).astype(np.float32)
  hidden = [(centres[labels] * s + rng.normal(size=(r, n, 5))).astype(np.float32)
            for s in (0.5, 1.0)]
  layers = [np.broadcast_to(x, (r, n, 5)), *hidden, hidden[-1].reshape(r, n, 5, 1).copy()]
  final = np.where(rng.uniform(size=(r, n)) < 0.85, labels, rng.integers(0, 3, (r, n)))
  probed = []
  dispatch = rep._Probe.dispatch  # pylint: disable=protected-access

  def counting(self, train, query, rows, device=None):
    probed.append(len(rows))
    return dispatch(self, train, query, rows, device)

  monkeypatch.setattr(rep._Probe, "dispatch", counting)  # pylint: disable=protected-access
  got = rep.prediction_depth(layers, labels, None, final, k=k, chunk_size=8)
  flat = [l.reshape(r, n, -1) for l in layers]
  ref = brute_depth(flat, labels, flat, final, k, exclude_self=True)
  np.testing.assert_array_equal(got, ref)
  assert len(np.unique(ref)) >= 3
  # Probes: the top layer for every query; no recomputation of the repeated layer; the input
  # once for all members, only where every later probe agreed.
  assert len(probed) == 2 * r + 1 and sum(probed) < 3 * r * n


def test_prediction_depth_hand_worked():
  # One member, 1-D features, k=1; probes per layer for the single query are set by its nearest
  # training point. Final prediction 1. Layer 0 -> 1, layer 1 -> 0, layer 2 -> 1, layer 3 -> 1:
  # the agreeing suffix starts at layer 2, so the depth is 2.
  labels = np.array([0, 1])
  train = [np.array([[[0.0], [1.0]]], np.float32)] * 4
  query = [np.array([[[q]]], np.float32) for q in (0.9, 0.1, 0.8, 0.7)]
  assert rep.prediction_depth(train, labels, query, np.array([[1]]), k=1)[0, 0] == 2
  assert rep.prediction_depth(train, labels, query, np.array([[0]]), k=1)[0, 0] == 4  # none agree


def test_features_and_prediction_depth_scores_on_a_model():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(30, 10)).astype(np.float32)
  y = rng.integers(0, 3, 30)
  v = stacked_init(MLP, 2, x)
  layers, logits = rep.features(mlp_apply, v, x, chunk_size=7, include_input=True,
                                return_logits=True)
  assert [l.shape for l in layers] == [(2, 30, 10), (2, 30, 16), (2, 30, 12)]
  for j in range(2):
    ref_logits, out = mlp_apply(member(v, j), x)
    np.testing.assert_allclose(logits[j], ref_logits, rtol=1e-5, atol=1e-6)
    for got, want in zip(layers, [x] + out["layers"]):
      np.testing.assert_allclose(got[j], want, rtol=1e-5, atol=1e-6)
  depth = rep.prediction_depth_scores(mlp_apply, v, x, y, k=3, chunk_size=7)
  np.testing.assert_array_equal(depth, brute_depth(layers, y, layers, logits.argmax(-1), 3, True))


def numpy_lloyd(x, c, iters):
  c = c.copy()
  for _ in range(iters):
    assign = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), axis=1)
    for j in range(len(c)):
      if (assign == j).any():
        c[j] = x[assign == j].mean(0)
  return c


@pytest.mark.parametrize("iters", [3, 200])  # 200: stops early at the fixed point
def test_lloyd_matches_numpy(iters):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(80, 3))
  init = x[rng.choice(80, 6, replace=False)] + 0.05
  init[5] = 100.0  # a far centroid: its cluster stays empty and keeps its position
  got = jax.jit(rep.lloyd, static_argnums=2)(x.astype(np.float32), init.astype(np.float32), iters)
  np.testing.assert_allclose(got, numpy_lloyd(x, init, iters), rtol=1e-4, atol=1e-5)


def test_kmeans_recovers_separated_blobs():
  rng = np.random.default_rng(4)
  centres = np.array([[0, 0], [20, 0], [0, 20], [20, 20]], float)
  assign = np.repeat(np.arange(4), 25)
  x = (centres[assign] + rng.normal(size=(100, 2))).astype(np.float32)
  got = np.asarray(rep.kmeans(x, 4, rep.member_key(7, 0)))
  blob_means = np.stack([x[assign == j].mean(0) for j in range(4)])
  order = [int(np.argmin(((got - m) ** 2).sum(-1))) for m in blob_means]
  assert sorted(order) == [0, 1, 2, 3]
  np.testing.assert_allclose(got[order], blob_means, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("normalize", [False, True])
def test_prototype_scores_match_numpy(normalize):
  rng = np.random.default_rng(5)
  feats = rng.normal(size=(2, 50, 4)).astype(np.float32)
  labels = rng.integers(0, 3, 50)
  out = rep.prototype_scores(feats, labels, num_clusters=5, seed=11, normalize=normalize)
  if normalize:
    feats = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  for j in range(2):
    f = feats[j].astype(np.float64)
    sup = [np.linalg.norm(f[i] - f[labels == labels[i]].mean(0)) for i in range(50)]
    np.testing.assert_allclose(out["proto_supervised"][j], sup, rtol=1e-4, atol=1e-5)
    cents = np.asarray(rep.kmeans(feats[j], 5, rep.member_key(11, j)), np.float64)
    selfsup = [min(np.linalg.norm(f[i] - c) for c in cents) for i in range(50)]
    np.testing.assert_allclose(out["proto_selfsup"][j], selfsup, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=r"num_clusters must be an int in \[1, 50\]"):
    rep.prototype_scores(feats, labels, num_clusters=51)


def lexsort_knn(train, labels, query, k, exclude_self, num_classes):
  """One member, all queries at once: the full distance matrix (exact for integer features), the
  neighbours by np.lexsort on (distance, index), majority vote (ties -> lowest class)."""
  d = ((query[:, None, :].astype(np.int64) - train[None].astype(np.int64)) ** 2).sum(-1)
  d = d.astype(np.float64)
  if exclude_self:
    d[np.arange(len(query)), np.arange(len(query))] = np.inf
  idx = np.broadcast_to(np.arange(train.shape[0]), d.shape)
  nbrs = np.stack([np.lexsort((i, row))[:k] for i, row in zip(idx, d)])
  return np.array([np.argmax(np.bincount(labels[n], minlength=num_classes)) for n in nbrs])


@pytest.mark.parametrize("block_size", [4, 5, 9, 36, 1000])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_blocked_knn_matches_lexsort_with_ties(block_size, exclude_self):
  # Integer features on a 3x3 grid with duplicated rows: most distances tie exactly, so the
  # neighbours depend on the (distance, index) order across reference blocks (36 examples: blocks
  # of 4 and 9 divide it, 5 does not, 36 and 1000 are one block). Labels = index with k=1 makes
  # the prediction the nearest neighbour's index itself.
  rng = np.random.default_rng(21)
  n = 36
  train = rng.integers(0, 3, size=(2, n, 2)).astype(np.float32)
  train[:, 20:26] = train[:, 3:9]  # exact duplicate rows, in and across blocks
  query = train if exclude_self else rng.integers(0, 3, size=(2, 23, 2)).astype(np.float32)
  for labels, k, num_classes in [(np.arange(n), 1, n), (np.arange(n), 3, n),
                                 (rng.integers(0, 3, n), 6, 3), (rng.integers(0, 4, n), 11, 4)]:
    got = rep.knn_predict(train, labels, query, k=k, exclude_self=exclude_self,
                          num_classes=num_classes, chunk_size=7, block_size=block_size)
    for j in range(2):
      np.testing.assert_array_equal(
          got[j], lexsort_knn(train[j], labels, query[j], k, exclude_self, num_classes),
          err_msg=f"k={k} member {j}")


def test_prediction_depth_blocked_with_ties_matches_brute_force():
  # Integer features (exact distances, many ties), more class-separated with depth; reference
  # blocks of 7 (not dividing N = 42), 6 and one block: the brute-force depths every time.
  rng = np.random.default_rng(5)
  r, n, k = 2, 42, 5
  labels = rng.integers(0, 3, n)
  layers = [(labels[:, None] * s + rng.integers(0, 3, size=(r, n, 3))).astype(np.float32)
            for s in (0, 1, 2, 4)]
  final = np.where(rng.uniform(size=(r, n)) < 0.8, labels, rng.integers(0, 3, (r, n)))
  ref = brute_depth(layers, labels, layers, final, k, exclude_self=True)
  assert len(np.unique(ref)) >= 3
  for block_size in (6, 7, 4096):
    got = rep.prediction_depth(layers, labels, None, final, k=k, chunk_size=16,
                               block_size=block_size)
    np.testing.assert_array_equal(got, ref, err_msg=f"block_size={block_size}")


def subset_brute_depth(train_layers, labels, final, k, subsets):
  """Depth with member j's probes restricted to the training rows `subsets[j]` (query i leaves
  out its own row when the subset holds it): brute-force k-NN on the subset, by the definition."""
  num_layers = len(train_layers)
  r, m = final.shape
  num_classes = max(labels.max(), final.max()) + 1
  depth = np.full((r, m), num_layers)
  for j in range(r):
    rows = subsets[j]
    probes = []
    for tl in train_layers:
      sub = tl[j][rows].astype(np.float64)
      pred = []
      for i in range(m):
        d = ((sub - tl[j][i]) ** 2).sum(-1)
        d[rows == i] = np.inf
        nbrs = np.argsort(d, kind="stable")[:k]
        pred.append(np.argmax(np.bincount(labels[rows][nbrs], minlength=num_classes)))
      probes.append(pred)
    for i in range(m):
      for l in range(num_layers):
        if all(probes[lp][i] == final[j, i] for lp in range(l, num_layers)):
          depth[j, i] = l
          break
  return depth


@pytest.mark.parametrize("block_size", [5, 4096])
def test_prediction_depth_reference_subset_matches_brute_force(block_size):
  # Integer features (many exact ties): each member's probes on its own random subset of 25 of the
  # 42 training examples equal a brute force on that subset; the subsets depend on the member's id.
  rng = np.random.default_rng(6)
  r, n, k, size = 3, 42, 4, 25
  labels = rng.integers(0, 3, n)
  layers = [(labels[:, None] * s + rng.integers(0, 3, size=(r, n, 3))).astype(np.float32)
            for s in (0, 1, 3)]
  layers[0] = np.broadcast_to(layers[0][:1], layers[0].shape)  # an input layer shared by members
  final = np.where(rng.uniform(size=(r, n)) < 0.8, labels, rng.integers(0, 3, (r, n)))
  got = rep.prediction_depth(layers, labels, None, final, k=k, chunk_size=16,
                             block_size=block_size, reference=size, seed=3)
  subsets = [rep.reference_subset(n, size, 3, j) for j in range(r)]
  assert all(s.size == size and len(np.unique(s)) == size for s in subsets)
  assert not np.array_equal(subsets[0], subsets[1])
  ref = subset_brute_depth(layers, labels, final, k, subsets)
  np.testing.assert_array_equal(got, ref)
  assert len(np.unique(ref)) >= 3
  # Member ids choose the subsets: members 2, 0 of this ensemble as ids 2, 0.
  got_ids = rep.prediction_depth([l[[2, 0]] for l in layers], labels, None, final[[2, 0]], k=k,
                                 reference=size, seed=3, member_ids=[2, 0])
  np.testing.assert_array_equal(got_ids, ref[[2, 0]])
  # reference >= N is the exact path.
  np.testing.assert_array_equal(
      rep.prediction_depth(layers, labels, None, final, k=k, reference=n),
      brute_depth(layers, labels, layers, final, k, exclude_self=True))
  with pytest.raises(ValueError, match=r"reference=4 must be at least k \+ 1 = 5"):
    rep.prediction_depth(layers, labels, None, final, k=k, reference=4)
  with pytest.raises(ValueError, match=r"reference must be an int >= 0 .* got -1"):
    rep.prediction_depth(layers, labels, None, final, k=k, reference=-1)


def test_prediction_depth_reference_subset_agrees_with_exact():
  # Gaussian classes, more separated with depth: depths from half of the training set as the
  # support set agree with the exact depths on most examples (measured: 0.78 equal, Spearman
  # 0.63; the exact depths shuffled: 0.42 and -0.02; an eighth of the set: 0.60 and 0.36).
  rng = np.random.default_rng(7)
  r, n, k = 2, 400, 10
  labels, layers = gaussian_layers(rng, r, n, 4, 8, 2, (0.2, 0.5, 1.0, 2.0))
  final = labels[None].repeat(r, 0)
  exact = rep.prediction_depth(layers, labels, None, final, k=k)
  approx = rep.prediction_depth(layers, labels, None, final, k=k, reference=n // 2)
  assert len(np.unique(exact)) >= 3
  equal = (approx == exact).mean()
  rho = stats.spearmanr(approx.ravel(), exact.ravel())[0]
  assert equal >= 0.7 and rho >= 0.5, (equal, rho)


@pytest.mark.parametrize("bad", [-1, 5, 10, 2.5, "all", True])
def test_knn_reference_option_is_validated(bad):
  # One line naming the bad value and the valid choices, before any training.
  from jaxdiff import recording  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError) as err:
    recording.validate({"knn_k": 10, "knn_reference": bad})
  assert str(err.value) == (f"scores.knn_reference={bad!r}: valid values are 0 (all training "
                            "examples) or an int above knn_k=10")
  recording.validate({"knn_k": 10, "knn_reference": 11})
  recording.validate({"knn_k": 10, "knn_reference": 0})

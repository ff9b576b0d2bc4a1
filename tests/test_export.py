"""Tests for jaxdiff.export: cleanlab, cartography, AUM and tidy exports round-trip.

A hand-made workdir (known logits, masks, a diverged member) checks values against loop references
and the readers' own logic; one tiny real training run checks the scripts end to end.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, tiny_config
from jaxdiff import export
from jaxdiff import heldout
from jaxdiff import store
from jaxdiff import train

R, N, C, E = 4, 12, 3, 3
DIVERGED = 2


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _margin(z, y):
  """Loop reference of the AUM margin z_y - max_{c != y} z_c for one example's logits."""
  return z[y] - max(z[c] for c in range(len(z)) if c != y)


def _make_workdir(path, subsets=True, history=True):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, C, N).astype(np.int32)
  hist = rng.normal(0, 2, (E, R, N, C)).astype(np.float32)
  hist[:, DIVERGED] = np.nan
  mask = rng.random((R, N)) < 0.5 if subsets else np.ones((R, N), bool)
  if subsets:
    mask[:, 0] = True  # example 0: every member trained on it (no held-out estimate)
    mask[:, 1] = False
  aum = np.zeros((R, N))
  for r in range(R):
    for n in range(N):
      aum[r, n] = np.mean([_margin(hist[e, r, n], labels[n]) for e in range(E)])
  loss = rng.random((R, N))
  loss[DIVERGED] = np.nan
  diverged = [r == DIVERGED for r in range(R)]
  store.save_scores(os.path.join(path, "scores"),
                    {"loss": loss, "aum": -aum,
                     "correct": -(hist[-1].argmax(-1) == labels).astype(float)},
                    example_ids=np.arange(N) + 100, labels=labels,
                    meta={"negated": ["aum", "correct"], "diverged": diverged, "num_epochs": E,
                          "subset_fractions": [0.5 if subsets else 1.0] * R})
  np.save(os.path.join(path, "logits.npy"), hist[-1])
  np.save(os.path.join(path, "subset_mask.npy"), mask)
  np.savez(os.path.join(path, "ensemble_scores.npz"), frac_correct=np.linspace(0, 1, N))
  if history:
    for e in range(E):
      os.makedirs(os.path.join(path, "history"), exist_ok=True)
      np.savez(os.path.join(path, "history", f"epoch_{e + 1:04d}.npz"), logits=hist[e])
  return {"labels": labels, "hist": hist, "mask": mask, "aum": aum, "loss": loss,
          "ids": np.arange(N) + 100}


def _cleanlab_checks(p, labels):
  """What cleanlab's input validation asks of pred_probs and labels (docs: labels (N,) ints in
  0..K-1, pred_probs (N, K) with rows summing to 1)."""
  assert p.ndim == 2 and p.shape[0] == labels.shape[0]
  assert np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0 and labels.max() < p.shape[1]
  assert np.isfinite(p).all() and (p >= 0).all()
  np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)


def test_cleanlab_out_of_sample_rows_match_reference(tmp_path):
  ref = _make_workdir(str(tmp_path / "w"))
  meta = export.export_cleanlab(str(tmp_path / "w"), str(tmp_path / "out"))
  p = np.load(tmp_path / "out" / "pred_probs.npy")
  labels = np.load(tmp_path / "out" / "labels.npy")
  assert p.shape == (N, C) and labels.shape == (N,)
  _cleanlab_checks(p, labels)
  np.testing.assert_array_equal(labels, ref["labels"])
  probs = _softmax(ref["hist"][-1].astype(np.float64))
  valid = [r for r in range(R) if r != DIVERGED]
  counts = np.load(tmp_path / "out" / "oos_count.npy")
  for n in range(N):
    held = [r for r in valid if not ref["mask"][r, n]]
    assert counts[n] == len(held)
    expect = probs[held, n].mean(0) if held else probs[valid, n].mean(0)  # filled in-sample
    np.testing.assert_allclose(p[n], expect, rtol=1e-5)
  assert counts[0] == 0 and meta["in_sample_rows"] == 1 and "warning" in meta
  assert json.loads((tmp_path / "out" / "meta.json").read_text())["out_of_sample_rows"] == N - 1


def test_cleanlab_without_subsets_is_flagged_in_sample(tmp_path):
  ref = _make_workdir(str(tmp_path / "w"), subsets=False)
  meta = export.export_cleanlab(str(tmp_path / "w"), str(tmp_path / "out"))
  assert "IN-SAMPLE" in meta["warning"]
  assert "IN-SAMPLE" in (tmp_path / "out" / "README.md").read_text()
  probs = _softmax(ref["hist"][-1].astype(np.float64))
  np.testing.assert_allclose(np.load(tmp_path / "out" / "pred_probs.npy"),
                             probs[[0, 1, 3]].mean(0), rtol=1e-5)


def _read_training_dynamics(model_dir):
  """allenai/cartography's reader, re-stated: count the files of training_dynamics/, read
  dynamics_epoch_{k}.jsonl in order, group logits by guid (the gold label from epoch 0)."""
  td_dir = os.path.join(model_dir, "training_dynamics")
  num_epochs = len([f for f in os.listdir(td_dir) if os.path.isfile(os.path.join(td_dir, f))])
  dynamics = {}
  for k in range(num_epochs):
    with open(os.path.join(td_dir, f"dynamics_epoch_{k}.jsonl")) as f:
      for line in f:
        rec = json.loads(line.strip())
        if rec["guid"] not in dynamics:
          assert k == 0
          dynamics[rec["guid"]] = {"gold": rec["gold"], "logits": []}
        dynamics[rec["guid"]]["logits"].append(rec[f"logits_epoch_{k}"])
  return dynamics, num_epochs


def test_cartography_round_trip(tmp_path):
  ref = _make_workdir(str(tmp_path / "w"))
  stale = tmp_path / "out" / "member_000" / "training_dynamics" / "dynamics_epoch_7.jsonl"
  stale.parent.mkdir(parents=True)
  stale.write_text("{}\n")  # from an older, longer export: must not survive
  dirs = export.export_cartography(str(tmp_path / "w"), str(tmp_path / "out"))
  assert [os.path.basename(d) for d in dirs] == ["member_000", "member_001", "member_003"]
  for d in dirs:
    r = int(d[-3:])
    dyn, epochs = _read_training_dynamics(d)
    assert epochs == E
    trained = ref["ids"][ref["mask"][r]]
    assert sorted(dyn) == sorted(trained.tolist())  # one line per (trained) example
    for n in np.flatnonzero(ref["mask"][r]):
      rec = dyn[int(ref["ids"][n])]
      assert rec["gold"] == ref["labels"][n]
      np.testing.assert_allclose(rec["logits"], ref["hist"][:, r, n], rtol=1e-6)
    for k in range(E):
      lines = (tmp_path / "out" / f"member_{r:03d}" / "training_dynamics" /
               f"dynamics_epoch_{k}.jsonl").read_text().splitlines()
      assert len(lines) == ref["mask"][r].sum()
  dirs = export.export_cartography(str(tmp_path / "w"), str(tmp_path / "all"), members=[1],
                                   only_trained=False)
  assert len(_read_training_dynamics(dirs[0])[0]) == N
  _make_workdir(str(tmp_path / "nohist"), history=False)
  with pytest.raises(ValueError, match="save_history=True"):
    export.export_cartography(str(tmp_path / "nohist"), str(tmp_path / "x"))
  with pytest.raises(ValueError, match=r"members \[7\] out of range"):
    export.export_cartography(str(tmp_path / "w"), str(tmp_path / "x"), members=[7])


def test_aum_csv_matches_the_aum_package_semantics(tmp_path):
  ref = _make_workdir(str(tmp_path / "w"))
  export.export_aum(str(tmp_path / "w"), str(tmp_path / "out"), full_records=True)
  df = pd.read_csv(tmp_path / "out" / "aum_values.csv")
  assert list(df.columns) == ["sample_id", "aum"]
  assert (np.diff(df["aum"].to_numpy()) <= 0).all()  # sorted descending, as AUMCalculator does
  valid = [r for r in range(R) if r != DIVERGED]
  got = dict(zip(df["sample_id"], df["aum"]))
  for n in range(N):
    trained = [r for r in valid if ref["mask"][r, n]]
    if trained:
      assert got[ref["ids"][n]] == pytest.approx(np.mean(ref["aum"][trained, n]), rel=1e-5)
    else:
      assert ref["ids"][n] not in got
  # Per member, the package's full records: running mean of the margin over measurements.
  full = pd.read_csv(tmp_path / "out" / "member_001" / "full_aum_records.csv")
  assert list(full.columns) == ["sample_id", "num_measurements", "target_logit", "target_val",
                                "other_logit", "other_val", "margin", "aum"]
  for n in np.flatnonzero(ref["mask"][1]):
    rows = full[full["sample_id"] == ref["ids"][n]].sort_values("num_measurements")
    z = ref["hist"][:, 1, n]
    m = [_margin(z[e], ref["labels"][n]) for e in range(E)]
    np.testing.assert_allclose(rows["margin"], m, rtol=1e-5)
    np.testing.assert_allclose(rows["aum"], np.cumsum(m) / np.arange(1, E + 1), rtol=1e-5)
    assert (rows["target_val"] == ref["labels"][n]).all()
    np.testing.assert_allclose(rows["aum"].iloc[-1], ref["aum"][1, n], rtol=1e-5)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_tidy_table_round_trip(tmp_path, fmt):
  ref = _make_workdir(str(tmp_path / "w"))
  path = export.export_tidy(str(tmp_path / "w"), str(tmp_path / "out"), fmt=fmt, min_holdout=1)
  df = pd.read_parquet(path) if fmt == "parquet" else pd.read_csv(path)
  meta = json.loads((tmp_path / "out" / "tidy_meta.json").read_text())
  assert list(df.columns) == ["example_id", "run", "score", "value"]
  assert meta["diverged_members"] == [DIVERGED] and DIVERGED not in set(df["run"])
  loss = df[df["score"] == "loss"].pivot(index="run", columns="example_id", values="value")
  np.testing.assert_allclose(loss.to_numpy(), ref["loss"][[0, 1, 3]], rtol=1e-6)
  assert list(loss.columns) == ref["ids"].tolist()
  # Per-example scores: run -1, stored higher-is-harder (negated names listed).
  fc = df[df["score"] == "frac_correct"].sort_values("example_id")
  assert (fc["run"] == -1).all()
  np.testing.assert_allclose(fc["value"], -np.linspace(0, 1, N), atol=1e-6)
  w = heldout.read_workdir(str(tmp_path / "w"))
  res = heldout.analyze(w, min_holdout=1)
  cs = df[df["score"] == "c_score"].sort_values("example_id")["value"].to_numpy()
  np.testing.assert_allclose(cs, -res.c.integrated, rtol=1e-6)
  assert {"aum", "correct", "frac_correct", "c_score", "oos_p_y"} <= set(meta["negated"])
  assert "loss" not in meta["negated"] and "memorisation" not in meta["negated"]
  n_rows = 3 * N * 3 + N + 3 * N  # 3 stored scores x 3 valid runs; frac_correct; 3 held-out
  assert len(df) == n_rows


def test_export_rejects_unknown_formats(tmp_path):
  _make_workdir(str(tmp_path / "w"))
  with pytest.raises(ValueError, match=r"unknown export format\(s\) \['clean'\]"):
    export.export(str(tmp_path / "w"), str(tmp_path / "o"), ["clean"])
  with pytest.raises(ValueError, match="fmt='xlsx'"):
    export.export_tidy(str(tmp_path / "w"), str(tmp_path / "o"), fmt="xlsx")


def test_scripts_end_to_end_on_a_real_workdir(tmp_path):
  c = tiny_config("mlp", num_epochs=2, subset_fraction=0.5,
                  **{"scores.save_history": True, "data.label_noise": 0.1, "scores.vog": False,
                     "scores.grand": False, "scores.representation": False})
  train.train_and_evaluate(c, str(tmp_path / "w"))
  env = dict(os.environ, PYTHONPATH=ROOT)
  subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "export.py"),
                  f"--workdir={tmp_path / 'w'}", f"--out={tmp_path / 'x'}",
                  "--format=cleanlab,cartography,aum,tidy"], check=True, env=env,
                 capture_output=True, timeout=120)
  p = np.load(tmp_path / "x" / "cleanlab" / "pred_probs.npy")
  labels = np.load(tmp_path / "x" / "cleanlab" / "labels.npy")
  assert p.shape == (400, 10)
  _cleanlab_checks(p, labels)
  np.testing.assert_array_equal(labels, np.load(tmp_path / "w" / "scores" / "labels.npy"))
  mask = np.load(tmp_path / "w" / "subset_mask.npy")
  dyn, epochs = _read_training_dynamics(str(tmp_path / "x" / "cartography" / "member_002"))
  assert epochs == 2 and len(dyn) == mask[2].sum() == 200
  assert (tmp_path / "x" / "tidy" / "tidy.parquet").exists()
  assert len(pd.read_csv(tmp_path / "x" / "aum" / "aum_values.csv")) == mask.any(0).sum()
  # The label-noise AUROC table of experiments/heldout.py, through the same library calls.
  w = heldout.read_workdir(str(tmp_path / "w"))
  held, insample = heldout.heldout_difficulty(heldout.analyze(w, min_holdout=1))
  s = store.load_scores(str(tmp_path / "w" / "scores"))
  rows, _ = heldout.noise_auroc_rows(held, insample, {k: s.get(k) for k in s.scores}, w.noise_mask)
  assert {r["kind"] for r in rows} == {"held-out", "in-sample", "stored"}
  assert all(0.0 <= r["auroc"] <= 1.0 for r in rows)


def test_impossible_format_writes_nothing(tmp_path):
  _make_workdir(str(tmp_path / "w"), history=False)
  os.unlink(tmp_path / "w" / "scores" / "aum.npy")
  meta = json.loads((tmp_path / "w" / "scores" / "meta.json").read_text())
  meta["score_names"].remove("aum")
  meta.get("sha256", {}).pop("aum.npy", None)
  (tmp_path / "w" / "scores" / "meta.json").write_text(json.dumps(meta))
  out = tmp_path / "out"
  # Default formats: cartography and AUM need history/; both named, nothing written.
  with pytest.raises(ValueError, match=r"cartography.*history/.*\n.*aum.*history/"):
    export.export(str(tmp_path / "w"), str(out))
  assert not out.exists()
  env = dict(os.environ, PYTHONPATH=ROOT)
  res = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "export.py"),
                        f"--workdir={tmp_path / 'w'}", f"--out={out}"], env=env,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode != 0 and "save_history" in res.stderr and not out.exists()
  export.export(str(tmp_path / "w"), str(out), ["cleanlab", "tidy"])
  assert sorted(os.listdir(out)) == ["cleanlab", "tidy"]


def test_truncated_logits_are_named_and_nothing_is_written(tmp_path):
  _make_workdir(str(tmp_path / "w"))
  path = tmp_path / "w" / "logits.npy"
  path.write_bytes(path.read_bytes()[:-9])
  with pytest.raises(store.StoreError, match=f"corrupt or truncated file '{path}'"):
    export.export(str(tmp_path / "w"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()

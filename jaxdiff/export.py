"""Exports of a training workdir to the file formats other tools read.

cleanlab `pred_probs` + `labels` (.npy), dataset-cartography training-dynamics JSON lines, AUM
`aum_values.csv`, and a tidy long table of every score (example_id, run, score, value).

Layouts (under the output directory; every file written atomically, readable with numpy, json,
pandas)::

    cleanlab/pred_probs.npy     float32 [N, C], rows sum to 1; out-of-sample when members trained
                                on subsets (mean over held-out members), else the in-sample
                                ensemble mean (flagged in meta.json and README.md)
    cleanlab/labels.npy         int64 [N] the (possibly noisy) training labels, in 0..C-1
    cleanlab/example_ids.npy    int64 [N]
    cleanlab/oos_count.npy      int64 [N] held-out members behind each row (0: filled in-sample)
    cleanlab/meta.json, README.md
    cartography/member_XXX/training_dynamics/dynamics_epoch_{k}.jsonl
                                k = 0..E-1; one line {"guid", "logits_epoch_k", "gold"} per example
                                (allenai/cartography's `read_training_dynamics` reads a directory)
    aum/aum_values.csv          sample_id, aum (mean over the members that trained on it), sorted by
                                aum descending as the `aum` package writes it
    aum/member_XXX/aum_values.csv [, full_aum_records.csv]
    tidy.parquet | tidy.csv     example_id, run, score, value (+ tidy_meta.json)
"""

from __future__ import annotations

import io
import os
import re
from typing import Any, Iterable, Sequence

from absl import logging
import numpy as np
import pandas as pd

from jaxdiff import heldout
from jaxdiff import scores as scores_lib
from jaxdiff.scores import probs as probs_lib
from jaxdiff.scores import registry
from jaxdiff import store
from jaxdiff import workdir as workdir_lib

FORMATS = ("cleanlab", "cartography", "aum", "tidy")
TIDY_FORMATS = ("auto", "parquet", "csv")


def _arrays(w: heldout.WorkdirArrays | str) -> heldout.WorkdirArrays:
  return heldout.read_workdir(w) if isinstance(w, str) else w


def _valid_members(w: heldout.WorkdirArrays, members: Sequence[int] | None) -> list[int]:
  runs = w.mask.shape[0]
  if members is None:
    return [int(r) for r in np.flatnonzero(w.valid)]
  bad = [m for m in members if not 0 <= int(m) < runs]
  if bad:
    raise ValueError(f"members {bad} out of range; this workdir has members 0..{runs - 1}")
  return [int(m) for m in members]


# ----------------------------------------------------------------------------- cleanlab


def _check_cleanlab(w: heldout.WorkdirArrays) -> None:
  if not w.valid.any():
    raise ValueError("every member diverged: no predicted probabilities to export")


def cleanlab_arrays(w: heldout.WorkdirArrays, min_holdout: int = 1) -> dict[str, Any]:
  """`pred_probs` and `labels` as cleanlab's `find_label_issues(labels, pred_probs)` takes them.

  With subsets, row n is the mean predicted distribution of the valid members that held example n
  out (`heldout.oos_probs`); rows with fewer than `min_holdout` such members, and every row without
  subsets, are the mean over all valid members, which saw the example in training (in-sample:
  cleanlab asks for out-of-sample probabilities, so such rows are flagged).

  Returns:
    {"pred_probs": float64 [N, C], "labels": int64 [N], "oos_count": int64 [N],
     "out_of_sample": bool [N]}.
  """
  _check_cleanlab(w)
  probs = probs_lib.softmax(w.logits)
  ens = probs[w.valid].mean(0)
  if w.has_subsets:
    p, count = heldout.oos_probs(probs, w.mask, w.valid, min_holdout=min_holdout)
    oos = count >= min_holdout
    p = np.where(oos[:, None], p, ens)
  else:
    p, count, oos = ens, np.zeros(ens.shape[0], np.int64), np.zeros(ens.shape[0], bool)
  p = p / p.sum(1, keepdims=True)
  return {"pred_probs": p, "labels": np.asarray(w.labels, np.int64), "oos_count": count,
          "out_of_sample": oos}


def export_cleanlab(w: heldout.WorkdirArrays | str, out_dir: str, *, min_holdout: int = 1
                    ) -> dict:
  """Writes `pred_probs.npy` [N, C] and `labels.npy` [N] for cleanlab (see `cleanlab_arrays`).

  Returns:
    the meta dict also written to `out_dir/meta.json`.
  """
  w = _arrays(w)
  a = cleanlab_arrays(w, min_holdout)
  n, c = a["pred_probs"].shape
  num_in = int((~a["out_of_sample"]).sum())
  meta = {"source_workdir": os.path.abspath(w.workdir), "num_examples": n, "num_classes": c,
          "out_of_sample_rows": n - num_in, "in_sample_rows": num_in,
          "min_holdout": int(min_holdout), "members_used": int(w.valid.sum()),
          "subset_fractions": w.fractions.tolist()}
  if not w.has_subsets:
    meta["warning"] = ("IN-SAMPLE: the members trained on every example, so pred_probs is the "
                       "in-sample ensemble mean, not the out-of-sample probabilities cleanlab "
                       "expects; retrain with subset_fraction < 1 (e.g. 0.5) for held-out ones.")
    logging.warning("cleanlab export of %s: %s", w.workdir, meta["warning"])
  elif num_in:
    meta["warning"] = (f"{num_in} of {n} rows had fewer than {min_holdout} held-out members and "
                       "hold the in-sample ensemble mean (oos_count.npy == their count)")
    logging.warning("cleanlab export of %s: %s", w.workdir, meta["warning"])
  store.atomic_save_npy(os.path.join(out_dir, "pred_probs.npy"),
                        a["pred_probs"].astype(np.float32))
  store.atomic_save_npy(os.path.join(out_dir, "labels.npy"), a["labels"])
  store.atomic_save_npy(os.path.join(out_dir, "example_ids.npy"),
                        np.asarray(w.example_ids, np.int64))
  store.atomic_save_npy(os.path.join(out_dir, "oos_count.npy"), a["oos_count"])
  note = ["# cleanlab export", "",
          f"From `{meta['source_workdir']}`: {n} examples, {c} classes, "
          f"{meta['members_used']} members.", "",
          f"- `pred_probs.npy` float32 [{n}, {c}]: "
          + ("mean softmax of the members that held each example out (out-of-sample)."
             if w.has_subsets else "mean softmax of all members (IN-SAMPLE)."),
          f"- `labels.npy` int64 [{n}]: the training labels (after any label noise).",
          "- `example_ids.npy`: row -> example id; `oos_count.npy`: held-out members per row.", ""]
  if "warning" in meta:
    note += [f"**Warning:** {meta['warning']}", ""]
  note += ["```python", "import numpy as np", "from cleanlab.filter import find_label_issues",
           "issues = find_label_issues(labels=np.load('labels.npy'), "
           "pred_probs=np.load('pred_probs.npy'),",
           "                           return_indices_ranked_by='self_confidence')", "```", ""]
  store.atomic_write_text(os.path.join(out_dir, "README.md"), "\n".join(note))
  store.atomic_write_json(os.path.join(out_dir, "meta.json"), meta)
  return meta


# ----------------------------------------------------------------------------- cartography


def _history_logits(w: heldout.WorkdirArrays, what: str) -> list[str]:
  if not w.history:
    raise ValueError(f"{what} needs per-epoch logits, and {w.workdir!r} has no history/: "
                     "train with --config.scores.save_history=True")
  return w.history


def _load_history(w: heldout.WorkdirArrays, path: str, header_only: bool = False):
  """One epoch's logits `[R, N, C]` (or only their shape, checked), naming the file if broken."""
  return store.load_npz_array(path, "logits", w.logits.shape, names=("R", "N", "C"),
                              header_only=header_only, what="one epoch's logits")


def _cartography_history(w: heldout.WorkdirArrays) -> list[str]:
  """The history files of a cartography export, checked to be every epoch from 1, whole, and of
  the final logits' shape (their headers only)."""
  paths = _history_logits(w, "the cartography export")
  epochs = [_epoch_of(p) for p in paths]
  if epochs != list(range(1, len(epochs) + 1)):
    raise ValueError(f"history/ of {w.workdir!r} has epochs {epochs[:5]}...; cartography needs "
                     "every epoch from 1 (an interrupted history?)")
  for p in paths:
    _load_history(w, p, header_only=True)
  return paths


def _epoch_of(path: str) -> int:
  return int(re.search(r"epoch_(\d+)\.npz$", path).group(1))


def export_cartography(w: heldout.WorkdirArrays | str, out_dir: str, *,
                       members: Sequence[int] | None = None, only_trained: bool = True
                       ) -> list[str]:
  """Training-dynamics JSON lines in the layout of allenai/cartography, one directory per member.

  Swayamdipta et al. 2020, "Dataset Cartography": each member's
  `member_XXX/training_dynamics/dynamics_epoch_{k}.jsonl` (k = 0..E-1 for the recorded epochs
  1..E) has one line per example, `{"guid": example id, "logits_epoch_k": [C floats], "gold":
  label}`, what cartography's `read_training_dynamics(model_dir)` reads (it counts the files of
  the directory to find E, so nothing else is written there).

  Args:
    w: a workdir (or its arrays) trained with `scores.save_history=True`.
    out_dir: output directory.
    members: member indices to export (default: every non-diverged member).
    only_trained: write only the examples each member trained on (its training dynamics); all
      examples otherwise. Without subsets both are every example.

  Returns:
    the member directories (pass one as cartography's model_dir).
  """
  w = _arrays(w)
  paths = _cartography_history(w)
  chosen = _valid_members(w, members)
  labels = np.asarray(w.labels, np.int64)
  ids = np.asarray(w.example_ids, np.int64)
  dirs = [os.path.join(out_dir, f"member_{r:03d}", "training_dynamics") for r in chosen]
  for k, path in enumerate(paths):
    logits = _load_history(w, path)
    for r, d in zip(chosen, dirs):
      keep = w.mask[r] if only_trained else np.ones(ids.shape, bool)
      df = pd.DataFrame({"guid": ids[keep],
                         f"logits_epoch_{k}": list(logits[r, keep].astype(np.float64)),
                         "gold": labels[keep]})
      text = df.to_json(orient="records", lines=True, double_precision=8)
      store.atomic_write_text(os.path.join(d, f"dynamics_epoch_{k}.jsonl"),
                              text if text.endswith("\n") else text + "\n")
  for d in dirs:  # drop epochs of an older, longer export: the reader counts files
    for f in os.listdir(d):
      m = re.fullmatch(r"dynamics_epoch_(\d+)\.jsonl", f)
      if m and int(m.group(1)) >= len(paths):
        os.unlink(os.path.join(d, f))
  return [os.path.dirname(d) for d in dirs]


# ----------------------------------------------------------------------------- AUM


def _natural(w: heldout.WorkdirArrays, name: str, stored: np.ndarray) -> np.ndarray:
  negated = w.meta.get("negated", sorted(scores_lib.NEGATED))
  return -stored if name in negated else stored


def margins(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
  """Logit margin z_y - max_{c != y} z_c and its parts (Pleiss et al. 2020), over `[..., N, C]`,
  named as the AUM authors' full records name them."""
  m = probs_lib.margins(logits, labels)
  return {"target_logit": m["target"], "other_logit": m["other"], "other_val": m["other_idx"],
          "margin": m["margin"]}


def _stored_aum(w: heldout.WorkdirArrays) -> np.ndarray | None:
  """scores/aum.npy `[R, N]` as stored (checked against its SHA-256), or None without it."""
  path = workdir_lib.score_file(w.workdir, "aum")
  if not os.path.exists(path):
    return None
  return store.load_npy(path, w.mask.shape, sha256=(w.meta.get("sha256") or {}).get("aum.npy"))


def _check_aum(w: heldout.WorkdirArrays) -> None:
  if _stored_aum(w) is None:
    for p in _history_logits(w, "AUM (no scores/aum.npy)"):
      _load_history(w, p, header_only=True)


def export_aum(w: heldout.WorkdirArrays | str, out_dir: str, *,
               members: Sequence[int] | None = None, full_records: bool = False) -> dict:
  """AUM values as the `aum` package's `AUMCalculator.finalize` writes them.

  Pleiss, Zhang, Elenberg & Weinberger 2020, "Identifying Mislabeled Data using the Area Under the
  Margin Ranking": AUM(x, y) = mean over measurements t of z_y^(t) - max_{c != y} z_c^(t). The
  values are jaxdiff's `aum` score (measured at every end-of-epoch evaluation; the paper measures
  every minibatch pass), natural orientation (low = suspicious). `aum_values.csv` has columns
  `sample_id, aum` sorted by aum descending; the top-level file averages over the members that
  trained on each example, `member_XXX/` holds each member's. With `full_records` (needs
  history/), `member_XXX/full_aum_records.csv` has the package's per-measurement columns
  `sample_id, num_measurements, target_logit (value), target_val (label), other_logit (value),
  other_val (class), margin, aum (running mean)`.

  Returns:
    {"members": [...], "files": [...]}.
  """
  w = _arrays(w)
  chosen = _valid_members(w, members)
  ids = np.asarray(w.example_ids, np.int64)
  stored = _stored_aum(w)
  if stored is not None:
    aum = _natural(w, "aum", stored.astype(np.float64))
  else:
    paths = _history_logits(w, "AUM (no scores/aum.npy)")
    aum = np.mean([margins(_load_history(w, p), w.labels)["margin"] for p in paths], axis=0)
  files = []

  def write(df, p):
    store.atomic_write_text(p, df.to_csv(index=False))
    files.append(p)

  for r in chosen:
    keep = w.mask[r]
    df = pd.DataFrame({"sample_id": ids[keep], "aum": aum[r, keep]})
    write(df.sort_values("aum", ascending=False, kind="stable"),
          os.path.join(out_dir, f"member_{r:03d}", "aum_values.csv"))
  sel = w.mask & np.isin(np.arange(w.mask.shape[0]), chosen)[:, None]
  count = sel.sum(0)
  with np.errstate(invalid="ignore"):
    mean = np.where(sel, aum, 0.0).sum(0) / count
  keep = count > 0
  write(pd.DataFrame({"sample_id": ids[keep], "aum": mean[keep]}).sort_values(
      "aum", ascending=False, kind="stable"), os.path.join(out_dir, "aum_values.csv"))
  if full_records:
    paths = _history_logits(w, "full AUM records")
    per_epoch = [margins(_load_history(w, p), w.labels) for p in paths]  # each [R, N]
    e = len(per_epoch)
    for r in chosen:
      keep = w.mask[r]
      n = int(keep.sum())
      stack = {k: np.stack([m[k][r, keep] for m in per_epoch], 1) for k in per_epoch[0]}  # [n, E]
      running = np.cumsum(stack["margin"], 1) / np.arange(1, e + 1)
      df = pd.DataFrame({
          "sample_id": np.repeat(ids[keep], e), "num_measurements": np.tile(np.arange(1, e + 1), n),
          "target_logit": stack["target_logit"].ravel(),
          "target_val": np.repeat(np.asarray(w.labels, np.int64)[keep], e),
          "other_logit": stack["other_logit"].ravel(), "other_val": stack["other_val"].ravel(),
          "margin": stack["margin"].ravel(), "aum": running.ravel()})
      write(df, os.path.join(out_dir, f"member_{r:03d}", "full_aum_records.csv"))
  return {"members": chosen, "files": files}


# ----------------------------------------------------------------------------- tidy table


def tidy_table(w: heldout.WorkdirArrays | str, *, include_diverged: bool = False,
               include_heldout: bool = True, min_holdout: int = 2) -> tuple[pd.DataFrame, dict]:
  """Every score of a workdir as one long table: example_id, run, score, value.

  Per-member scores (scores/) have run = member index; per-example scores have run = -1: the
  ensemble scores (ensemble_scores.npz) and, for workdirs trained on subsets, the held-out ones:
  `c_score` (integrated C-score, Jiang et al. 2021), `c_score_s<fraction>` (per fraction when
  several), `oos_p_y` (out-of-sample p_y) and `memorisation` (Feldman & Zhang 2020, mean over
  fractions). Values follow the store's convention, higher = harder: the names listed in the
  returned meta's "negated" are stored negated. Diverged members' rows are left out unless asked.

  Returns:
    (DataFrame with columns example_id int64, run int64, score category, value float32; meta
     dict with "orientation", "negated", "diverged_members").
  """
  w = _arrays(w)
  s = workdir_lib.load_scores(w.workdir)
  ids = np.asarray(s.example_ids, np.int64)
  n = ids.size
  runs = np.arange(s.num_runs)
  keep_runs = runs if include_diverged else runs[s.valid_runs]
  negated = set(s.meta.get("negated", sorted(scores_lib.NEGATED)))
  parts = []

  def add(name, values, run_ids):
    values = np.asarray(values, np.float32).reshape(len(run_ids), n)
    parts.append(pd.DataFrame({
        "example_id": np.tile(ids, len(run_ids)),
        "run": np.repeat(np.asarray(run_ids, np.int64), n),
        "score": name, "value": values.ravel()}))

  for name in sorted(s.scores):
    add(name, s.scores[name][keep_runs], keep_runs)
  epath = workdir_lib.path(w.workdir, "ensemble_scores")
  if os.path.exists(epath):
    ens = scores_lib.orient(store.load_npz(epath, what="ensemble scores"), strict=False)
    for name in sorted(ens):
      add(name, ens[name], [-1])
      if name in scores_lib.NEGATED:
        negated.add(name)
  if include_heldout and w.has_subsets:
    res = heldout.analyze(w, min_holdout=min_holdout)
    extra = {"c_score": res.c.integrated,
             "oos_p_y": probs_lib.label_prob(res.oos_probs, w.labels),
             "memorisation": res.mem.value.mean(0)}
    if len(res.c.fractions) > 1:
      extra.update({f"c_score_s{f:g}": res.c.estimate.mean[i]
                    for i, f in enumerate(res.c.fractions)})
    for name, v in registry.oriented(extra).items():
      add(name, v, [-1])
    negated |= {k for k in extra if registry.is_negated(k)}
  df = pd.concat(parts, ignore_index=True)
  df["score"] = df["score"].astype("category")
  meta = {"orientation": "higher is harder; names in 'negated' are stored negated (their natural "
                         "value is higher-is-easier)",
          "negated": sorted(negated & set(df["score"].cat.categories)),
          "run_-1": "per-example scores (ensemble and held-out)",
          "diverged_members": [int(r) for r in runs[~s.valid_runs]],
          "diverged_included": bool(include_diverged), "source_workdir": os.path.abspath(w.workdir)}
  return df, meta


def export_tidy(w: heldout.WorkdirArrays | str, out_dir: str, *, fmt: str = "auto",
                **kwargs) -> str:
  """Writes `tidy_table` as `tidy.parquet` (needs pyarrow; fmt="auto" uses it when installed) or
  `tidy.csv`, and `tidy_meta.json`. Returns the table's path."""
  if fmt not in TIDY_FORMATS:
    raise ValueError(f"fmt={fmt!r}; valid: {', '.join(TIDY_FORMATS)}")
  if fmt in ("auto", "parquet"):
    try:
      import pyarrow  # pylint: disable=g-import-not-at-top,unused-import
      fmt = "parquet"
    except ImportError:
      if fmt == "parquet":
        raise ValueError("fmt='parquet' needs pyarrow (pip install pyarrow); or use fmt='csv'")
      fmt = "csv"
  df, meta = tidy_table(w, **kwargs)
  meta["format"] = fmt
  if fmt == "parquet":
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    path = os.path.join(out_dir, "tidy.parquet")
    store.atomic_write_bytes(path, buf.getvalue())
  else:
    path = os.path.join(out_dir, "tidy.csv")
    store.atomic_write_text(path, df.to_csv(index=False))
  store.atomic_write_json(os.path.join(out_dir, "tidy_meta.json"), meta)
  return path


def export(workdir: str, out_dir: str, formats: Iterable[str] = FORMATS) -> dict[str, Any]:
  """Writes the chosen `formats` (subset of FORMATS) of `workdir` under `out_dir/<format>/`.

  Raises:
    ValueError (store.StoreError for files) listing every format that cannot be written and why
    (e.g. cartography without history/), before anything is written.
  """
  formats = [formats] if isinstance(formats, str) else list(formats)
  bad = [f for f in formats if f not in FORMATS]
  if bad or not formats:
    raise ValueError(f"unknown export format(s) {bad or formats}; valid: {', '.join(FORMATS)}")
  w = heldout.read_workdir(workdir)
  # Every format is checked before the first file is written: a refused export writes nothing.
  checks = {"cleanlab": _check_cleanlab, "cartography": _cartography_history,
            "aum": _check_aum,
            "tidy": lambda w: workdir_lib.load_scores(w.workdir)}
  problems = []
  for f in formats:
    try:
      checks[f](w)
    except ValueError as e:  # store.StoreError included
      problems.append(f"{f}: {e}")
  if problems:
    raise ValueError(f"cannot export {workdir!r} (nothing written; drop the format from --format "
                     "or fix the workdir):\n" + "\n".join(problems))
  done = {}
  for f in formats:
    sub = os.path.join(out_dir, f)
    if f == "cleanlab":
      done[f] = export_cleanlab(w, sub)
    elif f == "cartography":
      done[f] = export_cartography(w, sub)
    elif f == "aum":
      done[f] = export_aum(w, sub)
    else:
      done[f] = export_tidy(w, sub)
  return done

"""Member blocks merged into one workdir (jaxdiff/blocks.py, experiments/merge.py).

The reference is one run of all members: two blocks [0, 2) and [2, 4), merged by the script in
a subprocess, must give its workdir bit for bit (scores, meta, metrics, config, logits, masks,
history, snapshots, every checkpoint leaf), and its readers the same results. Blocks that are
not the parts of one run are refused by the script in one line, with nothing written.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdiff import blocks
from jaxdiff import checkpoints
from jaxdiff import cli
from jaxdiff import heldout
from jaxdiff import posthoc
from jaxdiff import store
from jaxdiff import train
from jaxdiff import workdir as workdir_lib
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MERGE_PY = os.path.join(ROOT, "experiments", "merge.py")
# Every file kind a run writes: subsets, label noise, history, a snapshot, all score families.
OPTIONS = {"subset_fraction": 0.5, "data.label_noise": 0.1, "scores.save_history": True,
           "scores.snapshot_epochs": (1,), "scores.knn_k": 5}


def _config(first_member, num_runs):
  return tiny_config("mlp", first_member=first_member, num_runs=num_runs, **OPTIONS)


def _merge_cmd(block_dirs, out):
  env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
  env.pop(cli.TRACEBACK_ENV, None)
  return subprocess.Popen([sys.executable, MERGE_PY, f"--blocks={','.join(map(str, block_dirs))}",
                           f"--workdir={out}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, cwd=ROOT)


def _finish(proc):
  _, err = proc.communicate(timeout=180)
  lines = [l for l in err.strip().splitlines() if l.startswith("error:") or "Traceback" in l]
  return proc.returncode, lines, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Blocks a [0, 2) and b [2, 4); one run of [0, 4); a and b merged by the script, and beside
  it the script refusing a block of another config (its exit status and stderr lines)."""
  root = tmp_path_factory.mktemp("merge")
  out = {"root": root}
  for name, (first, num) in {"a": (0, 2), "b": (2, 2), "full": (0, 4)}.items():
    out[name] = str(root / name)
    train.train_and_evaluate(_config(first, num), out[name])
  out["merged"] = str(root / "merged")
  merge = _merge_cmd([out["b"], out["a"]], out["merged"])  # any order
  refuse = _merge_cmd(REFUSALS[CLI_CASE][0](out), root / "cli_refused")
  rc, lines, err = _finish(merge)
  assert rc == 0 and not lines, err
  out["cli_refusal"] = _finish(refuse)
  return out


def _npy_files(d):
  return sorted(f for f in os.listdir(d) if f.endswith(".npy"))


def _assert_same_array(a, b, what):
  assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
  np.testing.assert_array_equal(a, b, err_msg=what)


def test_merged_blocks_equal_one_run_bit_for_bit(runs):
  full, merged = runs["full"], runs["merged"]
  # The score store: every array and the meta (checksums included), byte for byte.
  fs, ms = workdir_lib.scores_dir(full), workdir_lib.scores_dir(merged)
  assert _npy_files(fs) == _npy_files(ms) and len(_npy_files(fs)) > 30
  for f in _npy_files(fs):
    with open(os.path.join(fs, f), "rb") as a, open(os.path.join(ms, f), "rb") as b:
      assert a.read() == b.read(), f
  assert store.read_meta(fs) == store.read_meta(ms)
  assert store.read_meta(ms)["member_ids"] == [0, 1, 2, 3]
  # metrics.jsonl: line by line, apart from wall-clock fields.
  clock = lambda r: {k: v for k, v in r.items() if not k.endswith(("seconds", "time"))}
  fm, mm = workdir_lib.read_metrics(full), workdir_lib.read_metrics(merged)
  assert len(fm) == 2 * 4 and [clock(r) for r in fm] == [clock(r) for r in mm]
  # config.json: the one run's, member range included.
  with open(workdir_lib.path(full, "config")) as a, open(workdir_lib.path(merged, "config")) as b:
    fc, mc = json.load(a), json.load(b)
  assert (mc["first_member"], mc["num_runs"]) == (0, 4) and fc == mc
  # Per-member and per-example arrays, history and snapshots.
  for name in ("logits", "subset_mask", "noise_mask"):
    _assert_same_array(np.load(workdir_lib.path(full, name)),
                       np.load(workdir_lib.path(merged, name)), name)
  assert np.load(workdir_lib.path(merged, "subset_mask")).mean() < 0.6  # subsets: a real test
  fe, me = (np.load(workdir_lib.path(w, "ensemble_scores")) for w in (full, merged))
  assert sorted(fe) == sorted(me)
  for k in fe:
    _assert_same_array(fe[k], me[k], k)
  fh, mh = workdir_lib.history_paths(full), workdir_lib.history_paths(merged)
  assert [os.path.basename(p) for p in fh] == [os.path.basename(p) for p in mh] and len(fh) == 2
  for a, b in zip(fh, mh):
    _assert_same_array(np.load(a)["logits"], np.load(b)["logits"], a)
  assert workdir_lib.snapshot_names(full) == workdir_lib.snapshot_names(merged) != []
  for name in workdir_lib.snapshot_names(full):
    _assert_same_array(np.load(workdir_lib.snapshot_file(full, name)),
                       np.load(workdir_lib.snapshot_file(merged, name)), name)
  # Checkpoints: every saved epoch, every leaf (state and score accumulators) and its dtype.
  assert workdir_lib.saved_epochs(full) == workdir_lib.saved_epochs(merged) == [1, 2]
  for epoch in (1, 2):
    fck, mck = (checkpoints.restore(workdir_lib.checkpoint_dir(w, epoch)) for w in (full, merged))
    assert jax.tree_util.tree_structure(fck) == jax.tree_util.tree_structure(mck)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(fck)[0],
                            jax.tree_util.tree_leaves(mck)):
      _assert_same_array(a, b, f"epoch {epoch} {jax.tree_util.keystr(path)}")


def test_readers_take_the_merged_workdir_as_one_run(runs):
  full, merged = runs["full"], runs["merged"]
  # posthoc (the restore target built from config.json): the one run's parameters and logits.
  e = posthoc.load_ensemble(merged)
  assert e.epoch == 2 and list(e.member_ids) == [0, 1, 2, 3]
  params = checkpoints.restore(workdir_lib.checkpoint_dir(full, 2))["state"]["params"]
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(e.variables)):
    _assert_same_array(a, np.asarray(b), "params")
  _assert_same_array(np.load(workdir_lib.path(full, "logits")),
                     np.asarray(e.logits(e.data.x_train)), "logits of the loaded ensemble")
  # Held-out estimators (subset ensembles) and the score sets of analysis and fingerprinting.
  fh, mh = (heldout.analyze(workdir_lib.read_workdir(w)) for w in (full, merged))
  assert np.isfinite(fh.oos_probs).any()
  for a, b in zip(*(jax.tree_util.tree_leaves(dataclasses.asdict(h)) for h in (fh, mh))):
    _assert_same_array(np.asarray(a), np.asarray(b), "heldout")
  sets = workdir_lib.load_workdirs([full, merged])  # comparable: same data and example ids
  fs, ms = sets.values()
  assert fs.num_runs == ms.num_runs == 4 and (fs.valid_runs == ms.valid_runs).all()


def _copy(runs, src, name, edit=None):
  """A copy of block `src` named `name`, its files changed by `edit(path)`."""
  dest = runs["root"] / name
  if not dest.exists():
    shutil.copytree(runs[src], dest)
    if edit:
      edit(dest)
  return str(dest)


def _edit_json(path, change):
  with open(path) as f:
    obj = json.load(f)
  change(obj)
  store.atomic_write_json(str(path), obj)


def _moved(first):
  """Edits a copy of block b [2, 4) into a block [first, first + 2)."""
  def edit(d):
    _edit_json(d / "config.json", lambda c: c.update(first_member=first))
    _edit_json(d / "scores" / "meta.json", lambda m: m.update(member_ids=[first, first + 1]))
  return edit


def _smaller_subset(d):
  """A member whose subset holds 100 examples: 2 steps of 50 per epoch instead of 4 (as a
  `subset_fraction` given per member could give)."""
  path = d / "subset_mask.npy"
  mask = np.load(path)
  mask[0] = np.arange(mask.shape[1]) < 100
  np.save(path, mask)


# name -> (the blocks, the one line that refuses them).
REFUSALS = {
    "overlap": (lambda r: [r["a"], r["full"]],
                r"blocks '.*/a' \(members \[0, 2\)\) and '.*/full' \(members \[0, 4\)\) "
                r"overlap: members \[0, 2\) are in both$"),
    "gap": (lambda r: [_copy(r, "b", "b_at5", _moved(5)), r["a"]],
            r"members \[2, 5\) are in no block: '.*/a' ends at member 2 and '.*/b_at5' starts "
            r"at 5; train them with --config.first_member=2 --config.num_runs=3"),
    "config": (lambda r: [r["a"], _copy(r, "b", "b_lr", lambda d: _edit_json(
        d / "config.json", lambda c: c["optim"].update(lr=0.02)))],
               r"block '.*/b_lr' has another config than block '.*/a' \(optim.lr: 0.02 vs "
               r"0.01\); blocks must share the config apart from first_member and num_runs$"),
    "incomplete": (lambda r: [r["a"], _copy(r, "b", "b_cut", lambda d: os.unlink(
        d / "scores" / "meta.json"))],
                   r"block '.*/b_cut' is not finished: it has no scores/meta.json"),
    "data": (lambda r: [r["a"], _copy(r, "b", "b_data", lambda d: _edit_json(
        d / "scores" / "meta.json",
        lambda m: m["dataset_fingerprint"].update(x_train_sha256="0" * 64)))],
             r"'.*/b_data' and '.*/a' were trained on different data "
             r"\(x_train_sha256: 00000000\.\. vs [0-9a-f]{8}\.\.\)"),
}
REFUSALS["steps"] = (
    lambda r: [r["a"], _copy(r, "b", "b_steps", _smaller_subset)],
    r"block '.*/b_steps' trains 2 steps per epoch but block '.*/a' trains 4: with "
    r"subset_fraction=0.5 a run's members all take the steps of its smallest subset")
CLI_CASE = "config"  # the refusal also run through the script


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_blocks_that_are_not_one_run_are_refused(runs, case):
  blocks_of, message = REFUSALS[case]
  out = runs["root"] / f"lib_{case}"
  with pytest.raises(ValueError, match=message):
    blocks.merge_blocks(blocks_of(runs), str(out))
  assert not out.exists() and not [f for f in os.listdir(runs["root"]) if ".merging-" in f]


def test_the_script_refuses_in_one_line(runs):
  """Through experiments/merge.py: exit 2, one line naming both values, nothing written."""
  rc, lines, err = runs["cli_refusal"]
  assert rc == cli.BAD_INPUT and len(lines) == 1, err
  assert re.match("error: " + REFUSALS[CLI_CASE][1], lines[0]), lines[0]
  assert not (runs["root"] / "cli_refused").exists()
  assert not [f for f in os.listdir(runs["root"]) if ".merging-" in f]


def test_a_block_in_training_is_refused(runs):
  with workdir_lib.lock(runs["b"]):
    with pytest.raises(workdir_lib.WorkdirInUseError, match=r"workdir '.*/b' is in use"):
      blocks.merge_blocks([runs["a"], runs["b"]], str(runs["root"] / "busy"))
  assert not (runs["root"] / "busy").exists()


def test_a_non_empty_workdir_is_not_overwritten(runs, tmp_path):
  out = tmp_path / "taken"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  with pytest.raises(blocks.BlockError, match=r"--workdir '.*/taken' exists and is not empty"):
    blocks.merge_blocks([runs["a"], runs["b"]], str(out))
  assert os.listdir(out) == ["notes.txt"]
  # An empty folder is taken (the merge is renamed onto it).
  empty = tmp_path / "empty"
  empty.mkdir()
  blocks.merge_blocks([runs["a"], runs["b"]], str(empty))
  assert store.read_meta(workdir_lib.scores_dir(str(empty)))["num_runs"] == 4
  assert not [f for f in os.listdir(tmp_path) if ".merging-" in f]

"""Member blocks: one ensemble trained as independent jobs, merged into one workdir.

A job trains members `[first_member, first_member + num_runs)` into its own workdir (a SLURM
array task, a preemptible Colab session). Member i's keys are `fold_in(key(seed), i)` and it runs
through programs of one shape whatever ensemble holds it, so a block's members equal those of one
run of all members bit for bit. `merge_blocks` checks that a set of finished blocks are the parts
of one such run and writes that run's workdir (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import tempfile
from typing import Sequence

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdiff import checkpoints
from jaxdiff import checksums
from jaxdiff import scores as scores_lib
from jaxdiff import store
from jaxdiff import train
from jaxdiff import workdir as workdir_lib

# Config fields that say which members a block holds (the rest must agree).
MEMBER_RANGE_FIELDS = ("first_member", "num_runs")
# Config fields with one value per member of the block, in member order (concatenated).
PER_MEMBER_CONFIG = ("optim.member_lr_scale",)
# scores/meta.json fields with one value per member (concatenated); the others must agree, but
# those that store.save_scores writes itself.
PER_MEMBER_META = ("member_ids", "diverged", "diverged_step", "subset_fractions")
_STORE_META = ("format_version", "num_runs", "num_examples", "score_names", "sha256")
# Files with one value per example: byte-equal in every block, copied once.
PER_EXAMPLE_FILES = ("noise_mask", "source_ids", "kept_ids")


class BlockError(ValueError):
  """Blocks that are not the finished parts of one run, or an output that is not new."""


@dataclasses.dataclass
class Block:
  """A finished block's workdir, as `read_block` found it.

  Attributes:
    workdir: the path given.
    config: config.json, as a plain dict.
    first: the block's first member (`config.first_member`).
    num_runs: its number of members.
    scores: its score store.
  """
  workdir: str
  config: dict
  first: int
  num_runs: int
  scores: store.ScoreSet

  @property
  def end(self) -> int:
    return self.first + self.num_runs


def _flat(config: dict) -> dict:
  return train.flatten_config(config)


def read_block(workdir: str) -> Block:
  """A finished block's config and scores.

  Raises:
    BlockError (or workdir.WorkdirError, store.StoreError) naming the block: not a training
      workdir, training not finished (no scores/meta.json, no final checkpoint, epochs missing in
      metrics.jsonl), or scores that do not hold the members its config names.
  """
  config = workdir_lib.read_config(workdir).to_dict()
  first, runs, epochs = (int(config.get(k, 0)) for k in ("first_member", "num_runs", "num_epochs"))
  unfinished = f"block {workdir!r} is not finished: "
  resume = ("; rerun experiments/train.py on it with its own config to finish it, then merge")
  if not workdir_lib.scores_complete(workdir):
    raise BlockError(unfinished + f"it has no scores/{store.META} (written when training ends)"
                     + resume)
  if epochs not in workdir_lib.saved_epochs(workdir):
    raise BlockError(unfinished + f"it has no checkpoint of its final epoch {epochs} (saved: "
                     f"{workdir_lib.saved_epochs(workdir) or 'none'})" + resume)
  logged = {(r.get("epoch"), r.get("member")) for r in workdir_lib.read_metrics(workdir)}
  missing = sorted({(e, m) for e in range(1, epochs + 1) for m in range(runs)} - logged)
  if missing:
    raise BlockError(unfinished + f"metrics.jsonl has no line for epoch {missing[0][0]} of "
                     f"member {first + missing[0][1]}" + resume)
  scores = workdir_lib.load_scores(workdir)
  ids = scores.meta.get("member_ids", list(range(first, first + runs)))
  if scores.num_runs != runs or list(ids) != list(range(first, first + runs)):
    raise BlockError(f"block {workdir!r}: its config.json names members [{first}, "
                     f"{first + runs}) but its scores hold members {list(ids)}")
  return Block(workdir=workdir, config=config, first=first, num_runs=runs, scores=scores)


def check_blocks(blocks: Sequence[Block]) -> list[Block]:
  """Checks that `blocks` are the parts of one run; returns them in member order.

  The blocks must share the config apart from the member range (and `train.RESUME_SAFE_FIELDS`),
  hold every member from the first block's first to the last block's last exactly once, train as
  many steps per epoch (with `subset_fraction` by member, a run takes the steps of its smallest
  subset), and share the data (`store.check_compatible`) and score names and metadata.

  Raises:
    BlockError naming the block and the difference (store.StoreError for different data).
  """
  if len(blocks) < 2:
    raise BlockError(f"need at least two blocks to merge; got {len(blocks)}")
  blocks = sorted(blocks, key=lambda b: (b.first, b.end))
  ref = blocks[0]
  skip = set(MEMBER_RANGE_FIELDS) | set(PER_MEMBER_CONFIG) | set(train.RESUME_SAFE_FIELDS)
  a = _flat(ref.config)
  for b in blocks[1:]:
    f = _flat(b.config)
    diff = sorted(k for k in set(a) | set(f) if k not in skip and a.get(k) != f.get(k))
    if diff:
      shown = "; ".join(f"{k}: {f.get(k, '<absent>')!r} vs {a.get(k, '<absent>')!r}"
                        for k in diff[:6])
      raise BlockError(f"block {b.workdir!r} has another config than block {ref.workdir!r} "
                       f"({shown}); blocks must share the config apart from "
                       f"{' and '.join(MEMBER_RANGE_FIELDS)}")
  for prev, b in zip(blocks, blocks[1:]):
    if b.first < prev.end:
      raise BlockError(f"blocks {prev.workdir!r} (members [{prev.first}, {prev.end})) and "
                       f"{b.workdir!r} (members [{b.first}, {b.end})) overlap: members "
                       f"[{b.first}, {min(prev.end, b.end)}) are in both")
    if b.first > prev.end:
      raise BlockError(f"members [{prev.end}, {b.first}) are in no block: {prev.workdir!r} ends "
                       f"at member {prev.end} and {b.workdir!r} starts at {b.first}; train "
                       f"them with --config.first_member={prev.end} "
                       f"--config.num_runs={b.first - prev.end} and merge that block too")
  steps = [_steps_per_epoch(b) for b in blocks]
  for b, s in zip(blocks[1:], steps[1:]):
    if s != steps[0]:
      raise BlockError(f"block {b.workdir!r} trains {s} steps per epoch but block "
                       f"{ref.workdir!r} trains {steps[0]}: with subset_fraction="
                       f"{ref.config.get('subset_fraction')!r} a run's members all take the "
                       "steps of its smallest subset, so these blocks are not parts of one run")
  store.check_compatible({b.workdir: b.scores for b in blocks})
  for b in blocks[1:]:
    names, ref_names = set(b.scores.scores), set(ref.scores.scores)
    if names != ref_names:
      extra = sorted(names ^ ref_names)
      raise BlockError(f"block {b.workdir!r} and block {ref.workdir!r} hold different scores "
                       f"({', '.join(extra[:6])} in only one of them): score both alike "
                       "(experiments/score.py) first")
    for k in sorted(set(b.scores.meta) | set(ref.scores.meta)):
      if k in PER_MEMBER_META or k in _STORE_META:
        continue
      if b.scores.meta.get(k) != ref.scores.meta.get(k):
        raise BlockError(f"block {b.workdir!r} and block {ref.workdir!r} differ in "
                         f"scores/{store.META} field {k!r}: {b.scores.meta.get(k)!r} vs "
                         f"{ref.scores.meta.get(k)!r}")
  return blocks


def _steps_per_epoch(b: Block) -> int:
  """Optimiser steps per epoch of a block (train.setup): its smallest subset // batch_size."""
  mpath = workdir_lib.path(b.workdir, "subset_mask")
  n = b.scores.example_ids.shape[0]
  smallest = (int(store.load_npy(mpath, (b.num_runs, n), what="subset mask").sum(1).min())
              if os.path.exists(mpath) else n)
  return smallest // int(b.config["batch_size"])


def merged_config(blocks: Sequence[Block]) -> dict:
  """The config of one run of all members of `blocks` (in member order): the first block's, with
  its member range and per-member fields over all blocks."""
  config = json.loads(json.dumps(blocks[0].config))
  config["first_member"] = blocks[0].first
  config["num_runs"] = sum(b.num_runs for b in blocks)
  for field in PER_MEMBER_CONFIG:
    *parents, leaf = field.split(".")
    nodes = []
    for b in blocks:
      node = b.config
      for p in parents:
        node = node.get(p, {})
      nodes.append(list(node.get(leaf) or ()))
    if any(nodes):  # an empty list means 1.0 for each of the block's members
      out = config
      for p in parents:
        out = out[p]
      out[leaf] = [v for b, n in zip(blocks, nodes) for v in (n or [1.0] * b.num_runs)]
  return config


def merge_blocks(block_workdirs: Sequence[str], out_workdir: str) -> str:
  """Merges finished member blocks into the workdir of one run of all their members.

  Writes config.json (`merged_config`), metrics.jsonl (members renumbered in the merged run),
  the score store (scores concatenated along the runs axis, meta and checksums), subset_mask.npy,
  logits.npy (when under 1 GiB, as training), ensemble_scores.npz (recomputed from the merged
  logits), the per-example files, history/ and snapshots/, and every checkpoint epoch saved in all
  blocks (the final one at least) with its leaves concatenated along the runs axis. The result is
  the workdir that one run with `first_member` the first block's and `num_runs` all members would
  have written (bit for bit on CPU, tested), so every reader takes it as such; training resumes
  from it with that config (e.g. more epochs).

  The workdir is built in a temporary directory beside `out_workdir` and renamed into place: an
  interrupted merge leaves nothing at `out_workdir`. Each block's lock is held while it is read.

  Args:
    block_workdirs: the blocks' workdirs, in any order.
    out_workdir: the merged workdir; must not exist, or be empty.

  Returns:
    `out_workdir`.

  Raises:
    BlockError (and workdir.WorkdirError, store.StoreError: ValueErrors) naming the block and
      the difference: an unfinished block, another config, overlapping members, a gap, other
      data; or an `out_workdir` that is not empty.
    checksums.ChecksumError: a block's checkpoint changed on disk.
  """
  if os.path.exists(out_workdir) and (not os.path.isdir(out_workdir) or os.listdir(out_workdir)):
    raise BlockError(f"--workdir {out_workdir!r} exists and is not empty; merge into a new "
                     "directory")
  store.check_distinct_paths(block_workdirs, what="block")
  for wd in block_workdirs:
    if not os.path.isdir(wd):
      raise BlockError(f"no such block workdir {wd!r}")
  with contextlib.ExitStack() as held:
    for wd in block_workdirs:
      held.enter_context(workdir_lib.read_lock(wd))  # no training or rescoring meanwhile
    blocks = check_blocks([read_block(wd) for wd in block_workdirs])
    parent = os.path.dirname(os.path.abspath(out_workdir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_workdir))}.merging-",
                           dir=parent)
    try:
      _write(blocks, tmp)
      os.rename(tmp, out_workdir)  # onto an empty directory too
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  logging.info("merged %d blocks (members [%d, %d)) into %s", len(blocks), blocks[0].first,
               blocks[-1].end, out_workdir)
  return out_workdir


def _write(blocks: Sequence[Block], out: str) -> None:
  """Writes the merged workdir of `blocks` (checked, in member order) into `out`."""
  config = merged_config(blocks)
  store.atomic_write_json(workdir_lib.path(out, "config"), config)
  _write_metrics(blocks, out)
  ref = blocks[0].scores
  meta = {k: v for k, v in ref.meta.items() if k not in _STORE_META}
  for k in PER_MEMBER_META:
    if all(k in b.scores.meta for b in blocks):
      meta[k] = [v for b in blocks for v in b.scores.meta[k]]
  scores = {name: np.concatenate([b.scores.scores[name] for b in blocks])
            for name in ref.meta["score_names"]}
  store.save_scores(workdir_lib.scores_dir(out), scores, example_ids=ref.example_ids,
                    labels=ref.labels, meta=meta)
  n = ref.example_ids.shape[0]
  masks = [store.load_npy(workdir_lib.path(b.workdir, "subset_mask"), (b.num_runs, n))
           if os.path.exists(workdir_lib.path(b.workdir, "subset_mask"))
           else np.ones((b.num_runs, n), bool) for b in blocks]
  store.atomic_save_npy(workdir_lib.path(out, "subset_mask"), np.concatenate(masks))
  _write_logits(blocks, out, np.asarray(meta.get("diverged", [False] * sum(
      b.num_runs for b in blocks)), bool), ref.labels)
  for name in PER_EXAMPLE_FILES:
    _copy_per_example(blocks, out, name)
  _write_history(blocks, out)
  _write_snapshots(blocks, out)
  _write_checkpoints(blocks, out, int(config["num_epochs"]))


def _write_metrics(blocks: Sequence[Block], out: str) -> None:
  """metrics.jsonl of the merged run: `member` is the index in the merged run, lines ordered by
  epoch then member (as training writes them)."""
  records = []
  for b in blocks:
    offset = b.first - blocks[0].first
    records += [{**r, "member": r["member"] + offset} for r in workdir_lib.read_metrics(b.workdir)]
  records.sort(key=lambda r: (r["epoch"], r["member"]))
  workdir_lib.MetricsLog(out, 0).write(records)


def _final_logits(b: Block) -> np.ndarray | None:
  """A block's final logits `[R, N, C]` (logits.npy, else its last history file), or None."""
  try:
    return workdir_lib.read_workdir(b.workdir).logits
  except store.StoreError:
    return None


def _write_logits(blocks, out, diverged: np.ndarray, labels: np.ndarray) -> None:
  """logits.npy (under 1 GiB, as train.write_scores) and ensemble_scores.npz (recording.finalize:
  over the non-diverged members)."""
  parts = [_final_logits(b) for b in blocks]
  if any(p is None for p in parts):
    logging.warning("a block has neither logits.npy nor history/: the merged workdir has no "
                    "logits.npy or ensemble_scores.npz")
    return
  logits = np.concatenate(parts).astype(np.float32)
  if logits.nbytes < 2**30:
    store.atomic_save_npy(workdir_lib.path(out, "logits"), logits)
  ok = ~diverged
  if ok.any():
    probs = np.asarray(jax.nn.softmax(logits[ok], axis=-1))
    ens = scores_lib.ensemble_scores(probs, labels)
    store.atomic_write_bytes(workdir_lib.path(out, "ensemble_scores"), _npz_bytes(ens))


def _npz_bytes(arrays) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  return buf.getvalue()


def _copy_per_example(blocks, out, name: str) -> None:
  paths = [workdir_lib.path(b.workdir, name) for b in blocks]
  present = [os.path.exists(p) for p in paths]
  if not any(present):
    return
  contents = []
  for b, p, has in zip(blocks, paths, present):
    if not has:
      raise BlockError(f"block {b.workdir!r} has no {os.path.basename(p)} but block "
                       f"{blocks[present.index(True)].workdir!r} has")
    contents.append(store.load_npy(p))
  for b, c in zip(blocks[1:], contents[1:]):
    if c.shape != contents[0].shape or not np.array_equal(c, contents[0]):
      raise BlockError(f"block {b.workdir!r} and block {blocks[0].workdir!r} differ in "
                       f"{os.path.basename(paths[0])}")
  store.atomic_save_npy(workdir_lib.path(out, name), contents[0])


def _same_names(blocks, names_of, what: str) -> list[str]:
  """The names `names_of(block)` lists, the same in every block (else BlockError)."""
  names = [sorted(names_of(b)) for b in blocks]
  for b, n in zip(blocks[1:], names[1:]):
    if n != names[0]:
      extra = sorted(set(n) ^ set(names[0]))
      raise BlockError(f"block {b.workdir!r} and block {blocks[0].workdir!r} hold different "
                       f"{what} ({', '.join(map(str, extra[:4]))} in only one)")
  return names[0]


def _write_history(blocks, out) -> None:
  epochs = _same_names(blocks, lambda b: workdir_lib.history_epochs(b.workdir), "history/ files")
  if not epochs:
    return
  os.makedirs(workdir_lib.path(out, "history"), exist_ok=True)
  for epoch in epochs:
    parts = [store.load_npz(workdir_lib.history_file(b.workdir, epoch), what="per-epoch logits")
             for b in blocks]
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    store.atomic_write_bytes(workdir_lib.history_file(out, epoch), _npz_bytes(merged))


def _write_snapshots(blocks, out) -> None:
  names = _same_names(blocks, lambda b: workdir_lib.snapshot_names(b.workdir), "snapshots")
  for name in names:
    parts = [store.load_npy(workdir_lib.snapshot_file(b.workdir, name), (b.num_runs, None))
             for b in blocks]
    os.makedirs(workdir_lib.path(out, "snapshots"), exist_ok=True)
    store.atomic_save_npy(workdir_lib.snapshot_file(out, name), np.concatenate(parts))


def _write_checkpoints(blocks, out, final_epoch: int) -> None:
  """Every epoch saved in all blocks, leaves concatenated along the runs axis, as training saves
  them (an Orbax step of {"state", "recorder"}, device arrays where training had device arrays,
  NumPy where it had host arrays; then its checksums)."""
  epochs = sorted(set.intersection(*(set(workdir_lib.saved_epochs(b.workdir)) for b in blocks)))
  mngr = ocp.CheckpointManager(workdir_lib.checkpoints_dir(out),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  for epoch in epochs:
    trees, on_device = [], None
    for b in blocks:
      step_dir = workdir_lib.checkpoint_dir(b.workdir, epoch)
      checksums.verify(step_dir)
      trees.append(checkpoints.restore(step_dir))
      if on_device is None:
        meta = ocp.StandardCheckpointer().metadata(checkpoints.item_dir(step_dir))
        on_device = {jax.tree_util.keystr(p): getattr(m, "sharding", None) is not None
                     for p, m in jax.tree_util.tree_flatten_with_path(
                         getattr(meta, "item_metadata", meta))[0]}
    paths_leaves = [jax.tree_util.tree_flatten_with_path(t)[0] for t in trees]
    merged = []
    for i, (path, _) in enumerate(paths_leaves[0]):
      name = jax.tree_util.keystr(path)
      leaf = _merge_leaf(blocks, epoch, name, [pl[i][1] for pl in paths_leaves])
      merged.append(jax.device_put(leaf) if on_device.get(name) else leaf)
    tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(trees[0]), merged)
    mngr.save(epoch, args=ocp.args.StandardSave(tree))
    mngr.wait_until_finished()
    checksums.write(workdir_lib.checkpoint_dir(out, epoch))
  mngr.close()
  assert final_epoch in epochs  # read_block checked every block has it


def _merge_leaf(blocks, epoch: int, name: str, leaves: Sequence[np.ndarray]) -> np.ndarray:
  """Leaves with a runs axis concatenated; the others (step counters) equal in every block."""
  if leaves[0].ndim:
    for b, leaf in zip(blocks, leaves):
      if leaf.shape[0] != b.num_runs:
        raise BlockError(f"checkpoint {epoch} of block {b.workdir!r}: leaf {name} of shape "
                         f"{leaf.shape} has no leading runs axis of {b.num_runs}")
    return np.concatenate(leaves)
  for b, leaf in zip(blocks[1:], leaves[1:]):
    if not np.array_equal(leaf, leaves[0]):
      raise BlockError(f"checkpoint {epoch} of block {b.workdir!r}: {name} is {leaf} but "
                       f"{leaves[0]} in block {blocks[0].workdir!r}")
  return leaves[0]

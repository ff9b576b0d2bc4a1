"""A difficulty logger for any training loop: NumPy outputs in, a jaxdiff score store out.

`DifficultyLogger` takes each member's evaluations (logits or probabilities of the training
examples, in any order and any number of calls per epoch) and, optionally, its minibatch
correctness, feeds jaxdiff's own accumulators (`scores.EpochAccumulator`,
`scores.MinibatchForgetting`) and writes `<workdir>/scores` as a jaxdiff run does, so
`experiments/analyze.py --workdirs=<workdir>` and `jaxdiff.analysis.load_workdirs` read it.

What the input supports. From logits every point and trajectory score is computed. From
probabilities alone the logit margin is unknown, so `margin_logit` and `aum` (its mean over
epochs) are not stored (`meta["logger"]["not_stored"]` lists them); every other score is. If the
probabilities are a softmax that never underflows, `logits=np.log(probs)` gives back the logits up
to a per-example constant, which no score depends on: that choice is the caller's to make.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import scores as S
from jaxdiff import store
from jaxdiff import workdir as workdir_lib
from jaxdiff.scores import point, registry

LOGITS, PROBS = "logits", "probs"
# Scores that need logits: the logit margin z_y - max_{c != y} z_c and AUM, its mean over epochs.
NEED_LOGITS = ("margin_logit", "aum")
# Rows of probabilities must sum to 1 within this (float32 softmax outputs sum to 1 +- 1e-6).
PROB_SUM_TOL = 1e-3

_point_scores = jax.jit(S.point_scores)


def _bucket(n: int) -> int:
  """The next power of two >= n: chunks padded to it compile `point_scores` a few times only."""
  return 1 << max(0, int(n - 1).bit_length())


def point_scores_from_logits(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
  """`scores.point_scores` of `logits [B, C]`, `labels [B]` (jitted, rows padded to a power of 2)."""
  b = logits.shape[0]
  pad = _bucket(b) - b
  z = np.pad(np.asarray(logits, np.float32), ((0, pad), (0, 0)))
  y = np.pad(np.asarray(labels, np.int32), (0, pad))
  return {k: np.asarray(v)[:b] for k, v in jax.device_get(_point_scores(z, y)).items()}


def point_scores_from_probs(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
  """The point scores that probabilities `[B, C]` determine (all but `margin_logit`), float32 [B].

  The registry's point kernels (`scores.registry`) on `point.Parts` of the given probabilities p
  (jitted, rows padded to a power of 2). `loss` = -log p_y with p_y clipped below at float32's
  smallest normal number (1.2e-38, a loss of at most 87.3), so a p_y that underflowed to 0 gives a
  finite loss; `correct` = argmax_c p_c == y (ties -> lowest class).
  """
  b = probs.shape[0]
  pad = _bucket(b) - b
  p = np.pad(np.asarray(probs, np.float32), ((0, pad), (0, 0)))
  y = np.pad(np.asarray(labels, np.int32), (0, pad))
  return {k: np.asarray(v)[:b] for k, v in jax.device_get(_probs_point_scores(p, y)).items()}


def _probs_parts(probs: jax.Array, labels: jax.Array) -> point.Parts:
  """`point.Parts` of probabilities `[B, C]`: p as given, log p (clipped below at float32's
  smallest normal number) as the log-softmax and as the logits (log p = z - logsumexp(z): the
  logits up to a constant per row, so their argmax keeps)."""
  p = jnp.asarray(probs, jnp.float32)
  logp = jnp.log(jnp.maximum(p, jnp.finfo(jnp.float32).tiny))
  onehot = jax.nn.one_hot(labels, p.shape[-1], dtype=bool)
  y_idx = labels[..., None].astype(jnp.int32)
  logp_y = jnp.take_along_axis(logp, y_idx, axis=-1)[..., 0]
  return point.Parts(z=logp, labels=labels, logp=logp, p=p, onehot=onehot, logp_y=logp_y,
                     z_y=logp_y, p_y=jnp.take_along_axis(p, y_idx, axis=-1)[..., 0],
                     p_other=jnp.max(jnp.where(onehot, -jnp.inf, p), axis=-1),
                     z_other=jnp.max(jnp.where(onehot, -jnp.inf, logp), axis=-1))


@jax.jit
def _probs_point_scores(probs: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  q = _probs_parts(probs, labels)
  return {name: registry.ENTRIES[name].kernel(q) for name in point.POINT_SCORE_NAMES
          if name not in NEED_LOGITS}


class _Epoch:
  """One member's evaluation of one epoch while its examples arrive: point scores `[N]`, the
  outputs `[N, C]` and which examples were seen."""

  def __init__(self, num_examples: int, num_classes: int):
    self.values = {}
    self.outputs = np.zeros((num_examples, num_classes), np.float32)
    self.seen = np.zeros(num_examples, bool)

  def add(self, ids: np.ndarray, outputs: np.ndarray, values: dict[str, np.ndarray]) -> None:
    for k, v in values.items():
      self.values.setdefault(k, np.zeros(self.seen.shape, np.float32))[ids] = v
    self.outputs[ids] = outputs
    self.seen[ids] = True


class DifficultyLogger:
  """Per-example difficulty scores from a training loop of any framework (NumPy in).

  Usage (a full example: README, "Your own training loop")::

    log = DifficultyLogger(workdir, num_examples=N, num_classes=C, member_ids=[0, 1, 2])
    for each member, epoch, and chunk of the training set (any order, any chunks):
      log.log_eval(member, ids, logits=logits, labels=labels, epoch=epoch)
      # optional, every training step: log.log_minibatch(member, ids, correct=..., step=step)
    log.close()   # writes <workdir>/scores (and logits.npy, ensemble_scores.npz)

  Scores are those of a jaxdiff run with the same evaluations: every point score of each member's
  last evaluation (`scores.point_scores`), the trajectory scores of `scores.EpochAccumulator` over
  its evaluations, with `log_minibatch` those of `scores.MinibatchForgetting`; all stored higher =
  harder (`scores.orient`), NaN for members marked diverged. Each member has its own
  accumulators, fed as soon as one of its epochs is complete (every example id seen once), so
  members may be trained one after another or interleaved, and a member's scores do not depend on
  the others (as in jaxdiff). Example ids are indices into the training set, `0 .. N-1`.

  Bad input (an unknown member, a duplicate or out-of-range id, a wrong number of classes, labels
  that change, an epoch or step that does not increase, non-finite outputs) raises ValueError in
  one line and changes nothing.
  """

  def __init__(self, workdir: str, num_examples: int, num_classes: int,
               member_ids: Sequence[int], *, arch: str | None = None,
               dataset: str | None = None, dataset_fingerprint: dict | None = None,
               overwrite: bool = False):
    """An empty logger; nothing is written before `write` / `close`.

    Args:
      workdir: the output folder; the store goes to `<workdir>/scores`.
      num_examples: N, the training examples (ids 0 .. N-1).
      num_classes: C, the width of the logits / probabilities.
      member_ids: the members' ids (distinct ints), recorded in `meta["member_ids"]`.
      arch: architecture label (`meta["arch"]`; the analysis names the set by it, else by the
        workdir's folder name).
      dataset: dataset name (`meta["dataset"]`); sets are compared only on one dataset.
      dataset_fingerprint: JSON-able description of the data (`meta["dataset_fingerprint"]`,
        compared field by field by `store.check_compatible`).
      overwrite: replace a score store already in `workdir` (refused otherwise).
    """
    if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
      raise ValueError(f"num_examples={num_examples!r}: need a positive int")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
      raise ValueError(f"num_classes={num_classes!r}: need an int >= 2")
    ids = [int(m) for m in member_ids]
    if not ids or len(set(ids)) != len(ids):
      raise ValueError(f"member_ids={list(member_ids)!r}: need one or more distinct ints")
    if workdir_lib.scores_complete(workdir) and not overwrite:
      raise ValueError(f"{workdir!r} already holds a score store ({workdir_lib.scores_dir(workdir)}"
                       "); use another workdir or overwrite=True")
    self.workdir = workdir
    self.num_examples, self.num_classes = int(num_examples), int(num_classes)
    self.member_ids = ids
    self.meta = {k: v for k, v in (("arch", arch), ("dataset", dataset),
                                   ("dataset_fingerprint", dataset_fingerprint)) if v is not None}
    self.kind = None  # LOGITS or PROBS, fixed by the first evaluation
    self.labels = np.full(self.num_examples, -1, np.int64)
    r = len(ids)
    self.diverged = np.zeros(r, bool)
    self._epoch_state = [None] * r   # EpochAccumulator state [1, N] per member
    self._pending = [{} for _ in ids]  # epoch -> _Epoch being filled
    self._last_epoch = [-1] * r       # newest epoch fed to the accumulator
    self._last = [None] * r           # the newest complete _Epoch (final point scores, outputs)
    self._mb_state = [None] * r       # MinibatchForgetting state [1, N] per member
    self._mb_last = [-1] * r
    self._closed = False

  # --------------------------------------------------------------------------- input checks

  def _row(self, member: Any) -> int:
    if self._closed:
      raise ValueError("this DifficultyLogger is closed; make a new one to log more")
    try:
      return self.member_ids.index(int(member))
    except (TypeError, ValueError):
      raise ValueError(f"unknown member {member!r}; valid member ids: {self.member_ids}") from None

  def _ids(self, example_ids: Any, length: int | None = None) -> np.ndarray:
    ids = np.asarray(example_ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"example_ids must be a non-empty 1-D int array; got shape {ids.shape}, "
                       f"dtype {ids.dtype}")
    if length is not None and ids.size != length:
      raise ValueError(f"{ids.size} example ids for {length} rows of outputs")
    bad = (ids < 0) | (ids >= self.num_examples)
    if bad.any():
      raise ValueError(f"example id {int(ids[bad][0])} is out of range: valid ids are "
                       f"0..{self.num_examples - 1}")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
      raise ValueError(f"duplicate example id {int(uniq[counts > 1][0])} in one call "
                       f"({int((counts > 1).sum())} ids repeated); give each example once")
    return ids.astype(np.int64)

  @staticmethod
  def _step(value: Any, last: int, what: str, member: Any) -> int:
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{what}={value!r}: need a non-negative int")
    if value <= last:
      raise ValueError(f"member {member}: {what} {int(value)} is not after {what} {last}, "
                       f"already complete ({what}s must increase)")
    return int(value)

  # --------------------------------------------------------------------------- logging

  def log_eval(self, member: int, example_ids: Any, *, labels: Any, epoch: int,
               logits: Any = None, probs: Any = None) -> None:
    """Records one member's outputs on some training examples at the evaluation of `epoch`.

    Args:
      member: one of `member_ids`.
      example_ids: int `[B]`, distinct, in 0 .. N-1; an epoch is complete once every id was given
        exactly once (over any number of calls).
      labels: int `[B]` in 0 .. C-1, the training labels of those examples (the same every time).
      epoch: int >= 0, the evaluation's step (jaxdiff records epochs 1, 2, ...); a member's epochs
        must increase (several may be filled at once; each is fed when its predecessors are).
      logits: float `[B, C]`; or
      probs: float `[B, C]` rows summing to 1 (then `NEED_LOGITS` scores are not stored). The
        logger takes one kind for all its calls.
    """
    r = self._row(member)
    if (logits is None) == (probs is None):
      raise ValueError("give exactly one of logits= or probs=")
    kind = LOGITS if logits is not None else PROBS
    if self.kind is not None and kind != self.kind:
      raise ValueError(f"got {kind}= but this logger was fed {self.kind}= before; use one kind")
    out = np.asarray(logits if logits is not None else probs)
    if out.ndim != 2 or out.shape[1] != self.num_classes:
      raise ValueError(f"{kind} have shape {out.shape}; expected [B, {self.num_classes}] "
                       f"(num_classes={self.num_classes})")
    ids = self._ids(example_ids, out.shape[0])
    y = np.asarray(labels)
    if y.shape != ids.shape or (y.size and not np.issubdtype(y.dtype, np.integer)):
      raise ValueError(f"labels must be ints of shape {ids.shape}; got shape {y.shape}, "
                       f"dtype {y.dtype}")
    bad = (y < 0) | (y >= self.num_classes)
    if bad.any():
      raise ValueError(f"label {int(y[bad][0])} (example id {int(ids[bad][0])}) is out of range: "
                       f"valid labels are 0..{self.num_classes - 1}")
    known = self.labels[ids]
    changed = (known >= 0) & (known != y)
    if changed.any():
      i = int(np.argmax(changed))
      raise ValueError(f"example id {int(ids[i])} had label {int(known[i])} and now {int(y[i])}; "
                       "labels must stay the same")
    if self.diverged[r]:
      return  # marked diverged: its scores are NaN, later outputs are not needed
    epoch = self._step(epoch, self._last_epoch[r], "epoch", member)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
      raise ValueError(f"member {member} gave non-finite {kind} at epoch {epoch} (example id "
                       f"{int(ids[~finite][0])}); call mark_diverged({member}) to record it as "
                       "diverged (NaN scores, as a jaxdiff run)")
    if kind == PROBS:
      sums = out.sum(axis=1)
      off = (out < 0).any(axis=1) | (np.abs(sums - 1) > PROB_SUM_TOL)
      if off.any():
        i = int(np.argmax(off))
        raise ValueError(f"probs for example id {int(ids[i])} are not a distribution (sum "
                         f"{float(sums[i]):.4g}, min {float(out[i].min()):.4g}); pass "
                         "unnormalised outputs as logits=")
    pend = self._pending[r].get(epoch)
    if pend is not None and pend.seen[ids].any():
      raise ValueError(f"duplicate example id {int(ids[pend.seen[ids]][0])}: member {member} "
                       f"already gave it at epoch {epoch}")
    values = (point_scores_from_logits(out, y) if kind == LOGITS
              else point_scores_from_probs(out, y))
    # Checked: from here on nothing fails.
    self.kind = kind
    self.labels[ids] = y
    if pend is None:
      pend = self._pending[r][epoch] = _Epoch(self.num_examples, self.num_classes)
    pend.add(ids, out, values)
    self._feed(r)

  def _feed(self, r: int) -> None:
    """Feeds member r's complete epochs, oldest first, to its accumulator."""
    pending = self._pending[r]
    while pending:
      epoch = min(pending)
      pend = pending[epoch]
      if not pend.seen.all():
        return
      if self._epoch_state[r] is None:
        self._epoch_state[r] = S.EpochAccumulator.init(1, self.num_examples)
      point = {k: pend.values.get(k, np.zeros(self.num_examples, np.float32))[None]
               for k in S.trajectory.EPOCH_INPUTS}  # probs: margin_logit zeros, aum dropped
      S.EpochAccumulator.update(self._epoch_state[r], point, epoch)
      self._last_epoch[r], self._last[r] = epoch, pend
      del pending[epoch]

  def log_minibatch(self, member: int, example_ids: Any, *, correct: Any, step: int) -> None:
    """Records which examples of one member's training minibatch it classified correctly.

    Gives the `mb_*` scores (`scores.MinibatchForgetting`, Toneva et al.'s protocol: correctness
    in the forward pass of the training step). One call per member per step.

    Args:
      member: one of `member_ids`.
      example_ids: int `[B]`, distinct, in 0 .. N-1: the minibatch.
      correct: `[B]` bool or 0/1.
      step: int >= 0, the training step; a member's steps must increase.
    """
    r = self._row(member)
    ids = self._ids(example_ids)
    c = np.asarray(correct)
    if c.shape != ids.shape or not (c.dtype == bool or np.isin(c, (0, 1)).all()):
      raise ValueError(f"correct must be bool or 0/1 of shape {ids.shape}; got shape {c.shape}, "
                       f"dtype {c.dtype}")
    if self.diverged[r]:
      return
    step = self._step(step, self._mb_last[r], "step", member)
    if self._mb_state[r] is None:
      self._mb_state[r] = S.MinibatchForgetting.init(1, self.num_examples)
    self._mb_state[r] = S.MinibatchForgetting.update(self._mb_state[r], ids[None],
                                                     c.astype(bool)[None], step)
    self._mb_last[r] = step

  def mark_diverged(self, member: int) -> None:
    """Records `member` as diverged: its scores are stored as NaN (the analysis leaves it out),
    its unfinished epochs are dropped and its later logs ignored."""
    r = self._row(member)
    self.diverged[r] = True
    self._pending[r].clear()

  # --------------------------------------------------------------------------- writing

  def scores(self) -> dict[str, np.ndarray]:
    """Every score as float32 `[R, N]`, higher = harder (NaN rows for diverged members).

    Raises:
      ValueError: a member with an unfinished epoch (naming it and its missing ids), members with
        different numbers of evaluations, minibatches from some members only, or no evaluation.
    """
    ok = ~self.diverged
    for r in np.flatnonzero(ok):
      for epoch, pend in sorted(self._pending[r].items()):
        missing = np.flatnonzero(~pend.seen)
        raise ValueError(f"member {self.member_ids[r]}'s epoch {epoch} is incomplete: "
                         f"{missing.size} of {self.num_examples} example ids missing (first "
                         f"{missing[:5].tolist()}); log them or mark_diverged the member")
    counts = {self.member_ids[r]: int(self._epoch_state[r]["count"])
              if self._epoch_state[r] is not None else 0 for r in np.flatnonzero(ok)}
    if not counts or min(counts.values()) == 0 or len(set(counts.values())) != 1:
      raise ValueError(f"every member that did not diverge needs the same number (>= 1) of "
                       f"complete evaluations; got {counts} (member: evaluations)")
    with_mb = {self.member_ids[r] for r in np.flatnonzero(ok) if self._mb_state[r] is not None}
    if with_mb and len(with_mb) != len(counts):
      raise ValueError(f"minibatches were logged for members {sorted(with_mb)} only; log them "
                       f"for all of {sorted(counts)} or for none")
    rows = []
    for r in range(len(self.member_ids)):
      if not ok[r]:
        rows.append(None)
        continue
      row = dict(self._last[r].values)
      row.update({k: v[0] for k, v in S.EpochAccumulator.finalize(self._epoch_state[r]).items()})
      if with_mb:
        row.update({k: v[0] for k, v in S.MinibatchForgetting.finalize(self._mb_state[r]).items()})
      rows.append(row)
    names = [k for k in next(row for row in rows if row is not None)
             if not (self.kind == PROBS and k in NEED_LOGITS)]
    nan = np.full(self.num_examples, np.nan, np.float32)
    out = {k: np.stack([nan if row is None else row[k] for row in rows]) for k in names}
    return {k: np.where(ok[:, None], v, np.nan).astype(np.float32)
            for k, v in S.orient(out).items()}

  def final_outputs(self) -> np.ndarray:
    """float32 `[R, N, C]`: each member's last evaluation (logits or probs; NaN if diverged)."""
    return np.stack([np.full((self.num_examples, self.num_classes), np.nan, np.float32)
                     if self.diverged[r] or self._last[r] is None else self._last[r].outputs
                     for r in range(len(self.member_ids))])

  def write(self) -> dict[str, np.ndarray]:
    """Writes `<workdir>/scores` (every file atomic, meta.json last), `logits.npy` (logits
    only) and `ensemble_scores.npz`, under the workdir's lock; returns the stored scores."""
    final = self.scores()  # raises before anything is written
    ok = ~self.diverged
    outputs = self.final_outputs()
    probs = (np.asarray(jax.nn.softmax(outputs[ok], axis=-1)) if self.kind == LOGITS
             else outputs[ok])
    labels = np.maximum(self.labels, 0)  # every id was seen: no -1 is left
    meta = dict(self.meta)
    meta.update(
        member_ids=list(self.member_ids), num_epochs=int(max(
            int(s["count"]) for s in self._epoch_state if s is not None)),
        diverged=self.diverged.tolist(),
        orientation=("higher is harder: scores whose natural value is higher-is-easier are "
                     "stored negated (listed in 'negated')"),
        negated=sorted(k for k in final if k in S.NEGATED),
        logger={"input": self.kind, "writer": "jaxdiff.logger.DifficultyLogger",
                "not_stored": list(NEED_LOGITS) if self.kind == PROBS else [],
                "last_epoch": [e if e >= 0 else None for e in self._last_epoch]})
    with workdir_lib.lock(self.workdir):
      if self.kind == LOGITS:
        store.atomic_save_npy(workdir_lib.path(self.workdir, "logits"), outputs)
      if ok.any():
        ens = S.ensemble_scores(probs, labels)
        buf = _npz(ens)
        store.atomic_write_bytes(workdir_lib.path(self.workdir, "ensemble_scores"), buf)
      store.save_scores(workdir_lib.scores_dir(self.workdir), final,
                        example_ids=np.arange(self.num_examples), labels=labels, meta=meta)
    return final

  def close(self) -> dict[str, np.ndarray]:
    """`write`, then refuse further logs."""
    final = self.write()
    self._closed = True
    return final


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  return buf.getvalue()

"""Score recording during training: per-epoch evaluation, metrics and trajectory accumulators.

The Recorder turns each end-of-epoch evaluation into per-member metrics (metrics.jsonl) and feeds
the online trajectory accumulators; `finalize` returns every score as `[R, N]` for store.py.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax


def validate(config: Mapping[str, Any]) -> None:
  del config


class Recorder:
  """Per-epoch evaluation and score accumulation for one ensemble."""

  def __init__(self, config: Mapping[str, Any], engine, ds, num_runs: int):
    self.config = config
    self.engine = engine
    self.ds = ds
    self.num_runs = num_runs
    n = ds.num_train
    self.state = {"sum_loss": jnp.zeros((num_runs, n)), "count": jnp.zeros((), jnp.int32)}
    self.chunk = int(config.get("chunk_size", 1024)) if config else 1024

  def _eval(self, state, x, y):
    logits = self.engine.logits(state, x, self.chunk)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)[None])
    correct = (jnp.argmax(logits, -1) == jnp.asarray(y)[None]).astype(jnp.float32)
    return logits, loss, correct

  def on_epoch(self, epoch: int, state, idx, seen) -> list[dict]:
    _, loss, correct = self._eval(state, self.ds.x_train, self.ds.y_train)
    _, tloss, tcorrect = self._eval(state, self.ds.x_test, self.ds.y_test)
    self.state = {"sum_loss": self.state["sum_loss"] + loss, "count": self.state["count"] + 1}
    diverged = np.asarray(state.diverged)
    tr_l, tr_a = np.asarray(loss.mean(1)), np.asarray(correct.mean(1))
    te_l, te_a = np.asarray(tloss.mean(1)), np.asarray(tcorrect.mean(1))
    seen_loss = np.asarray(seen["loss"].mean((1, 2)))
    return [{"epoch": epoch, "member": r, "train_loss": float(tr_l[r]), "train_acc": float(tr_a[r]),
             "test_loss": float(te_l[r]), "test_acc": float(te_a[r]),
             "minibatch_loss": float(seen_loss[r]), "diverged": bool(diverged[r])}
            for r in range(self.num_runs)]

  def finalize(self, state) -> dict[str, np.ndarray]:
    _, loss, correct = self._eval(state, self.ds.x_train, self.ds.y_train)
    out = {"loss": np.asarray(loss), "correct": np.asarray(correct),
           "mean_loss": np.asarray(self.state["sum_loss"] / self.state["count"])}
    diverged = np.asarray(state.diverged)
    for k in out:
      out[k] = np.where(diverged[:, None], np.nan, out[k]).astype(np.float32)
    return out

"""Progress lines of the final scoring (recording.Recorder.finalize), captured from absl logging."""

import logging
import re
import types

from absl import logging as absl_logging
import numpy as np

from jaxdiff import recording
from test_scores_models import MLP, mlp_apply, stacked_init

STAGES = ("point", "grand", "features", "prediction_depth", "prototypes")


def _finalize(progress, caplog):
  """Runs `finalize` of a 2-member tiny MLP on 30 examples; returns the captured absl messages."""
  rng = np.random.default_rng(0)
  n = 30
  x = rng.normal(size=(n, 5)).astype(np.float32)
  y = np.arange(n) % 3
  ds = types.SimpleNamespace(x_train=x, y_train=y, x_test=x[:6], y_test=y[:6], num_train=n,
                             num_classes=3)
  engine = types.SimpleNamespace(  # every member vmapped at once
      apply_fn=mlp_apply, resolved_member_strategy="vmap", variables=lambda s: s.variables,
      map_members=lambda fn, v: fn(v), chunk_size=lambda runs: runs)
  state = types.SimpleNamespace(variables=stacked_init(MLP, 2, x), diverged=np.zeros(2, bool))
  rec = recording.Recorder({"knn_k": 3, "chunk_size": 16}, engine, ds, 2, progress=progress)
  absl_logging.set_verbosity(absl_logging.INFO)
  with caplog.at_level(logging.INFO, logger="absl"):
    caplog.clear()
    out, _ = rec.finalize(state, only={"grand", "representation"})  # no trajectory: untrained
  assert out["prediction_depth"].shape == (2, n)
  return [r.getMessage() for r in caplog.records if r.name == "absl"]


def test_finalize_logs_each_stage_with_elapsed_and_whats_left(caplog):
  lines = [m for m in _finalize(True, caplog) if m.startswith("final scoring")]
  # The plan first, then one line per stage in order, each naming what is still to come.
  assert lines[0] == "final scoring of 30 examples x 2 members: " + ", ".join(STAGES)
  done = [re.match(r"final scoring: (\w+) done in [\d.]+ s \(([\d.]+) s elapsed\); left: (.*)", m)
          for m in lines]
  done = [m for m in done if m]
  assert [m.group(1) for m in done] == list(STAGES)
  for i, m in enumerate(done):
    assert m.group(3) == (", ".join(STAGES[i + 1:]) or "nothing")
  elapsed = [float(m.group(2)) for m in done]
  assert elapsed == sorted(elapsed)
  # Prediction depth: the input and two hidden layers, probed top down.
  layers = [re.match(r"final scoring: prediction_depth layer (\d)/(\d) probed \([\d.]+ s in the "
                     r"stage\); at most ~\d+ s left in it", m) for m in lines]
  assert [(int(m.group(1)), int(m.group(2))) for m in layers if m] == [(1, 3), (2, 3), (3, 3)]


def test_finalize_is_silent_without_progress(caplog):
  messages = _finalize(False, caplog)
  assert not [m for m in messages if m.startswith("final scoring") and "times (s)" not in m]
  assert not [m for m in messages if any(s + " done" in m for s in STAGES)]



"""Progress lines of long stages, captured from absl logging: the final scoring
(recording.Recorder.finalize), the helper `jaxdiff.progress.Stages`, the analysis, the held-out
analysis and the study."""

import logging
import re
import types

from absl import logging as absl_logging
import jax
import numpy as np

from jaxdiff import analysis
from jaxdiff import heldout
from jaxdiff import progress as progress_lib
from jaxdiff import recording
from jaxdiff import store
from jaxdiff.scores import representation as rep
from test_heldout import _noisy_workdir
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


def test_finalize_logs_member_probes_within_a_layer(caplog, monkeypatch):
  # One device: the 2 members' probes of a layer run in 2 waves, and the first wave's line says
  # so (throttle off). The input layer is the same for both members: one probe, no line.
  monkeypatch.setattr(rep, "_member_devices", lambda: jax.devices()[:1])
  monkeypatch.setattr(recording, "MEMBER_PROGRESS_INTERVAL", 0.0)
  lines = _finalize(True, caplog)
  got = [re.match(r"final scoring: prediction_depth layer (\d)/3: members (\d)/(\d) probed "
                  r"\(([\d.]+) s in the stage\); at most ~\d+ s left in it", m) for m in lines]
  assert [m.group(1, 2, 3) for m in got if m] == [("1", "1", "2"), ("2", "1", "2")]
  # Each comes before its layer's own line.
  order = [m for m in lines if "prediction_depth layer" in m]
  assert [("members" in m) for m in order] == [True, False, True, False, False]


def test_finalize_is_silent_without_progress(caplog):
  messages = _finalize(False, caplog)
  assert not [m for m in messages if m.startswith("final scoring") and "times (s)" not in m]
  assert not [m for m in messages if any(s + " done" in m for s in STAGES)]




def done_stages(lines, task):
  """(stage, seconds elapsed, stages left) of each `<task>: <stage> done ...` line, in order."""
  done = [re.match(rf"{task}: (\w+) done in [\d.]+ s \(([\d.]+) s elapsed\); left: (.*)", m)
          for m in lines]
  return [(m.group(1), float(m.group(2)), m.group(3)) for m in done if m]


def _absl_lines(caplog, fn, prefix):
  absl_logging.set_verbosity(absl_logging.INFO)
  with caplog.at_level(logging.INFO, logger="absl"):
    caplog.clear()
    fn()
  return [r.getMessage() for r in caplog.records
          if r.name == "absl" and r.getMessage().startswith(prefix)]


def test_stages_lines_on_a_fake_clock(caplog, monkeypatch):
  # Hand-worked: stages of 2 s and 3 s; a stage of 4 parts, 1 s each (0.5 s apart from the
  # throttle of 1 s: the 2nd and 4th parts are logged), with what is left at that pace.
  clock = iter([10.0, 12.0, 13.0, 13.5, 14.0, 14.5, 15.0, 20.0])
  monkeypatch.setattr(progress_lib.time, "perf_counter", lambda: next(clock))

  def run():
    p = progress_lib.Stages("job", ["read", "fit", "write"], min_interval=1.0)  # t = 10
    p.plan("3 things")
    assert p.done("read") == 2.0  # t = 12
    p.begin()  # t = 13: the second between the stages counts in neither
    for i in range(1, 5):  # t = 13.5, 14, 14.5, 15
      p.step("fit", i, 4, part="part", verb="fitted")
    assert p.done("fit") == 7.0  # t = 20
    assert p.times == {"read": 2.0, "fit": 7.0}

  assert _absl_lines(caplog, run, "job") == [
      "job of 3 things: read, fit, write",
      "job: read done in 2.0 s (2.0 s elapsed); left: fit, write",
      "job: fit part 2/4 fitted (1.0 s in the stage); about ~1 s left in it",
      "job: fit part 4/4 fitted (2.0 s in the stage); about ~0 s left in it",
      "job: fit done in 7.0 s (10.0 s elapsed); left: write"]


def test_stages_silent_when_disabled(caplog):
  def run():
    p = progress_lib.Stages("job", ["a"], enabled=False, min_interval=0.0)
    p.plan("x")
    p.step("a", 1, 2)
    p.done("a")
    assert set(p.times) == {"a"}
  assert _absl_lines(caplog, run, "job") == []


def _score_sets():
  rng = np.random.default_rng(0)
  return {a: store.ScoreSet(scores={k: rng.standard_normal((4, 30)).astype(np.float32)
                                    for k in ("loss", "el2n")},
                            example_ids=np.arange(30), labels=np.arange(30) % 3,
                            meta=dict(num_runs=4))
          for a in ("mlp", "cnn")}


def test_analysis_logs_each_stage_and_is_silent_without_progress(caplog):
  sets = _score_sets()
  kw = dict(num_draws=2, kendall_draws=0, methods=("spearman",), num_workers=2)
  lines = _absl_lines(caplog, lambda: analysis.analyze(sets, **kw), "analysis")
  stages = ["reliability", "agreement", "sensitivity", "examples"]
  assert lines[0] == "analysis of 2 architecture(s) x 2 score(s): " + ", ".join(stages)
  done = done_stages(lines, "analysis")
  assert [d[0] for d in done] == stages
  assert [d[2] for d in done] == [", ".join(stages[i + 1:]) or "nothing" for i in range(4)]
  # The last of the 4 (arch, score) reliability tasks always logs, with nothing left.
  assert "analysis: reliability (arch, score) 4/4 done" in "\n".join(lines)
  assert _absl_lines(caplog, lambda: analysis.analyze(sets, progress=False, **kw),
                     "analysis") == []


def test_heldout_logs_each_stage_and_is_silent_without_progress(caplog, tmp_path):
  wd = _noisy_workdir(tmp_path / "w")
  lines = _absl_lines(caplog, lambda: heldout.load_report(wd), "heldout")
  stages = ["read", *heldout.STAGES, "auroc"]
  assert lines[0] == f"heldout of {wd}: " + ", ".join(stages[:-1])  # auroc: once noise is seen
  done = done_stages(lines, "heldout")
  assert [d[0] for d in done] == stages
  assert [d[2] for d in done] == [", ".join(stages[i + 1:]) or "nothing"
                                  for i in range(len(stages))]
  elapsed = [d[1] for d in done]
  assert elapsed == sorted(elapsed)
  assert _absl_lines(caplog, lambda: heldout.load_report(wd, progress=False), "heldout") == []

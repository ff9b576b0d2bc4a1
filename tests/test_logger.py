"""jaxdiff.logger: a training loop of any framework feeding NumPy outputs into a score store.

The logger's trajectory scores are compared with those jaxdiff's Recorder stored in a real run
(on the run's own per-epoch logits), and with a plain-Python loop over recorded evaluations; the
README's two examples are run as written.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxdiff import analysis
from jaxdiff import scores as S
from jaxdiff import store
from jaxdiff import train
from jaxdiff import workdir as workdir_lib
from jaxdiff.logger import DifficultyLogger, NEED_LOGITS

from conftest import ROOT, tiny_config

# Every score EpochAccumulator.finalize returns, named (checked complete below).
TRAJECTORY = ("mean_loss", "mean_p_y", "variability", "mean_correct", "aum", "aum_prob",
              "forgetting_events", "forgetting_events_inf", "never_learned", "learning_time",
              "learning_time_inf", "consistent_learning_time", "consistent_learning_time_inf",
              "unforgettable")
POINT = ("loss", "correct", "p_y", "max_p", "entropy", "margin_prob", "margin_logit", "el2n")


def readme_example(index):
  """The index-th ```python block of README's "Your own training loop" section."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  section = text.split("## Your own training loop\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)[index]


def run_example(code, workdir, monkeypatch):
  """Runs README code with its workdir replaced.

  Returns:
    evals: each log_eval call's (member, epoch, ids [B], logits [B, C], labels [B]).
    steps: each log_minibatch call's (member, step, ids [B], correct [B]).
  """
  evals, steps = [], []
  log_eval, log_minibatch = DifficultyLogger.log_eval, DifficultyLogger.log_minibatch

  def recording_eval(self, member, example_ids, **kw):
    evals.append((member, kw["epoch"], np.array(example_ids), np.array(kw["logits"]),
                  np.array(kw["labels"])))
    return log_eval(self, member, example_ids, **kw)

  def recording_minibatch(self, member, example_ids, **kw):
    steps.append((member, kw["step"], np.array(example_ids), np.array(kw["correct"])))
    return log_minibatch(self, member, example_ids, **kw)

  monkeypatch.setattr(DifficultyLogger, "log_eval", recording_eval)
  monkeypatch.setattr(DifficultyLogger, "log_minibatch", recording_minibatch)
  code, n = re.subn(r'workdir = "[^"]*"', f"workdir = {str(workdir)!r}", code)
  assert n == 1
  exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})  # pylint: disable=exec-used
  return evals, steps


def place(evals, num_epochs, num_members, num_examples, num_classes):
  """log_eval calls -> logits [T, R, N, C] and labels [N], each row at its example id (members
  are 0..R-1); every (epoch, member, example) given exactly once."""
  logits = np.full((num_epochs, num_members, num_examples, num_classes), np.nan)
  labels = np.full(num_examples, -1)
  for member, epoch, ids, z, y in evals:
    assert np.isnan(logits[epoch - 1, member, ids]).all()
    logits[epoch - 1, member, ids] = z
    labels[ids] = y
  assert not np.isnan(logits).any() and (labels >= 0).all()
  return logits, labels


def reference_minibatch(steps, num_members, num_examples):
  """Plain Python over log_minibatch calls (member, step, ids, correct) -> the mb_* scores [R, N]:
  forgetting events (correct then wrong at the example's next presentation; never right ->
  the member's most presentations // 2 + 1), learning time (the first step it was right; never ->
  the member's last step + 1) and the number of presentations."""
  out = {k: np.zeros((num_members, num_examples)) for k in
         ("mb_forgetting_events", "mb_learning_time", "mb_presentations")}
  for r in range(num_members):
    mine = [(step, list(ids), list(c)) for m, step, ids, c in steps if m == r]
    last = max(step for step, _, _ in mine)
    hist = {i: [(s, c[ids.index(i)]) for s, ids, c in mine if i in ids]
            for i in range(num_examples)}
    most = max(len(h) for h in hist.values())
    for i, h in hist.items():
      seq = [c for _, c in h]
      learned = [s for s, c in h if c]
      forgets = sum(a == 1 and b == 0 for a, b in zip(seq, seq[1:]))
      out["mb_forgetting_events"][r, i] = forgets if learned else most // 2 + 1
      out["mb_learning_time"][r, i] = learned[0] if learned else last + 1
      out["mb_presentations"][r, i] = len(h)
  return out


def reference_trajectory(logits, labels):
  """Plain Python over members and examples: logits [T, R, N, C] of epochs 1..T -> scores."""
  t_max, r_max, n_max, _ = logits.shape
  out = {k: np.zeros((r_max, n_max)) for k in
         ("mean_loss", "mean_p_y", "variability", "aum", "forgetting_events", "learning_time",
          "consistent_learning_time")}
  for r in range(r_max):
    for i in range(n_max):
      y = labels[i]
      losses, p_ys, margins, correct = [], [], [], []
      for t in range(t_max):
        z = logits[t, r, i].astype(np.float64)
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        losses.append(-np.log(p[y]))
        p_ys.append(p[y])
        margins.append(z[y] - max(z[c] for c in range(len(z)) if c != y))
        correct.append(int(np.argmax(z) == y))
      forgets = sum(1 for a, b in zip(correct, correct[1:]) if a == 1 and b == 0)
      learned = [t + 1 for t in range(t_max) if correct[t]]
      consistent = next((t + 1 for t in range(t_max) if all(correct[t:])), t_max + 1)
      out["mean_loss"][r, i] = sum(losses) / t_max
      out["mean_p_y"][r, i] = sum(p_ys) / t_max
      out["variability"][r, i] = np.sqrt(sum((v - out["mean_p_y"][r, i]) ** 2 for v in p_ys)
                                         / t_max)
      out["aum"][r, i] = sum(margins) / t_max
      out["forgetting_events"][r, i] = forgets if learned else t_max // 2 + 1
      out["learning_time"][r, i] = learned[0] if learned else t_max + 1
      out["consistent_learning_time"][r, i] = consistent
  return out


def test_logger_equals_the_recorder_of_a_jaxdiff_run(tmp_path):
  wd = str(tmp_path / "run")
  config = tiny_config(**{"scores.save_history": True, "num_epochs": 4, "scores.grand": False,
                          "scores.representation": False})
  train.train_and_evaluate(config, wd)
  run = workdir_lib.load_scores(wd)
  paths = workdir_lib.history_paths(wd)
  assert len(paths) == 4
  history = [store.load_npz_array(p, "logits") for p in paths]  # [R, N, C] per epoch
  r_max, n, c = history[0].shape
  labels = run.labels
  log = DifficultyLogger(str(tmp_path / "logged"), num_examples=n, num_classes=c,
                         member_ids=run.meta["member_ids"], arch="mlp-logged",
                         dataset=run.meta["dataset"],
                         dataset_fingerprint=run.meta["dataset_fingerprint"])
  # Every (member, epoch, chunk) in one shuffled order: chunks of uneven sizes, epochs of a member
  # interleaved (a later epoch may complete before an earlier one).
  rng = np.random.default_rng(0)
  calls = []
  for epoch, logits in enumerate(history, start=1):
    for r, member in enumerate(run.meta["member_ids"]):
      perm = rng.permutation(n)
      for ids in np.split(perm, np.sort(rng.choice(np.arange(1, n), 3, replace=False))):
        calls.append((member, epoch, ids, logits[r, ids]))
  for k in rng.permutation(len(calls)):
    member, epoch, ids, z = calls[k]
    log.log_eval(member, ids, logits=z, labels=labels[ids], epoch=epoch)
  mine = log.close()

  assert set(TRAJECTORY) == set(S.EpochAccumulator.finalize(
      S.EpochAccumulator.init(1, 1) | {"count": np.array(1)}))
  stored = workdir_lib.load_scores(str(tmp_path / "logged"))
  for name in TRAJECTORY + POINT:
    np.testing.assert_allclose(stored.scores[name], run.scores[name], rtol=1e-6, atol=1e-6,
                               err_msg=name)
    np.testing.assert_array_equal(stored.scores[name], mine[name], err_msg=name)
  assert (run.scores["forgetting_events"] > 0).any()  # not a trivial trajectory
  for key in ("member_ids", "num_epochs", "negated", "orientation", "diverged", "dataset",
              "dataset_fingerprint"):
    got = stored.meta[key]
    want = run.meta[key]
    if key == "negated":  # the run also stores families the logger does not compute
      want = [k for k in want if k in stored.scores]
    assert got == want, key
  np.testing.assert_array_equal(stored.labels, run.labels)
  np.testing.assert_array_equal(stored.example_ids, run.example_ids)
  np.testing.assert_array_equal(np.load(workdir_lib.path(str(tmp_path / "logged"), "logits")),
                                history[-1])
  ens_run = np.load(workdir_lib.path(wd, "ensemble_scores"))
  ens = np.load(workdir_lib.path(str(tmp_path / "logged"), "ensemble_scores"))
  for name in ens_run.files:
    np.testing.assert_allclose(ens[name], ens_run[name], rtol=1e-6, atol=1e-6, err_msg=name)
  # The run and the logged copy are one dataset: the analysis takes both together.
  sets = analysis.load_workdirs([wd, str(tmp_path / "logged")])
  assert set(sets) == {"mlp-logged", workdir_lib.arch_name(run.meta, "run")}


def test_readme_flax_loop_matches_a_python_loop_and_is_analysed(tmp_path, monkeypatch):
  wd = tmp_path / "own_loop"
  evals, steps = run_example(readme_example(0), wd, monkeypatch)
  stored = workdir_lib.load_scores(str(wd))
  ref = reference_trajectory(*place(evals, 5, 2, 256, 2))
  for name, want in ref.items():
    got = S.orient({name: want})[name]  # stored higher = harder
    np.testing.assert_allclose(stored.scores[name], got, rtol=1e-5, atol=1e-5, err_msg=name)
  for name, want in reference_minibatch(steps, 2, 256).items():
    np.testing.assert_array_equal(stored.scores[name], want, err_msg=name)
  assert stored.meta["arch"] == "dense" and stored.meta["num_epochs"] == 5

  sets = analysis.load_workdirs([str(wd)])
  assert list(sets) == ["dense"] and sets["dense"].num_runs == 2
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = tmp_path / "report"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "analyze.py"),
                         f"--workdirs={wd}", f"--out={out}", "--num_draws=2", "--gallery=false",
                         "--figures=false"], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "aum" in (out / "report.md").read_text()


def test_readme_torch_loop(tmp_path, monkeypatch):
  pytest.importorskip("torch")
  wd = tmp_path / "torch_loop"
  evals, steps = run_example(readme_example(1), wd, monkeypatch)
  # Shuffled DataLoader batches: the logger must place rows by their ids, not by position.
  assert all(len(ids) < 256 for _, _, ids, _, _ in evals)
  assert any((np.diff(ids) < 0).any() for _, _, ids, _, _ in evals)
  stored = workdir_lib.load_scores(str(wd))
  ref = reference_trajectory(*place(evals, 5, 2, 256, 2))
  for name, want in ref.items():
    np.testing.assert_allclose(stored.scores[name], S.orient({name: want})[name], rtol=1e-5,
                               atol=1e-5, err_msg=name)
  for name, want in reference_minibatch(steps, 2, 256).items():
    np.testing.assert_array_equal(stored.scores[name], want, err_msg=name)
  assert (ref["forgetting_events"] > 0).any() or (ref["learning_time"] > 1).any()  # not trivial
  assert stored.meta["num_epochs"] == 5
  assert list(analysis.load_workdirs([str(wd)])) == ["linear"]


def test_minibatch_scores_match_a_python_loop(tmp_path):
  # Two members, 6 examples, steps 0..; member 1 logs its steps before member 0 (per-member state).
  sched = {0: [(0, [0, 1, 2], [1, 0, 1]), (1, [3, 4, 5], [0, 0, 1]), (2, [2, 0, 1], [0, 1, 1]),
               (3, [5, 4, 3], [1, 0, 0])],
           1: [(0, [5, 0], [1, 1]), (2, [0, 5], [0, 1]), (7, [1, 0], [1, 1])]}
  log = DifficultyLogger(str(tmp_path), num_examples=6, num_classes=3, member_ids=[0, 1])
  for member in (1, 0):
    for step, ids, c in sched[member]:
      log.log_minibatch(member, np.array(ids), correct=np.array(c, bool), step=step)
  z = np.eye(3)[np.arange(6) % 3] * 2.0
  for member in (0, 1):
    log.log_eval(member, np.arange(6), logits=z, labels=np.arange(6) % 3, epoch=1)
  got = log.scores()
  steps = [(r, step, ids, c) for r, rows in sched.items() for step, ids, c in rows]
  for name, want in reference_minibatch(steps, 2, 6).items():
    np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_probabilities_store_what_they_determine(tmp_path):
  rng = np.random.default_rng(1)
  z = rng.normal(size=(3, 2, 20, 4)) * 3  # [T, R, N, C]
  y = rng.integers(0, 4, 20)
  probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  logged = {}
  for kind, values in (("logits", z), ("probs", probs)):
    log = DifficultyLogger(str(tmp_path / kind), num_examples=20, num_classes=4,
                           member_ids=[0, 1])
    for t in range(3):
      for r in range(2):
        log.log_eval(r, np.arange(20), labels=y, epoch=t + 1, **{kind: values[t, r]})
    logged[kind] = log.close()
  assert set(logged["logits"]) - set(logged["probs"]) == set(NEED_LOGITS)
  for name, value in logged["probs"].items():
    np.testing.assert_allclose(value, logged["logits"][name], rtol=1e-5, atol=1e-5, err_msg=name)
  meta = store.read_meta(workdir_lib.scores_dir(str(tmp_path / "probs")))
  assert meta["logger"]["not_stored"] == ["margin_logit", "aum"]
  assert not os.path.exists(workdir_lib.path(str(tmp_path / "probs"), "logits"))


@pytest.mark.parametrize("call, message", [
    (lambda log: log.log_eval(0, np.array([1, 2, 1]), logits=np.zeros((3, 3)),
                              labels=np.zeros(3, int), epoch=1),
     "duplicate example id 1 in one call (1 ids repeated); give each example once"),
    (lambda log: log.log_eval(0, np.array([3, 4]), logits=np.zeros((2, 3)),
                              labels=np.zeros(2, int), epoch=1),
     "duplicate example id 3: member 0 already gave it at epoch 1"),
    (lambda log: log.log_eval(0, np.array([5]), logits=np.zeros((1, 4)), labels=np.zeros(1, int),
                              epoch=1),
     "logits have shape (1, 4); expected [B, 3] (num_classes=3)"),
    (lambda log: log.log_eval(7, np.array([5]), logits=np.zeros((1, 3)), labels=np.zeros(1, int),
                              epoch=1),
     "unknown member 7; valid member ids: [0, 1]"),
    (lambda log: log.log_eval(0, np.array([6]), logits=np.zeros((1, 3)), labels=np.zeros(1, int),
                              epoch=1),
     "example id 6 is out of range: valid ids are 0..5"),
    (lambda log: log.log_eval(0, np.array([5]), probs=np.full((1, 3), 0.5),
                              labels=np.zeros(1, int), epoch=1),
     "got probs= but this logger was fed logits= before; use one kind"),
    (lambda log: log.log_minibatch(0, np.array([0, 0]), correct=np.ones(2, bool), step=0),
     "duplicate example id 0 in one call"),
])
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, call, message):
  log = DifficultyLogger(str(tmp_path), num_examples=6, num_classes=3, member_ids=[0, 1])
  log.log_eval(0, np.array([3, 4]), logits=np.zeros((2, 3)), labels=np.zeros(2, int), epoch=1)
  with pytest.raises(ValueError) as e:
    call(log)
  assert str(e.value).startswith(message) and "\n" not in str(e.value)
  # Nothing half-applied: the epoch still lacks exactly the ids it lacked.
  assert np.flatnonzero(~log._pending[0][1].seen).tolist() == [0, 1, 2, 5]  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"^member 0's epoch 1 is incomplete: 4 of 6 example ids "
                     r"missing \(first \[0, 1, 2, 5\]\)"):
    log.close()
  assert not os.path.exists(workdir_lib.scores_dir(str(tmp_path)))  # nothing written


def test_existing_store_and_diverged_member(tmp_path):
  log = DifficultyLogger(str(tmp_path), num_examples=4, num_classes=2, member_ids=[3, 5])
  z = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
  log.log_eval(3, np.arange(4), logits=z, labels=np.array([0, 1, 1, 1]), epoch=1)
  with pytest.raises(ValueError, match=r"^member 5 gave non-finite logits at epoch 1 \(example "
                     r"id 0\); call mark_diverged\(5\)"):
    log.log_eval(5, np.arange(4), logits=z * np.nan, labels=np.array([0, 1, 1, 1]), epoch=1)
  log.mark_diverged(5)
  out = log.close()
  assert np.isnan(out["loss"][1]).all() and np.isfinite(out["loss"][0]).all()
  s = workdir_lib.load_scores(str(tmp_path))
  assert s.meta["diverged"] == [False, True] and s.get("loss").shape == (1, 4)
  # Correct, correct, wrong, correct at the one evaluation: stored negated (higher = harder).
  np.testing.assert_array_equal(s.get("correct")[0], [-1, -1, 0, -1])
  with pytest.raises(ValueError, match=r"already holds a score store .*; use another workdir or "
                     "overwrite=True$"):
    DifficultyLogger(str(tmp_path), num_examples=4, num_classes=2, member_ids=[0])


def test_probabilities_go_through_the_registry_kernels(monkeypatch):
  # One home per score: a point entry added to the registry is what the probabilities path
  # computes too (the logger re-implemented the kernels in numpy before).
  import dataclasses  # pylint: disable=g-import-not-at-top
  from jaxdiff import logger as logger_lib  # pylint: disable=g-import-not-at-top
  from jaxdiff.scores import point, registry  # pylint: disable=g-import-not-at-top
  extra = dataclasses.replace(registry.ENTRIES["p_y"], name="p_y_squared",
                              kernel=lambda q: q.p_y * q.p_y)
  monkeypatch.setitem(registry.ENTRIES, "p_y_squared", extra)
  monkeypatch.setattr(point, "POINT_SCORE_NAMES", (*point.POINT_SCORE_NAMES, "p_y_squared"))
  logger_lib._probs_point_scores.clear_cache()  # traced before with the registry as it was
  rng = np.random.default_rng(2)
  z = rng.normal(size=(3, 11))
  probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  y = np.array([0, 10, 4])
  got = logger_lib.point_scores_from_probs(probs, y)
  logger_lib._probs_point_scores.clear_cache()
  want = [probs[i, y[i]] ** 2 for i in range(3)]  # a loop
  np.testing.assert_allclose(got["p_y_squared"], want, rtol=1e-6)
  np.testing.assert_allclose(got["p_y"], [probs[i, y[i]] for i in range(3)], rtol=1e-6)

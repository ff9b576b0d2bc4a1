"""Fault tolerance: a training job SIGKILLed at any moment loses nothing; bad input is refused.

Kill tests run the real experiments/train.py (tests/kill_harness.py); refusals check the message
names the bad value and the valid choices, the script exits non-zero, and nothing is written.
"""

import errno
import os
import pathlib
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxdiff import checksums
from jaxdiff import store
from jaxdiff import train
import kill_harness as kh
from conftest import ROOT, tiny_config

KILL_SEED = 8  # seeds the kill points


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _finished_run(tmp_path_factory, cache_dir, layout, name, hash_seed, watch=None):
  d = tmp_path_factory.mktemp(f"{name}_{layout}")
  wd = str(d / "wd")
  out = kh.run(kh.train_command(wd, layout=layout), kh.child_env(cache_dir, hash_seed=hash_seed),
               wd, watch, str(d / "log.txt"))
  assert out.returncode == 0, out.stderr_tail
  return wd, out.seconds


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  """One uninterrupted run of the tiny job with the default device split, 16 members sharded over
  2 CPU devices (it also fills the compilation cache)."""
  wd = _finished_run(tmp_path_factory, cache_dir, "split", "reference", 1)[0]
  assert kh.checkpoint_devices(wd, 6) == {0, 1}  # really sharded over both devices
  return wd


@pytest.fixture(scope="module")
def reference_single(tmp_path_factory, cache_dir):
  """The same job on one CPU device with 3 members (the layout without sharding)."""
  return _finished_run(tmp_path_factory, cache_dir, "single", "reference", 1)[0]


def _timed_rerun(tmp_path_factory, cache_dir, layout):
  """A second uninterrupted run, in a fresh process with another hash seed, timed per phase."""
  watch = kh.Watch()
  wd, seconds = _finished_run(tmp_path_factory, cache_dir, layout, "rerun", 2, watch)
  return wd, seconds, watch.first_seen


@pytest.fixture(scope="module")
def rerun(tmp_path_factory, cache_dir, reference):
  return _timed_rerun(tmp_path_factory, cache_dir, "split")


@pytest.fixture(scope="module")
def rerun_single(tmp_path_factory, cache_dir, reference_single):
  return _timed_rerun(tmp_path_factory, cache_dir, "single")


def test_same_config_and_seed_give_bit_identical_outputs(reference, rerun):
  """Every score tensor, metrics.jsonl, meta.json and the final checkpoint, byte for byte."""
  assert kh.compare_finished(rerun[0], reference) == []
  assert kh.stale_temporaries(reference) == []


def test_harness_detects_differences(reference, tmp_path):
  """The comparisons used here can fail: one flipped score byte, a torn metrics line."""
  wd = tmp_path / "wd"
  shutil.copytree(reference, wd)
  loss = wd / "scores" / "loss.npy"
  data = bytearray(loss.read_bytes())
  data[-1] ^= 1
  loss.write_bytes(bytes(data))
  assert kh.compare_finished(str(wd), reference) == ["scores/loss.npy differs"]
  problems = kh.check_workdir_sound(str(wd), reference)[0]
  assert problems[0] == f"scores/loss.npy differs from the reference ({len(data)} bytes)"
  # ... and the score store's own SHA-256 catches it on load.
  assert len(problems) == 2 and "does not match the SHA-256" in problems[1], problems
  metrics = wd / "metrics.jsonl"
  metrics.write_bytes(metrics.read_bytes()[:-40])
  problems = kh.check_workdir_sound(str(wd), reference)[0]
  assert any("does not parse" in p for p in problems), problems
  assert not kh.trees_equal(kh.restore_step(reference, 5), kh.restore_step(reference, 6))
  assert kh.trees_equal(kh.restore_step(reference, 6), kh.restore_step(str(wd), 6))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["split", "single"])
def test_sigkill_at_random_moments_loses_nothing(layout, request, tmp_path, cache_dir, capsys):
  """SIGKILLs the job at seeded random moments (during a checkpoint write, a metrics write, the
  score write, and at random times), reruns the same command each time, and finally compares
  everything with the uninterrupted reference, bit for bit; with the members sharded over the
  default CPU split, and on one device."""
  suffix = "" if layout == "split" else "_single"
  reference = request.getfixturevalue("reference" + suffix)
  rerun = request.getfixturevalue("rerun" + suffix)
  rng = random.Random(KILL_SEED)
  _, warm_seconds, first_seen = rerun
  train_start = first_seen.get("checkpoints", 0.0)  # the manager is created just before epoch 1
  cues = [
      kh.CheckpointWrite(rng.randint(2, 5)),
      kh.Delay(rng.uniform(0.0, warm_seconds)),
      kh.TmpFile("", rng.randint(2, 4), "a metrics.jsonl write", prefix="metrics.jsonl"),
      kh.Delay(rng.uniform(train_start, warm_seconds)),
      kh.TmpFile("scores", rng.randint(1, 15), "the score write", count_done=True),
  ]
  wd = str(tmp_path / "wd")
  outcomes = []
  try:
    for i, cue in enumerate(cues):
      out = kh.run(kh.train_command(wd, layout=layout), kh.child_env(cache_dir, hash_seed=10 + i),
                   wd, cue,
                   str(tmp_path / f"log{i}.txt"))
      outcomes.append(out)
      if not out.killed:
        assert out.returncode == 0, out.stderr_tail
      problems, notes = kh.check_workdir_sound(wd, reference)
      out.landed += "".join(f"\n      note: {n}" for n in notes)
      assert problems == [], (cue.name, out.landed, problems)
    for attempt in range(3):  # rerun the same command until it completes
      out = kh.run(kh.train_command(wd, layout=layout),
                   kh.child_env(cache_dir, hash_seed=20 + attempt), wd, None,
                   str(tmp_path / f"final{attempt}.txt"))
      outcomes.append(out)
      if out.returncode == 0:
        break
    assert out.returncode == 0, out.stderr_tail
  finally:
    with capsys.disabled():
      print(f"\nkill points (seed {KILL_SEED}):")
      for o in outcomes:
        status = "SIGKILL" if o.killed else f"exit {o.returncode}"
        print(f"  {o.cue:50s} {status:8s} at {o.seconds:5.1f}s -> {o.landed}")
  # The cues that must land: mid-checkpoint and mid-score-write; the others land where they may.
  assert outcomes[0].killed
  assert f"unfinished ['{cues[0].step}.orbax-checkpoint-tmp']" in outcomes[0].landed
  assert outcomes[4].killed and outcomes[4].landed.startswith("[writing scores]")
  assert sum(o.killed for o in outcomes) >= 4
  assert kh.compare_finished(wd, reference) == []
  assert kh.stale_temporaries(wd) == []


# ----------------------------------------------------------------------------- corrupt checkpoints


def _largest_array_file(step_dir):
  """The biggest array-data file of an Orbax step (truncating it breaks the restore)."""
  d = os.path.join(step_dir, "default", "ocdbt.process_0", "d")
  return max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def test_corrupt_latest_checkpoint_falls_back_to_previous(reference, tmp_path, cache_dir):
  """A truncated array file in the newest checkpoint: rerunning moves it aside, resumes from the
  one before, says so, and ends with the reference's result bit for bit."""
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  _truncate(_largest_array_file(os.path.join(wd, "checkpoints", "6")))
  out = kh.run(kh.train_command(wd), kh.child_env(cache_dir, 3), wd, None, str(tmp_path / "log"))
  assert out.returncode == 0, out.stderr_tail
  log = (tmp_path / "log").read_text()
  assert "checkpoint of epoch 6 is unreadable" in log and "resumed from epoch 5" in log
  assert os.path.join(wd, "corrupt_checkpoints", "6") in log
  assert os.path.isdir(os.path.join(wd, "corrupt_checkpoints", "6", "default"))
  assert kh.compare_finished(wd, reference, ignore=("corrupt_checkpoints",)) == []


def _flip_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))


def test_flipped_byte_in_latest_checkpoint_is_caught(reference, tmp_path, cache_dir):
  """One flipped bit inside an array file of the newest checkpoint, which Orbax alone restores
  without complaint: its checksum catches it, the step is moved aside, training resumes from the
  one before and ends with the reference's result bit for bit."""
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  step6 = os.path.join(wd, "checkpoints", "6")
  assert checksums.verify(step6)  # every finished step has its checksums
  target = _largest_array_file(step6)
  _flip_byte(target)
  # Orbax alone reads the step back without an error, with different numbers in it.
  assert not kh.trees_equal(kh.restore_step(wd, 6), kh.restore_step(reference, 6))
  with pytest.raises(checksums.ChecksumError, match="does not match the SHA-256"):
    checksums.verify(step6)
  out = kh.run(kh.train_command(wd), kh.child_env(cache_dir, 5), wd, None, str(tmp_path / "log"))
  assert out.returncode == 0, out.stderr_tail
  log = (tmp_path / "log").read_text()
  assert "checkpoint of epoch 6 is unreadable (ChecksumError" in log and "resumed from epoch 5" in log
  assert kh.compare_finished(wd, reference, ignore=("corrupt_checkpoints",)) == []
  assert checksums.verify(os.path.join(wd, "checkpoints", "6"))  # rewritten, with checksums


def test_checkpoint_without_checksums_is_trusted_and_sealed(reference, tmp_path, cache_dir):
  """A run killed between Orbax's write and the checksums': the step restores, gets its
  checksums, and the result is unchanged."""
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  manifest = os.path.join(wd, "checkpoints", "6", checksums.MANIFEST_FILE)
  os.remove(manifest)
  assert not checksums.verify(os.path.dirname(manifest))
  out = kh.run(kh.train_command(wd), kh.child_env(cache_dir, 6), wd, None, str(tmp_path / "log"))
  assert out.returncode == 0, out.stderr_tail
  assert "unreadable" not in (tmp_path / "log").read_text()
  assert checksums.verify(os.path.dirname(manifest))
  assert kh.compare_finished(wd, reference) == []


def test_no_readable_checkpoint_is_refused(reference, tmp_path, cache_dir):
  """Every checkpoint broken (garbled metadata, truncated data): a clear error naming each epoch
  and its path, a non-zero exit, and the workdir left exactly as it was."""
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  with open(os.path.join(wd, "checkpoints", "5", "default", "_METADATA"), "w") as f:
    f.write("garbage")
  _truncate(_largest_array_file(os.path.join(wd, "checkpoints", "6")))
  before = {rel: pathlib.Path(p).read_bytes() for rel, p in kh.output_files(wd).items()}
  out = kh.run(kh.train_command(wd), kh.child_env(cache_dir, 4), wd, None, str(tmp_path / "log"))
  assert out.returncode != 0
  log = (tmp_path / "log").read_text()
  ckpt = os.path.join(wd, "checkpoints")
  assert f"CheckpointError: no checkpoint in {ckpt} can be read back" in log, out.stderr_tail
  assert f"epoch 6 ({ckpt}/6)" in log and f"epoch 5 ({ckpt}/5)" in log
  assert "Delete that directory" in log
  assert {rel: pathlib.Path(p).read_bytes() for rel, p in kh.output_files(wd).items()} == before
  assert kh.checkpoint_steps(wd) == ([5, 6], [])


# ----------------------------------------------------------------------------- bad input, scripts


def _script(name, *args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", name), *args],
                        capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def _bad_scores_config(tmp_path):
  path = tmp_path / "bad_scores.py"
  path.write_text("from experiments.configs import default\n\n\ndef get_config():\n"
                  "  c = default.get_config()\n  c.scores.bogus = 1\n  return c\n")
  return {"config": str(path)}


def _npz_missing_labels(tmp_path):
  path = tmp_path / "x_only.npz"
  np.savez(path, x_train=np.zeros((20, 8), np.float32), x_test=np.zeros((5, 8), np.float32))
  return ["--config.data.name=npz", f"--config.data.path={path}"]


@pytest.mark.parametrize("flags,expected", [
    (["--config.data.name=imagenet21k"],
     "unknown dataset 'imagenet21k'; valid: mnist1d, npz, arrays, mnist"),
    (["--config.optim.name=lamb"], "unknown optimiser 'lamb'; valid: sgd, adam, adamw"),
    (_bad_scores_config, "unknown scores option(s) ['bogus']; valid: ["),
    (_npz_missing_labels, "is missing ['y_train']; it must hold x_train, y_train"),
], ids=["dataset", "optimiser", "score_option", "npz_missing_keys"])
def test_train_script_refuses_bad_input_and_writes_nothing(tmp_path, flags, expected):
  """Unknown names and an .npz without labels: exit non-zero, the message names the value and
  what is valid, no workdir is created. (Unknown architectures: test_train.py.)"""
  flags = flags(tmp_path) if callable(flags) else flags
  wd = tmp_path / "wd"
  cmd = (kh.train_command(str(wd), **flags) if isinstance(flags, dict) else
         kh.train_command(str(wd), *flags))
  r = _script("train.py", *cmd[2:])
  assert r.returncode != 0
  assert expected in r.stderr, r.stderr[-2000:]
  assert not wd.exists()


@pytest.fixture(scope="module")
def score_workdirs(tmp_path_factory):
  """Workdirs holding only scores/: two architectures on MNIST-1D, one on another dataset, one
  with other example ids (same count), one with a truncated score file, one whose score write was
  cut short (no meta.json)."""
  root = tmp_path_factory.mktemp("score_workdirs")
  rng = np.random.default_rng(0)
  n, runs = 40, 4

  def make(name, dataset="mnist1d", ids=np.arange(n), arch=None):
    store.save_scores(str(root / name / "scores"),
                      {"loss": rng.random((runs, n)), "el2n": rng.random((runs, n))},
                      example_ids=ids, labels=np.arange(n) % 10,
                      meta={"dataset": dataset, "arch": arch or name})
    return str(root / name)
  other_ids = np.arange(n)
  other_ids[7] = n
  dirs = {"mlp": make("mlp"), "cnn": make("cnn"), "cifar": make("cifar", dataset="cifar10"),
          "other_ids": make("other_ids", ids=other_ids), "truncated": make("truncated"),
          "incomplete": make("incomplete")}
  _truncate(os.path.join(dirs["truncated"], "scores", "loss.npy"))
  os.unlink(os.path.join(dirs["incomplete"], "scores", "meta.json"))
  return dirs


@pytest.mark.parametrize("script", ["analyze.py", "fingerprint.py"])
@pytest.mark.parametrize("pair,expected", [
    (("mlp", "cifar"), "'cifar' is on dataset 'cifar10' but 'mlp' is on 'mnist1d'"),
    (("mlp", "other_ids"), "have different example ids (first at position 7: id 40 vs 7)"),
    (("mlp", "truncated"), "corrupt or truncated file '{truncated}/scores/loss.npy'"),
    (("mlp", "incomplete"), "'{incomplete}/scores' has no meta.json: not a score directory, or "
                            "its write was interrupted"),
], ids=["datasets", "example_ids", "truncated_npy", "interrupted_write"])
def test_analysis_scripts_refuse_mixed_or_broken_workdirs(score_workdirs, tmp_path, script, pair,
                                                          expected):
  """analyze.py and fingerprint.py: exit non-zero, name the workdirs and the mismatch, no --out."""
  out = tmp_path / "out"
  r = _script(script, f"--workdirs={','.join(score_workdirs[k] for k in pair)}", f"--out={out}")
  assert r.returncode != 0
  assert expected.format(**score_workdirs) in r.stderr, r.stderr[-2000:]
  assert not out.exists()


@pytest.mark.parametrize("script,flag,expected", [
    ("analyze.py", "--scores=bogus", "scores ['bogus'] are not in architecture 'mlp'; it has "
                                     "['el2n', 'loss']"),
    ("analyze.py", "--primary_score=bogus", "unknown score 'bogus'; valid choices are ['el2n', "
                                            "'loss']"),
    ("fingerprint.py", "--score=bogus", "architecture 'mlp' lacks scores ['bogus']; it has "
                                        "['el2n', 'loss']"),
])
def test_analysis_scripts_refuse_unknown_score_names(score_workdirs, tmp_path, script, flag,
                                                     expected):
  out = tmp_path / "out"
  r = _script(script, f"--workdirs={score_workdirs['mlp']},{score_workdirs['cnn']}", f"--out={out}",
              flag)
  assert r.returncode != 0
  assert expected in r.stderr, r.stderr[-2000:]
  assert not out.exists()


# ------------------------------------------------------------------------- full or read-only disk


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_full_disk_during_score_write_leaves_nothing_half_written(tmp_path, monkeypatch, failing):
  """ENOSPC on the 4th file of a rewrite: the error propagates, no temporary remains, the
  directory is marked incomplete (no meta.json), and every file present is whole."""
  d = str(tmp_path / "scores")
  rng = np.random.default_rng(1)
  old = {k: rng.random((2, 30)).astype(np.float32) for k in ("a", "b", "c", "d")}
  new = {k: v + 1 for k, v in old.items()}
  kw = dict(example_ids=np.arange(30), labels=np.zeros(30, int), meta={"dataset": "x"})
  store.save_scores(d, old, **kw)
  real = getattr(os, failing)
  calls = []

  def full_disk(*args):
    calls.append(args)
    if len(calls) == 4:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(*args)
  monkeypatch.setattr(os, failing, full_disk)
  with pytest.raises(OSError) as e:
    store.save_scores(d, new, **kw)
  assert e.value.errno == errno.ENOSPC
  assert str(e.value) == f"[Errno 28] No space left on device: '{os.path.join(d, 'b.npy')}'"
  monkeypatch.undo()
  names = sorted(os.listdir(d))
  assert not [f for f in names if f.endswith(".tmp")], names
  assert "meta.json" not in names
  with pytest.raises(store.StoreError, match="no meta.json.*interrupted"):
    store.load_scores(d)
  # example_ids, labels and a were rewritten; b failed; c and d are the old ones: each whole.
  for k in ("a", "b", "c", "d"):
    np.testing.assert_array_equal(np.load(os.path.join(d, f"{k}.npy")),
                                  new[k] if k == "a" else old[k])
  store.save_scores(d, new, **kw)  # space again: the rewrite completes
  np.testing.assert_array_equal(store.load_scores(d).scores["d"], new["d"])


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
  d = tmp_path / "scores"
  d.mkdir()
  (d / ".loss.npy.ab3_x9zq.tmp").write_bytes(b"half")   # atomic_write_bytes' pattern
  (d / "notes.tmp").write_text("user file")            # not ours: kept
  store.save_scores(str(d), {"loss": np.zeros((1, 3))}, example_ids=np.arange(3),
                    labels=np.zeros(3, int))
  assert sorted(os.listdir(d)) == ["example_ids.npy", "labels.npy", "loss.npy", "meta.json",
                                   "notes.tmp"]


def _chmod_stops_writes(path) -> bool:
  probe = os.path.join(path, "probe")
  try:
    open(probe, "w").close()
  except PermissionError:
    return True
  os.unlink(probe)
  return False


def test_read_only_output_directory_is_refused(tmp_path):
  """A read-only parent: PermissionError naming the path, nothing written."""
  parent = tmp_path / "ro"
  parent.mkdir()
  parent.chmod(0o555)
  try:
    if not _chmod_stops_writes(str(parent)):
      pytest.skip("running as root (or on a filesystem ignoring modes): chmod does not stop "
                  "writes here")
    with pytest.raises(PermissionError, match=str(parent / "wd")):
      train.train_and_evaluate(tiny_config("mlp", num_epochs=1), str(parent / "wd"))
    with pytest.raises(PermissionError, match=str(parent)):
      store.save_scores(str(parent / "scores"), {"loss": np.zeros((1, 3))},
                        example_ids=np.arange(3), labels=np.zeros(3, int))
    assert os.listdir(parent) == []
  finally:
    parent.chmod(0o755)


def test_workdir_in_use_by_a_live_run_is_refused(tmp_path):
  """Another process holding the workdir's lock (a run still going): a clear error naming the
  workdir and nothing written; once that process is gone, the same call trains."""
  wd = str(tmp_path / "wd")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, os, sys, time\n"
       f"os.makedirs({wd!r}, exist_ok=True)\n"
       f"fd = os.open(os.path.join({wd!r}, '.lock'), os.O_RDWR | os.O_CREAT)\n"
       "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(600)\n"],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(train.ConfigError, match=f"workdir '{wd}' is in use by another running job"):
      train.train_and_evaluate(tiny_config("mlp", num_epochs=1), wd)
    assert os.listdir(wd) == [".lock"]
  finally:
    holder.kill()  # SIGKILL: the kernel releases its lock
    holder.wait()
  out = train.train_and_evaluate(tiny_config("mlp", num_epochs=1), wd)
  assert out["test_acc"].shape == (3,)
  assert os.path.exists(os.path.join(wd, "scores", "meta.json"))

"""Multi-process training on JAX's multi-controller runtime, two local CPU processes over gloo.

Each process runs the real `experiments/train.py` with one CPU device; together they train the
quick start's 16 members, 8 per process. The reference is one process with two CPU devices (8
members each): the same devices, so the workdirs must be byte-identical (every file, the final
checkpoint), and so must a run whose second process is SIGKILLed and then restarted with the
first. Every test picks a free port and kills what it started.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests import kill_harness as kh

# Two epochs of checkpoints after the kill, so the restart resumes and trains on.
FLAGS = ("--config.num_runs=16", "--config.num_epochs=4", "--config.data.num_samples=500",
         "--config.model.width=16", "--config.batch_size=50", "--config.checkpoint_every=1",
         "--config.progress=False")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(cache, devices):
  # The device count through XLA_FLAGS, so that config.json (cpu_devices) is the same in both
  # layouts.
  env = kh.child_env(cache)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _command(workdir, *flags):
  return [sys.executable, kh.TRAIN, f"--config={kh.DEFAULT_CONFIG}", f"--workdir={workdir}",
          *FLAGS, *flags]


def _start(workdir, cache, logs, num=2, port=None, extra=()):
  port = port or _free_port()
  procs = []
  for i in range(num):
    log = open(os.path.join(logs, f"p{i}_{time.time_ns()}.log"), "wb")
    procs.append((subprocess.Popen(
        _command(workdir, f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num}",
                 f"--process_id={i}", "--distributed_timeout=60", *extra),
        cwd=kh.ROOT, env=_env(cache, 1), stdout=log, stderr=subprocess.STDOUT), log))
  return procs


def _wait(procs, timeout=300):
  deadline = time.monotonic() + timeout
  try:
    for p, _ in procs:
      p.wait(timeout=max(1, deadline - time.monotonic()))
  finally:
    _kill(procs)
  return [p.returncode for p, _ in procs]


def _kill(procs):
  for p, log in procs:
    if p.poll() is None:
      p.kill()
    p.wait()
    log.close()


def _tail(procs):
  out = []
  for _, log in procs:
    with open(log.name, "rb") as f:
      out.append(f.read()[-1500:].decode("utf-8", "replace"))
  return "\n---\n".join(out)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
  """(cache dir, logs dir, reference workdir: one process, two devices)."""
  base = tmp_path_factory.mktemp("multiprocess")
  cache, logs = str(base / "cache"), str(base / "logs")
  os.makedirs(logs)
  ref = str(base / "reference")
  done = subprocess.run(_command(ref), cwd=kh.ROOT, env=_env(cache, 2), capture_output=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  # The reference really is sharded over the two devices of one process.
  assert kh.checkpoint_devices(ref, 4) == {0, 1}
  return cache, logs, ref


def test_two_processes_equal_one_process_with_their_devices(setting, tmp_path):
  cache, logs, ref = setting
  workdir = str(tmp_path / "two")
  procs = _start(workdir, cache, logs)
  codes = _wait(procs)
  assert codes == [0, 0], _tail(procs)
  # The checkpoint spans both processes' devices (process 1's device has id 2048 in JAX's
  # multi-process numbering), and everything equals the one-process run byte for byte.
  assert len(kh.checkpoint_devices(workdir, 4)) == 2
  assert kh.compare_finished(workdir, ref) == []


def test_killing_one_process_and_restarting_both_resumes_to_the_same_result(setting, tmp_path):
  cache, logs, ref = setting
  workdir = str(tmp_path / "killed")
  procs = _start(workdir, cache, logs)
  try:
    deadline = time.monotonic() + 300
    while 2 not in kh.checkpoint_steps(workdir)[0]:  # epoch 2 saved: mid-run
      assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs), _tail(procs)
      time.sleep(0.01)
    os.kill(procs[1][0].pid, signal.SIGKILL)
    # Process 0 loses its peer at the next collective; a job manager then stops the job.
    time.sleep(1.0)
  finally:
    _kill(procs)
  assert kh.checkpoint_steps(workdir)[0][-1] < 4, "the kill came after the end"
  procs = _start(workdir, cache, logs)
  codes = _wait(procs)
  assert codes == [0, 0], _tail(procs)
  assert kh.compare_finished(workdir, ref) == []


def test_runs_not_divisible_by_the_processes_devices_is_one_line_on_each(setting, tmp_path):
  cache, logs, _ = setting
  workdir = str(tmp_path / "odd")
  procs = _start(workdir, cache, logs, extra=("--config.num_runs=3",))
  codes = _wait(procs)
  assert codes == [2, 2], _tail(procs)
  for _, log in procs:
    with open(log.name) as f:
      last = f.read().strip().splitlines()[-1]
    assert last.startswith("error: ") and "num_runs=3" in last and "2 devices" in last, last
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_unreachable_coordinator_is_a_clear_error_within_the_timeout(setting, tmp_path):
  cache, _, _ = setting
  workdir = str(tmp_path / "alone")
  port = _free_port()  # nobody listens there
  t0 = time.monotonic()
  done = subprocess.run(
      _command(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               "--process_id=1", "--distributed_timeout=3"),
      cwd=kh.ROOT, env=_env(cache, 1), capture_output=True, text=True, timeout=120)
  assert done.returncode == 2, done.stderr[-2000:]
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("error: process 1 of 2 could not reach the coordinator at "
                         f"127.0.0.1:{port} within 3 s"), last
  assert time.monotonic() - t0 < 60
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("flags, expected", [
    (("--num_processes=2", "--process_id=2", "--coordinator_address=127.0.0.1:1"),
     "process_id=2: need 0 <= process_id < num_processes=2"),
    (("--num_processes=2",), "coordinator_address, process_id not set"),
])
def test_bad_process_flags_are_one_line(setting, tmp_path, flags, expected):
  cache, _, _ = setting
  done = subprocess.run(_command(str(tmp_path / "w"), *flags), cwd=kh.ROOT, env=_env(cache, 1),
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and expected in last, last

"""The experiment scripts' command line (jaxdiff/cli.py): bad input is one line on stderr and a
non-zero exit, with the traceback only on request; genuine bugs keep theirs.

Most tests run the real scripts as subprocesses; they fail before any training (a few s each)."""

import difflib
import os
import re
import subprocess
import sys
import textwrap

import pytest

from experiments.configs import default
from experiments.configs import study as study_config
from jaxdiff import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments")
DEFAULT = os.path.join(EXP, "configs", "default.py")


def _run(script, *args, env=None, cwd=None):
  """Runs experiments/<script> (or a path) -> (exit status, stderr lines)."""
  path = script if os.path.isabs(script) else os.path.join(EXP, script)
  e = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
  e.pop(cli.TRACEBACK_ENV, None)
  e.update(env or {})
  p = subprocess.run([sys.executable, path, *args], capture_output=True, text=True, env=e,
                     cwd=cwd or ROOT, timeout=120, check=False)
  return p.returncode, p.stderr.strip().splitlines()


def _one_line(rc, lines, status=cli.BAD_INPUT):
  assert rc == status, lines
  assert len(lines) == 1, "\n".join(lines)
  assert lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
  assert "\\n" not in lines[0], lines  # no escaped newlines from a repr'd message
  return lines[0]


def _valid_list(line):
  """The Python list printed after `valid: `."""
  return eval(line.split("valid: ", 1)[1])  # pylint: disable=eval-used


def test_config_error_one_line(tmp_path):
  rc, lines = _run("train.py", f"--config={DEFAULT}", f"--workdir={tmp_path / 'w'}",
                   "--config.num_runs=0")
  assert _one_line(rc, lines) == "error: config.num_runs=0: must be a positive integer"
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("how", ["env", "verbosity"])
def test_traceback_on_request(tmp_path, how):
  args = [f"--config={DEFAULT}", f"--workdir={tmp_path / 'w'}", "--config.num_runs=0"]
  env = {cli.TRACEBACK_ENV: "1"} if how == "env" else {}
  if how == "verbosity":
    args.append("--verbosity=1")
  rc, lines = _run("train.py", *args, env=env)
  text = "\n".join(lines)
  assert rc == cli.BAD_INPUT
  assert "Traceback (most recent call last)" in text and "ConfigError" in text
  assert lines[-1] == "error: config.num_runs=0: must be a positive integer"


def test_unknown_scores_option(tmp_path):
  rc, lines = _run("train.py", f"--config={DEFAULT}", f"--workdir={tmp_path}",
                   "--config.scores.bogus=1")
  line = _one_line(rc, lines)
  # The message the Python path gives (recording.validate), behind the flag as typed.
  assert line.startswith("error: --config.scores.bogus: unknown scores option(s) ['bogus']")
  assert _valid_list(line) == sorted(default.get_config().scores.keys())
  assert "did you mean" not in line  # nothing close to "bogus"


def test_unknown_option_close_match(tmp_path):
  rc, lines = _run("train.py", f"--config={DEFAULT}", f"--workdir={tmp_path}",
                   "--config.num_run=4")
  line = _one_line(rc, lines)
  keys = sorted(default.get_config().keys())
  assert difflib.get_close_matches("num_run", keys, n=1) == ["num_runs"]  # the reference
  assert "unknown config option(s) ['num_run'] (did you mean 'num_runs'?)" in line
  assert _valid_list(line) == keys


def test_unknown_section_in_path(tmp_path):
  rc, lines = _run("train.py", f"--config={DEFAULT}", f"--workdir={tmp_path}",
                   "--config.scors.grand=False")
  line = _one_line(rc, lines)
  assert "--config.scors.grand: unknown config option(s) ['scors'] (did you mean 'scores'?)" in line
  rc, lines = _run("train.py", f"--config={DEFAULT}", f"--workdir={tmp_path}",
                   "--config.model.widht=8")
  line = _one_line(rc, lines)
  assert "unknown model option(s) ['widht'] (did you mean 'width'?)" in line
  assert _valid_list(line) == sorted(default.get_config().model.keys())


def test_config_field_without_prefix(tmp_path):
  rc, lines = _run("train.py", f"--config={DEFAULT}", f"--workdir={tmp_path}", "--num_runs=4")
  assert "did you mean --config.num_runs?" in _one_line(rc, lines)
  # In the study config the field sits one level down.
  assert "num_runs" in study_config.get_config().train
  rc, lines = _run("study.py", f"--config={os.path.join(EXP, 'configs', 'study.py')}",
                   f"--workdir={tmp_path}", "--num_runs=4")
  assert "did you mean --config.train.num_runs?" in _one_line(rc, lines)


def test_unknown_flag_close_match(tmp_path):
  rc, lines = _run("train.py", f"--config={DEFAULT}", f"--workdr={tmp_path}")
  assert "unknown flag --workdr (did you mean --workdir?)" in _one_line(rc, lines)


@pytest.mark.parametrize("script", ["train.py", "study.py"])
def test_missing_config_file(tmp_path, script):
  rc, lines = _run(script, "--config=nope.py", f"--workdir={tmp_path}", "--config.seed=1",
                   cwd=str(tmp_path))
  line = _one_line(rc, lines)
  assert "--config=nope.py" in line and str(tmp_path / "nope.py") in line


def test_missing_required_flag_and_bad_value(tmp_path):
  rc, lines = _run("train.py", f"--config={DEFAULT}")
  assert _one_line(rc, lines) == "error: missing required flag --workdir"
  rc, lines = _run("train.py", f"--config={DEFAULT}", f"--workdir={tmp_path}",
                   "--config.num_runs=abc")
  line = _one_line(rc, lines)
  assert "--config.num_runs=abc" in line


@pytest.mark.parametrize("script,args", [
    ("fingerprint.py", ["--workdirs={missing},{missing}2", "--out={tmp}/fp"]),
    ("heldout.py", ["--workdir={missing}"]),
    ("export.py", ["--workdir={missing}"]),
    ("noise_auroc.py", ["--workdir={missing}"]),
    ("analyze.py", ["--workdirs={missing}", "--out={tmp}/report"]),
    ("train.py", ["--config=" + DEFAULT, "--workdir={tmp}/w", "--config.data.name=npz",
                  "--config.data.path={missing}.npz"]),
])
def test_every_script_one_line(tmp_path, script, args):
  missing = str(tmp_path / "no_such_workdir")
  rc, lines = _run(script, *[a.format(missing=missing, tmp=tmp_path) for a in args])
  assert missing in _one_line(rc, lines)


def _script(tmp_path, body):
  """A script whose main runs `body`, wired through cli.run as the experiments are."""
  path = tmp_path / "script.py"
  path.write_text("\n".join([
      "import sys", f"sys.path.insert(0, {ROOT!r})", "from jaxdiff import cli", "",
      "def main(argv):", textwrap.indent(textwrap.dedent(body), "  "), "",
      "if __name__ == '__main__':", "  cli.run(main)", ""]))
  return str(path)


def test_jaxdiff_value_error_one_line_bug_keeps_traceback(tmp_path):
  # A ValueError raised by jaxdiff's validation: one line.
  rc, lines = _run(_script(tmp_path, """\
      from jaxdiff import recording
      recording.validate({"knn_k": 0})"""))
  assert _one_line(rc, lines) == "error: scores.knn_k=0: must be positive"
  # ValueErrors from elsewhere, and other exception types, are bugs: the traceback stays.
  for body, name in (("import numpy as np\nnp.zeros(2).reshape(3)", "ValueError"),
                     ("return 1 / 0", "ZeroDivisionError")):
    rc, lines = _run(_script(tmp_path, body))
    assert rc == 1 and "Traceback (most recent call last)" in lines[0], lines
    assert lines[-1].startswith(name)


def test_failure_names_its_class(tmp_path):
  rc, lines = _run(_script(tmp_path, """\
      from jaxdiff import train
      raise train.DivergenceError("every member diverged at epoch 3")"""))
  assert (_one_line(rc, lines, status=cli.FAILED)
          == "error: DivergenceError: every member diverged at epoch 3")


def test_exit_status_of_jaxdiff_errors():
  from jaxdiff import checksums, data, store, study, train  # pylint: disable=g-import-not-at-top
  for cls in (train.ConfigError, data.DataError, store.StoreError, study.StudyError):
    assert cli.exit_status(cls("x")) == cli.BAD_INPUT
  for cls in (train.CheckpointError, train.DivergenceError, checksums.ChecksumError):
    assert cli.exit_status(cls("x")) == cli.FAILED
  assert cli.exit_status(RuntimeError("x")) is None  # a bug: not ours to shorten
  assert cli.exit_status(KeyError("x")) is None


def test_test_command_shows_progress(tmp_path):
  # The README's `python -m pytest -n 2 tests` under this repository's pytest settings prints a
  # line per finished test with its percentage (under -q it printed dots, and a log that shows
  # whole lines showed nothing until 70 tests had finished), and the slowest tests at the end.
  (tmp_path / "test_tiny.py").write_text(
      "".join(f"def test_{i}():\n  assert True\n\n" for i in range(4)))
  env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
  p = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider",
                      "-c", os.path.join(ROOT, "pyproject.toml"), "--rootdir", str(tmp_path),
                      str(tmp_path / "test_tiny.py")], capture_output=True, text=True,
                     cwd=str(tmp_path), env=env, timeout=120, check=False)
  assert p.returncode == 0, p.stdout + p.stderr
  done = [l for l in p.stdout.splitlines() if re.match(r"\[gw\d+\] \[\s*\d+%\] PASSED ", l)]
  assert sorted(l.rsplit("::", 1)[1].strip() for l in done) == [f"test_{i}" for i in range(4)]
  assert "slowest 10 durations" in p.stdout

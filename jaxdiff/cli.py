"""The experiment scripts' entry point: absl's `app.run`, with bad input reported as one line.

`run(main)` replaces `app.run(main)` in every script of experiments/. jaxdiff's own errors, and
mistakes on the command line (an unknown flag or config field, a missing config file, a bad
value), reach the user as one line on stderr and a non-zero exit status: `error: <message>` and
`BAD_INPUT` (2) for input the user can fix, `error: <ErrorClass>: <message>` and `FAILED` (1)
for a run that could not finish (every member diverged, no readable checkpoint). The traceback is printed above that line with
`--verbosity=1` or the environment variable `JAXDIFF_TRACEBACK=1`. Anything else is a bug and
keeps Python's traceback (exit status 1).

What counts as jaxdiff's own error (`exit_status`): an exception class defined in jaxdiff
(`ConfigError`, `DataError`, `StoreError`, `StudyError`: bad input, they subclass ValueError;
`CheckpointError`, `DivergenceError`, `ChecksumError`: failures), absl's `app.UsageError`, and a
ValueError or FileNotFoundError raised by jaxdiff's or the scripts' own code (a validation), not
by a library underneath (numpy, JAX: a bug).
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
import traceback
from typing import Any, Callable, Sequence

from absl import app
from absl import flags

TRACEBACK_ENV = "JAXDIFF_TRACEBACK"
BAD_INPUT = 2
FAILED = 1

# Code whose ValueErrors are validations: the package and the scripts that call it.
_OWN_CODE = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "experiments") + os.sep)


def exit_status(exc: BaseException) -> int | None:
  """The exit status for an error of jaxdiff's own or of the user's input; None for a bug."""
  if isinstance(exc, app.UsageError):
    return BAD_INPUT
  if type(exc).__module__.split(".")[0] == "jaxdiff":
    return BAD_INPUT if isinstance(exc, ValueError) else FAILED
  if isinstance(exc, (ValueError, FileNotFoundError)):
    frames = traceback.extract_tb(exc.__traceback__)
    if frames and os.path.abspath(frames[-1].filename).startswith(_OWN_CODE):
      return BAD_INPUT
  return None


def _one_line(message: str) -> str:
  return " ".join(str(message).split())


def _traceback_wanted(argv: Sequence[str] = ()) -> bool:
  if os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no"):
    return True
  try:
    verbosity = flags.FLAGS["verbosity"].value
  except KeyError:
    verbosity = 0
  for arg in argv:  # flags after the one that failed to parse are not parsed yet
    m = re.fullmatch(r"--?(?:v|verbosity)=(-?\d+)", arg)
    if m:
      verbosity = int(m.group(1))
  return (verbosity or 0) >= 1


def _fail(message: str, status: int, argv: Sequence[str] = (), keep_lines: bool = False):
  if _traceback_wanted(argv) and sys.exc_info()[0] is not None:
    traceback.print_exc()
  sys.stderr.write(f"error: {message if keep_lines else _one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(status)


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
  """`absl.app.run(main)` that reports bad input and jaxdiff's errors as one line (see above)."""

  @functools.wraps(main)
  def guarded(args):
    try:
      return main(args)
    except Exception as e:  # pylint: disable=broad-except
      status = exit_status(e)
      if status is None:
        raise
      # A run that could not finish says which failure it was (DivergenceError, ...).
      message = str(e) if status == BAD_INPUT else f"{type(e).__name__}: {e}"
      _fail(message, status)

  app.run(guarded, argv=argv, flags_parser=parse_flags)


# --- the command line ---------------------------------------------------------------------------


def _config_flags() -> list[str]:
  """Names of the ml_collections config flags (DEFINE_config_file / _dict) of this program."""
  out = []
  for name in list(flags.FLAGS):
    f = flags.FLAGS[name]
    if f.name == name and f.flag_type() == "config object":
      out.append(name)
  return out


def _config_path(name: str, argv: Sequence[str]) -> str | None:
  """The file given to config flag `name` on the command line (without a `:argument`)."""
  path = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}=") or arg.startswith(f"-{name}="):
      path = arg.split("=", 1)[1]
    elif arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      path = argv[i + 1]
  return None if path is None else path.split(":", 1)[0]


def _load_config(name: str, argv: Sequence[str]):
  """The config of flag `name` as given on the command line (before overrides), or None."""
  flag = flags.FLAGS[name]
  path = _config_path(name, argv)
  try:
    config = flag.parser.parse(path) if path is not None else flag.default
    config.keys()  # a config that failed to load raises here
    return config
  except Exception:  # pylint: disable=broad-except
    return None


def _keys(node) -> list[str] | None:
  try:
    return sorted(node.keys())
  except Exception:  # pylint: disable=broad-except
    return None


def _leaf_paths(node, prefix="") -> list[str]:
  out = []
  for k in _keys(node) or []:
    child = node[k]
    sub = _leaf_paths(child, f"{prefix}{k}.") if _keys(child) is not None else []
    out += sub or [prefix + k]
  return out


def unknown_field_message(config, path: str, flag: str = "config") -> str | None:
  """`--config.a.b`: the message for its first field that `config` lacks; None if all exist.

  Same words as the Python path's (`recording.validate`): `unknown <section> option(s) [...];
  valid: [...]`, with the closest valid names (difflib) as a hint.
  """
  node, done = config, []
  for key in path.split("."):
    valid = _keys(node)
    if valid is None:
      return None  # below a plain value: ml_collections' own message is the right one
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=3)
      hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
      section = ".".join(done) or flag
      return (f"--{flag}.{path}: unknown {section} option(s) {[key]}{hint}; valid: {valid}")
    node = node[key]
    done.append(key)
  return None


def _unknown_override(argv: Sequence[str]) -> str | None:
  for name in _config_flags():
    config = None
    for arg in argv:
      m = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
      if not m:
        continue
      config = config if config is not None else _load_config(name, argv)
      if config is None:
        return None
      message = unknown_field_message(config, m.group(1), name)
      if message:
        return message
  return None


def _unknown_flag_message(flagname: str, argv: Sequence[str]) -> str:
  """`--flagname` is not a flag: point at the config field of that name, else the closest flags."""
  fields = []
  for name in _config_flags():
    config = _load_config(name, argv)
    if config is not None:
      fields += [f"{name}.{p}" for p in _leaf_paths(config)]
  exact = [f for f in fields if f.endswith("." + flagname)]
  if exact:
    return f"unknown flag --{flagname}; did you mean --{exact[0]}?"
  close = difflib.get_close_matches(flagname, list(flags.FLAGS) + fields, n=3)
  if close:
    return f"unknown flag --{flagname} (did you mean {' or '.join('--' + c for c in close)}?)"
  return f"unknown flag --{flagname}; --helpshort lists the flags"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing (`app.run`'s `flags_parser`) with one-line messages for bad input."""
  argv = list(argv)
  for name in _config_flags():  # ml_collections defers this error until the config is used
    path = _config_path(name, argv)
    if path is not None and not os.path.isfile(path):
      _fail(f"--{name}={path}: no such config file ({os.path.abspath(path)})", BAD_INPUT, argv)
  try:
    return flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    _fail(_unknown_flag_message(e.flagname, argv), BAD_INPUT, argv)
  except flags.Error as e:
    message = str(e)
    m = re.search(r"Flag --(\S+) must have a value other than None", message)
    if m:
      message = f"missing required flag --{m.group(1)}"
    # A config file that raised while loading: its traceback is the message.
    _fail(message, BAD_INPUT, argv, keep_lines="Traceback" in message)
  except (AttributeError, KeyError):  # ml_collections: an override of a field that is not there
    message = _unknown_override(argv)
    if message is None:
      raise
    _fail(message, BAD_INPUT, argv)

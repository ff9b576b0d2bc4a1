"""SHA-256 manifests of finished checkpoints, so that a changed byte is caught before a resume.

Orbax writes each step atomically but keeps no checksums of array data: a bit flipped on disk
after the write restores silently as a wrong parameter. `write` records the SHA-256 of every file
of a finished step in `<step>/MANIFEST_FILE`; `verify` re-hashes them before the step is restored.
"""

from __future__ import annotations

import hashlib
import json
import os

from jaxdiff import store

MANIFEST_FILE = "jaxdiff_sha256.json"


class ChecksumError(RuntimeError):
  """A file of a checkpoint is missing, or its bytes are not the ones written."""


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _files(step_dir: str) -> list[str]:
  """Paths (relative to `step_dir`) of the step's files, without the manifest and temporaries."""
  out = []
  for dirpath, _, filenames in os.walk(step_dir):
    for name in filenames:
      rel = os.path.relpath(os.path.join(dirpath, name), step_dir)
      if rel != MANIFEST_FILE and not (name.startswith(".") and name.endswith(".tmp")):
        out.append(rel)
  return sorted(out)


def write(step_dir: str) -> None:
  """Records the SHA-256 of every file of a finished step (atomically, in the step directory)."""
  digests = {rel: _sha256(os.path.join(step_dir, rel)) for rel in _files(step_dir)}
  store.atomic_write_json(os.path.join(step_dir, MANIFEST_FILE), {"sha256": digests})


def verify(step_dir: str) -> bool:
  """Checks a step's files against its manifest.

  Returns:
    True when every listed file has its recorded SHA-256; False when the step has no manifest (a
    run killed between Orbax's write and the manifest's).

  Raises:
    ChecksumError naming the first file that is missing or differs, or a corrupt manifest.
  """
  path = os.path.join(step_dir, MANIFEST_FILE)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      digests = json.load(f)["sha256"]
  except (ValueError, KeyError, TypeError) as e:
    raise ChecksumError(f"checksum manifest {path} is corrupt ({e})") from e
  for rel, expected in sorted(digests.items()):
    file = os.path.join(step_dir, rel)
    if not os.path.exists(file):
      raise ChecksumError(f"{file} is missing (listed in {path})")
    if _sha256(file) != expected:
      raise ChecksumError(f"{file} does not match the SHA-256 recorded when it was written "
                          f"({path}): its bytes changed on disk")
  return True

"""The study config: architecture names and training configs, the checks made before any training,
and the study workdir's record of the config its architectures were trained with."""

from __future__ import annotations

import json
import os
import re

import ml_collections

from jaxdiff import models
from jaxdiff import pruning
from jaxdiff import store
from jaxdiff import train
from jaxdiff import workdir as workdir_lib
from jaxdiff.workdir import model_label  # pylint: disable=unused-import (re-exported)


class StudyError(ValueError):
  """An invalid study config or an inconsistent study workdir."""


def arch_names(config: ml_collections.ConfigDict) -> list[str]:
  """Architecture names in report order: `config.arch_order` if set, else sorted."""
  archs = config.get("archs")
  if not archs:
    raise StudyError("config.archs is empty; give at least one architecture (name -> model config)")
  names = list(config.get("arch_order") or sorted(archs.keys()))
  unknown = [n for n in names if n not in archs]
  if unknown:
    raise StudyError(f"config.arch_order names {unknown}, not in config.archs "
                     f"({sorted(archs.keys())})")
  if len(set(names)) != len(names):
    raise StudyError(f"config.arch_order repeats a name: {names}")
  for n in names:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", n):
      raise StudyError(f"architecture name {n!r}: use letters, digits, '_', '.', '-' only")
  return names


def arch_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The training config of architecture `name`: `config.train` with its model and label."""
  if name not in config.archs:
    raise StudyError(f"unknown architecture {name!r}; valid: {sorted(config.archs.keys())}")
  cfg = ml_collections.ConfigDict(config.train.to_dict())
  cfg.model = ml_collections.ConfigDict(config.archs[name].to_dict())
  cfg.arch_label = name
  return cfg


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the whole study config before any training; errors name the bad value."""
  names = arch_names(config)
  for n in names:
    try:
      train.validate_config(arch_config(config, n))
    except ValueError as e:
      raise StudyError(f"architecture {n!r}: {e}") from e
    try:
      models.build_model(config.archs[n], 10)  # unknown model fields
    except ValueError as e:
      raise StudyError(f"architecture {n!r}: {e}") from e
  if config.train.num_runs < 2:
    raise StudyError(f"config.train.num_runs={config.train.num_runs}: the study needs >= 2 runs "
                     "per architecture (reliability compares runs)")
  a = config.analysis
  for f in a.fractions:
    if not 0.0 < f < 1.0:
      raise StudyError(f"config.analysis.fractions has {f}; fractions must be in (0, 1)")
  fp = config.fingerprint
  if fp.enabled and len(names) < 2:
    raise StudyError("the fingerprint needs >= 2 architectures; set config.fingerprint.enabled="
                     "False or add architectures")
  if any(int(k) < 1 for k in fp.ks):
    raise StudyError(f"config.fingerprint.ks={tuple(fp.ks)}: every k must be >= 1")
  pr = config.pruning
  if pr.enabled:
    if pr.arch not in names:
      raise StudyError(f"config.pruning.arch={pr.arch!r} is not a study architecture; valid: "
                       f"{names}")
    pruning.conditions(pr.fractions, pr.methods, pr.keep)  # raises on bad names / fractions
    if not 0 <= pr.single_run < config.train.num_runs:
      raise StudyError(f"config.pruning.single_run={pr.single_run}: must be in "
                       f"[0, {config.train.num_runs})")
    cfg = pruning.training_config(config.train, config.archs[pr.arch], num_seeds=pr.num_seeds,
                                  num_epochs=pr.num_epochs, seed=pr.seed, scores=pr.scores)
    try:
      train.validate_config(cfg)
    except ValueError as e:
      raise StudyError(f"pruning training config: {e}") from e


def check_study_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes study_config.json, or refuses a workdir whose architectures were trained otherwise.

  Only what decides the trained runs must match: `train` (but the fields `train.RESUME_SAFE_FIELDS`)
  and the model of every architecture in both configs. Architectures may be added or left out, and
  analysis, fingerprint, pruning settings may change (their stages then recompute).
  """
  path = workdir_lib.study_path(workdir, "config")
  resolved = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise StudyError(f"{path} is unreadable ({e}); remove it or use a new workdir") from e
    common = set(old.get("archs", {})) & set(resolved["archs"])
    flat = train.flatten_config
    a = flat({"train": old.get("train", {}), "archs": {n: old["archs"][n] for n in common}})
    b = flat({"train": resolved["train"], "archs": {n: resolved["archs"][n] for n in common}})
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)
                  and k.removeprefix("train.") not in train.RESUME_SAFE_FIELDS)
    if diff:
      details = "; ".join(f"{k}: workdir has {a.get(k)!r}, config has {b.get(k)!r}"
                          for k in diff[:6])
      raise StudyError(f"study workdir {workdir!r} was trained with another config ({details}). "
                       "Use a new --workdir, or the original config to resume.")
  os.makedirs(workdir, exist_ok=True)
  store.atomic_write_json(path, resolved)

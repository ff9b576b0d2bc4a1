"""benchmarks/accelerator_check.py --smoke: its JSON's numbers checked against the arrays it saved
and against each other (the script itself is meant for a GPU; here it runs on 2 CPU devices)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("accel") / "check.json")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accelerator_check.py"),
                         "--smoke", f"--out={out}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    result = json.load(f)
  return result, dict(np.load(out[:-len(".json")] + ".npz")), proc.stdout


def test_member_checks_agree_with_the_saved_members(smoke):
  result, arrays, _ = smoke
  checks = result["checks"]
  vm, lp = arrays["mlp_vmap"], arrays["mlp_loop"]
  assert vm.shape[0] == 2 and vm.shape == lp.shape
  c = checks["vmap_vs_loop_mlp"]
  assert c["max_abs_diff"] == float(np.max(np.abs(vm - lp)))
  assert c["bit_identical"] == bool(np.array_equal(vm, lp))
  assert c["equal_within_rtol"] is True and c["max_abs_diff"] <= 1e-4 * np.max(np.abs(lp))
  # sharded over the 2 CPU devices vs one device: the same chunk program, so bit for bit on CPU
  s = checks["sharded_vs_one_device"]
  assert s["devices"] == 2 and s["bit_identical"] is True
  assert np.array_equal(arrays["sharded"], arrays["one_device"])
  assert checks["grand_ghost_vs_vmap"]["equal_within_rtol"] is True


def test_speed_rows_are_consistent(smoke):
  result, _, stdout = smoke
  rows = result["speed"]
  assert [(r["arch"], r["runs"]) for r in rows] == [("mlp", 1), ("mlp", 2)]
  try:
    import torch  # pylint: disable=unused-import,import-outside-toplevel
    torch_ok = True
  except ImportError:
    torch_ok = False
  for r in rows:
    for k in ("engine", "loop") + (("torch",) if torch_ok else ()):
      t, rate = r[f"{k}_s"], r[f"{k}_member_epochs_per_s"]
      assert np.isfinite(t) and t > 0 and np.isfinite(rate) and rate > 0
      assert rate == pytest.approx(r["runs"] * r["steps"] / r["full_epoch_steps"] / t, rel=1e-12)
    if not torch_ok:
      assert r["torch_s"] == "skipped: torch not importable"
      assert r["torch_member_epochs_per_s"] is None
    assert r["engine_strategy"].startswith("vmap/scan")
    assert r["engine_program_bytes"] > 0
    assert f"{'mlp':<14}{r['runs']:>4}  vmap/scan" in stdout  # printed too


def test_determinism_entries(smoke):
  result, _, _ = smoke
  d = result["determinism"]
  for name in ("default", "deterministic"):
    assert d[name]["bit_identical"] is True and d[name]["max_abs_diff"] == 0.0  # CPU: exact
  assert d["slowdown"] == pytest.approx(d["deterministic"]["seconds_per_epoch"]
                                        / d["default"]["seconds_per_epoch"])
  assert result["backend"] == "cpu" and result["device_peak_bytes"] is None  # CPU reports none

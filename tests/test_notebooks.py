"""Executes the notebooks in fast mode (JAXDIFF_FAST=1) so they cannot rot, and checks their outputs
against the files they wrote; checks they are committed without outputs."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

import jaxdiff
from jaxdiff import analysis
from jaxdiff import store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = ("quickstart.ipynb", "explore.ipynb")


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """A kernelspec that runs this interpreter (whatever `python3` means elsewhere), found through
  JUPYTER_PATH, with the checkout on PYTHONPATH."""
  base = tmp_path_factory.mktemp("jupyter")
  spec = base / "kernels" / "jaxdiff-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "jaxdiff test", "language": "python"}))
  env = {"JUPYTER_PATH": str(base), "PYTHONPATH": ROOT + os.pathsep + os.environ.get(
      "PYTHONPATH", ""), "JAXDIFF_FAST": "1", "OPENBLAS_NUM_THREADS": "1"}
  return env


def _site_dirs():
  """This interpreter's import path without the checkout: where pip, setuptools and jaxdiff's
  dependencies are (an editable jaxdiff is a .pth hook, which `python -S` does not run)."""
  return [p for p in sys.path if p and os.path.isdir(p) and os.path.abspath(p) != ROOT]


def _copy_checkout(dest):
  """What building jaxdiff needs, copied: a build in ROOT would write build/ into the tree."""
  os.makedirs(os.path.join(dest, "notebooks"))
  for f in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, f), dest)
  shutil.copytree(os.path.join(ROOT, "jaxdiff"), os.path.join(dest, "jaxdiff"),
                  ignore=shutil.ignore_patterns("__pycache__"))
  return str(dest)


def _without_jaxdiff(target):
  """Environment in which jaxdiff is not importable and pip installs offline into `target`
  (on the path), leaving this interpreter's own jaxdiff alone. Run Python with -S."""
  os.makedirs(target, exist_ok=True)
  return {"PYTHONPATH": os.pathsep.join([str(target)] + _site_dirs()),
          "PIP_TARGET": str(target), "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1",
          "PIP_NO_BUILD_ISOLATION": "0",  # sic: pip reads this variable inverted (= no isolation)
          "PYTHONNOUSERSITE": "1"}


@pytest.fixture(scope="module")
def uninstalled_kernel_env(tmp_path_factory):
  """A kernel (`python -S`) that cannot import jaxdiff, started in the notebooks/ folder of a
  copy of the checkout: the notebook's first cell must install jaxdiff from that checkout."""
  base = tmp_path_factory.mktemp("uninstalled")
  spec = base / "kernels" / "jaxdiff-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-S", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "jaxdiff test (not installed)", "language": "python"}))
  checkout = _copy_checkout(base / "checkout")
  env = dict(_without_jaxdiff(base / "target"), JUPYTER_PATH=str(base), JAXDIFF_FAST="1",
             OPENBLAS_NUM_THREADS="1")
  return env, checkout, str(base / "target")


def _execute(name, env, monkeypatch, timeout=300, cwd=NB_DIR):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
  NotebookClient(nb, kernel_name="jaxdiff-test", timeout=timeout,
                 resources={"metadata": {"path": cwd}}).execute()
  return nb


def _text(nb):
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.get("output_type") == "stream":
        out.append(o["text"])
      elif "data" in o and "text/plain" in o["data"]:
        out.append(o["data"]["text/plain"])
  return "".join(out)


def _images(nb):
  return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_quickstart_fast(uninstalled_kernel_env, monkeypatch, tmp_path):
  # Run where jaxdiff is not importable: the first cell installs it from the checkout.
  env, checkout, target = uninstalled_kernel_env
  wd = tmp_path / "qs"
  nb = _execute("quickstart.ipynb", dict(env, JAXDIFF_WORKDIR=str(wd)), monkeypatch,
                cwd=os.path.join(checkout, "notebooks"))
  text = _text(nb)
  assert f"installing jaxdiff from {checkout}\n" in text
  assert f"jaxdiff {jaxdiff.__version__} from {os.path.join(target, 'jaxdiff')}\n" in text
  assert re.search(r"Found (CPU|GPU|TPU): \d+ device", text)
  # The printed hardest / easiest ids are those of the saved score files.
  s = store.load_scores(str(wd / "scores"))
  name = re.search(r"score: (\w+), shape \((\d+), (\d+)\)", text)
  assert name and (int(name.group(2)), int(name.group(3))) == s.get(name.group(1)).shape
  mean = s.get(name.group(1)).mean(0)
  hardest = json.loads(re.search(r"hardest ids: (\[.*\])", text).group(1))
  easiest = json.loads(re.search(r"easiest ids: (\[.*\])", text).group(1))
  ref = sorted(range(mean.size), key=lambda i: mean[i])  # slow reference order
  assert [mean[i] for i in easiest] == [mean[i] for i in ref[:8]]
  assert [mean[i] for i in hardest] == [mean[i] for i in ref[::-1][:8]]
  # The printed reliability is the documented split-half Spearman of the same scores.
  rho1 = float(re.search(r"single-run Spearman reliability ([\d.-]+)", text).group(1))
  curve = analysis.reliability_curve(s.get(name.group(1)), num_draws=20, seed=0)
  assert rho1 == pytest.approx(curve.rho1(), abs=6e-4)
  assert _images(nb) == 2  # gallery and reliability curve


def test_explore_fast_on_demo(kernel_env, monkeypatch, tmp_path):
  # No path: the notebook trains its own 2-architecture demo; point it at a fresh folder.
  demo = tmp_path / "demo"
  env = dict(kernel_env, JAXDIFF_EXPLORE_PATH="")
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  nb = nbformat.read(os.path.join(NB_DIR, "explore.ipynb"), as_version=4)
  for cell in nb.cells:  # the demo folder only; everything else runs as committed
    cell.source = cell.source.replace('"/tmp/jaxdiff_explore_demo"', repr(str(demo)))
  NotebookClient(nb, kernel_name="jaxdiff-test", timeout=300,
                 resources={"metadata": {"path": NB_DIR}}).execute()
  text = _text(nb)
  assert _images(nb) == 5  # reliability, agreement, sensitivity, gallery, fingerprint
  sets = {a: store.load_scores(str(demo / "runs" / a / "scores"))
          for a in ("linear", "mlp")}
  score = re.search(r"score: (\w+);", text).group(1)
  for a, s in sets.items():
    rho1 = float(re.search(rf"{a}: single-run Spearman ([\d.-]+)", text).group(1))
    ref = analysis.reliability_curve(s.get(score), num_draws=20, seed=0).rho1()
    assert rho1 == pytest.approx(ref, abs=6e-4)
  assert "first principal component explains" in text
  assert "most sensitive example ids" in text and "pvalue" in text and "random" in text
  # Sensitivity counts printed equal a scipy Welch test + Bonferroni on the saved scores.
  import scipy.stats  # pylint: disable=g-import-not-at-top
  a, b = sets["linear"].get(score), sets["mlp"].get(score)
  p = scipy.stats.ttest_ind(a, b, axis=0, equal_var=False).pvalue
  count = int(np.sum(np.nan_to_num(p, nan=1.0) <= 0.05 / a.shape[1]))
  row = re.search(r"linear\s+mlp\s+(\d+)\s+[\d.]+\s+(\d+)", text)
  assert row and int(row.group(2)) == count


def _install_cell(name="quickstart.ipynb"):
  nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
  cell = nb.cells[1].source
  assert 'JAXDIFF_SOURCE = ""' in cell  # the one visible setting
  return cell


def _run_cell(source, cwd, target):
  """Runs the install cell's code with `python -S` where jaxdiff is not importable."""
  p = subprocess.run([sys.executable, "-S", "-c", source], cwd=cwd, capture_output=True,
                     text=True, timeout=120, check=False,
                     env=dict(os.environ, **_without_jaxdiff(target)))
  return p.returncode, p.stdout + p.stderr


def test_install_cell_is_the_same_in_both_notebooks():
  assert _install_cell("quickstart.ipynb") == _install_cell("explore.ipynb")


def test_install_cell_wheel_source_and_nothing_found(tmp_path):
  cell = _install_cell()
  checkout = _copy_checkout(tmp_path / "checkout")
  # The wheel a user would upload; its build prints no setuptools deprecation warning (the
  # license is an SPDX string, pyproject.toml) and records the license.
  p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                      "--no-build-isolation", "-w", str(tmp_path / "dist"), checkout],
                     capture_output=True, text=True, timeout=120, check=True)
  assert "deprecat" not in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
  (wheel,) = (tmp_path / "dist").glob("jaxdiff-*.whl")
  with zipfile.ZipFile(wheel) as z:
    meta = z.read(f"jaxdiff-{jaxdiff.__version__}.dist-info/METADATA").decode()
  assert "License-Expression: Apache-2.0" in meta.splitlines()

  # No checkout above, no wheel here, no JAXDIFF_SOURCE: a clear error naming the options.
  empty = tmp_path / "empty" / "nb"
  empty.mkdir(parents=True)
  rc, out = _run_cell(cell, empty, tmp_path / "t0")
  assert rc != 0 and "RuntimeError: jaxdiff is not installed and no source" in out
  assert "JAXDIFF_SOURCE" in out and ".whl" in out and str(empty) in out
  assert not os.listdir(tmp_path / "t0")  # nothing installed

  # An uploaded wheel in the working directory.
  uploaded = tmp_path / "upload"
  uploaded.mkdir()
  shutil.copy(wheel, uploaded)
  rc, out = _run_cell(cell, uploaded, tmp_path / "t1")
  assert rc == 0, out
  assert f"installing jaxdiff from {uploaded / wheel.name}" in out
  assert f"jaxdiff {jaxdiff.__version__} from {tmp_path / 't1' / 'jaxdiff'}" in out

  # JAXDIFF_SOURCE wins; a source pip cannot install stops the cell with its name.
  rc, out = _run_cell(cell.replace('JAXDIFF_SOURCE = ""', f"JAXDIFF_SOURCE = {str(wheel)!r}"),
                      empty, tmp_path / "t2")
  assert rc == 0 and f"installing jaxdiff from {wheel}" in out, out
  bad = str(tmp_path / "no_such_checkout")
  rc, out = _run_cell(cell.replace('JAXDIFF_SOURCE = ""', f"JAXDIFF_SOURCE = {bad!r}"),
                      empty, tmp_path / "t3")
  assert rc != 0 and f"RuntimeError: pip install {bad} failed" in out, out

"""Executes the notebooks in fast mode (JAXDIFF_FAST=1) so they cannot rot, and checks their outputs
against the files they wrote; checks they are committed without outputs."""

import json
import os
import re
import sys

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

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


def _execute(name, env, monkeypatch, timeout=300):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  nb = nbformat.read(os.path.join(NB_DIR, name), as_version=4)
  NotebookClient(nb, kernel_name="jaxdiff-test", timeout=timeout,
                 resources={"metadata": {"path": NB_DIR}}).execute()
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


def test_quickstart_fast(kernel_env, monkeypatch, tmp_path):
  wd = tmp_path / "qs"
  nb = _execute("quickstart.ipynb", dict(kernel_env, JAXDIFF_WORKDIR=str(wd)), monkeypatch)
  text = _text(nb)
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

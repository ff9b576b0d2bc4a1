"""Tests of jaxdiff.report: the one markdown table writer, and that drawing is the report layer's
alone and leaves matplotlib's global state (backend, pyplot) untouched."""

import ast
import os
import subprocess
import sys

import pandas as pd

from conftest import ROOT
from jaxdiff.report import tables


def test_markdown_table_by_hand():
  df = pd.DataFrame({"name": ["a", "b"], "x": [0.5, float("nan")], "n": [3.0, 1e7],
                     "tiny": [1e-5, float("inf")]})
  assert tables.markdown_table(df) == ("| name | x | n | tiny |\n"
                                       "|---|---|---|---|\n"
                                       "| a | 0.500 | 3 | 1e-05 |\n"
                                       "| b | – | 1e+07 | inf |\n")
  assert tables.markdown_table(df, ["x", "name"], cell=str) == ("| x | name |\n|---|---|\n"
                                                                "| 0.5 | a |\n| nan | b |\n")
  assert tables.markdown_table(df.iloc[:0]) == "(none)\n"
  assert tables.markdown_table(df.iloc[:0], ["name"], empty=None) == "| name |\n|---|\n"


def test_only_the_report_layer_imports_matplotlib():
  found = []
  for folder, _, files in os.walk(os.path.join(ROOT, "jaxdiff")):
    for f in files:
      if not f.endswith(".py"):
        continue
      path = os.path.join(folder, f)
      with open(path) as fh:
        tree = ast.parse(fh.read())
      for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n.split(".")[0] == "matplotlib" for n in names):
          found.append(os.path.relpath(path, ROOT))
  assert found and all(p.startswith(os.path.join("jaxdiff", "report") + os.sep) for p in found), found


def test_report_figures_leave_the_backend_and_pyplot_alone(tmp_path):
  # The fingerprint figure used pyplot and called matplotlib.use("Agg") for the whole process.
  code = f"""
import sys
import matplotlib
matplotlib.rcParams["backend"] = "svg"
import pandas as pd
from jaxdiff.report import fingerprint
df = pd.DataFrame(dict(method=["pvalue", "pvalue"], classifier="logreg", k=[1, 10],
                       accuracy=[0.5, 0.9], accuracy_sd=0.0, repeats=1, chance=0.25))
fingerprint.plot_accuracy_vs_k(df, {str(tmp_path / "f.png")!r})
print(matplotlib.rcParams["backend"], "matplotlib.pyplot" in sys.modules)
"""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("MPLBACKEND", None)
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.split() == ["svg", "False"]
  with open(tmp_path / "f.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

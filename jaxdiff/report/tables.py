"""Tables of every report: the one markdown table writer, number formats, CSV+JSON table files.

Markdown is written by `markdown_table` only; the report pages format their cells with `fmt`,
`pct`, `num` and `runs` so that a number reads the same on every page.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from jaxdiff import store


def fmt(v) -> str:
  """A table cell: NaN as "–", integers without decimals, 3 decimals (or 3 significant digits for
  very small or large values); anything that is not a float as `str`."""
  if isinstance(v, (float, np.floating)):
    if np.isnan(v):
      return "–"
    if np.isinf(v):
      return "inf" if v > 0 else "-inf"
    if float(v).is_integer() and abs(v) < 1e6:
      return str(int(v))
    return f"{v:.3g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.3f}"
  return str(v)


def pct(v: float | None, digits: int = 1) -> str:
  """A share as a percentage ("12.5%"); None or non-finite as "–"."""
  if v is None or not np.isfinite(v):
    return "–"
  return f"{round(100 * v, digits) + 0.0:.{digits}f}%"  # + 0.0: no "-0.0%"


def num(v: float | None, digits: int = 3) -> str:
  """A number with `digits` decimals; None or NaN as "–", infinities as "inf"/"-inf"."""
  if v is None or (isinstance(v, float) and not np.isfinite(v)):
    return "–" if v is None or np.isnan(v) else ("inf" if v > 0 else "-inf")
  return f"{v:.{digits}f}"


def runs(v: float | None) -> str:
  """A number of runs: "–" when unknown, "never" when infinite."""
  if v is None or np.isnan(v):
    return "–"
  return "never" if np.isinf(v) else str(int(v))


def markdown_table(df: pd.DataFrame, columns: Sequence[str] | None = None, *,
                   cell: Callable[[object], str] = fmt, empty: str | None = "(none)\n") -> str:
  """A DataFrame as a GitHub markdown table (no tabulate dependency), ending in a newline.

  Args:
    df: the table; its column names are the header.
    columns: the columns to show, in order (default: all).
    cell: formats one value (default `fmt`; pass `str` for cells formatted already).
    empty: the text for a table without rows; None writes the header alone.
  """
  if df.empty and empty is not None:
    return empty
  cols = list(columns or df.columns)
  lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df[cols].itertuples(False)]
  return "\n".join(lines) + "\n"


def write_table(out: str, name: str, df: pd.DataFrame) -> str:
  """Writes `df` as out/tables/<name>.csv and .json (a list of records), atomically; returns the
  CSV path."""
  path = os.path.join(out, "tables", f"{name}.csv")
  store.atomic_write_text(path, df.to_csv(index=False))
  store.atomic_write_json(path[:-4] + ".json", json.loads(df.to_json(orient="records")))
  return path


def safe_name(name: str) -> str:
  """`name` usable in a file name: runs of other characters than letters, digits, '_.-' as '_'."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))

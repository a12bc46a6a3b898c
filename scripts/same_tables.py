"""Compare two analysis folders table by table, bit for bit: the check that a refactor changed no result.

    python scripts/same_tables.py OUT_A OUT_B [--report]

Every Parquet file under OUT_A must exist under OUT_B with equal column names, dtypes and values
(NaN equal to NaN, floats compared by their bits). Columns that measure the run rather than the
result are left out: `seconds` (wall time), and in the task markers the host, worker and finish time.
With --report, the two report.html files must be equal once the "generated <date>" stamp and the
folder's own name are removed.
Exit status 0 when everything matches, 1 otherwise (each difference printed).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

TIMING_COLUMNS = {"seconds"}


def _frame_bits(frame: pd.DataFrame) -> dict[str, bytes | list]:
    """Each column as bytes (numeric: the raw bits, so -0.0 != 0.0 and NaN payloads count) or as a list."""
    out = {}
    for name in frame.columns:
        col = frame[name]
        if col.dtype.kind in "biufcM":
            out[name] = np.ascontiguousarray(col.to_numpy()).tobytes()
        else:
            out[name] = [repr(np.asarray(v).tolist()) if isinstance(v, (list, np.ndarray)) else repr(v)
                         for v in col.tolist()]
    return out


def compare_file(a: Path, b: Path) -> list[str]:
    fa = pd.read_parquet(a).drop(columns=TIMING_COLUMNS, errors="ignore")
    fb = pd.read_parquet(b).drop(columns=TIMING_COLUMNS, errors="ignore")
    if list(fa.columns) != list(fb.columns):
        return [f"columns differ: {list(fa.columns)} != {list(fb.columns)}"]
    problems = [f"dtype of {c}: {fa[c].dtype} != {fb[c].dtype}" for c in fa if fa[c].dtype != fb[c].dtype]
    if len(fa) != len(fb):
        return problems + [f"{len(fa)} rows != {len(fb)} rows"]
    ba, bb = _frame_bits(fa), _frame_bits(fb)
    problems += [f"values of {c} differ" for c in fa if ba[c] != bb[c]]
    return problems


def compare_folders(a: Path, b: Path) -> list[str]:
    files_a = {p.relative_to(a) for p in a.rglob("*.parquet") if ".tmp" not in p.name}
    files_b = {p.relative_to(b) for p in b.rglob("*.parquet") if ".tmp" not in p.name}
    problems = [f"only in {a}: {p}" for p in sorted(files_a - files_b)]
    problems += [f"only in {b}: {p}" for p in sorted(files_b - files_a)]
    for rel in sorted(files_a & files_b):
        problems += [f"{rel}: {msg}" for msg in compare_file(a / rel, b / rel)]
    return problems


def _report_text(out: Path) -> str:
    """OUT/report.html without what names the run: its date stamp and the folder OUT itself."""
    text = (out / "report.html").read_text().replace(f"<code>{out}</code>", "<code>OUT</code>")
    return re.sub(r"generated \d{4}-\d\d-\d\d \d\d:\d\d", "generated DATE", text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--report", action="store_true", help="also compare report.html (date stamp removed)")
    args = p.parse_args(argv)
    problems = compare_folders(args.a, args.b)
    if args.report and _report_text(args.a) != _report_text(args.b):
        problems.append("report.html differs")
    n = len(list(args.a.rglob("*.parquet")))
    for line in problems:
        print(line)
    print(f"{n} Parquet files compared: " + ("identical" if not problems else f"{len(problems)} difference(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

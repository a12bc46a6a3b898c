"""scripts/same_tables.py, the bit-for-bit check of two analysis folders: equal folders pass; one flipped
bit, a changed dtype or a missing part fail; wall-time columns and the report's date stamp are ignored."""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

main = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "same_tables.py"))["main"]


def _folder(root: Path, llc: np.ndarray, seconds: float = 1.0, stamp: str = "2026-01-01 10:00") -> Path:
    (root / "llc").mkdir(parents=True)
    pd.DataFrame({"run": ["a", "b"], "llc_mean": llc, "llc_per_chain": [[1.0, 2.0], [3.0, np.nan]],
                  "seconds": [seconds, seconds]}).to_parquet(root / "llc" / "part-1.parquet")
    (root / "report.html").write_text(f"<p>generated {stamp} from <code>{root}</code></p>")
    return root


def test_equal_folders_pass_and_timing_and_date_are_ignored(tmp_path):
    a = _folder(tmp_path / "a", np.array([1.5, np.nan]))
    b = _folder(tmp_path / "b", np.array([1.5, np.nan]), seconds=9.0, stamp="2027-02-02 11:11")
    assert main([str(a), str(b), "--report"]) == 0


def test_one_flipped_bit_a_dtype_or_a_missing_part_fail(tmp_path):
    values = np.array([1.5, 2.5])
    a = _folder(tmp_path / "a", values)
    flipped = values.copy()
    flipped.view(np.int64)[0] ^= 1  # the last bit of the mantissa
    assert main([str(a), str(_folder(tmp_path / "bit", flipped))]) == 1
    assert main([str(a), str(_folder(tmp_path / "dtype", values.astype(np.float32)))]) == 1
    missing = tmp_path / "missing"
    shutil.copytree(a, missing)
    (missing / "llc" / "part-1.parquet").rename(missing / "llc" / "part-2.parquet")
    assert main([str(a), str(missing)]) == 1

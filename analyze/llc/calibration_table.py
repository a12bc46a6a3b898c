"""Reading the `calibration` table (pandas only, no torch: the report uses it too): the grid's rows, the
plateau as text, and the recommended setting. Running the calibration: analyze/llc/calibrate.py."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

SMALLER_STEP = 3  # calibrate's step check on its confirmed pick: a step this many times smaller, relaxed as long


def grid_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The grid's rows (tables written before confirmation existed have no `stage`: all grid)."""
    return table[table["stage"] == "grid"] if "stage" in table else table


def plateau_text(table: pd.DataFrame) -> str:
    """LLC +- s.e. for each localization (rows) and step (columns): the plateau at a glance (grid rows)."""
    table = grid_rows(table)
    cells = table.assign(cell=[
        f"{r.llc_mean:.4g} ± {r.llc_sem:.2g}" + ("" if r.healthy else " ✗") + (" ◀" if r.recommended else "")
        for r in table.itertuples()])
    grid = cells.pivot_table(index=["nbeta_option", "localization_option"], columns="lr_option", values="cell",
                             aggfunc="first", sort=False)
    order = table.drop_duplicates("lr_option").sort_values("lr", ascending=False).lr_option
    return grid[[c for c in order if c in grid]].to_string()


def recommended_setting(table: pd.DataFrame) -> dict | None:
    """The recommended setting: lr, localization and nbeta options, burn-in and chains (None when it was not
    confirmed: any), the draws it was run at, and its LLC; None when nothing is recommended."""
    rec = table[table.recommended.fillna(False).astype(bool)]
    if not len(rec):
        return None
    stage = rec["stage"] if "stage" in rec else pd.Series("grid", index=rec.index)
    confirmed = rec[stage == "confirmation"]
    r = (confirmed if len(confirmed) else rec).iloc[-1]
    # a confirmed pick at a smaller step than the grid's was checked against the larger one; otherwise the grid's
    checks = step_checks(table, r.lr_option, r.localization_option) if len(confirmed) else table.iloc[:0]
    larger = checks.llc_at_larger_step.iloc[-1] if len(checks) else rec.iloc[0].llc_at_larger_step
    return {"lr": str(r.lr_option), "localization": str(r.localization_option), "nbeta": str(r.nbeta_option),
            "burnin": int(r.n_burnin) if len(confirmed) else None, "draws": int(r.n_draws),
            "chains": int(r.n_chains) if len(confirmed) else None,
            "llc_mean": float(r.llc_mean), "llc_sem": float(r.llc_sem), "llc_at_larger_step": float(larger),
            "llc_at_smaller_step": step_check(table, r)}


def step_checks(table: pd.DataFrame, lr_option: str, localization_option: str) -> pd.DataFrame:
    """calibrate's step-check runs at this step and localization (each against a step SMALLER_STEP x larger)."""
    if "check" not in table:
        return table.iloc[:0]
    return table[(table["check"] == "step") & (table.lr_option == lr_option)
                 & (table.localization_option == localization_option)]


def step_check(table: pd.DataFrame, row) -> float:
    """The LLC of the relaxed run at a third of `row`'s step that checked it (calibrate's step plateau), or NaN."""
    if "check" not in table:
        return math.nan
    checks = table[(table["check"] == "step") & np.isclose(table.lr_nbeta * SMALLER_STEP, row.lr_nbeta, rtol=0.05)
                   & (table.localization_option == row.localization_option)]
    return float(checks.llc_mean.iloc[-1]) if len(checks) else math.nan

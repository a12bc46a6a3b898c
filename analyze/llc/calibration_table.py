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
    confirmed: any), the draws it was run at, its LLC, the LLCs of the step checks around it (NaN where none ran)
    and whether the check at a third of its step was healthy; None when nothing is recommended."""
    rec = table[table.recommended.fillna(False).astype(bool)]
    if not len(rec):
        return None
    stage = rec["stage"] if "stage" in rec else pd.Series("grid", index=rec.index)
    confirmed = rec[stage == "confirmation"]
    r = (confirmed if len(confirmed) else rec).iloc[-1]
    # the step checks at its localization: the one that checked this step against a larger one (a confirmed pick at a
    # smaller step than the grid's; otherwise the grid's neighbour), and the one that checked it at a smaller step
    checks = step_checks(table, r.localization_option) if len(confirmed) else table.iloc[:0]
    of_this = checks[checks.lr_option == r.lr_option]
    smaller = checks[np.isclose(checks.lr_nbeta * SMALLER_STEP, r.lr_nbeta, rtol=0.05)]
    larger = of_this.llc_at_larger_step.iloc[-1] if len(of_this) else rec.iloc[0].llc_at_larger_step
    return {"lr": str(r.lr_option), "localization": str(r.localization_option), "nbeta": str(r.nbeta_option),
            "burnin": int(r.n_burnin) if len(confirmed) else None, "draws": int(r.n_draws),
            "chains": int(r.n_chains) if len(confirmed) else None,
            "llc_mean": float(r.llc_mean), "llc_sem": float(r.llc_sem), "llc_at_larger_step": float(larger),
            "llc_at_smaller_step": float(smaller.llc_mean.iloc[-1]) if len(smaller) else math.nan,
            # a recommended step whose smaller check ran: that check's chains were still settling (step_plateau)
            "smaller_step_healthy": bool(smaller.healthy.iloc[-1]) if len(smaller) else False}


def step_checks(table: pd.DataFrame, localization_option: str) -> pd.DataFrame:
    """calibrate's step-check runs at this localization (each against the step SMALLER_STEP x larger)."""
    if "check" not in table:
        return table.iloc[:0]
    return table[(table["check"] == "step") & (table.localization_option == localization_option)]

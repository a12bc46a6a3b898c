"""Diagnostics: the warnings listed per family and at the top of the page."""

from __future__ import annotations

import math

from analyze.llc.statistics import DRIFT_MAX, NOT_AT_MINIMUM_SE, not_at_minimum
from analyze.report.complexity import RHAT_WARN
from analyze.report.data import ReportData
from analyze.tables import present

MAX_WARNINGS = 40  # listed per family (the count says how many there are)


def _true(value) -> bool:
    return present(value) and bool(value)


def family_diagnostics(data: ReportData, family: str) -> list[str]:
    runs = set(data.family_runs(family))
    items = []
    llc = data.main.get("llc")  # every checkpoint, mid-epoch ones too
    if llc is not None:
        for r in llc[llc["run"].astype(str).isin(runs)].sort_values(["run", "step"]).to_dict("records"):
            where = data.where(r)
            if _true(r.get("diverged")):
                n = r.get("n_diverged")
                items.append(f"LLC {where}: sampler diverged" + (f" ({n} chain(s))" if present(n) else "") +
                             " — lower --llc-lr or raise --llc-localization")
            if _true(r.get("left_basin")):
                n = r.get("chains_left_basin")
                items.append(f"LLC {where}: chains left the basin" + (f" ({n})" if present(n) else "") +
                             " — sampled loss near chance; the estimate is not local")
            rhat = r.get("rhat")
            high_rhat = present(rhat) and rhat > RHAT_WARN
            # from the estimates rather than the column, so tables written before the flag existed get it too
            if present(r.get("llc_mean")) and not_at_minimum(r["llc_mean"], r.get("llc_sem", math.nan)):
                # R-hat is high here because the chains descend; more draws would not fix it
                items.append(f"LLC {where}: not at a local minimum — the chains found lower loss than the "
                             f"checkpoint (LLC {r['llc_mean']:.3g} ± {r['llc_sem']:.2g}); the LLC is not defined here"
                             + (f" (R-hat {rhat:.3f} reflects the descent)" if high_rhat else ""))
            else:
                if high_rhat:
                    items.append(f"LLC {where}: R-hat {rhat:.3f} > {RHAT_WARN} — chains disagree; more draws or chains")
                if present(r.get("drift")) and abs(r["drift"]) > DRIFT_MAX:
                    items.append(f"LLC {where}: drift {r['drift']:.2g} — the second half of the draws differs from "
                                 f"the first by more than {DRIFT_MAX:g} standard errors; a longer --llc-burnin")
                if present(r.get("llc_mean")) and r["llc_mean"] < 0:
                    items.append(f"LLC {where}: negative LLC {r['llc_mean']:.3g}, within {NOT_AT_MINIMUM_SE:g} "
                                 "standard errors of 0")
    h = data.main.get("hessian")
    if h is not None and "lambda_max" in h:
        for r in h[h["run"].astype(str).isin(runs)].sort_values(["run", "step"]).to_dict("records"):
            if present(r.get("lambda_max")) and r["lambda_max"] <= 0:
                items.append(f"Hessian {data.where(r)}: no positive curvature "
                             f"(λ_max {r['lambda_max']:.3g}); rank undefined")
    errors = data.tables.get("errors")
    if errors is not None and len(errors) and "run" in errors:
        for r in errors[errors["run"].astype(str).isin(runs)].to_dict("records"):
            items.append(f"error in {r.get('estimator', '?')} at {data.label(str(r['run']))}, epoch "
                         f"{r.get('epoch', '?')}: {r.get('error', '')}: {str(r.get('message', ''))[:300]}")
    return items


def global_warnings(data: ReportData) -> list[str]:
    items = []
    errors = data.tables.get("errors")
    if errors is not None and len(errors):
        known = set(data.infos)
        stray = errors[~errors["run"].astype(str).isin(known)] if "run" in errors else errors
        for r in stray.to_dict("records"):
            items.append(f"error in {r.get('estimator', '?')}: {r.get('error', '')}: {str(r.get('message', ''))[:300]}")
        if len(errors):
            items.insert(0, f"{len(errors)} task(s) failed (the errors table); see each family's diagnostics")
    return items

"""From SGLD loss traces to LLC, WBIC and chain diagnostics.

    LLC_c = nbeta * (mean_t L_B(w_t) over chain c's kept draws - L_n(w*))
    LLC   = mean over chains;  WBIC = n * mean over all kept draws of L_B(w_t)

The standard error is between chains: `llc_sem` = SD of the per-chain LLCs / sqrt(chains). Chains are
independent (own noise and batch streams), so this is what another set of chain seeds would scatter by,
whatever the autocorrelation inside a chain. ArviZ's `mcse`, which infers it from the within-chain
autocorrelation instead, was off both ways in practice: 6x too large on a deep linear net (a slow,
seed-independent transient in every chain reads as autocorrelation) and 2x too small on the demo's MLP
(chains settle in different parts of the basin, which one chain's trace cannot see). Test: the SD of
`llc_mean` over 20 chain seeds matches the mean `llc_sem` (tests/test_llc.py, scripts/validate_llc.py).
It rests on few chains (4-8), so comparisons use Student's t with chains - 1 degrees of freedom.
R-hat is ArviZ's rank-normalised split R-hat, ESS its bulk effective sample size, both on the loss
traces.

`healthy`: the estimate can be used. No chain diverged or left the basin, the checkpoint is at a minimum,
R-hat < RHAT_MAX, |drift| <= DRIFT_MAX, and the step is stable in the stiffest direction
(`step_curvature` < STABLE_STEP, analyze/llc/stability.py; unknown, NaN, when it was not measured). One
definition, used by the llc rows, `analyze calibrate` and the reproduction scripts' verdicts.

`drift`: are the chains still settling? The LLC over the second half of the kept draws minus that over the
first half, in units of its standard error, sqrt((s1^2 + s2^2) / chains) with s1, s2 the SDs of the chains'
half-means (between chains, as `llc_sem`; 2 (chains - 1) degrees of freedom; the halves' positive correlation
only makes it conservative). |drift| > DRIFT_MAX means the burn-in was too short for these settings
(`drifting`): the trend is large against the estimate's own statistical error. A chain with a non-finite loss is `diverged`; the LLC mean is then NaN, never an average over
the surviving chains (per-chain values stay available).

`left_basin` (per chain): over the kept draws, the loss has climbed more than half of the way from
L_n(w*) to chance level (uniform prediction, or predicting the mean target), or it is still rising
(last quarter above the third quarter by > 2% of that gap) after climbing more than 20% of it.

`not_at_minimum`: the LLC is below zero by more than 3 standard errors, i.e. the chains found lower
loss than L_n(w*) within the localization's reach, so w* is not a local minimum and the LLC is not
defined there (early checkpoints, where the loss is still falling). The chains then descend to
different places and R-hat stays high however long they run: it says nothing about the settings.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from analyze.llc.stability import STABLE_STEP

LEFT_BASIN_LEVEL = 0.5
RISING_LEVEL = 0.2
RISING_DRIFT = 0.02
NOT_AT_MINIMUM_SE = 3.0
DRIFT_MAX = 3.0
RHAT_MAX = 1.1


def _arviz():
    import warnings

    with warnings.catch_warnings():
        # ArviZ 0.2x announces its coming refactor in a multi-line FutureWarning on import (once a day, in
        # every dask worker of that day's first run); nothing here depends on what it announces. Only that
        # warning is filtered: any other ArviZ warning still shows.
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning,
                                module="arviz")
        import arviz  # imported lazily: ~1 s, and only estimators that sample need it
    return arviz


def chain_left_basin(trace: np.ndarray, init_loss: float, chance_loss: float) -> bool:
    gap = max(chance_loss - init_loss, 0.1 * abs(chance_loss), 1e-12)
    quarter = max(len(trace) // 4, 1)
    last, before = trace[-quarter:].mean(), trace[-2 * quarter:-quarter].mean() if len(trace) >= 2 * quarter else np.nan
    level = (last - init_loss) / gap
    drift = (last - before) / gap if np.isfinite(before) else 0.0
    return bool(level > LEFT_BASIN_LEVEL or (drift > RISING_DRIFT and level > RISING_LEVEL))


def summarize(kept: np.ndarray, init_loss: float, nbeta: float, n: int, chance_loss: float) -> dict:
    """Estimates and diagnostics from kept draws, shape (chains, draws)."""
    chains, draws = kept.shape
    finite = np.isfinite(kept).all(axis=1)
    per_chain = np.where(finite, nbeta * (np.where(np.isfinite(kept), kept, 0).mean(axis=1) - init_loss), np.nan)
    row = {
        "llc_mean": float(per_chain.mean()) if finite.all() else math.nan,
        "llc_std": float(per_chain.std(ddof=1)) if chains > 1 and finite.all() else math.nan,
        "llc_per_chain": [float(v) for v in per_chain],
        "init_loss": float(init_loss),
        "mean_sampled_loss": float(kept.mean()) if finite.all() else math.nan,
        "wbic": float(n * kept.mean()) if finite.all() else math.nan,
        "diverged": bool(not finite.all()),
        "n_diverged": int((~finite).sum()),
        "chains_left_basin": int(sum(chain_left_basin(kept[c], init_loss, chance_loss)
                                     for c in range(chains) if finite[c])),
        "chance_loss": float(chance_loss),
    }
    row["left_basin"] = row["chains_left_basin"] > 0
    row["llc_sem"] = between_chain_sem(per_chain) if finite.all() else math.nan
    row["drift"] = drift(kept, nbeta) if finite.all() else math.nan
    row["drifting"] = bool(abs(row["drift"]) > DRIFT_MAX)  # NaN compares False
    if finite.all() and draws >= 4:
        az = _arviz()
        with warnings.catch_warnings():  # ArviZ warns about few chains; the values are still defined
            warnings.simplefilter("ignore")
            data = az.convert_to_dataset(kept)  # (chain, draw) -> variable "x"
            row["rhat"] = float(az.rhat(data)["x"].values)
            row["ess"] = float(az.ess(data)["x"].values)
    else:
        row.update(rhat=math.nan, ess=math.nan)
    row["not_at_minimum"] = not_at_minimum(row["llc_mean"], row["llc_sem"])
    return row


def between_chain_sem(values: np.ndarray) -> float:
    """SD of independent per-chain estimates / sqrt(chains); NaN for one chain (nothing to compare)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def drift(kept: np.ndarray, nbeta: float) -> float:
    """(second-half LLC - first-half LLC) / its standard error; NaN with one chain or too few draws."""
    half = kept.shape[1] // 2
    if half < 2 or kept.shape[0] < 2:
        return math.nan
    first, second = nbeta * kept[:, :half].mean(axis=1), nbeta * kept[:, -half:].mean(axis=1)
    sem = math.hypot(between_chain_sem(first), between_chain_sem(second))
    return float((second.mean() - first.mean()) / sem) if sem > 0 else math.nan


def healthy(row) -> bool:
    """Whether an llc or calibration row can be used (module docstring); row: a mapping or a pandas row."""
    step_curvature = row.get("step_curvature", math.nan)
    return bool(not row["diverged"] and not row["left_basin"] and not row["not_at_minimum"]
                and row["rhat"] < RHAT_MAX and not abs(row["drift"]) > DRIFT_MAX
                and not step_curvature >= STABLE_STEP)


def not_at_minimum(llc_mean: float, llc_sem: float) -> bool:
    """The LLC is below zero by more than NOT_AT_MINIMUM_SE standard errors (see the module docstring)."""
    return bool(np.isfinite(llc_sem) and llc_mean < -NOT_AT_MINIMUM_SE * llc_sem)

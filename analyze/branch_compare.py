"""Compare a measure (LLC, Hessian trace, ...) between two branches of a swap run, with standard errors.

Two views, because the branches do not train at the same speed (after the swap NGD reaches a lower
training loss than SGD at the same epoch, and the LLC and Tr(H) both move as the loss falls):
- at matched epoch: each epoch both branches have, after the cut-off;
- at matched training loss: each checkpoint of branch `a` against the checkpoint of branch `b` nearest to
  it in training loss, kept only when the two losses lie within `loss_tolerance` (relative) of each other.

A difference counts when it exceeds its combined standard error times `critical`, Student's t at the coverage
of Z = 2 normal standard errors with the difference's Welch degrees of freedom (analyze/significance.py): 2 for
a Hessian trace over 1,280 samples, 4.5 or more for two 2-chain LLCs, whose standard errors are themselves
rough. The verdict says in which direction most compared points differ, or that there is no consistent
difference. "Most" is a test, not a count past the half: a direction needs more than half of the healthy points at
the one-sided binomial test's level of Z normal errors (97.7%), so a count near the half is no verdict. Each
point's call is a draw from its chains' noise, and a count at the line flips with them: the study's LLC at matched
training loss read 10 of 21 points above (no consistent difference) on one run and 12 of 18 (more than half) after
the same training on another machine; both are no verdict under the test (p = 0.67 and 0.12).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from analyze.significance import Z, difference_bound

LOSS_TOLERANCE = 0.05  # matched-loss pairs: |loss_a - loss_b| <= 5% of loss_b
MAJORITY_LEVEL = stats.norm.sf(Z)  # 2.3%: a direction's count must beat half at the level of Z normal errors


def series(values: pd.DataFrame, run: str, value: str, se: str, ok: str | None = None,
           train_loss: pd.Series | None = None, dof: str | None = None) -> pd.DataFrame:
    """One run's (epoch -> value, se, dof, ok, train_loss) from a tidy table with run and epoch columns; `ok`
    names its boolean health column (every point healthy without one), `dof` the column of the standard error's
    degrees of freedom (infinite without one: an error from many samples)."""
    rows = values[values.run == run].drop_duplicates("epoch", keep="last").set_index("epoch").sort_index()
    out = pd.DataFrame({"value": rows[value].astype(float), "se": rows[se].astype(float)})
    out["dof"] = np.inf if dof is None else rows[dof].astype(float).to_numpy()
    out["ok"] = True if ok is None else rows[ok].astype(bool).to_numpy()
    out["train_loss"] = np.nan if train_loss is None else train_loss.reindex(out.index).to_numpy()
    return out


def call(diff: float, se: float, critical: float = Z) -> str:
    """'above' / 'below' when diff exceeds `critical` x se that way, else 'no difference'."""
    if not np.isfinite(diff) or not np.isfinite(se) or not np.isfinite(critical):
        return "unknown"
    if diff > critical * se:
        return "above"
    if diff < -critical * se:
        return "below"
    return "no difference"


def at_matched_epoch(a: pd.DataFrame, b: pd.DataFrame, after: int) -> pd.DataFrame:
    """Per epoch > `after` that both have: a's and b's values, a - b, its s.e., and the call (a above b?)."""
    epochs = sorted(e for e in set(a.index) & set(b.index) if e > after)
    return _pairs(a.loc[epochs], b.loc[epochs], pd.Index(epochs, name="epoch"))


def at_matched_loss(a: pd.DataFrame, b: pd.DataFrame, after: int,
                    loss_tolerance: float = LOSS_TOLERANCE) -> pd.DataFrame:
    """Each epoch of a (> `after`) against b's checkpoint nearest in training loss (any epoch of b), kept when
    the losses agree within `loss_tolerance`; columns add both epochs and both losses."""
    a = a[(a.index > after) & a.train_loss.notna()]
    b = b[b.train_loss.notna()]
    if not len(a) or not len(b):
        return _pairs(a.iloc[:0], b.iloc[:0], pd.Index([], name="epoch"))
    nearest = [b.index[np.argmin(np.abs(b.train_loss.to_numpy() - loss))] for loss in a.train_loss]
    matched = b.loc[nearest]
    keep = (np.abs(a.train_loss.to_numpy() - matched.train_loss.to_numpy())
            <= loss_tolerance * matched.train_loss.to_numpy())
    table = _pairs(a[keep], matched[keep], pd.Index(a.index[keep], name="epoch"))
    table.insert(0, "b_epoch", np.asarray(nearest)[keep])
    table.insert(1, "a_loss", a.train_loss.to_numpy()[keep])
    table.insert(2, "b_loss", matched.train_loss.to_numpy()[keep])
    return table


def _pairs(a: pd.DataFrame, b: pd.DataFrame, index: pd.Index) -> pd.DataFrame:
    diff = a.value.to_numpy() - b.value.to_numpy()
    se, t = difference_bound(a.se.to_numpy(), a.dof.to_numpy(), b.se.to_numpy(), b.dof.to_numpy())
    table = pd.DataFrame({"a": a.value.to_numpy(), "a_se": a.se.to_numpy(), "b": b.value.to_numpy(),
                          "b_se": b.se.to_numpy(), "diff": diff, "diff_se": se, "t": t,
                          "healthy": a.ok.to_numpy() & b.ok.to_numpy()}, index=index)
    table["call"] = [call(d, s, c) for d, s, c in zip(diff, se, t)]
    return table


def verdict(table: pd.DataFrame, a: str, b: str, measure: str) -> str:
    """One line: whether a's measure lies above b's, over the healthy compared points (no verdict unless more than
    half of the compared points are healthy)."""
    healthy = table[table.healthy]
    if not len(healthy):
        # What the unhealthy points say, so a reader sees it without reading it as a verdict: their chains
        # measured something else (e.g. a descent from a checkpoint not at a minimum), in whichever direction.
        counts = table.call.value_counts()
        seen = (f" (the unhealthy points, not a verdict: {a} above {b} at {counts.get('above', 0)} of {len(table)},"
                f" below at {counts.get('below', 0)})" if len(table) else "")
        return f"{measure}: NO VERDICT: none of {len(table)} compared points is healthy on both branches{seen}"
    counts = healthy.call.value_counts()
    above, below = counts.get("above", 0), counts.get("below", 0)
    n = len(healthy)
    if 2 * n <= len(table):
        # a few healthy points among many unhealthy ones are not the comparison: the study's calibrated LLC once
        # read NGD ABOVE from 1 healthy point of 10
        return (f"{measure}: NO VERDICT: only {n} of {len(table)} compared points are healthy on both branches (a "
                f"verdict needs more than half; at those, {a} above {b} at {above}, below at {below})")
    leading = max(above, below)
    p = majority_p_value(leading, n)
    detail = (f"{a} above {b} by more than t combined s.e. at {above} of {n} healthy points, below at {below} "
              f"(more than half? one-sided binomial p = {p:.2g}, at most {MAJORITY_LEVEL:.3f}); "
              f"mean difference {healthy['diff'].mean():+.4g}"
              + (f" ({len(table) - n} unhealthy points left out)" if len(table) > n else ""))
    if p <= MAJORITY_LEVEL:
        return f"{measure}: {a.upper()} {'ABOVE' if above > below else 'BELOW'}: {detail}"
    return f"{measure}: NO CONSISTENT DIFFERENCE: {detail}"


def majority_p_value(count: int, n: int) -> float:
    """P(X >= count) for X ~ Binomial(n, 1/2): how often `count` of `n` points or more would fall one way if
    each were as likely to as not."""
    return float(stats.binom.sf(count - 1, n, 0.5)) if n else 1.0

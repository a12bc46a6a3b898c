"""Branch comparison at matched epoch and matched training loss (analyze/branch_compare.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analyze import branch_compare as bc


def frame(run, epochs, values, ses, losses):
    return pd.DataFrame({"run": run, "epoch": epochs, "value": values, "se": ses, "loss": losses})


def test_matched_epoch_calls_each_epoch_by_combined_standard_errors():
    a = bc.series(frame("ngd", [3, 4, 5, 6], [10.0, 10.0, 13.0, 7.0], [1.0] * 4, [1.0] * 4), "ngd", "value", "se")
    b = bc.series(frame("sgd", [4, 5, 6, 7], [10.0, 10.0, 10.0, 10.0], [1.0] * 4, [1.0] * 4), "sgd", "value", "se")
    table = bc.at_matched_epoch(a, b, after=3)
    assert list(table.index) == [4, 5, 6]  # only epochs both have, after the cut-off
    # differences 0, +3, -3 with s.e. sqrt(2): 2 s.e. = 2.83
    assert list(table.call) == ["no difference", "above", "below"]
    assert table.diff_se.iloc[0] == pytest.approx(np.sqrt(2))
    assert "NO CONSISTENT DIFFERENCE" in bc.verdict(table, "NGD", "SGD", "LLC")


def test_matched_loss_pairs_each_checkpoint_with_the_nearest_loss_within_tolerance():
    # NGD trains faster: its epoch-6 loss 0.5 matches SGD's epoch 9; its epoch-7 loss 0.2 has no SGD match
    ngd = frame("ngd", [5, 6, 7], [20.0, 22.0, 30.0], [1.0] * 3, [0.8, 0.5, 0.2])
    sgd = frame("sgd", [5, 6, 7, 8, 9], [10.0, 11.0, 12.0, 13.0, 14.0], [1.0] * 5, [0.9, 0.8, 0.7, 0.6, 0.51])
    a = bc.series(ngd, "ngd", "value", "se", train_loss=ngd.set_index("epoch").loss)
    b = bc.series(sgd, "sgd", "value", "se", train_loss=sgd.set_index("epoch").loss)
    table = bc.at_matched_loss(a, b, after=4)
    assert list(table.index) == [5, 6] and list(table.b_epoch) == [6, 9]
    assert list(table["diff"]) == [20.0 - 11.0, 22.0 - 14.0]
    assert (table.call == "above").all()
    # two points of two above: as likely as 1 in 4 by chance, not yet a majority (that needs 6 of 6)
    assert bc.verdict(table, "NGD", "SGD", "LLC").startswith("LLC: NO CONSISTENT DIFFERENCE: NGD above SGD by more "
                                                              "than t combined s.e. at 2 of 2 healthy points")


def calls(above: int, below: int, n: int) -> pd.DataFrame:
    """A comparison table whose healthy points call `above` above, `below` below, the rest no difference."""
    return pd.DataFrame({"call": ["above"] * above + ["below"] * below + ["no difference"] * (n - above - below),
                         "healthy": True, "diff": 1.0})


@pytest.mark.parametrize("above, below, n, verdict", [
    (41, 0, 43, "NGD ABOVE"), (0, 19, 24, "NGD BELOW"), (6, 0, 6, "NGD ABOVE"),
    (5, 0, 6, "NO CONSISTENT DIFFERENCE"),  # 5 of 6 or more: 11% by chance
    (12, 0, 18, "NO CONSISTENT DIFFERENCE"), (10, 0, 21, "NO CONSISTENT DIFFERENCE"),  # the study's two runs
    (26, 0, 50, "NO CONSISTENT DIFFERENCE"), (14, 14, 28, "NO CONSISTENT DIFFERENCE"),
])
def test_a_verdict_needs_more_than_half_of_the_points_by_a_binomial_test(above, below, n, verdict):
    """More than half of the healthy points one way, at the one-sided binomial test's level of 2 normal errors
    (2.3%); the p-value printed is scipy's exact binomial test against one half."""
    text = bc.verdict(calls(above, below, n), "NGD", "SGD", "LLC")
    assert text.startswith(f"LLC: {verdict}: ")
    p = stats.binomtest(max(above, below), n, 0.5, alternative="greater").pvalue
    assert f"one-sided binomial p = {p:.2g}," in text and (p <= 0.02275) == (verdict != "NO CONSISTENT DIFFERENCE")


def test_unhealthy_points_are_left_out_of_the_verdict():
    ngd = frame("ngd", [4, 5, 6], [5.0, 5.0, 20.0], [1.0] * 3, [1.0] * 3).assign(ok=[True, True, False])
    a = bc.series(ngd, "ngd", "value", "se", ok="ok")
    b = bc.series(frame("sgd", [4, 5, 6], [10.0] * 3, [1.0] * 3, [1.0] * 3), "sgd", "value", "se")
    text = bc.verdict(bc.at_matched_epoch(a, b, after=0), "NGD", "SGD", "LLC")
    # the unhealthy epoch 6 (20 against 10: above) is left out; 2 healthy points are too few for a verdict
    assert text.startswith("LLC: NO CONSISTENT DIFFERENCE: NGD above SGD by more than t combined s.e. at 0 of 2 "
                           "healthy points, below at 2") and "1 unhealthy points left out" in text
    # healthy at no more than half of the compared points: no verdict, what the healthy ones say
    few = bc.series(ngd.assign(ok=[True, False, False]), "ngd", "value", "se", ok="ok")
    assert bc.verdict(bc.at_matched_epoch(few, b, after=0), "NGD", "SGD", "LLC") == (
        "LLC: NO VERDICT: only 1 of 3 compared points are healthy on both branches (a verdict needs more than half; "
        "at those, NGD above SGD at 0, below at 1)")
    none = bc.series(frame("ngd", [4], [5.0], [1.0], [1.0]).assign(ok=False), "ngd", "value", "se", ok="ok")
    # no healthy point: no verdict, but what the unhealthy points show (5 below 10 by 5 combined errors / sqrt 2)
    assert bc.verdict(bc.at_matched_epoch(none, b, after=0), "NGD", "SGD", "LLC") == (
        "LLC: NO VERDICT: none of 1 compared points is healthy on both branches "
        "(the unhealthy points, not a verdict: NGD above SGD at 0 of 1, below at 1)")
    assert bc.verdict(bc.at_matched_epoch(none, b, after=10), "NGD", "SGD", "LLC") == (
        "LLC: NO VERDICT: none of 0 compared points is healthy on both branches")


def test_few_chain_standard_errors_need_students_t():
    """The same difference (3 combined errors) counts for errors from many samples, not for two 2-chain LLCs:
    their errors have 1 degree of freedom each, and Student's t at 95.45% then asks for about 4.5-14."""
    a_rows = frame("ngd", [4], [13.0], [1.0], [1.0]).assign(dof=1.0)
    b_rows = frame("sgd", [4], [13.0 - 3 * np.sqrt(2)], [1.0], [1.0]).assign(dof=1.0)
    many = bc.at_matched_epoch(bc.series(a_rows, "ngd", "value", "se"), bc.series(b_rows, "sgd", "value", "se"), 0)
    few = bc.at_matched_epoch(bc.series(a_rows, "ngd", "value", "se", dof="dof"),
                              bc.series(b_rows, "sgd", "value", "se", dof="dof"), 0)
    assert many.call.iloc[0] == "above" and many.t.iloc[0] == 2.0
    assert few.call.iloc[0] == "no difference" and few.t.iloc[0] == pytest.approx(4.527, abs=1e-3)  # Welch dof 2

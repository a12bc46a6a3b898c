"""`analyze calibrate CKPT`: SGLD over a grid of (step, localization) at equal sampling time, with a
recommendation and the plateau it comes from.

Steps are given relative to nbeta ('c/nbeta': the drift's effective step eps x nbeta = c) and every
step gets the same sampling time: a step k times smaller runs k times more burn-in steps and draws, so a
smaller step is never judged on a shorter chain. Only steps stable at the checkpoint are run
(eps x nbeta x lambda_max < STABLE_STEP, analyze/llc/stability.py; lambda_max is measured once): smaller
ones (a factor 3 apart) replace the unstable ones, and equal sampling time counts from the largest stable
step. A grid point whose chains were still settling (unhealthy by |drift| or R-hat alone) is run once more
with SETTLE_BURNIN x the burn-in; if it is still unhealthy, the smaller steps at its localization are not run
(at the same sampling time their chains would roam alike). A setting is *healthy* as an llc row is
(analyze/llc/statistics.py: no chain diverged or left the basin, at a minimum, R-hat < 1.1, |drift| <= 3,
stable step). Two estimates *agree* when their difference is within AGREEMENT_SE combined standard errors plus
AGREEMENT_SLACK of their size. (Not Student's t, unlike the branch verdicts: agreement is the evidence of a
plateau here, and a wider bound would accept more; with t at 4 chains, 50.1 +- 1.4 and 43.3 +- 1.4 on the demo's
MLP, 3.4 combined errors apart, counted as a plateau.) The recommendation: the weakest localization
at which every step is healthy (strong localization biases the LLC low), and at it the plateau the smallest
steps reach: from the smallest step up, the steps that agree with their next larger one (bottom_plateau), of
which the largest is recommended. It and its larger neighbour are on the plateau, and of the two it carries
the smaller step-size bias (which grows with the step: a larger step that merely agrees within the tolerance
can still be 10% high). A larger pair that agrees while a smaller step falls away is not a plateau. Where the
smallest step at the weakest healthy localization does not agree with its larger neighbour, up to EXTRA_STEPS
steps a factor 3 smaller are tried there first, and only then is a stronger localization accepted. Last, the
pick is confirmed at the length the study will run (its chains and draws; `confirm`): the grid's short chains
cannot see a slow drift, so the pick runs again, with a longer burn-in while it is still settling, and at its grid
point's burn-in where it had fewer burn-in steps than the grid point and does not agree with it (the drift test
can miss a slow rise), and is recommended with the burn-in that settled it, or set aside for the next
localization's pick. A pick must also have relaxed: its burn-in must cover RELAXATION_TIMES relaxation times of the
flattest direction (relaxation_steps = 1/(eps (gamma + nbeta max(lambda_min, 0))): where only the localizer holds a
direction, the chains spread along it that slowly, and the drift test cannot see it), or agree with a run that does
(`relaxed`); where the pick is too slow to relax within the longest confirmation run but its larger neighbour on the
plateau is not, the confirmation starts from that one and must reach a step plateau at the pick's step
(`relaxable_start`); a localization too weak for either is set aside unrun. Then the step:
relaxed chains roam further than the grid's short ones, into regions where the grid's step can be too large, so the
relaxed pick runs once more at a third of its step, relaxed too (3x the burn-in and draws); where the two agree the
smaller step is recommended (it carries the smaller step bias), where they do not it replaces the pick and is checked
in turn, up to STEP_CHECKS smaller steps within 27x the study's burn-in, the smallest recommended when none agrees
(`step_plateau`). Where the
standard error is above `precision` of the LLC, it runs once more with the chains that bring it there
(`more_chains`), and those are recommended too. Every row also carries the Hessian's smallest
eigenvalue at the checkpoint and the localization margin gamma + nbeta lambda_min: where it is negative the
localizer does not hold the chains against the loss's downward curvature on those samples (reported, not a health
test: a subsample's Hessian dips below zero even at a minimum of the full loss). The table keeps every grid point
and confirmation run (`stage`), so the plateau (LLC against step for each localization, with error bars) can be
read off and plotted.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from analyze.catalog import CheckpointInfo
from analyze.estimators.base import Context
from analyze.estimators.llc import LLCEstimator, parse_burnin, parse_lr, parse_nbeta
from analyze.llc.calibration_table import SMALLER_STEP
from analyze.llc.statistics import healthy
from analyze.llc.stability import (STABLE_STEP, bottom_hessian_eigenvalue, localization_margin, relaxation_steps,
                                   top_hessian_eigenvalue)
from analyze.store import file_hash
from trainer.checkpoints import load_model
from trainer.data import load_dataset
from trainer.losses import nll_loss

AGREEMENT_SE = 2.0
AGREEMENT_SLACK = 0.05
CALIBRATION_LENGTH = 300  # burn-in and draws at the largest step (the default grid's is 3x the default step)
# gamma 1000: on large nets (a 784-256-256-10 deep linear net, 268,800 parameters) chains at gamma <= 100 roam so far
# along the flat directions that they leave the basin, and 1000 is where the estimate is right (docs/llc.md)
SETTLE_BURNIN = 3  # burn-in factor for a grid point whose chains were still settling (drift or R-hat only)
CONFIRM_RUNS = 3  # the recommendation at the study's length: its burn-in, then 3x and 9x while still settling
# a confirmed burn-in covers 3 relaxation times of the flattest direction (the chains' spread along it is then 99.8%
# of the stationary one), or agrees with a run that does: on the multiplicity-4 net at n = 59,940 the estimate moved
# by +14% between 1/3 and 3 relaxation times at gamma 10 and held from 1 to 10 at gamma 30 (docs/llc-localization.md)
RELAXATION_TIMES = 3
PRECISION = 0.05  # standard error / LLC a confirmed recommendation should reach (more chains where it does not)
MAX_CHAINS = 16  # at most this many chains for it (16 chains x 1,000 draws cost four times the default's 4)
EXTRA_STEPS = 2  # smaller steps tried at the weakest healthy localization when its smallest step has no plateau
STEP_CHECKS = 2  # at most this many smaller steps while the check disagrees (within 27x the study's burn-in after one)
DEFAULT_GRID = {"lr": ["0.1/nbeta", "0.03/nbeta", "0.01/nbeta"], "localization": ["1", "3", "10", "100", "1000"]}


def context_for(path: Path, device: str = "cpu", data_root: str | None = None) -> Context:
    model, ckpt = load_model(path, device)
    splits = load_dataset(ckpt.meta["dataset_spec"], root=data_root)
    info = CheckpointInfo(ckpt.meta["run"], ckpt.meta["optimizer"], ckpt.meta["epoch"], ckpt.meta["step"],
                          path, file_hash(path), ckpt.meta)
    return Context(model=model, checkpoint=info, device=torch.device(device), splits=splits,
                   loss_fn=nll_loss(splits.task, splits.noise_sigma),
                   per_sample_loss=nll_loss(splits.task, splits.noise_sigma, reduction="none"))


def agree(a: dict, b: dict) -> bool:
    """Two estimates agree within AGREEMENT_SE combined standard errors plus AGREEMENT_SLACK of their size."""
    if not all(math.isfinite(v) for v in (a["llc_mean"], b["llc_mean"], a["llc_sem"], b["llc_sem"])):
        return False
    allowed = AGREEMENT_SE * math.hypot(a["llc_sem"], b["llc_sem"]) + AGREEMENT_SLACK * abs(b["llc_mean"])
    return abs(a["llc_mean"] - b["llc_mean"]) <= allowed


def calibrate(ctx: Context, lrs: list[str], localizations: list[str], nbetas: list[str], common: dict,
              progress: bool = True, study: dict | None = None, precision: float = PRECISION) -> pd.DataFrame:
    """One row per (lr, localization, nbeta); the largest step runs common's burn-in and draws, a step k times
    smaller k times as many (equal sampling time). Where the smallest steps reach no plateau at the weakest
    healthy localization, smaller steps are tried there before a stronger one is accepted (extend_downwards).
    With `study` (chains, draws, burnin: the length the llc estimator will run at), the recommendation is
    confirmed at that length (confirm), with more chains where its standard error is above `precision` of the
    LLC (0: never); `stage` tells grid rows from confirmation rows."""
    n = len(ctx.splits.train)
    lambda_max = top_hessian_eigenvalue(ctx)
    rows, given_up_all = [], set()
    for nb in nbetas:
        steps = stable_steps(lrs, parse_nbeta(nb, n), lambda_max)
        grid = [(lr, loc) for loc in localizations for lr in steps]
        given_up: set[str] = set()
        for lr, loc in tqdm(grid, desc=f"calibration (nbeta {nb})", disable=not progress, file=sys.stderr):
            if loc in given_up:
                continue
            row = grid_point(ctx, lr, loc, nb, steps[0], common, len(rows), lambda_max)
            rows.append(row)
            if not row["healthy"]:
                # Unhealthy after the settling rerun, with a stable step: the chains roam at this localization
                # (they leave the basin or never settle), and smaller steps at the same sampling time would too.
                # The localization cannot be recommended, so its smaller steps are not run: on a large model they
                # cost the most (a 269,322-parameter MLP at gamma 1 and 10).
                given_up.add(loc)
                given_up_all.add(loc)
    table = with_recommendation(pd.DataFrame(rows), nbetas, localizations)
    table = extend_downwards(ctx, table, nbetas, localizations, common, lambda_max, progress)
    table["stage"] = "grid"
    given_up = sorted(given_up_all)  # localizations whose smaller steps were not run
    # The downward curvature the localizer must hold: reported, not part of `healthy` (at a minimum of the full loss
    # the 1,280 samples' Hessian still dips below zero: -0.1 to -0.24 on the truth suite's deep linear nets); its
    # positive part sets how fast the flattest direction relaxes, which the confirmation's burn-in must cover
    lambda_min = bottom_hessian_eigenvalue(ctx)
    unrelaxed = []
    if study:
        table = confirm(ctx, table, nbetas, localizations, common, study, lambda_max, lambda_min, progress, precision)
        unrelaxed = table.attrs["unrelaxed"]
    table["lambda_min"] = lambda_min
    table["localization_margin"] = localization_margin(table.localization, table.nbeta, table.lambda_min)
    table["relaxation_steps"] = relaxation_steps(table.lr, table.localization, table.nbeta, lambda_min)
    table.attrs["given_up"] = given_up
    table.attrs["unrelaxed"] = unrelaxed
    return table


def confirm(ctx: Context, table: pd.DataFrame, nbetas: list[str], localizations: list[str], common: dict,
            study: dict, lambda_max: float, lambda_min: float, progress: bool, precision: float = 0.0) -> pd.DataFrame:
    """Run the recommendation at the study's length (`study`: chains, draws, burnin) before it is recommended.

    The grid judges settings on short chains, whose drift test has little power: on the NGD-vs-SGD study's MLP
    (269,322 parameters) it recommended 0.0033/nbeta at gamma 100, whose chains at the study's 300 burn-in steps
    were still settling at 61 of 66 checkpoints (median |drift| 7.9). Here the recommended setting runs with the
    study's chains and draws; while it is still settling, with SETTLE_BURNIN x the burn-in, up to CONFIRM_RUNS
    runs; where it then had fewer burn-in steps than its grid point and does not agree with it, once more at the
    grid point's burn-in; and where its burn-in is under RELAXATION_TIMES relaxation times of the flattest direction,
    once more at that many, the shorter recommended if the two agree (`relaxed`). The burn-in that settles it
    becomes part of the recommendation. A localization whose pick would need more than the longest confirmation run
    (SETTLE_BURNIN^(CONFIRM_RUNS - 1) x the study's burn-in) to relax is set aside unrun, as is one whose pick does
    not settle, and the next recommendation (a stronger localization) is confirmed instead. A confirmed setting
    whose standard error is above `precision` of its LLC runs again at the recommended burn-in (longer while still
    settling) with the chains `more_chains` asks for, which are recommended if they settle: at n ~ 1,000 one 4-chain
    estimate scatters by 6-10% of the LLC (docs/llc-validation.md), too much for a 15% accuracy. Confirmation rows
    join the table with stage "confirmation"; the grid row and the confirmation row whose burn-in and chains are
    recommended are marked recommended, and nothing is when no recommendation is confirmed."""
    grid = table.assign(recommended=False)
    runs, set_aside, unrelaxed = [], set(), []
    while True:
        candidates = grid[[(nb, loc) not in set_aside for nb, loc in zip(grid.nbeta_option, grid.localization_option)]]
        best = recommend(candidates, nbetas, localizations)
        if best is None:
            break
        chosen = grid.loc[best]
        longest_burnin = SETTLE_BURNIN ** (CONFIRM_RUNS - 1) * parse_burnin(study["burnin"], chosen.nbeta)
        needed = relaxation_burnin(chosen, lambda_min)
        start = relaxable_start(grid, best, lambda_min, longest_burnin)
        if start is None:
            # Too weak a localization to reach stationarity at an affordable length (relaxed): set aside unrun, the
            # next recommendation holds the flat directions more strongly.
            if progress:
                print(f"calibration: gamma {chosen.localization_option} at eps {chosen.lr_option} needs "
                      f"{needed:,.0f} burn-in steps to relax ({RELAXATION_TIMES} x "
                      f"1/(eps (gamma + nbeta max(lambda_min, 0)))), more than the longest confirmation run "
                      f"({longest_burnin:,}: 9x --confirm-burnin); setting it aside", file=sys.stderr)
            set_aside.add((chosen.nbeta_option, chosen.localization_option))
            unrelaxed.append(chosen.localization_option)
            continue
        walked = start != best
        if walked:
            if progress:
                print(f"calibration: gamma {chosen.localization_option} at eps {chosen.lr_option} needs {needed:,.0f} "
                      f"burn-in steps to relax, more than the longest confirmation run ({longest_burnin:,}); starting "
                      f"from the plateau's larger step {grid.loc[start].lr_option}, which must reach a step plateau",
                      file=sys.stderr)
            chosen = grid.loc[start]
        if progress:
            print(f"calibration: confirming eps {chosen.lr_option}, gamma {chosen.localization_option} at "
                  f"{study['chains']} chains x {study['draws']} draws", file=sys.stderr)

        def run_pick(options: dict, seed_block: int, attempts: int = CONFIRM_RUNS, check: str = "study length",
                     lr: str = chosen.lr_option) -> list[dict]:
            """The pick (at step `lr`) at the study's length with `options` on top, chain seeds of their own per
            block and run; each row says which `check` it was run for."""
            rows = settled_point(ctx, lr, chosen.localization_option, chosen.nbeta_option,
                                 {**common, **study, **options}, attempts,
                                 common.get("seed", 0) * 1009 + seed_block * 104729 + len(runs), lambda_max)
            return [{**row, "check": check} for row in rows]

        attempts = run_pick({}, 1)
        if shorter_and_disagreeing(attempts[-1], chosen):
            # The drift test can miss a slow rise: on the multiplicity-4 deep linear net at n = 990 the pick
            # 0.01/nbeta, gamma 1 gave 25.2 +- 0.4 after the grid's 3,000 burn-in steps and 20.6 +- 0.4 (drift -0.5)
            # after the study's 1,000. The grid point is the plateau's evidence: confirm at its burn-in.
            if progress:
                short = attempts[-1]
                print(f"calibration: after {short['n_burnin']} burn-in steps the LLC ({short['llc_mean']:.3g} +- "
                      f"{short['llc_sem']:.2g}) does not agree with the grid's ({chosen.llc_mean:.3g} +- "
                      f"{chosen.llc_sem:.2g}) after {chosen.n_burnin}; confirming at {chosen.n_burnin}",
                      file=sys.stderr)
            attempts += run_pick({"burnin": int(chosen.n_burnin)}, 3, check="grid burn-in")
        pick = len(attempts) - 1 if attempts[-1]["healthy"] else None
        if pick is not None:
            pick, attempts = relaxed(attempts, run_pick, lambda_min, progress)
        if pick is not None:
            pick, attempts = step_plateau(attempts, pick, run_pick, lambda_min, SETTLE_BURNIN * longest_burnin,
                                          progress, plateau_required=walked)
        runs += confirmation_rows(attempts, pick)
        if pick is not None:
            grid.loc[best, "recommended"] = True
            chosen_run = attempts[pick]
            spread = pooled_spread(attempts)
            chains = more_chains(chosen_run, precision, spread)
            if chains > chosen_run["n_chains"]:
                if progress:
                    print(f"calibration: the chains' spread at this localization (SD {spread:.2g}, pooled over its "
                          f"healthy confirmation runs) gives {chosen_run['n_chains']} chains a standard error of "
                          f"{spread / math.sqrt(chosen_run['n_chains']):.2g}, above {precision:g} of the LLC; running "
                          f"{chains} chains", file=sys.stderr)
                # more chains test the drift with more power: still settling, they get a longer burn-in too
                precise = run_pick({"chains": chains, "burnin": chosen_run["n_burnin"], "draws": chosen_run["n_draws"]},
                                   7, check="chains", lr=chosen_run["lr_option"])
                if precise[-1]["healthy"]:  # one recommended confirmation row: the one with the chains it needs
                    for row in runs:
                        row["recommended"] = False
                runs += confirmation_rows(precise, len(precise) - 1 if precise[-1]["healthy"] else None)
            break
        set_aside.add((chosen.nbeta_option, chosen.localization_option))
    out = pd.concat([grid, pd.DataFrame(runs)], ignore_index=True) if runs else grid.assign(check="")
    out["check"] = out["check"].fillna("")  # grid rows: no confirmation check
    out.attrs["unrelaxed"] = unrelaxed  # localizations set aside unrun: too slow to relax at the longest burn-in
    return out


def relaxation_burnin(row, lambda_min: float) -> float:
    """Burn-in steps for RELAXATION_TIMES relaxation times of the flattest direction at `row`'s setting."""
    return RELAXATION_TIMES * float(relaxation_steps(row["lr"], row["localization"], row["nbeta"], lambda_min))


def relaxed(attempts: list[dict], run_pick, lambda_min: float, progress: bool) -> tuple[int | None, list[dict]]:
    """Is the healthy confirmation run attempts[-1] stationary? Its burn-in must cover RELAXATION_TIMES relaxation
    times of the flattest direction (relaxation_steps), or agree with a run that does. Returns the index of the run
    to recommend (None: neither is healthy) and the attempts, with that longer run if one was made.

    The drift test cannot see a rise as slow as the localizer's: on the multiplicity-4 deep linear net at
    n = 59,940 (gamma 10, 1/(eps gamma) = 18,200 steps) the estimate was -0%, +6% and +14% of the truth after 6,130,
    20,000 and 60,000 burn-in steps with |drift| < 3 throughout, and on the demo's MLP at gamma 1 it fell from 45 to
    16 between 1,068 and 45,000 steps (docs/llc-localization.md, docs/demo-relaxation.md). Where the confirmed
    burn-in is shorter, the pick runs once at RELAXATION_TIMES relaxation times: if the two agree the shorter burn-in
    is recommended (its estimate is the stationary one within the tolerance), otherwise the longer one."""
    settled, needed = attempts[-1], relaxation_burnin(attempts[-1], lambda_min)
    if settled["n_burnin"] >= needed:
        return len(attempts) - 1, attempts
    if progress:
        print(f"calibration: {settled['n_burnin']} burn-in steps are under {RELAXATION_TIMES} relaxation times "
              f"({math.ceil(needed):,} steps); checking the estimate there", file=sys.stderr)
    longer = run_pick({"burnin": math.ceil(needed)}, 5, attempts=1, check="relaxation")[-1]
    attempts = attempts + [longer]
    if not longer["healthy"]:
        return None, attempts
    return (len(attempts) - 2 if agree(settled, longer) else len(attempts) - 1), attempts


def relaxable_start(grid: pd.DataFrame, best, lambda_min: float, longest_burnin: float):
    """Index of the grid row the confirmation of the pick grid.loc[best] starts from: the pick itself where its
    chains relax within `longest_burnin` steps; otherwise its larger neighbour on the plateau (the pick agrees with
    it), where that one relaxes within it (a step 3x larger relaxes in 3x fewer steps), and step_plateau then checks
    it at a third of its step, the pick's, with the step check's longer budget; None where neither relaxes.

    On the multiplicity-4 deep linear net at n = 990 the grid's plateau at gamma 3 ends at 0.01/nbeta, whose 14,353
    relaxation steps exceed the 9,000 of the longest confirmation run, and gamma 10 (-15% and -26%) was recommended;
    from 0.03/nbeta the relaxed check at 0.01/nbeta agrees, and gives +1% and -8% (docs/llc.md, "Started from the
    plateau's larger step")."""
    pick = grid.loc[best]
    if relaxation_burnin(pick, lambda_min) <= longest_burnin:
        return best
    if not bool(pick.agrees_with_larger_step):
        return None
    same = grid[(grid.nbeta_option == pick.nbeta_option) & (grid.localization_option == pick.localization_option)
                & (grid.lr > pick.lr)]
    if not len(same):
        return None
    larger = same.lr.idxmin()
    return larger if relaxation_burnin(grid.loc[larger], lambda_min) <= longest_burnin else None


def step_plateau(attempts: list[dict], pick: int, run_pick, lambda_min: float, longest_burnin: float,
                 progress: bool, plateau_required: bool = False) -> tuple[int | None, list[dict]]:
    """Is the relaxed pick attempts[pick] on a step plateau? It runs once more at a third of its step, relaxed too
    (SMALLER_STEP x the burn-in and draws: the same relaxation times and sampling time). Where the two agree, the
    smaller step is recommended: it is on the plateau and carries the smaller step bias (the grid's rule too: a
    larger step that merely agrees within the tolerance can still be 10% high). Where they do not, the smaller step
    replaces the pick and is checked in turn, up to STEP_CHECKS smaller steps while that run's burn-in stays within
    `longest_burnin`; the last one is recommended when none agrees. A check whose chains are still settling (|drift|
    or R-hat alone) says nothing about the step, so the step it checked is recommended, and said; one whose chains
    diverged or left the basin sets the localization aside. With `plateau_required` (a pick started above the grid's
    plateau bottom: relaxable_start) only an agreeing check is recommended; where none agrees, or a check is still
    settling, the localization is set aside (from gamma 3 at 0.1/nbeta on the multiplicity-4 net at n = 59,940, the
    smallest step within the budget, 0.033/nbeta, gave +43% and +54%). Returns the index of the run to recommend
    (None: set aside) and the attempts with the step checks; each carries the LLC of the step it checked and whether
    it agrees.

    The grid judges the step on short chains: relaxed chains roam further from the checkpoint, into regions whose
    curvature the step was not chosen for, and there the grid's step can be too large. Relaxed, the multiplicity-4
    deep linear net's student at n = 59,940 gave 31.1 +- 0.7 (+13% of the truth) at 0.03/nbeta and 26.9 +- 1.2 (-2%)
    at 0.01/nbeta (gamma 10), which agree within the tolerance, and the full-rank 5-5-5-5 net +29% and +0% at gamma 3
    (docs/llc-localization.md, fifth table)."""
    checked = 0
    while True:
        current = attempts[pick]
        burnin = SMALLER_STEP * max(int(current["n_burnin"]), math.ceil(relaxation_burnin(current, lambda_min)))
        if checked == STEP_CHECKS or (checked and burnin > longest_burnin):
            if progress:
                why = (f"after {STEP_CHECKS} smaller steps" if checked == STEP_CHECKS else
                       f"and a third of {current['lr_option']} would need {burnin:,} burn-in steps, more than "
                       f"{longest_burnin:,.0f}")
                then = ("setting the localization aside (started above the grid's plateau bottom, it needs one)"
                        if plateau_required else
                        f"recommending the smallest step run, {current['lr_option']} (the step's bias falls with the "
                        "step)")
                print(f"calibration: no step plateau {why}; {then}", file=sys.stderr)
            return (None if plateau_required else pick), attempts
        lr = f"{current['lr_nbeta'] / SMALLER_STEP:.2g}/nbeta"
        if progress:
            print(f"calibration: checking the step {current['lr_option']} against {lr}, relaxed ({burnin:,} burn-in "
                  "steps)", file=sys.stderr)
        # equal sampling time, as on the grid: at the study's draws the smaller step's chains mix over a third of
        # the time, and R-hat fails on a regular model where nothing is wrong
        draws = SMALLER_STEP * int(current["n_draws"])
        smaller = run_pick({"burnin": burnin, "draws": draws}, 11 + checked, attempts=1, check="step", lr=lr)[-1]
        smaller.update(llc_at_larger_step=current["llc_mean"],
                       agrees_with_larger_step=bool(smaller["healthy"]) and agree(smaller, current))
        attempts = attempts + [smaller]
        if not smaller["healthy"]:
            if not still_settling(smaller):
                return None, attempts
            if progress:
                then = ("the localization is set aside (started above the grid's plateau bottom, it needs one)"
                        if plateau_required else f"{current['lr_option']} is recommended without a step plateau")
                print(f"calibration: the step check's chains were still settling (drift {smaller['drift']:.2g}, R-hat "
                      f"{smaller['rhat']:.3g}): {then}", file=sys.stderr)
            return (None if plateau_required else pick), attempts
        pick = len(attempts) - 1
        if smaller["agrees_with_larger_step"]:
            return pick, attempts
        checked += 1


def confirmation_rows(attempts: list[dict], recommended: int | None) -> list[dict]:
    """Calibration rows of confirmation runs, attempts[recommended] marked recommended (the caller may replace it
    with a run of more chains); the plateau test only where a step check made one."""
    return [{"llc_at_larger_step": math.nan, "agrees_with_larger_step": False, **row, "stage": "confirmation",
             "recommended": i == recommended} for i, row in enumerate(attempts)]


def shorter_and_disagreeing(confirmed: dict, grid_row) -> bool:
    """A healthy confirmation run that had fewer burn-in steps than its grid point and does not agree with it."""
    return (bool(confirmed["healthy"]) and confirmed["n_burnin"] < grid_row["n_burnin"]
            and not agree(confirmed, grid_row))


def more_chains(row: dict, precision: float, spread: float = math.nan) -> int:
    """Chains for a standard error of `precision` x the run's LLC: the error is spread / sqrt(chains), `spread` the
    per-chain SD (by default the run's own, llc_sem x sqrt(chains)); at most MAX_CHAINS, and the run's chains when
    it is already there (or precision is 0)."""
    chains, target = int(row["n_chains"]), precision * abs(row["llc_mean"])
    if not math.isfinite(spread):
        spread = row["llc_sem"] * math.sqrt(chains)
    if precision <= 0 or not math.isfinite(spread) or spread / math.sqrt(chains) <= target:
        return chains
    return max(chains, min(MAX_CHAINS, math.ceil((spread / target) ** 2)))


def pooled_spread(runs: list[dict]) -> float:
    """The per-chain SD of the LLC pooled over the healthy `runs` (each weighted by its chains - 1 degrees of
    freedom); NaN when none has two chains. One 4-chain run's SD has 3 degrees of freedom and can come out 10x too
    small: on the demo's cut-off checkpoint (gamma 3) the recommended run's 4 chains had an SD of 0.65, the two runs
    before it 3.7 and 6.6, and the demo's runs at that setting 4.3-6.6 (docs/llc.md, Open)."""
    usable = [r for r in runs if r["healthy"] and r["n_chains"] > 1 and math.isfinite(r["llc_std"])]
    dof = sum(r["n_chains"] - 1 for r in usable)
    return math.sqrt(sum((r["n_chains"] - 1) * r["llc_std"] ** 2 for r in usable) / dof) if dof else math.nan


def grid_point(ctx: Context, lr: str, loc: str, nb: str, largest: str, common: dict, index: int,
               lambda_max: float) -> dict:
    """One calibration row: the llc estimator at (lr, loc, nb) for the sampling time of `largest`."""
    nbeta = parse_nbeta(nb, len(ctx.splits.train))
    stretch = parse_lr(largest, nbeta) / parse_lr(lr, nbeta)
    options = {**common, "draws": round(common["draws"] * stretch), "burnin": round(common["burnin"] * stretch)}
    return settled_point(ctx, lr, loc, nb, options, 2, common.get("seed", 0) * 1009 + index, lambda_max)[-1]


def settled_point(ctx: Context, lr: str, loc: str, nb: str, options: dict, attempts: int, seed: int,
                  lambda_max: float) -> list[dict]:
    """The llc estimator at (lr, loc, nb) with `options`' chains, draws and burn-in; while the chains are still
    settling (unhealthy by |drift| or R-hat alone), run again with SETTLE_BURNIN x the burn-in, at most
    `attempts` runs in all. Returns every run's row, the last one last."""
    burnin, rows = parse_burnin(options["burnin"], parse_nbeta(nb, len(ctx.splits.train))), []
    for attempt in range(attempts):
        # Each run gets its own chain seeds: with one seed for all, a single unlucky set of chains (a chance
        # |drift| > 3) repeated at every step and localization and disqualified them all at once, and the
        # agreement test assumes independent estimates.
        est = LLCEstimator(lr=lr, localization=loc, nbeta=nb, stability=False,
                           **{**options, "burnin": burnin, "seed": seed + 7919 * attempt})
        r = est.run(ctx)["llc"].iloc[0].to_dict()
        r["lambda_max"] = lambda_max  # measured once for the whole grid
        r["step_curvature"] = r["lr_nbeta"] * lambda_max
        r["healthy"] = healthy(r)
        rows.append(calibration_row(r, lr, loc, nb))
        if r["healthy"] or not still_settling(r):
            break
        # Still settling, nothing else wrong: a large model's chains at a small step need longer to reach the
        # localized posterior (a 268,800-parameter deep linear net at 0.01/nbeta, gamma 1000: drifting after
        # 900 burn-in steps, settled after 3,000), so the point runs again with SETTLE_BURNIN x the burn-in.
        burnin *= SETTLE_BURNIN
    return rows


def calibration_row(r: dict, lr: str, loc: str, nb: str) -> dict:
    """The columns of the calibration table from an llc row."""
    return {"sampler": r["sampler"], "lr_option": lr, "localization_option": loc, "nbeta_option": nb,
            "lr": r["lr"], "localization": r["localization"], "nbeta": r["nbeta"],
            "lr_nbeta": r["lr_nbeta"], "lambda_max": r["lambda_max"], "step_curvature": r["step_curvature"],
            "n_chains": r["n_chains"], "n_draws": r["n_draws"], "n_burnin": r["n_burnin"],
            "batch_size": r["batch_size"], "llc_mean": r["llc_mean"], "llc_std": r["llc_std"],
            "llc_sem": r["llc_sem"], "drift": r["drift"], "rhat": r["rhat"], "ess": r["ess"],
            "diverged": r["diverged"], "left_basin": r["left_basin"],
            "not_at_minimum": r["not_at_minimum"], "healthy": r["healthy"], "llc_truth": r["llc_truth"],
            "init_loss": r["init_loss"], "mean_sampled_loss": r["mean_sampled_loss"]}


def still_settling(row: dict) -> bool:
    """Unhealthy only by |drift| or R-hat: the chains had not reached stationarity, nothing diverged or left."""
    return not row["healthy"] and healthy({**row, "drift": 0.0, "rhat": 1.0})


def with_recommendation(table: pd.DataFrame, nbetas: list[str], localizations: list[str]) -> pd.DataFrame:
    """The table with the plateau test (each row against the next larger step at its localization and nbeta)
    and the recommended row marked."""
    table = table.reset_index(drop=True)
    table["llc_at_larger_step"] = math.nan
    table["agrees_with_larger_step"] = False
    for _, group in table.groupby(["nbeta_option", "localization_option"], sort=False):
        ordered = group.sort_values("lr")
        for (i, row), (_, larger) in zip(ordered.iterrows(), list(ordered.iterrows())[1:]):
            table.loc[i, "llc_at_larger_step"] = larger["llc_mean"]
            table.loc[i, "agrees_with_larger_step"] = agree(row, larger) and bool(larger["healthy"])
    table["recommended"] = False
    best = recommend(table, nbetas, localizations)
    if best is not None:
        table.loc[best, "recommended"] = True
    return table


def extend_downwards(ctx: Context, table: pd.DataFrame, nbetas: list[str], localizations: list[str], common: dict,
                     lambda_max: float, progress: bool) -> pd.DataFrame:
    """At the weakest localization where every step is healthy, if the smallest step does not agree with its
    larger neighbour (no bottom plateau), the steps still carry a step-size bias: up to EXTRA_STEPS steps a
    factor 3 smaller are tried there (at equal sampling time) before a stronger localization is accepted, since a
    stronger one biases the LLC low (on a 784->10 linear regression, gamma 1000 came out 13-22% low where a
    smaller step at gamma 100 was right)."""
    for nb in nbetas:
        at_nb = table[table.nbeta_option == nb]
        largest = at_nb.sort_values("lr").lr_option.iloc[-1]
        weakest = next((loc for loc in _weakest_first(at_nb, localizations)
                        if at_nb[at_nb.localization_option == loc].healthy.all()), None)
        for _ in range(EXTRA_STEPS if weakest is not None else 0):
            group = table[(table.nbeta_option == nb) & (table.localization_option == weakest)]
            if len(group) < 2 or len(bottom_plateau(group)) or not group.healthy.all():
                break  # a single step asked for is a query, not a plateau to extend
            lr = f"{group.lr_nbeta.min() / 3:.2g}/nbeta"
            if progress:
                print(f"calibration: no plateau at localization {weakest} yet; trying the smaller step {lr}",
                      file=sys.stderr)
            row = grid_point(ctx, lr, weakest, nb, largest, common, len(table), lambda_max)
            table = with_recommendation(pd.concat([table, pd.DataFrame([row])]), nbetas, localizations)
    return table


def _weakest_first(table: pd.DataFrame, localizations: list[str]) -> list[str]:
    return sorted(localizations, key=lambda t: table.loc[table.localization_option == t, "localization"].min())


def stable_steps(lrs: list[str], nbeta: float, lambda_max: float) -> list[str]:
    """The steps of `lrs` that are stable at this checkpoint (eps x nbeta x lambda_max < STABLE_STEP), largest
    first. Steps a factor 3 below the smallest are added until there are as many stable steps as were given: a
    stiff model's plateau lies below the default grid, and an unstable step is unhealthy whatever
    its chains show."""
    steps = sorted(lrs, key=lambda t: parse_lr(t, nbeta), reverse=True)
    if not math.isfinite(lambda_max):
        return steps
    stable = [t for t in steps if parse_lr(t, nbeta) * nbeta * lambda_max < STABLE_STEP]
    c = parse_lr(steps[-1], nbeta) * nbeta
    while len(stable) < len(steps):
        c /= 3
        if c * lambda_max < STABLE_STEP:
            stable.append(f"{c:.2g}/nbeta")
    return stable


def recommend(table: pd.DataFrame, nbetas: list[str], localizations: list[str]):
    """Index of the recommended row, or None (see the module docstring)."""
    for nb in nbetas:
        at_nb = table[table.nbeta_option == nb]
        for loc in _weakest_first(at_nb, localizations):
            group = at_nb[at_nb.localization_option == loc]
            if not group.healthy.all():
                continue
            plateau = bottom_plateau(group)
            if len(plateau):
                return plateau.index[-1]
    return None


def bottom_plateau(group: pd.DataFrame) -> pd.DataFrame:
    """The steps of one localization, smallest first, that agree with their next larger step, up to the first
    that does not: the plateau the smallest steps reach. A larger pair that agrees while a smaller step falls
    away is not a plateau (the demo's MLP at gamma 1: 51 and 50 at 0.1 and 0.03 / nbeta, 43 at 0.01)."""
    ordered = group.sort_values("lr")
    agreeing = ordered.agrees_with_larger_step.astype(bool)
    return ordered[agreeing.cumprod().astype(bool)]

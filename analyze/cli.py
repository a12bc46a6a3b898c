"""`analyze CKPT_DIR`: run estimators over every checkpoint, resumably, on dask; see `analyze --help`.

Options are parsed in analyze/options.py; here the run itself: catalog, plan, execution, summary, report.
"""

from __future__ import annotations

import sys
from pathlib import Path

from analyze.options import PROG, Settings, UsageError, parse_args  # noqa: F401  (UsageError, parse_args: the API's)
from analyze.summary import AnalysisResult
from common import budget
from common.checks import one_line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["calibrate"]:
        from analyze.llc.calibrate_command import main as calibrate_main

        return calibrate_main(argv[1:])
    from analyze.runner import SchedulerLost

    debug = "--debug" in argv  # tracebacks only on request: one line per problem otherwise
    try:
        settings = parse_args(argv)
        if isinstance(settings, str):
            print(settings, end="")
            return 0
        return run(settings)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output folder cannot be written (full disk, permissions): one line naming the file
        _traceback(debug)
        print(f"{PROG}: error: {e}; finished tasks are kept", file=sys.stderr)
        return 1
    except SchedulerLost as e:
        _traceback(debug)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        _traceback(debug)
        done = f" ({e})" if str(e) else ""
        print(f"\n{PROG}: interrupted; rerun to resume{done}; finished tasks are kept", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a problem with the input: still one line, the traceback on request
        _traceback(debug)
        print(f"{PROG}: error: internal error: {type(e).__name__}: {one_line(e)}"
              + ("" if debug else " (rerun with --debug for the traceback)"), file=sys.stderr)
        return 1


def _traceback(debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc()


def check_out(out: Path, ckpt_dir: Path, runs) -> None:
    """Refuse an output folder that is the checkpoint folder or one of its runs (tables would mix with runs)."""
    target = out.resolve()
    forbidden = {ckpt_dir.resolve(): "CKPT_DIR itself"} | {run.path.resolve(): f"run {run.name}'s folder" for run in runs}
    if target in forbidden:
        raise UsageError(f"--out {out}: is {forbidden[target]}; choose a folder of its own (default: CKPT_DIR/analysis)")
    if (target / "run.json").exists():
        raise UsageError(f"--out {out}: holds a run.json (a run folder); choose a folder of its own")


def run(s: Settings) -> int:
    return execute_settings(s).exit_code


def execute_settings(s: Settings) -> AnalysisResult:
    """Analyse what the settings select, print the summary, and return it (raises UsageError)."""
    from analyze.catalog import build_catalog
    from analyze.store import Store
    from common.atomic import folder_lock

    catalog = build_catalog(s.ckpt_dir, runs=s.runs, epochs=s.epochs)
    _print_warnings(catalog.warnings)
    if not catalog.runs:
        raise UsageError(f"CKPT_DIR {s.ckpt_dir}: no runs found (folders with a valid run.json)")
    if not catalog.selected:
        raise UsageError(f"--runs {s.runs!r}: matches none of the runs in {s.ckpt_dir} "
                         f"({', '.join(r.name for r in catalog.runs)})")
    if not catalog.checkpoints:
        raise UsageError(f"--epochs {s.epochs.text!r}: selects no checkpoint" if s.epochs.text != "all"
                         else f"CKPT_DIR {s.ckpt_dir}: the selected runs have no checkpoint files")
    check_out(s.out, s.ckpt_dir, catalog.runs)
    store = Store(s.out)
    store.root.mkdir(parents=True, exist_ok=True)

    def waiting(holder: str) -> None:
        print(f"{PROG}: waiting for another analyze writing to {store.root} ({holder or 'holder unknown'}) to finish; "
              "its finished tasks will be skipped", file=sys.stderr)

    def unsupported(message: str) -> None:
        print(f"{PROG}: warning: {message}", file=sys.stderr)

    # One analyze per output folder: the lock is held for the whole run and dies with the process.
    with folder_lock(store.lock_path, wait=True, on_wait=waiting, on_unsupported=unsupported):
        return _run_locked(s, catalog, store)


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)


def _run_locked(s: Settings, catalog, store) -> AnalysisResult:
    from analyze.catalog import runs_frame, training_log
    from analyze.runner import execute, plan_tasks
    from analyze.scheduler import SchedulerError
    from analyze.summary import last_estimates, llc_health_note, summarize

    log_warnings: list[str] = []
    training = training_log(catalog.runs, log_warnings)
    _print_warnings(log_warnings)
    store.remove_stale_temp_files()
    store.write_run_tables(runs_frame(catalog.runs), training)
    plan = plan_tasks(catalog, s.estimators, store, force=s.force, device=s.device, data_root=s.data_root,
                      max_memory=budget.cap_bytes(s.max_memory_gb))
    superseded = store.remove_superseded({(str(t.checkpoint.path), t.estimator, t.config_hash): t.key
                                          for t in plan.todo + plan.done})
    if superseded:
        print(f"{PROG}: dropped the output of {superseded} earlier task(s) on checkpoint files rewritten since",
              file=sys.stderr)
    print(f"{PROG}: {len(catalog.checkpoints)} checkpoint(s) of {len(catalog.selected)} run(s) x "
          f"{len(s.estimators)} estimator(s): {len(plan.todo)} task(s) to compute, {len(plan.done)} already complete",
          file=sys.stderr)
    try:
        statuses = execute(plan.todo, scheduler=s.scheduler, workers=s.workers, debug=s.debug)
    except OSError as e:  # includes the connection errors of a scheduler that is not there
        if s.scheduler:
            raise UsageError(f"--scheduler {s.scheduler}: cannot connect ({e})") from None
        raise
    except SchedulerError as e:  # no dask scheduler answers there (runner.dask_client's probe)
        raise UsageError(str(e)) from None
    post_ok = post_process(s, store) if s.report else True
    rows = summarize(catalog, plan, statuses)
    estimates = last_estimates(store)
    for row in rows:
        row["last_estimates"] = estimates.get(row["run"], "")
    failures = [st for st in statuses if not st["ok"]]
    report = (s.report_path or store.root / "report.html").resolve() if s.report and post_ok else None
    result = AnalysisResult(out=store.root.resolve(), report=report, runs=rows, failures=failures,
                            tables=store.tables(), exit_code=1 if failures or not post_ok else 0)
    print(result.summary_text())
    note = llc_health_note(store)
    if note:
        print(f"{PROG}: warning: {note}", file=sys.stderr)
    if report:
        print(f"report: {report}")
    if failures:
        for st in failures[:5]:
            print(f"  {st['run']} epoch {st['epoch']} step {st['step']} {st['estimator']}: "
                  f"{st['error']}: {st['message'].splitlines()[0] if st['message'] else ''}", file=sys.stderr)
        if len(failures) > 5:
            print(f"  ... and {len(failures) - 5} more", file=sys.stderr)
        print(f"{PROG}: {len(failures)} task(s) failed; see {store.root / 'errors'}", file=sys.stderr)
    return result


def post_process(s: Settings, store) -> bool:
    """Cross-correlations over the finished tables, then the HTML report (also after partial failures)."""
    from analyze.report import write_report
    from analyze.xcorr import write_xcorr

    try:
        write_xcorr(store.root, max_lag=s.xcorr_max_lag)
        write_report(store.root, path=s.report_path, ckpt_dir=s.ckpt_dir)
        return True
    except Exception as e:  # a report problem must not hide the tables, which are complete on disk
        print(f"{PROG}: error: report/xcorr failed ({type(e).__name__}: {e}); the tables are complete; "
              f"rerun with --no-report to skip it", file=sys.stderr)
        return False


if __name__ == "__main__":
    sys.exit(main())

"""Offline analysis of training checkpoints (see analyze.cli, `analyze --help`).

    import analyze
    result = analyze.run("ckpts", estimators=["evaluate", "llc"], llc={"chains": 2})   # `analyze ckpts ...`
    tables = analyze.load("ckpts/analysis")   # {"evaluate": DataFrame, "weights": ..., "epochs": ...}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable


def run(ckpt_dir: str | Path, estimators: str | Iterable[str] | None = None, *, config: str | Path | None = None,
        **options: Any):
    """Analyse the checkpoints in `ckpt_dir` as `analyze CKPT_DIR` does, with the same options and defaults.

    `estimators` is what `--estimators` takes, as a list or comma-separated text (default: evaluate,
    weights; "all" for every one); `config` is a config file as for `--config`. Every other option is a
    flag without its dashes and overrides the file: `out`, `runs`, `epochs` (text as for the flag, or a
    list), `scheduler`, `workers`, `force`, `device`, `data_root`, `report`, `report_path`,
    `xcorr_max_lag`; an estimator's options either as a section, `llc={"chains": 2, "draws": 200}` (as
    in a config file), or by their flag's name, `llc_chains=2`.

    Prints the progress bar (a widget in Jupyter) and the command's summary, and returns an
    `AnalysisResult`: `out`, `report`, per-run `summary` (a DataFrame), `failures`, `ok`, and `load()`
    for the tables. A failed task does not raise (it is a row in the errors table and in `failures`, as
    the command goes on and exits 1); bad options raise `analyze.cli.UsageError` (a ValueError) with the
    message the flag gives.
    """
    from analyze.cli import UsageError, execute_settings, parse_args

    if "help" in options:
        raise UsageError("help: see help(analyze.run) and `analyze --help`")
    argv = [str(ckpt_dir)] + (["--config", str(config)] if config is not None else [])
    settings = parse_args(argv, {**options, "estimators": estimators})  # the command's parsing and checks
    return execute_settings(settings)


def load(path):
    """The tables of an analysis folder as pandas DataFrames, one per table, plus an `epochs` frame
    joining the training logs with per-epoch estimates (eval_train_loss, eval_val_acc, llc_mean, ...).

    The result is a dict; in a notebook it shows a summary of its tables, runs, epochs and estimator
    settings (also `print(tables)`, or `tables.summary()` as a DataFrame)."""
    from analyze.tables import load as _load  # imported on use: `import analyze` stays fast

    return _load(path)

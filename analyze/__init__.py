"""Offline analysis of training checkpoints (see analyze.cli, `analyze --help`).

    import analyze
    tables = analyze.load("ckpts/analysis")   # {"evaluate": DataFrame, "weights": ..., "epochs": ...}
"""

from __future__ import annotations


def load(path):
    """The tables of an analysis folder as pandas DataFrames, one per table, plus an `epochs` frame
    joining the training logs with per-epoch estimates (eval_train_loss, eval_val_acc, llc_mean, ...)."""
    from analyze.tables import load as _load  # imported on use: `import analyze` stays fast

    return _load(path)

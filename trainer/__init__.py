"""Training with per-epoch checkpoints (see trainer.cli, `train-ckpts --help`).

    import trainer
    result = trainer.train(out="ckpts", hidden_nodes=[16], hidden_layers=[1], cut_off_epochs=3, num_epochs=6)
    result.runs          # {"ffnn-1x16-trunk": "complete", ...}
    result.checkpoints   # {"ffnn-1x16-trunk": [Path(".../epoch-0000.safetensors"), ...], ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    """What `train` wrote: the output folder, each run's status and checkpoint files, and the config used."""

    out: Path
    runs: dict[str, str]  # run name -> "complete", "diverged" or "skipped" (a branch whose trunk did not complete)
    checkpoints: dict[str, list[Path]] = field(repr=False)  # run name -> checkpoint files in training order
    config: Any = field(repr=False)  # the validated trainer.config.TrainConfig

    @property
    def ok(self) -> bool:
        """Every run complete (what `train-ckpts` reports with exit status 0)."""
        return all(status == "complete" for status in self.runs.values())

    def __repr__(self) -> str:
        lines = [f"TrainResult: {len(self.runs)} run(s) in {self.out}/"]
        for run, status in self.runs.items():
            files = self.checkpoints.get(run, [])
            lines.append(f"  {run:<28} {status:<9} {len(files)} checkpoint(s)")
        lines.append(f"next: analyze.run({str(self.out)!r})" if self.ok else "some runs did not complete")
        return "\n".join(lines)


def train(config: str | Path | None = None, **options: Any) -> TrainResult:
    """Train the runs `train-ckpts` would train, with the same options and defaults; returns what it wrote.

    `config` is a config file as for `--config` (JSON, TOML, or the study's args file); each keyword
    argument is a flag without its dashes (`--hidden-nodes 32 64` is `hidden_nodes=[32, 64]`,
    `--no-bias` is `bias=False`) and overrides the file. Bad options raise `trainer.config.ConfigError`
    with the message the flag gives; an existing run raises `RunExistsError` unless `resume=True` or
    `overwrite=True`. Progress bars are tqdm's (widgets in Jupyter, text in a terminal; `quiet=True`
    turns them off); one line per epoch is printed.

    Example: `train(out="ckpts", hidden_nodes=[16], hidden_layers=[1], cut_off_epochs=3, num_epochs=6)`.
    """
    from trainer.checkpoints import list_checkpoints
    from trainer.config import config_with_options
    from trainer.experiment import run_experiment

    cfg = config_with_options(config, options)  # the same parsing and validation as train-ckpts's flags
    statuses = run_experiment(cfg)
    out = Path(cfg.out)
    checkpoints = {run: [p for _, _, p in list_checkpoints(out / run)] if (out / run).is_dir() else []
                   for run in statuses}
    return TrainResult(out=out, runs=statuses, checkpoints=checkpoints, config=cfg)

"""`train-ckpts`: train the study's networks with SGD and NGD and write one checkpoint per epoch.

Flags mirror the config keys with dashes; they override a --config file (JSON, TOML, or the study's
args file: a JSON list of [hyperparameters, data args, sampler args]).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings

from trainer.config import FIELDS, ConfigError, TrainConfig, config_with_options

EPILOG = """examples:
  train-ckpts                                   the default swap study on scikit-learn's digits
  train-ckpts --dataset digits --model-type ffnn --hidden-nodes 32 64 --hidden-layers 2 2 \\
              --experiment-type swap --optimizer both --cut-off-epochs 2 --num-epochs 4 --seed 1
  train-ckpts --config args_ngd_sgd.json --data-root ~/data   the study's args file

output: OUT/<run>/run.json, epoch-NNNN.safetensors (0 = initial weights), steps.parquet,
        epochs.parquet, resume.safetensors. Runs are named <model>-<optimizer> (standard) or
        <model>-trunk / <model>-swap-sgd / <model>-swap-ngd (swap)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train-ckpts", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--config", metavar="FILE", help="JSON/TOML config or the study's args file; flags override it")
    groups = {name: parser.add_argument_group(name) for name in
              ("data", "teacher dataset", "model", "experiment", "optimizers", "run")}
    group_of = {"dataset": "data", "teacher_task": "teacher dataset", "model_type": "model",
                "experiment_type": "experiment", "sgd_lr": "optimizers", "seed": "run"}
    group = groups["data"]
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("help") is None:
            continue
        group = groups.get(group_of.get(f.name), None) or group
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default if default != [] else 'none'})"
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            item = str if f.name == "layers" else int
            group.add_argument(flag, nargs="+", type=item, metavar="X", **kw)
        elif default is None:  # optional integers
            group.add_argument(flag, type=int, metavar="N", **kw)
        else:
            group.add_argument(flag, type=type(default), metavar=type(default).__name__.upper(), **kw)
    return parser


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    assert set(args) <= set(FIELDS)
    return config_with_options(config_file, args, typed=True)  # flags override the file


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = lambda msg, cat, *a, **k: f"train-ckpts: warning: {msg}\n"
    from trainer.checkpoints import CheckpointError
    from trainer.data import DataError
    from trainer.experiment import RunExistsError, run_experiment

    try:
        cfg = config_from_args(argv)
        statuses = run_experiment(cfg)
    except (ConfigError, DataError, RunExistsError, CheckpointError) as e:
        print(f"train-ckpts: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a file-size limit while writing: the file being written is dropped
        print(f"train-ckpts: error: {e}; complete epochs are kept (continue with --resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train-ckpts: interrupted; complete epochs are kept (continue with --resume)", file=sys.stderr)
        return 130
    bad = {run: s for run, s in statuses.items() if s != "complete"}
    print(f"checkpoints of {len(statuses)} run(s) in {cfg.out}/" +
          (f"; not complete: {', '.join(f'{r} ({s})' for r, s in bad.items())}" if bad else
           f"; next: analyze {cfg.out}"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

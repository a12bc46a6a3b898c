"""The estimator interface: a small object with options, a config to hash, and one `run` method.

    class MyEstimator(Estimator):
        name = "my"                                  # used in --estimators and as --my-<option>
        tables = ("my_table",)                       # tables it writes rows to
        options = (Option("probes", int, 10, "number of probes"),)
        def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
            return {"my_table": pd.DataFrame({"value": [...]})}

The runner adds the key columns (run, optimizer, epoch, step, ckpt_hash, config_hash) to every table,
so `run` returns only the estimator's own columns. Estimators hold no global state: everything that
changes the result is an option, and options go into `config()`, which is hashed into the task key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import pandas as pd
import torch

from analyze.catalog import CheckpointInfo


class EstimatorError(ValueError):
    """Bad estimator name or option; the message names it."""


@dataclass(frozen=True)
class Option:
    name: str  # snake_case; the CLI flag is --<estimator>-<name with dashes>
    type: type  # int, float, str or bool
    default: Any
    help: str
    choices: tuple | None = None

    def parse(self, value: Any, owner: str) -> Any:
        """Convert a CLI string or config value, with a one-line error naming --<owner>-<option>."""
        flag = f"--{owner}-{self.name.replace('_', '-')}"
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("1", "true", "yes")
            elif self.type is float and isinstance(value, str):
                value = float(value)
            elif self.type is int and isinstance(value, str):
                value = int(value)
            elif self.type is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif self.type is str and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = repr(value)  # a config file's `sigma = 5` for a text option such as "5" or "median"
            if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
                raise ValueError(value)
        except ValueError:
            raise EstimatorError(f"{flag}: {value!r} is not a valid {self.type.__name__}") from None
        if self.choices is not None and value not in self.choices:
            raise EstimatorError(f"{flag}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        return value


@dataclass
class Context:
    """What an estimator gets for one checkpoint; built by the runner on the worker."""

    model: torch.nn.Module  # rebuilt from the checkpoint, in eval mode, on `device`
    checkpoint: CheckpointInfo
    device: torch.device
    splits: Any = None  # trainer.data.Splits (None for data-free estimators)
    loss_fn: Callable | None = None  # mean negative log-likelihood for the data's task
    per_sample_loss: Callable | None = None  # the same, reduction "none"


class Estimator:
    name: ClassVar[str]
    tables: ClassVar[tuple[str, ...]]
    options: ClassVar[tuple[Option, ...]] = ()
    needs_data: ClassVar[bool] = True
    version: ClassVar[int] = 1  # bump when a code change alters results: it invalidates cached parts

    def __init__(self, **values: Any):
        known = {o.name: o for o in self.options}
        unknown = sorted(set(values) - set(known))
        if unknown:
            flags = ", ".join(f"--{self.name}-{u.replace('_', '-')}" for u in unknown)
            raise EstimatorError(f"estimator {self.name!r} has no option {flags}")
        self.opts = {name: (o.parse(values[name], self.name) if name in values else o.default)
                     for name, o in known.items()}
        self.validate()

    def validate(self) -> None:
        """Check option combinations; raise EstimatorError naming the option."""

    def config(self) -> dict[str, Any]:
        return {"estimator": self.name, "version": self.version, **self.opts}

    def run(self, ctx: Context) -> dict[str, pd.DataFrame]:
        raise NotImplementedError

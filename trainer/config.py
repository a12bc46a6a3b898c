"""Training configuration: one dataclass, loaded from JSON/TOML (or the study's args file) and CLI flags.

Precedence: dataclass defaults < config file < command-line flags. Every field has a help text that
`train-ckpts --help` shows, so the dataclass is the single source of truth for options.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.budget import DEFAULT_GB
from common.checks import one_line
from common.files import read_text


class ConfigError(ValueError):
    """A bad configuration value or file; the message names the key or file."""


DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "teacher")
MODEL_TYPES = ("ffnn", "dlnn", "cnn", "layers")
EXPERIMENTS = ("standard", "swap")
OPTIMIZERS = ("sgd", "ngd", "both")
NGD_REFRESH = ("exact", "subspace")  # trainer.optim.ngd.REFRESH_MODES (this module does not import torch)


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _list_opt(default: list, help: str, **kw):
    return field(default_factory=lambda: list(default), metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- data
    dataset: str = _opt("digits", "dataset: " + ", ".join(DATASETS))
    data_root: str = _opt("data", "folder with torchvision-layout datasets (mnist, fashion-mnist, cifar10); "
                                  "fashion-mnist is also read from Debian's package dataset-fashion-mnist")
    val_fraction: float = _opt(0.15, "fraction of the training pool held out for validation")
    test_fraction: float = _opt(0.2, "fraction held out for test (digits and teacher; torchvision sets use their test split)")
    data_seed: int | None = _opt(None, "seed of the train/val/test split (none: use --seed)")
    train_samples: int = _opt(0, "train on the first N training samples only (0 = all): quick runs on large datasets")
    batch_size: int = _opt(32, "minibatch size")
    num_workers: int = _opt(0, "accepted for the study's args files; unused (every dataset is held in memory as tensors)")
    # --- teacher (synthetic) dataset
    teacher_task: str = _opt("classification", "teacher dataset: classification or regression")
    teacher_samples: int = _opt(2000, "teacher dataset: number of samples (all splits)")
    teacher_input_dim: int = _opt(10, "teacher dataset: input dimension (inputs are N(0, I))")
    teacher_outputs: int = _opt(3, "teacher dataset: classes (classification) or target dimension (regression)")
    teacher_noise_sigma: float = _opt(0.1, "teacher regression: std of the Gaussian target noise (recorded; the loss uses it)")
    teacher_model_type: str = _opt("ffnn", "teacher net type: ffnn or dlnn")
    teacher_hidden_nodes: int = _opt(8, "teacher net hidden width")
    teacher_hidden_layers: int = _opt(1, "teacher net hidden layers (0 = linear map)")
    teacher_bias: bool = _opt(True, "teacher net has bias vectors")
    teacher_rank: int | None = _opt(None, "teacher dlnn (or linear map): rank of its input-output matrix; its layers are "
                                          "then orthogonal, the first truncated to this rank (none: the default random init)")
    truth_checkpoint: bool = _opt(False, "teacher dataset: also write the teacher's own weights as run <model>-truth "
                                         "(epoch 0), to estimate the LLC at the true parameter; needs the teacher to "
                                         "have the student's architecture")
    # --- model
    model_type: str = _opt("ffnn", "model: " + ", ".join(MODEL_TYPES))
    hidden_nodes: list[int] = _list_opt([32], "hidden width per model (ffnn/dlnn); paired with --hidden-layers")
    hidden_layers: list[int] = _list_opt([2], "hidden depth per model (ffnn/dlnn); paired with --hidden-nodes")
    hidden_conv_layers: list[int] = _list_opt([1], "extra 6->6 conv layers per LeNet model (cnn)")
    bias: bool = _opt(True, "ffnn/dlnn: bias vectors in every layer (--no-bias: none, as in the deep linear "
                            "network theory)")
    layers: list[str] = _list_opt([], "Keras-like layer list for model_type=layers, e.g. conv2d:16:3:1:1:relu flatten dropout:0.4 dense:500:relu dense:10")
    # --- experiment
    experiment_type: str = _opt("swap", "standard (each optimizer from the same init) or swap (SGD to the cut-off, then SGD and NGD branches)")
    optimizer: str = _opt("both", "sgd, ngd or both (swap needs both)")
    cut_off_epochs: int = _opt(10, "swap: epoch at which the SGD trunk branches")
    num_epochs: int = _opt(20, "total training epochs")
    ckpt_every_steps: int = _opt(0, "also checkpoint every K optimizer steps (0 = only at epoch ends)")
    # --- optimizers
    sgd_lr: float = _opt(0.01, "SGD learning rate")
    ngd_lr: float = _opt(0.01, "NGD learning rate")
    alpha: float = _opt(0.1, "NGD smoothing of the Fisher estimate (F + alpha tr(F)/d I)")
    eta: float = _opt(0.9, "NGD forgetting factor: F_t = eta S_t + (1 - eta) F_{t-1}")
    epsilon: float = _opt(1e-10, "NGD absolute eigenvalue floor")
    delta: float = _opt(5e-4, "NGD eigenvalue floor relative to the largest eigenvalue")
    ngd_refresh: str = _opt("exact", "how NGD refreshes its Fisher estimates: exact (full eigendecomposition, the "
                                     "algorithm's definition) or subspace (approximate: subspace iteration from the "
                                     "previous estimate, cheaper on wide layers; see docs/training.md)")
    momentum: float = _opt(0.9, "momentum of SGD and NGD")
    nesterov: bool = _opt(True, "Nesterov momentum for SGD and NGD")
    # --- run
    seed: int = _opt(1, "seed of the initial weights and batch order")
    device: str = _opt("cpu", "torch device: cpu or cuda")
    out: str = _opt("ckpts", "output folder; one sub-folder per run")
    overwrite: bool = _opt(False, "replace existing runs of the same name")
    resume: bool = _opt(False, "continue interrupted runs from their last complete epoch")
    quiet: bool = _opt(False, "no progress bars")
    max_memory_gb: float = _opt(DEFAULT_GB, "memory cap (GB) for the models and the teacher dataset the options ask "
                                            "for, checked before anything is allocated")
    jobs: int = _opt(1, "runs trained at once, each in its own process with cores/jobs threads: the two branches "
                        "of a swap after the trunk, the runs of a standard experiment (results are the same as with 1)")
    # Keys of the study's args file that belong to the analysis; kept in run.json, unused here.
    analysis_args: dict[str, Any] = field(default_factory=dict, metadata={"help": None})

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        def fail(key: str, why: str):
            raise ConfigError(f"invalid value for '{key}': {why}")

        def choice(key, allowed):
            if getattr(self, key) not in allowed:
                fail(key, f"{getattr(self, key)!r} is not one of {', '.join(allowed)}")

        choice("dataset", DATASETS)
        choice("model_type", MODEL_TYPES)
        choice("experiment_type", EXPERIMENTS)
        choice("optimizer", OPTIMIZERS)
        choice("ngd_refresh", NGD_REFRESH)
        choice("teacher_task", ("classification", "regression"))
        choice("teacher_model_type", ("ffnn", "dlnn"))
        for key in ("batch_size", "num_epochs", "teacher_samples", "teacher_input_dim", "teacher_outputs"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                fail(key, f"{getattr(self, key)!r} must be a positive integer")
        for key in ("sgd_lr", "ngd_lr", "teacher_noise_sigma"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                fail(key, f"{v!r} must be a positive number")
        if not isinstance(self.max_memory_gb, (int, float)) or not self.max_memory_gb > 0:
            fail("max_memory_gb", f"{self.max_memory_gb!r} must be a positive number")
        for key in ("alpha", "epsilon", "delta"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                fail(key, f"{v!r} must be a non-negative number")
        for key in ("eta", "momentum"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                fail(key, f"{v!r} must lie in [0, 1]")
        for key in ("val_fraction", "test_fraction"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not 0 <= v < 1:
                fail(key, f"{v!r} must lie in [0, 1)")
        if self.val_fraction + self.test_fraction >= 0.9:
            fail("val_fraction", "val_fraction + test_fraction must leave at least 10% for training")
        if self.teacher_rank is not None:
            if self.teacher_model_type != "dlnn" and self.teacher_hidden_layers != 0:
                fail("teacher_rank", "a rank is defined for a linear teacher: teacher_model_type dlnn, or 0 hidden layers")
            if not 0 <= self.teacher_rank <= min(self.teacher_input_dim, self.teacher_outputs,
                                                 *([self.teacher_hidden_nodes] if self.teacher_hidden_layers else [])):
                fail("teacher_rank", f"{self.teacher_rank} must lie between 0 and the teacher's smallest width")
        if self.truth_checkpoint:
            if self.dataset != "teacher":
                fail("truth_checkpoint", "needs the teacher dataset")
            student = (self.model_type, self.hidden_nodes, self.hidden_layers, self.bias)
            teacher = (self.teacher_model_type, [self.teacher_hidden_nodes], [self.teacher_hidden_layers], self.teacher_bias)
            if student != teacher:
                fail("truth_checkpoint", f"the student {student} must have the teacher's architecture {teacher} "
                                         "(type, hidden nodes, hidden layers, bias)")
        if not isinstance(self.train_samples, int) or self.train_samples < 0:
            fail("train_samples", f"{self.train_samples!r} must be a non-negative integer (0 = all)")
        if self.ckpt_every_steps < 0:
            fail("ckpt_every_steps", "must be >= 0")
        if self.model_type in ("ffnn", "dlnn"):
            if len(self.hidden_nodes) != len(self.hidden_layers):
                fail("hidden_nodes", f"{len(self.hidden_nodes)} widths but {len(self.hidden_layers)} depths "
                     "(hidden_nodes and hidden_layers are paired, one model per pair)")
            if not self.hidden_nodes or any(not isinstance(h, int) or h < 1 for h in self.hidden_nodes):
                fail("hidden_nodes", f"{self.hidden_nodes!r} must be positive integers")
            if any(not isinstance(h, int) or h < 0 for h in self.hidden_layers):
                fail("hidden_layers", f"{self.hidden_layers!r} must be non-negative integers")
        if self.model_type == "cnn" and (not self.hidden_conv_layers
                                         or any(not isinstance(h, int) or h < 0 for h in self.hidden_conv_layers)):
            fail("hidden_conv_layers", f"{self.hidden_conv_layers!r} must be non-negative integers")
        if self.model_type == "layers":
            if not self.layers:
                fail("layers", "model_type 'layers' needs a non-empty layer list")
            from trainer.models import parse_layer  # validates each entry with a message naming it
            for entry in self.layers:
                try:
                    parse_layer(entry)
                except ValueError as e:
                    fail("layers", str(e))
        if self.experiment_type == "swap":
            if self.optimizer != "both":
                fail("optimizer", "a swap experiment trains both optimizers; use optimizer 'both'")
            if not 0 < self.cut_off_epochs < self.num_epochs:
                fail("cut_off_epochs", f"{self.cut_off_epochs} must lie strictly between 0 and num_epochs={self.num_epochs}")
        if self.jobs < 1:
            fail("jobs", f"{self.jobs} must be at least 1")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            fail("device", f"{self.device!r} is not cpu or cuda[:N]")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def split_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# Keys of the study's args file (and its analysis section) that this trainer does not use for training.
ANALYSIS_KEYS = {"hessian", "num_hessian_batches", "sampler", "num_chains", "num_draws", "localization",
                 "sampler_lr", "num_burnin_steps", "nbeta"}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON/TOML config, or the study's args file (a JSON list of three objects), into a flat dict."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = read_text(path)  # a regular file of bounded size: a FIFO or /dev/zero would hang or exhaust memory
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot read ({getattr(e, 'strerror', None) or one_line(e)})") from None
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from None
    if isinstance(raw, list):  # the study's format: [hyperparameters, data args, sampler args]
        if not all(isinstance(part, dict) for part in raw):
            raise ConfigError(f"{path}: a list config must hold objects (hyperparameters, data args, sampler args)")
        flat: dict[str, Any] = {}
        for part in raw:
            flat.update(part)
        return flat
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be an object (or the study's list of three objects)")
    return raw


def _coerce(name: str, value: Any) -> Any:
    """Check a file value's type against the field's (JSON ints are fine where floats are expected)."""
    f = FIELDS[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if default is None:  # optional integers (data_seed, teacher_rank)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"invalid value for '{name}': {value!r} must be an integer")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"invalid value for '{name}': {value!r} must be true or false")
    elif isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"invalid value for '{name}': {value!r} must be an integer")
    elif isinstance(default, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"invalid value for '{name}': {value!r} must be a number")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"invalid value for '{name}': {value!r} must be a string")
    elif isinstance(default, list):
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            value = [value]  # a single width/depth is a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"invalid value for '{name}': {value!r} must be a list")
        # the items too, as the flag types them: text layers, integer widths and depths
        item_ok, kind = ((lambda v: isinstance(v, str)), "text") if name == "layers" else \
            ((lambda v: isinstance(v, int) and not isinstance(v, bool)), "integers")
        if not all(item_ok(v) for v in value):
            raise ConfigError(f"invalid value for '{name}': {value!r} must be a list of {kind}")
    return value


# The study called its MLP "dnn" in prose and "ffnn" in code; accept both spellings.
_ALIASES = {"model_type": {"dnn": "ffnn"}, "dataset": {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}}


def config_with_options(config_file: str | Path | None, options: dict[str, Any], *, typed: bool = False) -> TrainConfig:
    """The validated config of a config file (or none) with `options` overriding it, as flags do.

    `train-ckpts` passes its parsed flags (argparse has typed them); `trainer.train` passes its keyword
    arguments with typed=False, which checks them as config-file values are checked, so both interfaces
    accept the same options and reject bad values with the same one-line messages.
    """
    values = read_config_file(config_file) if config_file else {}
    try:
        cfg = config_from_dict(values, source="config file")
    except ConfigError as e:  # a value of the wrong type in the file: say which file
        raise ConfigError(f"{config_file}: {e}") from None
    for key, value in options.items():
        name = key.replace("-", "_")
        if name not in FIELDS or name == "analysis_args":
            close = difflib.get_close_matches(name, [f for f in FIELDS if f != "analysis_args"], n=1)
            raise ConfigError(f"unknown option {key!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                           " (train-ckpts --help lists every option)"))
        if not typed:
            value = os.fspath(value) if isinstance(value, os.PathLike) else value  # out=Path(...) is a path too
            value = _coerce(name, value)
            value = _ALIASES[name].get(value, value) if name in _ALIASES else value
        setattr(cfg, name, value)
    return cfg.validate()


def config_from_dict(values: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Build a config from a flat dict; unknown keys give one warning naming them."""
    kwargs: dict[str, Any] = {}
    analysis: dict[str, Any] = {}
    unknown = []
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in ANALYSIS_KEYS:
            analysis[name] = value
        elif name in FIELDS and name != "analysis_args":
            value = _coerce(name, value)
            kwargs[name] = _ALIASES[name].get(value, value) if name in _ALIASES else value
        else:
            unknown.append(key)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown keys: {', '.join(sorted(unknown))}", stacklevel=2)
    cfg = TrainConfig(**kwargs)
    cfg.analysis_args = analysis
    return cfg

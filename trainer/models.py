"""Models, rebuilt from a plain-JSON model spec stored in every checkpoint (never pickled, never eval'd).

Spec: {"type": "ffnn"|"dlnn"|"cnn"|"layers", "input_shape": [C, H, W] or [D], "outputs": K, ...}
  ffnn/dlnn: "hidden_nodes": H, "hidden_layers": L    (dlnn = the same without ReLU: deep linear net)
             optional "bias": false                  (no bias vectors; absent means biases, as before)
  cnn:       "extra_layers": E                         (LeNet-5 with E extra 6->6 5x5 "same" convs)
  layers:    "layers": ["conv2d:16:3:1:1:relu", "flatten", "dropout:0.4", "dense:500:relu", "dense:10"]
Every model outputs logits (or regression values); losses apply the softmax.
Modules are named (fc1, relu1, ..., out) so layer names in the analysis tables are readable.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.checks import is_int

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "none": None, "linear": None}


MAX_DEPTH = 1024  # layers a spec may ask for (a checkpoint's spec is untrusted input)


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The module a spec describes; ValueError (naming the key) for a spec of the wrong shape or types.

    Sizes are not capped: to rebuild an untrusted spec without allocating, build it under
    `with torch.device("meta"):` first (trainer.checkpoints.load_model does).
    """
    builders = {"ffnn": _mlp, "dlnn": _mlp, "cnn": _lenet, "layers": _layer_list}
    validate_spec(spec)
    try:
        return builders[spec["type"]](spec)
    except ValueError:
        raise
    except (RuntimeError, ArithmeticError, TypeError, IndexError) as e:  # torch's shape checks, e.g. a too-small input
        raise ValueError(f"model spec does not give a working model: {str(e).splitlines()[0] if str(e) else e!r}") from None


# Activations are counted for a batch this large: a model is built to be run on batches (the estimators'
# smallest default is 256), so one whose activations for a small batch exceed the memory cap is of no use,
# and its one-sample shape probe, a 64th of that, is refused with it before it allocates.
BUDGET_BATCH = 64


@dataclass(frozen=True)
class ModelSizes:
    """What the model a spec describes holds, from one build on the meta device (nothing allocated)."""
    parameter_bytes: float
    parameter_shapes: list[tuple[int, ...]]
    widest_step: int  # per sample: the largest input plus output of one layer (a forward pass, layer by layer)
    all_outputs: int  # per sample: the input and every layer's output (what a training step keeps for backward)

    def bytes(self, batch: int = BUDGET_BATCH, *, training: bool = False) -> float:
        """The parameters and the float32 activations of a forward pass over `batch` samples; with `training`,
        all of them at once, as a training step keeps them for the backward pass."""
        return self.parameter_bytes + 4.0 * batch * (self.all_outputs if training else self.widest_step)


def model_sizes(spec: dict[str, Any]) -> ModelSizes:
    """The sizes of the model a spec describes. The shape probe the cnn and layer-list builders run is a forward
    pass for one sample (its widest step is counted). ValueError for a spec build_model refuses."""
    with torch.device("meta"):
        model = build_model(spec)
        x = torch.zeros(1, *spec["input_shape"])
        widest, kept = 0, x.numel()
        with torch.no_grad():
            for module in model:
                y = module(x)
                widest = max(widest, x.numel() + y.numel())
                kept += y.numel()
                x = y
    params = sum(float(t.numel()) * t.element_size() for t in model.state_dict().values())
    return ModelSizes(params, [tuple(p.shape) for p in model.parameters()], widest, kept)


def build_bytes(spec: dict[str, Any], batch: int = BUDGET_BATCH, *, training: bool = False) -> float:
    """Memory the model a spec describes takes for a forward pass over `batch` samples (ModelSizes.bytes)."""
    return model_sizes(spec).bytes(batch, training=training)


def parameter_shapes(spec: dict[str, Any]) -> list[tuple[int, ...]]:
    """The shapes of the parameters of the model a spec describes, built on the meta device (nothing allocated)."""
    return model_sizes(spec).parameter_shapes


def validate_spec(spec: Any) -> None:
    """Check a model spec's keys and value types (the builders trust them)."""
    if not isinstance(spec, dict):
        raise ValueError(f"model spec must be an object, not {type(spec).__name__}")
    kind = spec.get("type")
    if kind not in ("ffnn", "dlnn", "cnn", "layers"):
        raise ValueError(f"unknown model type {kind!r} in model spec")

    def integer(key: str, low: int, high: int | None = None) -> int:
        if key not in spec:
            raise ValueError(f"model spec lacks {key!r}")
        v = spec[key]
        if not is_int(v) or v < low or (high is not None and v > high):
            bound = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")
            raise ValueError(f"model spec {key!r} must be {bound}, not {v!r}")
        return v

    shape = spec.get("input_shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 3 or not all(is_int(d) and d >= 1 for d in shape):
        raise ValueError(f"model spec 'input_shape' must be a list of 1 to 3 positive integers, not {shape!r}")
    integer("outputs", 1)
    if kind in ("ffnn", "dlnn"):
        integer("hidden_nodes", 1)
        integer("hidden_layers", 0, MAX_DEPTH)
        if not isinstance(spec.get("bias", True), bool):
            raise ValueError(f"model spec 'bias' must be true or false, not {spec['bias']!r}")
    elif kind == "cnn":
        if len(shape) != 3:
            raise ValueError(f"model spec 'input_shape' of a cnn must be [channels, height, width], not {shape!r}")
        integer("extra_layers", 0, MAX_DEPTH)
    else:
        layers = spec.get("layers")
        if not isinstance(layers, list) or not layers or len(layers) > MAX_DEPTH \
                or not all(isinstance(e, str) for e in layers):
            raise ValueError(f"model spec 'layers' must be a list of 1 to {MAX_DEPTH} layer strings")
        for entry in layers:
            parse_layer(entry)


def model_spec_from_config(cfg, input_shape: tuple[int, ...], outputs: int) -> list[dict[str, Any]]:
    """One spec per model of the study: (hidden_nodes, hidden_layers) pairs, conv depths, or the layer list."""
    base = {"type": cfg.model_type, "input_shape": list(input_shape), "outputs": outputs}
    if cfg.model_type in ("ffnn", "dlnn"):
        # "bias" is written only when false, so specs (and their hashes) of models with biases are unchanged
        no_bias = {} if cfg.bias else {"bias": False}
        return [{**base, "hidden_nodes": h, "hidden_layers": l, **no_bias}
                for h, l in zip(cfg.hidden_nodes, cfg.hidden_layers)]
    if cfg.model_type == "cnn":
        return [{**base, "extra_layers": e} for e in cfg.hidden_conv_layers]
    return [{**base, "layers": list(cfg.layers)}]


def family_name(spec: dict[str, Any]) -> str:
    """Short readable name of a model, used as the prefix of its run names."""
    if spec["type"] in ("ffnn", "dlnn"):
        suffix = "" if spec.get("bias", True) else "-nobias"
        return f"{spec['type']}-{spec['hidden_layers']}x{spec['hidden_nodes']}{suffix}"
    if spec["type"] == "cnn":
        return f"cnn-{spec['extra_layers']}extra"
    return "layers"


def _mlp(spec: dict) -> nn.Module:
    relu = spec["type"] == "ffnn"
    width, depth, bias = int(spec["hidden_nodes"]), int(spec["hidden_layers"]), spec.get("bias", True)
    mods: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    fan_in = math.prod(spec["input_shape"])
    for i in range(1, depth + 1):
        mods[f"fc{i}"] = nn.Linear(fan_in, width, bias=bias)
        if relu:
            mods[f"relu{i}"] = nn.ReLU()
        fan_in = width
    mods["out"] = nn.Linear(fan_in, int(spec["outputs"]), bias=bias)
    return nn.Sequential(mods)


def _lenet(spec: dict) -> nn.Module:
    channels, height, _ = spec["input_shape"]
    # LeNet-5 pads 28x28 inputs to the paper's 32x32; on smaller inputs (8x8 digits) conv2 pads as well
    # so that the feature map stays non-empty.
    pad1 = 2 if height < 32 else 0
    after_pool1 = (height + 2 * pad1 - 4) // 2
    pad2 = 2 if after_pool1 < 10 else 0
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    mods["conv1"] = nn.Conv2d(channels, 6, 5, padding=pad1)
    mods["relu1"] = nn.ReLU()
    for i in range(1, int(spec["extra_layers"]) + 1):
        mods[f"conv1_extra{i}"] = nn.Conv2d(6, 6, 5, padding=2)
        mods[f"relu1_extra{i}"] = nn.ReLU()
    mods["pool1"] = nn.MaxPool2d(2)
    mods["conv2"] = nn.Conv2d(6, 16, 5, padding=pad2)
    mods["relu2"] = nn.ReLU()
    mods["pool2"] = nn.MaxPool2d(2)
    mods["flatten"] = nn.Flatten()
    features = _flat_size(nn.Sequential(mods.copy()), spec["input_shape"])
    mods["fc1"] = nn.Linear(features, 120)
    mods["relu3"] = nn.ReLU()
    mods["fc2"] = nn.Linear(120, 84)
    mods["relu4"] = nn.ReLU()
    mods["out"] = nn.Linear(84, int(spec["outputs"]))
    return nn.Sequential(mods)


def _flat_size(features: nn.Module, input_shape) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *input_shape)).shape[1])


def parse_layer(entry: str) -> tuple[str, list[str]]:
    """Check one Keras-like layer string; return (kind, args). Raises ValueError naming the entry."""
    parts = entry.strip().lower().split(":")
    kind, args = parts[0], parts[1:]
    expected = {"conv2d": (4, 5), "dense": (1, 2), "dropout": (1, 1), "flatten": (0, 0), "maxpool2d": (1, 1)}
    if kind not in expected:
        raise ValueError(f"layer {entry!r}: unknown kind {kind!r} (conv2d, dense, dropout, flatten, maxpool2d)")
    lo, hi = expected[kind]
    if not lo <= len(args) <= hi:
        raise ValueError(f"layer {entry!r}: {kind} takes {lo}-{hi} arguments, e.g. "
                         + {"conv2d": "conv2d:16:3:1:1:relu", "dense": "dense:500:relu", "dropout": "dropout:0.4",
                            "flatten": "flatten", "maxpool2d": "maxpool2d:2"}[kind])
    numeric = args[:-1] if kind in ("conv2d", "dense") and len(args) == hi else args
    try:
        values = [float(a) for a in numeric]
    except ValueError:
        raise ValueError(f"layer {entry!r}: arguments must be numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"layer {entry!r}: arguments must be finite numbers")
    if kind == "dropout" and not 0 <= values[0] < 1:
        raise ValueError(f"layer {entry!r}: dropout probability must lie in [0, 1)")
    if kind != "dropout" and any(v != int(v) or v < 0 for v in values) or (kind in ("dense", "conv2d") and values[0] < 1):
        raise ValueError(f"layer {entry!r}: sizes must be positive integers")
    if kind == "conv2d" and (values[1] < 1 or values[2] < 1) or kind == "maxpool2d" and values[0] < 1:
        raise ValueError(f"layer {entry!r}: kernel sizes and strides must be positive integers")
    if kind in ("conv2d", "dense") and len(args) == hi:
        if args[-1] == "softmax":
            raise ValueError(f"layer {entry!r}: the last layer outputs logits; cross-entropy applies the softmax")
        if args[-1] not in ACTIVATIONS:
            raise ValueError(f"layer {entry!r}: unknown activation {args[-1]!r} ({', '.join(ACTIVATIONS)})")
    return kind, args


def _layer_list(spec: dict) -> nn.Module:
    mods: OrderedDict[str, nn.Module] = OrderedDict()
    counts: dict[str, int] = {}
    shape = list(spec["input_shape"])
    for entry in spec["layers"]:
        kind, args = parse_layer(entry)
        counts[kind] = counts.get(kind, 0) + 1
        name = f"{kind}_{counts[kind]}"
        act = None
        if kind == "conv2d":
            filters, kernel, stride, padding = (int(a) for a in args[:4])
            op = nn.Conv2d(shape[0], filters, kernel, stride=stride, padding=padding)
            act = args[4] if len(args) > 4 else None
        elif kind == "dense":
            if len(shape) != 1:
                raise ValueError(f"layer {entry!r}: input has shape {shape}; put a flatten before it")
            op = nn.Linear(shape[0], int(args[0]))
            act = args[1] if len(args) > 1 else None
        elif kind == "dropout":
            op = nn.Dropout(float(args[0]))
        elif kind == "maxpool2d":
            op = nn.MaxPool2d(int(args[0]))
        else:
            op = nn.Flatten()
        activation = ACTIVATIONS.get(act) if act else None
        mods[name] = nn.Sequential(op, activation()) if activation else op
        with torch.no_grad():
            shape = list(mods[name](torch.zeros(1, *shape)).shape[1:])
    if math.prod(shape) != int(spec["outputs"]) or len(shape) != 1:
        raise ValueError(f"layer list ends with shape {shape}, expected [{spec['outputs']}] outputs "
                         f"(end with e.g. dense:{spec['outputs']})")
    return nn.Sequential(mods)

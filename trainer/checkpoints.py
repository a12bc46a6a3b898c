"""Checkpoint files: safetensors with string metadata; run.json; resume state. Nothing is pickled.

epoch-NNNN.safetensors            state_dict at the end of epoch N (0 = initial weights)
epoch-NNNN-step-SSSSSSSS.safetensors  mid-epoch checkpoint at global step S, during epoch N
metadata (str -> str): format, run, epoch, step, kind, optimizer, model_spec (JSON),
dataset_spec (JSON), train_loss, val_loss
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from trainer.atomic import atomic_write_bytes

FORMAT = "ckpt-dynamics/1"
CKPT_RE = re.compile(r"^epoch-(\d{4,})(?:-step-(\d{8,}))?\.safetensors$")
JSON_FIELDS = ("model_spec", "dataset_spec")
REQUIRED = ("format", "run", "epoch", "step", "optimizer", "model_spec", "dataset_spec")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message starts with the file's path."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    return f"epoch-{epoch:04d}.safetensors" if step is None else f"epoch-{epoch:04d}-step-{step:08d}.safetensors"


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], *, run: str, epoch: int, step: int,
                    optimizer: str, model_spec: dict, dataset_spec: dict, kind: str = "epoch",
                    train_loss: float = math.nan, val_loss: float = math.nan) -> Path:
    meta = {"format": FORMAT, "run": run, "epoch": str(epoch), "step": str(step), "kind": kind,
            "optimizer": optimizer, "model_spec": json.dumps(model_spec, sort_keys=True),
            "dataset_spec": json.dumps(dataset_spec, sort_keys=True),
            "train_loss": repr(float(train_loss)), "val_loss": repr(float(val_loss))}
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    return atomic_write_bytes(path, st_save(tensors, metadata=meta))


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]  # parsed: epoch/step ints, specs dicts, losses floats


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint. Any problem raises CheckpointError naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    try:
        tensors = st_load(data)
        meta = _read_metadata(data)
    except (SafetensorError, ValueError, OverflowError, RuntimeError, KeyError) as e:
        raise CheckpointError(path, f"not a valid safetensors file (truncated or corrupt?): {e}") from None
    return Checkpoint(path, tensors, parse_metadata(path, meta))


def _read_metadata(data: bytes) -> dict[str, str]:
    # safetensors' torch loader drops metadata; the header is 8 bytes of length then JSON.
    if len(data) < 8:
        raise ValueError("file shorter than the safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header length exceeds the file size")
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not an object")
    return meta


def parse_metadata(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(path, f"metadata lacks {', '.join(missing)} (not written by train-ckpts?)")
    if meta["format"] != FORMAT:
        raise CheckpointError(path, f"unsupported checkpoint format {meta['format']!r} (expected {FORMAT})")
    parsed: dict[str, Any] = dict(meta)
    for key in ("epoch", "step"):
        try:
            parsed[key] = int(meta[key])
        except (TypeError, ValueError):
            raise CheckpointError(path, f"metadata '{key}' is not an integer: {meta[key]!r}") from None
        if parsed[key] < 0:
            raise CheckpointError(path, f"metadata '{key}' is negative")
    for key in JSON_FIELDS:
        try:
            parsed[key] = json.loads(meta[key])
        except (TypeError, json.JSONDecodeError):
            raise CheckpointError(path, f"metadata '{key}' is not valid JSON") from None
        if not isinstance(parsed[key], dict):
            raise CheckpointError(path, f"metadata '{key}' is not a JSON object")
    for key in ("train_loss", "val_loss"):
        try:
            parsed[key] = float(meta.get(key, "nan"))
        except ValueError:
            parsed[key] = math.nan
    return parsed


def load_model(path: str | Path, device: str = "cpu"):
    """Rebuild the model a checkpoint describes and load its weights. Returns (model, Checkpoint)."""
    from trainer.models import build_model

    ckpt = read_checkpoint(path)
    try:
        model = build_model(ckpt.meta["model_spec"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(ckpt.path, f"invalid model spec: {e}") from None
    expected = model.state_dict()
    if set(expected) != set(ckpt.tensors):
        extra, lacking = set(ckpt.tensors) - set(expected), set(expected) - set(ckpt.tensors)
        raise CheckpointError(ckpt.path, f"tensors do not match the model spec (unexpected: {sorted(extra)[:3]}, "
                                         f"missing: {sorted(lacking)[:3]})")
    for name, t in ckpt.tensors.items():
        if t.shape != expected[name].shape or t.dtype != expected[name].dtype:
            raise CheckpointError(ckpt.path, f"tensor {name!r} has shape {tuple(t.shape)} {t.dtype}, "
                                             f"the model spec needs {tuple(expected[name].shape)} {expected[name].dtype}")
    model.load_state_dict(ckpt.tensors)
    return model.to(device).eval(), ckpt


# ------------------------------------------------------------------------ optimizer/resume state
def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested optimizer state by references, collecting them for safetensors."""
    if isinstance(obj, torch.Tensor):
        key = prefix.strip(".")
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    return obj


def _key(k):
    return k if isinstance(k, (str, int)) else str(k)


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def save_resume_state(path: Path, *, epoch: int, step: int, optimizer_state: dict) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten_state(optimizer_state, "opt", tensors)
    meta = {"format": FORMAT, "epoch": str(epoch), "step": str(step), "optimizer_state": json.dumps(skeleton)}
    return atomic_write_bytes(path, st_save(tensors, metadata=meta))


def read_resume_state(path: Path) -> tuple[int, int, dict]:
    data = Path(path).read_bytes()
    try:
        tensors, meta = st_load(data), _read_metadata(data)
        return int(meta["epoch"]), int(meta["step"]), unflatten_state(json.loads(meta["optimizer_state"]), tensors)
    except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"invalid resume state: {e}") from None


def list_checkpoints(run_dir: Path) -> list[tuple[int, int | None, Path]]:
    """(epoch, step or None, path) of every checkpoint file in a run folder, in training order."""
    found = []
    for p in Path(run_dir).iterdir():
        m = CKPT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)) if m.group(2) else None, p))
    # mid-epoch checkpoints of epoch N come before the end of epoch N
    return sorted(found, key=lambda t: (t[0], t[1] is None, t[1] or 0))

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
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from common import budget
from common.atomic import atomic_write_bytes
from common.checks import is_foreign_panic, one_line
from common.files import open_regular, read_regular

FORMAT = "ckpt-dynamics/1"
CKPT_RE = re.compile(r"^epoch-([0-9]{4,})(?:-step-([0-9]{8,}))?\.safetensors$")
JSON_FIELDS = ("model_spec", "dataset_spec")
REQUIRED = ("format", "run", "epoch", "step", "optimizer", "model_spec", "dataset_spec")
MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB
# A run name is one plain path component: it names a folder, and must never lead out of one.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@-]{0,199}")


def check_name(name: Any, what: str = "run name") -> str:
    """Return `name` if it is safe as a single folder name (no separators, no `..`, no leading dot)."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} {name!r} is not a plain folder name (letters, digits and ._+=@-, "
                         "not starting with a dot, no path separators or '..')")
    return name


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message starts with the file's path."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # crosses process boundaries (train-ckpts --jobs) intact
        return (CheckpointError, (self.path, self.reason))


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
    return atomic_write_bytes(path, st_bytes(tensors, meta))


def st_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a canonical header: the same tensors and metadata give the same bytes in
    every process. (safetensors writes `__metadata__` in Rust HashMap order, which is randomised per
    process; a resumed run could then never be byte-identical to an uninterrupted one.)"""
    data = st_save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    entries = {"__metadata__": header.pop("__metadata__"), **header}  # tensors keep safetensors' order
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]  # parsed: epoch/step ints, specs dicts, losses floats


def read_checkpoint(path: str | Path, max_bytes: int = budget.DEFAULT_BYTES) -> Checkpoint:
    """Read and validate a checkpoint. Any problem raises CheckpointError naming the file.

    Only the safetensors format and JSON are parsed: nothing is unpickled or evaluated. Only a regular
    file of at most `max_bytes` (the memory cap) is read.
    """
    path = Path(path)
    try:
        data = read_regular(path, max_bytes)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    try:
        meta = _read_metadata(data)
        tensors = st_load(data)
    except Exception as e:  # SafetensorError, KeyError for a dtype torch lacks, MemoryError, ...
        raise CheckpointError(path, f"not a valid safetensors file (truncated or corrupt?): "
                                    f"{type(e).__name__}: {one_line(e)}") from None
    except BaseException as e:
        if not is_foreign_panic(e):
            raise
        raise CheckpointError(path, f"not a valid safetensors file (truncated or corrupt?): "
                                    f"safetensors panicked: {one_line(e)}") from None
    return Checkpoint(path, tensors, parse_metadata(path, meta))


def _header_dict(header_bytes: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors JSON header; ValueError unless it maps strings to strings."""
    try:
        header = json.loads(header_bytes)
    except RecursionError:
        raise ValueError("header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("__metadata__ is not an object of strings")
    return meta


def _read_metadata(data: bytes) -> dict[str, str]:
    # safetensors' torch loader drops metadata; the header is 8 bytes of length then JSON.
    if len(data) < 8:
        raise ValueError("file shorter than the safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER:
        raise ValueError("header length exceeds safetensors' limit")
    if n > len(data) - 8:
        raise ValueError("header length exceeds the file size")
    return _header_dict(data[8:8 + n])


def read_header_metadata(path: str | Path) -> dict[str, Any]:
    """Parsed and validated metadata from a checkpoint's header only (no tensors are read).

    Raises CheckpointError naming the file for any problem, OSError included.
    """
    path = Path(path)
    try:
        with open_regular(path) as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the safetensors header")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER:
                raise ValueError("header length exceeds safetensors' limit")
            header = f.read(n)
            if len(header) < n:
                raise ValueError("header length exceeds the file size")
        meta = _header_dict(header)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(path, f"not a valid safetensors file (truncated or corrupt?): {one_line(e)}") from None
    return parse_metadata(path, meta)


def parse_metadata(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(path, f"metadata lacks {', '.join(missing)} (not written by train-ckpts?)")
    if meta["format"] != FORMAT:
        raise CheckpointError(path, f"unsupported checkpoint format {str(meta['format'])[:40]!r} (expected {FORMAT})")
    parsed: dict[str, Any] = dict(meta)
    for key in ("epoch", "step"):
        value = meta[key]
        if not isinstance(value, str) or not re.fullmatch(r"-?[0-9]{1,18}", value):
            raise CheckpointError(path, f"metadata '{key}' is not an integer: {str(value)[:40]!r}")
        parsed[key] = int(value)
        if parsed[key] < 0:
            raise CheckpointError(path, f"metadata '{key}' is negative")
    for key in ("run", "optimizer"):
        if not isinstance(meta[key], str):
            raise CheckpointError(path, f"metadata '{key}' is not a string")
    try:
        check_name(meta["run"])
    except ValueError as e:
        raise CheckpointError(path, f"metadata 'run': {e}") from None
    for key in JSON_FIELDS:
        try:
            parsed[key] = json.loads(meta[key])
        except (TypeError, ValueError, RecursionError):  # JSONDecodeError, too many digits, too deep
            raise CheckpointError(path, f"metadata '{key}' is not valid JSON") from None
        if not isinstance(parsed[key], dict):
            raise CheckpointError(path, f"metadata '{key}' is not a JSON object")
    for key in ("train_loss", "val_loss"):
        try:
            parsed[key] = float(meta.get(key, "nan"))
        except (TypeError, ValueError):
            parsed[key] = math.nan
    return parsed


def load_model(path: str | Path, device: str = "cpu", max_bytes: int = budget.DEFAULT_BYTES):
    """Rebuild the model a checkpoint describes and load its weights. Returns (model, Checkpoint).

    The spec is untrusted: the model is first built on torch's "meta" device (shapes only, no memory),
    its parameter names, shapes and dtypes are compared with the file's tensors, what building and running
    it takes (parameters, shape probe, a batch's activations) is checked against the memory cap `max_bytes`,
    and only a spec that passes both is built for real. Any problem raises CheckpointError naming the file.
    """
    from trainer.models import build_bytes, build_model

    ckpt = read_checkpoint(path, max_bytes)
    try:
        with torch.device("meta"):
            skeleton = build_model(ckpt.meta["model_spec"])
        need = build_bytes(ckpt.meta["model_spec"])
    except Exception as e:  # ValueError from the spec checks; anything else the builders raise
        raise CheckpointError(ckpt.path, f"invalid model spec: {one_line(e)}") from None
    expected = skeleton.state_dict()
    if set(expected) != set(ckpt.tensors):
        extra, lacking = set(ckpt.tensors) - set(expected), set(expected) - set(ckpt.tensors)
        raise CheckpointError(ckpt.path, f"tensors do not match the model spec (unexpected: {sorted(extra)[:3]}, "
                                         f"missing: {sorted(lacking)[:3]})")
    for name in expected:  # in the model's order: the first layer that differs is named
        t = ckpt.tensors[name]
        if t.shape != expected[name].shape or t.dtype != expected[name].dtype:
            raise CheckpointError(ckpt.path, f"tensor {name!r} has shape {tuple(t.shape)} {t.dtype}, "
                                             f"the model spec needs {tuple(expected[name].shape)} {expected[name].dtype}")
    del skeleton, expected
    # after the comparison: parameters that match the file are bounded by it; what remains is the activations
    try:
        budget.check(need, max_bytes, "its model spec (parameters, and activations of a 64-sample batch)")
    except budget.OverBudget as e:
        raise CheckpointError(ckpt.path, str(e)) from None
    try:
        with torch.device("cpu"):
            model = build_model(ckpt.meta["model_spec"])
        model.load_state_dict(ckpt.tensors)
    except Exception as e:
        raise CheckpointError(ckpt.path, f"cannot rebuild the model: {one_line(e)}") from None
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
    return atomic_write_bytes(path, st_bytes(tensors, meta))


def read_resume_state(path: Path, max_bytes: int = budget.DEFAULT_BYTES) -> tuple[int, int, dict]:
    try:
        data = read_regular(path, max_bytes)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from None
    try:
        meta = _read_metadata(data)
        tensors = st_load(data)
        epoch, step = int(meta["epoch"]), int(meta["step"])
        state = unflatten_state(json.loads(meta["optimizer_state"]), tensors)
        if not isinstance(state, dict) or epoch < 0 or step < 0:
            raise ValueError("not an optimizer state")
        return epoch, step, state
    except Exception as e:  # SafetensorError, ValueError, KeyError, TypeError, RecursionError, ...
        raise CheckpointError(path, f"invalid resume state: {type(e).__name__}: {one_line(e)}") from None
    except BaseException as e:
        if not is_foreign_panic(e):
            raise
        raise CheckpointError(path, f"invalid resume state: safetensors panicked: {one_line(e)}") from None


def name_mismatch(path: Path, meta: dict[str, Any], run: str) -> str | None:
    """How a checkpoint's metadata disagrees with its file name and run folder (None when they agree).

    Rows are filed under (run, epoch, step): a file whose metadata names another epoch, step, kind or run
    (a copy or a rename) would give a second set of rows for one checkpoint, so such a file is not used.
    """
    m = CKPT_RE.match(Path(path).name)
    if not m:
        return None
    epoch, step = int(m.group(1)), int(m.group(2)) if m.group(2) else None
    found = []
    if meta.get("run") != run:
        found.append(f"run {run!r} by its folder, {meta.get('run')!r} in its metadata")
    if meta.get("epoch") != epoch:
        found.append(f"epoch {epoch} by its file name, {meta.get('epoch')} in its metadata")
    if step is not None and meta.get("step") != step:
        found.append(f"step {step} by its file name, {meta.get('step')} in its metadata")
    kind = meta.get("kind", "epoch")
    if kind != ("epoch" if step is None else "step"):
        found.append(f"{'an end-of-epoch' if step is None else 'a mid-epoch (step)'} checkpoint by its file name, "
                     f"kind {str(kind)[:20]!r} in its metadata")
    return "; ".join(found) or None


def list_checkpoints(run_dir: Path) -> list[tuple[int, int | None, Path]]:
    """(epoch, step or None, path) of every checkpoint file in a run folder, in training order."""
    found = []
    for p in Path(run_dir).iterdir():
        m = CKPT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)) if m.group(2) else None, p))
    # mid-epoch checkpoints of epoch N come before the end of epoch N
    return sorted(found, key=lambda t: (t[0], t[1] is None, t[1] or 0))

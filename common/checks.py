"""Small checks shared by the trainer and the analyzer."""

from __future__ import annotations

from typing import Any


def is_int(value: Any) -> bool:
    """An int, and not a bool (JSON's true would pass isinstance(value, int))."""
    return isinstance(value, int) and not isinstance(value, bool)


def one_line(e: BaseException) -> str:
    """An exception's message as one short line, for messages that name the file or option first."""
    text = str(e).strip() or repr(e)
    return text.splitlines()[0][:300]


def is_foreign_panic(e: BaseException) -> bool:
    """A Rust panic surfacing through pyo3 (say, inside safetensors): PanicException derives from
    BaseException, not Exception, so `except Exception` misses it."""
    return type(e).__name__ == "PanicException"


def check_device(device: str, *, local: bool = True):
    """The torch.device named `device`; ValueError when it names none, or (local) names CUDA this
    machine lacks. With a remote cluster (local=False) the workers may have the GPU the client lacks."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if local and dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{device}: CUDA is not available on this machine")
    return dev

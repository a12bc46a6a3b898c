"""Property-based tests of the checkpoint loader: random and mutated bytes, headers and metadata.

Whatever the file holds, `read_checkpoint`, `load_model`, `read_resume_state` and the catalog's header
reader either succeed completely or raise the project's CheckpointError, whose message starts with the
file's path and is one line. Nothing else escapes (not SafetensorError, KeyError, RecursionError,
MemoryError, nor pyo3's PanicException), and a mutated model spec asking for absurd sizes is rejected
without allocating them (it is built on the meta device first).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from analyze.catalog import Run, checkpoint_info
from trainer.checkpoints import (CheckpointError, load_model, read_checkpoint, read_header_metadata,
                                 read_resume_state, save_checkpoint)
from trainer.models import build_model

SPEC = {"type": "ffnn", "input_shape": [64], "outputs": 10, "hidden_nodes": 8, "hidden_layers": 1}
DATA = {"name": "digits", "split_seed": 1, "val_fraction": 0.15, "test_fraction": 0.2}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
_DIR = Path(tempfile.mkdtemp(prefix="loader-fuzz-"))


def _good() -> tuple[bytes, dict[str, torch.Tensor], dict[str, str]]:
    torch.manual_seed(0)
    tensors = build_model(SPEC).state_dict()
    path = save_checkpoint(_DIR / "good.safetensors", tensors, run="ffnn-1x8-sgd", epoch=3, step=57, optimizer="sgd",
                           model_spec=SPEC, dataset_spec=DATA, train_loss=0.5, val_loss=0.6)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n])["__metadata__"]
    return data, {k: v.clone() for k, v in tensors.items()}, meta


GOOD, TENSORS, META = _good()
_counter = iter(range(10**9))


def write(data: bytes) -> Path:
    path = _DIR / f"case-{next(_counter)}.safetensors"
    path.write_bytes(data)
    return path


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: a mutated float may be NaN, and torch.equal says NaN != NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def check_loader(path: Path) -> None:
    """Every entry point either succeeds fully or raises a one-line CheckpointError naming the file."""
    for load in (read_checkpoint, read_header_metadata, load_model):
        try:
            result = load(path)
        except CheckpointError as e:
            message = str(e)
            assert message.startswith(f"{path}: "), message
            assert "\n" not in message, message
            assert e.path == str(path)
            continue
        if load is load_model:  # success is complete: the model holds exactly the file's tensors
            model, ckpt = result
            state = model.state_dict()
            assert state.keys() == ckpt.tensors.keys()
            assert all(same_bits(state[k], ckpt.tensors[k]) for k in state)
    # the catalog never raises for a readable file: a corrupt one is catalogued with empty metadata
    run = Run("r", _DIR, {"optimizer": {"name": "sgd"}})
    info = checkpoint_info(run, 3, None, path)
    assert info.hash and isinstance(info.meta, dict)
    path.unlink()


def test_the_unmutated_checkpoint_loads():
    model, ckpt = load_model(write(GOOD))
    assert ckpt.meta["model_spec"] == SPEC and ckpt.meta["epoch"] == 3


# ------------------------------------------------------------------ bytes
@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data):
    check_loader(write(data))


def test_a_mutation_that_makes_a_weight_nan_loads_exactly():
    """Found by test_mutated_bytes: a byte inserted in fc1.weight and one deleted after it shift a float into
    NaN; the file is still valid and the model must hold its exact bits."""
    blob = bytearray(GOOD)
    blob[664:664] = b"\x00"
    del blob[1084]
    path = write(bytes(blob))
    model, ckpt = load_model(path)
    assert torch.isnan(ckpt.tensors["fc1.weight"]).any()
    assert same_bits(model.state_dict()["fc1.weight"], ckpt.tensors["fc1.weight"])
    check_loader(path)


@FUZZ
@given(st.data())
def test_mutated_bytes(data):
    blob = bytearray(GOOD)
    n_header = int.from_bytes(GOOD[:8], "little") + 8
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length", "header-byte"]))
        if not blob:
            break
        if kind == "flip":
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
        elif kind == "insert":
            i = data.draw(st.integers(0, len(blob)))
            blob[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            i = data.draw(st.integers(0, len(blob) - 1))
            del blob[i:i + data.draw(st.integers(1, 16))]
        elif kind == "length":  # the 8-byte header length
            blob[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
        else:  # a printable character inside the JSON header: breaks structure, keys or numbers
            i = data.draw(st.integers(8, min(n_header, len(blob)) - 1)) if min(n_header, len(blob)) > 8 else 0
            blob[i] = ord(data.draw(st.sampled_from(list('{}[]":,0123456789-eE.aFUIBx '))))
    check_loader(write(bytes(blob)))


# ------------------------------------------------------------------ headers
DTYPES = ["F32", "F64", "F16", "BF16", "I64", "I32", "I8", "U8", "U16", "U32", "U64", "BOOL", "C64", "F8_E4M3",
          "F8_E5M2", "F4", "E8M0", "X", ""]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                         st.text(max_size=10))


@FUZZ
@given(st.dictionaries(st.sampled_from(["fc1.weight", "fc1.bias", "out.weight", "out.bias", "x", "__metadata__"]),
                       st.one_of(st.fixed_dictionaries({
                           "dtype": st.sampled_from(DTYPES),
                           "shape": st.lists(st.integers(-1, 2**40), max_size=4),
                           "data_offsets": st.lists(st.integers(-1, 2**40), min_size=0, max_size=3)}),
                           json_scalars, st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
                       max_size=5),
       st.integers(0, 4096), st.integers(0, 7))
def test_random_headers(header, body_size, pad):
    text = json.dumps(header).encode() + b" " * pad
    check_loader(write(len(text).to_bytes(8, "little") + text + os.urandom(body_size)))


@FUZZ
@given(st.recursive(json_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.sampled_from(["__metadata__", "a", "format", "run"]), children,
                                                    max_size=4)), max_leaves=10))
def test_any_json_as_header(header):
    text = json.dumps(header).encode()
    check_loader(write(len(text).to_bytes(8, "little") + text))


# ------------------------------------------------------------------ metadata and model specs
json_values = st.recursive(json_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)), max_leaves=12)
sizes = st.one_of(st.integers(-3, 20), st.integers(10**6, 10**13), st.sampled_from([8, 9, 10**9, 2**31, 2**62]),
                  st.floats(allow_nan=True), st.text(max_size=4), st.booleans(), st.none(),
                  st.lists(st.integers(0, 10), max_size=3))
layer_strings = st.lists(st.one_of(st.sampled_from(["flatten", "dense:10", "dense:8:relu", "dense:1e9", "dense:0",
                                                    "dropout:0.5", "conv2d:4:3:1:1:relu", "maxpool2d:2",
                                                    "dense:99999999999:tanh", "conv2d:6:5:0:2", "dense:nan"]),
                                   st.text(max_size=12)), max_size=6)


@st.composite
def model_specs(draw):
    spec = dict(SPEC)
    for key in draw(st.lists(st.sampled_from(["type", "input_shape", "outputs", "hidden_nodes", "hidden_layers",
                                              "extra_layers", "layers", "extra"]), max_size=4, unique=True)):
        if key == "type":
            spec[key] = draw(st.one_of(st.sampled_from(["ffnn", "dlnn", "cnn", "layers", "rnn"]), json_scalars))
        elif key == "input_shape":
            spec[key] = draw(st.one_of(st.lists(sizes, max_size=4), st.lists(st.integers(1, 10**7), max_size=4),
                                       json_scalars))
        elif key == "layers":
            spec[key] = draw(st.one_of(layer_strings, json_values))
        elif key == "extra":
            spec[key] = draw(json_values)
        else:
            spec[key] = draw(st.one_of(sizes, json_values))
    if draw(st.booleans()):
        spec.pop(draw(st.sampled_from(sorted(spec))))
    return spec


@FUZZ
@given(model_specs())
def test_mutated_model_specs(spec):
    meta = {**META, "model_spec": json.dumps(spec)}
    check_loader(write(st_save(TENSORS, metadata=meta)))


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(META) + ["extra"]), st.one_of(st.text(max_size=30), json_values.map(json.dumps)),
                       max_size=4),
       st.lists(st.sampled_from(sorted(META)), max_size=3, unique=True))
def test_mutated_metadata(changes, removed):
    meta = {k: v for k, v in {**META, **changes}.items() if k not in removed}
    check_loader(write(st_save(TENSORS, metadata=meta)))


@FUZZ
@given(st.dictionaries(st.sampled_from(["fc1.weight", "fc1.bias", "out.weight", "out.bias", "spy"]),
                       st.tuples(st.sampled_from([torch.float32, torch.float64, torch.int64, torch.float16, torch.bool]),
                                 st.lists(st.integers(0, 70), max_size=3)),
                       max_size=5))
def test_tensors_that_do_not_match_the_spec(tensors):
    made = {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in tensors.items()}
    check_loader(write(st_save(made, metadata=META)))


# ------------------------------------------------------------------ resume state
@FUZZ
@given(st.dictionaries(st.sampled_from(["epoch", "step", "optimizer_state", "format"]),
                       st.one_of(st.text(max_size=12), json_values.map(json.dumps)), max_size=4))
def test_mutated_resume_state(meta):
    path = write(st_save({"opt.state.0.momentum_buffer": torch.zeros(3)}, metadata=meta))
    try:
        epoch, step, state = read_resume_state(path)
    except CheckpointError as e:
        assert str(e).startswith(f"{path}: invalid resume state") and "\n" not in str(e)
    else:
        assert isinstance(state, dict) and epoch >= 0 and step >= 0


def test_a_seeded_sweep_of_single_byte_changes():
    """Every header byte replaced by a few values: a deterministic complement to the random mutations."""
    rng = random.Random(0)
    n = int.from_bytes(GOOD[:8], "little") + 8
    for i in sorted(rng.sample(range(n), 60)):
        for value in (0, ord("}"), ord("9"), 0xFF):
            blob = bytearray(GOOD)
            blob[i] = value
            check_loader(write(bytes(blob)))


@pytest.fixture(autouse=True, scope="module")
def _cleanup():
    yield
    import shutil

    shutil.rmtree(_DIR, ignore_errors=True)

"""Shared fixtures: tiny real checkpoint folders made by the real trainer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import running_dask_cluster
from trainer.config import TrainConfig
from trainer.experiment import run_experiment

# Keep the suite deterministic and light on this 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def train_tiny_study(out: Path, **overrides) -> Path:
    """Train a tiny study into `out` (default: digits, ffnn 1x8, swap 2 of 3 epochs) and return `out`."""
    settings = dict(dataset="digits", model_type="ffnn", hidden_nodes=[8], hidden_layers=[1],
                    experiment_type="swap", optimizer="both", cut_off_epochs=2, num_epochs=3,
                    batch_size=64, sgd_lr=0.05, ngd_lr=0.05, seed=3, out=str(out), quiet=True)
    settings.update(overrides)
    statuses = run_experiment(TrainConfig(**settings), log=lambda *a: None)
    assert all(s == "complete" for s in statuses.values()), statuses
    return out


@pytest.fixture(scope="session")
def make_ckpts():
    """`make_ckpts(out, **overrides)`: train a tiny study with the real trainer (train_tiny_study)."""
    return train_tiny_study


@pytest.fixture(scope="session")
def tiny_ckpts_master(tmp_path_factory) -> Path:
    """A swap study on digits, trained once per session. Copy it (tiny_ckpts) before modifying."""
    return train_tiny_study(tmp_path_factory.mktemp("master") / "ckpts")


@pytest.fixture
def tiny_ckpts(tiny_ckpts_master, tmp_path) -> Path:
    """A private copy of the session's tiny swap study (trunk epochs 0-2, branches epoch 3)."""
    dest = tmp_path / "ckpts"
    shutil.copytree(tiny_ckpts_master, dest)
    return dest


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A real dask scheduler and two workers on loopback, per test module (see helpers.running_dask_cluster)."""
    with running_dask_cluster(tmp_path_factory.mktemp("dask")) as cluster:
        yield cluster

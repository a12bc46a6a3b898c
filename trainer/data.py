"""Datasets, all offline, rebuilt from a plain-JSON dataset spec stored in every checkpoint.

Every dataset here fits in memory (CIFAR-10 is the largest at ~600 MB of float32), so all are held as
tensors: batching is slicing, with no DataLoader worker overhead on small models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import budget
from common.checks import is_int


class DataError(RuntimeError):
    """A dataset that cannot be loaded; the message names the folder and files expected."""


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    task: str  # "classification" or "regression"
    input_shape: tuple[int, ...]
    outputs: int  # classes, or regression target dimension
    noise_sigma: float | None = None  # regression only: the Gaussian noise std the loss assumes

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r} (train, val or test)")
        return getattr(self, name)


# Normalisation constants as the seed study used them.
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.5,), (0.5,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
}

TORCHVISION_FILES = {
    "mnist": ("MNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    "fashion-mnist": ("FashionMNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    "cifar10": ("cifar-10-batches-py", ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                                        "data_batch_5", "test_batch", "batches.meta"]),
}


def dataset_spec_from_config(cfg) -> dict[str, Any]:
    """The plain-JSON spec that `load_dataset` rebuilds the exact same splits from."""
    spec: dict[str, Any] = {"name": cfg.dataset, "split_seed": cfg.split_seed,
                            "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction}
    if cfg.dataset in TORCHVISION_FILES:
        spec["root"] = str(Path(cfg.data_root).expanduser().resolve())
        del spec["test_fraction"]  # torchvision sets come with their own test split
    if cfg.train_samples:
        spec["train_samples"] = cfg.train_samples  # written only when set: earlier specs are unchanged
    if cfg.dataset == "teacher":
        spec.update(task=cfg.teacher_task, samples=cfg.teacher_samples, input_dim=cfg.teacher_input_dim,
                    outputs=cfg.teacher_outputs,
                    teacher_model={"type": cfg.teacher_model_type, "input_shape": [cfg.teacher_input_dim],
                                   "outputs": cfg.teacher_outputs, "hidden_nodes": cfg.teacher_hidden_nodes,
                                   "hidden_layers": cfg.teacher_hidden_layers})
        # Written only when set, so the specs (and hashes) of earlier teacher datasets are unchanged.
        if not cfg.teacher_bias:
            spec["teacher_model"]["bias"] = False
        if cfg.teacher_rank is not None:
            spec["teacher_rank"] = cfg.teacher_rank
        if cfg.teacher_task == "regression":
            spec["noise_sigma"] = cfg.teacher_noise_sigma
    return spec


# Where Debian's packages install the original gzipped IDX files (apt-get install dataset-fashion-mnist);
# read when the data folder does not hold the dataset.
DEBIAN_FOLDERS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
DEBIAN_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}


def dataset_bytes(spec: dict[str, Any]) -> float:
    """Memory that building a dataset spec's splits takes, by arithmetic (nothing is allocated).

    The files on disk bound the real datasets; a teacher dataset is made from the spec's numbers alone:
    its inputs and targets (kept twice: whole and split), the teacher net's parameters, one forward pass
    over every sample at its widest layer, and the orthogonal frames (k x k per width) of teacher_rank.
    """
    if spec.get("name") != "teacher":
        return 0.0
    from trainer.models import build_bytes

    samples, dim, outputs = (spec.get(k) for k in ("samples", "input_dim", "outputs"))
    if not all(is_int(v) and v >= 1 for v in (samples, dim, outputs)):
        raise DataError("teacher dataset spec: 'samples', 'input_dim' and 'outputs' must be positive integers")
    teacher = spec.get("teacher_model")
    try:
        params = build_bytes(teacher)
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"teacher dataset spec: 'teacher_model': {str(e).splitlines()[0][:200]}") from None
    widths = [dim, outputs] + ([teacher["hidden_nodes"]] if teacher.get("hidden_layers") else [])
    frames = 4.0 * sum(float(k) * k for k in widths) if "teacher_rank" in spec else 0.0
    return params + frames + 4.0 * samples * (2 * max(widths) + 2 * (dim + outputs))


def load_dataset(spec: dict[str, Any], root: str | None = None, max_bytes: int = budget.DEFAULT_BYTES) -> Splits:
    """Rebuild the splits a spec describes; `root` overrides the spec's data folder (another machine).

    budget.OverBudget, before anything is allocated, for a spec whose data would not fit `max_bytes`."""
    budget.check(dataset_bytes(spec), max_bytes, "the teacher dataset")
    name = spec.get("name")
    if name == "digits":
        splits = _digits(spec)
    elif name == "teacher":
        splits = _teacher(spec)
    elif name in ("mnist", "fashion-mnist"):
        splits = _idx_dataset(spec, Path(root or spec.get("root") or "data"))
    elif name in TORCHVISION_FILES:
        splits = _torchvision(spec, Path(root or spec.get("root") or "data"))
    else:
        raise DataError(f"unknown dataset {name!r} in dataset spec")
    if spec.get("train_samples"):  # a quick run on the first N training samples
        keep = spec["train_samples"]
        splits.train = Split(splits.train.x[:keep], splits.train.y[:keep])
    return splits


def _three_way_split(n: int, spec: dict, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    perm = torch.randperm(n, generator=generator)
    n_test = int(round(n * spec["test_fraction"]))
    n_val = int(round(n * spec["val_fraction"]))
    return perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test]


def _digits(spec: dict) -> Splits:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    train, val, test = _three_way_split(len(y), spec, torch.Generator().manual_seed(spec["split_seed"]))
    # Standardise with the training split's pixel mean and std (scalars, so it stays a plain image).
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return Splits(Split(x[train], y[train]), Split(x[val], y[val]), Split(x[test], y[test]),
                  task="classification", input_shape=(1, 8, 8), outputs=10)


def build_teacher(spec: dict) -> torch.nn.Module:
    """The teacher net of a `teacher` dataset spec, with its seeded weights.

    With "teacher_rank" r, every weight matrix is a rank-r partial isometry, W_k = Q_k[:, :r] Q_{k-1}[:, :r]^T
    with a random orthogonal Q_k per layer width, so the input-output map Q_L[:, :r] Q_0[:, :r]^T has rank r
    and singular values 1: r is the rank the data can resolve (the default init gives near-zero singular
    values to deep linear products). Every layer, not only one, has rank r because the teacher's weights
    are also the `--truth-checkpoint`: the learning coefficient theory gives (Aoyagi's) is the minimum of the
    local one over the true parameters, attained where every layer has the least rank, while at a true
    parameter whose hidden layers keep full rank the local coefficient is larger (measured +17% on a
    10-4-4-10 rank-2 net when only the first layer was cut).
    """
    from trainer.models import build_model

    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec["split_seed"] + 7919)  # teacher weights: seeded, distinct from the split seed
        teacher = build_model(spec["teacher_model"]).eval()
        if "teacher_rank" in spec:
            weights = [m.weight for m in teacher.modules() if isinstance(m, torch.nn.Linear)]
            widths = [weights[0].shape[1]] + [w.shape[0] for w in weights]
            r = spec["teacher_rank"]
            with torch.no_grad():
                frames = [torch.nn.init.orthogonal_(torch.empty(k, k))[:, :r] for k in widths]
                for w, inner, outer in zip(weights, frames, frames[1:]):
                    w.copy_(outer @ inner.T)
    finally:
        torch.random.set_rng_state(torch_state)
    return teacher


def _teacher(spec: dict) -> Splits:
    g = torch.Generator().manual_seed(spec["split_seed"])
    teacher = build_teacher(spec)
    x = torch.randn(spec["samples"], spec["input_dim"], generator=g)
    with torch.no_grad():
        out = teacher(x)
    if spec["task"] == "classification":
        # Labels sampled from the teacher's softmax, so the teacher is the true (realisable) distribution.
        y = torch.multinomial(torch.softmax(out, dim=1), 1, generator=g).squeeze(1)
        sigma = None
    else:
        sigma = float(spec["noise_sigma"])
        y = out + sigma * torch.randn(out.shape, generator=g)
    train, val, test = _three_way_split(len(x), spec, g)
    return Splits(Split(x[train], y[train]), Split(x[val], y[val]), Split(x[test], y[test]),
                  task=spec["task"], input_shape=(spec["input_dim"],), outputs=spec["outputs"],
                  noise_sigma=sigma)


def _idx_files(name: str, root: Path) -> dict[str, Path]:
    """The four IDX files of MNIST / Fashion-MNIST: torchvision's raw folder under `root` (plain or .gz),
    else the folder Debian's package installs; a DataError naming both places and the package otherwise."""
    sub, files = TORCHVISION_FILES[name]
    found = {}
    for f in files:
        for candidate in (root / sub / f, root / sub / (f + ".gz")):
            if candidate.is_file():
                found[f] = candidate
                break
    if len(found) == len(files):
        return found
    debian = DEBIAN_FOLDERS.get(name)
    if debian is not None and all((debian / (f + ".gz")).is_file() for f in files):
        return {f: debian / (f + ".gz") for f in files}
    missing = [f for f in files if f not in found]
    where = f"not found in {root / sub} (torchvision's layout: {', '.join(files)}, plain or .gz; missing {', '.join(missing)})"
    if debian is not None:
        where += f" nor in {debian} (apt-get install {DEBIAN_PACKAGES[name]})"
    else:
        where += "; put torchvision's layout under --data-root"
    raise DataError(f"{name}: dataset files {where}")


def _idx_dataset(spec: dict, root: Path) -> Splits:
    """MNIST / Fashion-MNIST read from their IDX files: the same tensors torchvision's classes give."""
    from trainer.idx import IDXError, read_idx

    name = spec["name"]
    files = _idx_files(name, root)
    try:
        arrays = {f: read_idx(path, (None, 28, 28) if "images" in f else (None,)) for f, path in files.items()}
    except IDXError as e:
        raise DataError(f"{name}: {e}") from None
    mean, std = NORMALISATION[name]

    def split(kind: str) -> Split:
        images, labels = arrays[f"{kind}-images-idx3-ubyte"], arrays[f"{kind}-labels-idx1-ubyte"]
        if len(images) != len(labels):
            raise DataError(f"{name}: {files[f'{kind}-images-idx3-ubyte']} holds {len(images)} images but "
                            f"{files[f'{kind}-labels-idx1-ubyte']} {len(labels)} labels")
        x = (torch.from_numpy(images.copy()).float().unsqueeze(1) / 255.0 - mean[0]) / std[0]
        return Split(x.contiguous(), torch.from_numpy(labels.astype(np.int64)))

    return _with_validation(split("train"), split("t10k"), spec)


def _with_validation(pool: Split, test: Split, spec: dict) -> Splits:
    """A 10-class image dataset's splits: validation carved from the training pool by the split seed."""
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(spec["split_seed"]))
    n_val = int(round(len(pool) * spec["val_fraction"]))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return Splits(Split(pool.x[train_idx], pool.y[train_idx]), Split(pool.x[val_idx], pool.y[val_idx]),
                  test, task="classification", input_shape=tuple(pool.x.shape[1:]), outputs=10)


def _torchvision(spec: dict, root: Path) -> Splits:
    """CIFAR-10 through torchvision's reader."""
    name = spec["name"]
    sub, files = TORCHVISION_FILES[name]
    folder = root / sub
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        raise DataError(f"{name}: dataset files not found in {folder} (expected {', '.join(files)}; "
                        f"missing {', '.join(missing)}); put torchvision's layout under --data-root")
    import torchvision

    cls = torchvision.datasets.CIFAR10  # MNIST and Fashion-MNIST are read from their IDX files (_idx_dataset)
    try:
        train_pool, test = cls(str(root), train=True, download=False), cls(str(root), train=False, download=False)
    except (RuntimeError, OSError) as e:
        raise DataError(f"{name}: cannot read the dataset in {folder}: {e}") from None

    def tensors(ds) -> Split:
        data = torch.as_tensor(np.asarray(ds.data)).float() / 255.0
        data = data.permute(0, 3, 1, 2)  # CIFAR is NHWC
        mean, std = NORMALISATION[name]
        data = (data - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        return Split(data.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long))

    return _with_validation(tensors(train_pool), tensors(test), spec)

"""Fashion-MNIST offline: Debian's package (gzipped IDX read directly), torchvision's layout, and one-line
errors for a missing package, a truncated file and a file of the wrong shape."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch

import trainer.data
from trainer.data import DEBIAN_FOLDERS, DataError, load_dataset

DEBIAN = DEBIAN_FOLDERS["fashion-mnist"]
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
needs_package = pytest.mark.skipif(not all((DEBIAN / (f + ".gz")).is_file() for f in FILES),
                                   reason="Debian's dataset-fashion-mnist is not installed (apt-get install "
                                          "dataset-fashion-mnist; .ci/run installs it)")
SPEC = {"name": "fashion-mnist", "root": "/nowhere", "split_seed": 1, "val_fraction": 0.15}


@needs_package
def test_debian_package_gives_the_real_dataset_and_torchvision_layout_the_same_tensors(tmp_path):
    splits = load_dataset(SPEC)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (51_000, 9_000, 10_000)
    assert splits.train.x.shape[1:] == (1, 28, 28) and set(splits.test.y.tolist()) == set(range(10))
    # the t10k labels of Fashion-MNIST are balanced: 1,000 per class
    assert torch.bincount(splits.test.y).tolist() == [1000] * 10
    # the same files unpacked in torchvision's layout give the same tensors
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FILES:
        (raw / f).write_bytes(gzip.decompress((DEBIAN / (f + ".gz")).read_bytes()))
    again = load_dataset(SPEC, root=str(tmp_path))
    assert torch.equal(again.train.x, splits.train.x) and torch.equal(again.test.y, splits.test.y)


@needs_package
def test_trains_and_analyses_a_few_hundred_real_images_end_to_end(tmp_path):
    import analyze
    from analyze.cli import main as analyze_main
    from trainer.cli import main as train_main

    out = tmp_path / "ck"
    assert train_main(["--dataset", "fashion-mnist", "--data-root", str(tmp_path / "empty"), "--train-samples", "300",
                       "--model-type", "ffnn", "--hidden-nodes", "16", "--hidden-layers", "1", "--experiment-type",
                       "standard", "--optimizer", "sgd", "--num-epochs", "2", "--sgd-lr", "0.05", "--out", str(out),
                       "--quiet"]) == 0
    assert analyze_main([str(out), "--estimators", "evaluate,llc", "--llc-draws", "100", "--llc-burnin", "100",
                         "--workers", "0", "--no-report"]) == 0
    tables = analyze.load(out / "analysis")
    llc, evaluate = tables["llc"], tables["evaluate"]
    assert len(llc) == 3 and (llc.n == 300).all() and llc.llc_mean.notna().all()
    val = evaluate[(evaluate.split == "val") & (evaluate.epoch == 2)]
    assert val.accuracy.iloc[0] > 0.5  # learnt something real from 300 images (10 classes: chance is 0.1)


def _fake_package(folder, images: bytes | None = None):
    folder.mkdir(parents=True)
    for f in FILES:
        n = 4 if "train" in f else 2
        header = (b"\x00\x00\x08\x03" + np.array([n, 28, 28], ">i4").tobytes() if "images" in f
                  else b"\x00\x00\x08\x01" + np.array([n], ">i4").tobytes())
        body = bytes((28 * 28 if "images" in f else 1) * n)
        (folder / (f + ".gz")).write_bytes(gzip.compress(header + body))
    if images is not None:
        (folder / "train-images-idx3-ubyte.gz").write_bytes(images)


def test_missing_truncated_and_wrong_shape_files_each_give_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(trainer.data.DEBIAN_FOLDERS, "fashion-mnist", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as missing:
        load_dataset(SPEC)
    good = tmp_path / "good"
    _fake_package(good)
    monkeypatch.setitem(trainer.data.DEBIAN_FOLDERS, "fashion-mnist", good)
    assert len(load_dataset({**SPEC, "val_fraction": 0.25}).train) == 3
    truncated = gzip.decompress((good / "train-images-idx3-ubyte.gz").read_bytes())[:-100]
    _fake_package(tmp_path / "truncated", gzip.compress(truncated))
    monkeypatch.setitem(trainer.data.DEBIAN_FOLDERS, "fashion-mnist", tmp_path / "truncated")
    with pytest.raises(DataError, match="truncated") as cut:
        load_dataset(SPEC)
    wrong = b"\x00\x00\x08\x03" + np.array([4, 32, 32], ">i4").tobytes() + bytes(4 * 32 * 32)
    _fake_package(tmp_path / "wrong", gzip.compress(wrong))
    monkeypatch.setitem(trainer.data.DEBIAN_FOLDERS, "fashion-mnist", tmp_path / "wrong")
    with pytest.raises(DataError, match="shape 4x32x32, expected Nx28x28") as shape:
        load_dataset(SPEC)
    _fake_package(tmp_path / "notgzip", b"this is not gzip")
    monkeypatch.setitem(trainer.data.DEBIAN_FOLDERS, "fashion-mnist", tmp_path / "notgzip")
    with pytest.raises(DataError, match="cannot read") as garbage:
        load_dataset(SPEC)
    for error in (missing, cut, shape, garbage):
        assert len(str(error.value).splitlines()) == 1 and "fashion-mnist" in str(error.value)
    assert "train-images-idx3-ubyte.gz" in str(cut.value)  # names the file
    shutil.rmtree(tmp_path / "good")

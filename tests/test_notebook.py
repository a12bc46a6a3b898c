"""The example notebook runs, cell by cell, in a real Jupyter kernel (nbclient + ipykernel), from its committed
file: a cell that raises fails the test, so the notebook cannot go stale."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "ngd_vs_sgd.ipynb"
BUDGET_SECONDS = 180  # the promise from a fresh clone; it takes about a minute here


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert 6 <= len(code) <= 14  # a dozen short cells
    assert all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernelspec for this interpreter (the test's venv), whatever kernels the machine has installed."""
    spec = tmp_path / "jupyter" / "kernels" / "ckpt-dynamics-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ckpt-dynamics (test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # no deprecation warning from jupyter_core
    # connection files and IPython's profile in the test's folder: nothing written to (or read from) $HOME
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter" / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures as PNG outputs
    return spec.name


def test_example_notebook_executes_in_a_jupyter_kernel(tmp_path, kernel_name):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=BUDGET_SECONDS, allow_errors=False,
                            resources={"metadata": {"path": str(work)}})
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:  # the failing cell's source and traceback, in one message
        pytest.fail(f"a notebook cell raised:\n{e}")
    seconds = time.perf_counter() - start
    print(f"notebook executed in {seconds:.1f} s")
    assert seconds < BUDGET_SECONDS

    outputs = {c.id: c.outputs for c in nb.cells if c.cell_type == "code"}
    text = {cid: "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outs)
            for cid, outs in outputs.items()}
    every = "\n".join(text.values())
    assert "TrainResult: 3 run(s)" in every and "ffnn-1x16-swap-ngd" in every
    # the analysis summary and the tables' summary (analyze.load's repr, as HTML in Jupyter)
    assert "tables in" in every and "last estimates" in every
    assert any("text/html" in o.get("data", {}) and "llc: draws=200, burnin=100, lr=0.2/nbeta" in o["data"]["text/html"]
               for outs in outputs.values() for o in outs)
    # the verdicts, one per measure, and the figures
    assert "LLC: " in every and "Hessian trace: " in every
    images = sum("image/png" in o.get("data", {}) for outs in outputs.values() for o in outs)
    assert images == 2  # the LLC and trace figure, the HSIC plane
    assert not any(o.get("output_type") == "error" for outs in outputs.values() for o in outs)
    assert (work / "demo" / "ckpts" / "analysis" / "report.html").is_file()

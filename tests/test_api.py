"""The Python API (`trainer.train`, `analyze.run`, `analyze.load`'s summary) against the commands: the same
options give the same files, and bad options the same one-line messages.

Files are compared byte for byte where nothing in them varies between two runs; elsewhere only these
columns and fields are left out, because they measure the run rather than the result:
- `seconds` (wall-clock time) in training logs (epochs.parquet) and in the analysis tables (llc, hessian, ...);
- in the analysis's task markers (OUT/_tasks/*.json): `seconds`, `finished` (a timestamp), `host` and
  `worker` (which dask worker ran the task);
- report.html embeds the output folder's path and the timings: it is only checked to exist.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

import analyze
import trainer
from analyze.cli import UsageError
from analyze.cli import main as analyze_main
from trainer.cli import main as train_main
from trainer.config import ConfigError

TIMING_COLUMNS = ["seconds"]
MARKER_VARYING = ("seconds", "finished", "host", "worker")

# One tiny swap study, as flags and as keyword arguments: lists, a negated boolean, numbers.
TRAIN_FLAGS = ["--hidden-nodes", "8", "--hidden-layers", "1", "--cut-off-epochs", "2", "--num-epochs", "3",
               "--batch-size", "64", "--sgd-lr", "0.05", "--ngd-lr", "0.05", "--seed", "3", "--no-nesterov",
               "--out", "ckpts", "--quiet"]
TRAIN_OPTIONS = dict(hidden_nodes=[8], hidden_layers=[1], cut_off_epochs=2, num_epochs=3, batch_size=64,
                     sgd_lr=0.05, ngd_lr=0.05, seed=3, nesterov=False, out="ckpts", quiet=True)


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def same_parquet(a: Path, b: Path, ignore=TIMING_COLUMNS) -> None:
    fa, fb = pd.read_parquet(a), pd.read_parquet(b)
    assert list(fa.columns) == list(fb.columns), a
    pd.testing.assert_frame_equal(fa.drop(columns=ignore, errors="ignore"), fb.drop(columns=ignore, errors="ignore"),
                                  check_exact=True, obj=str(a))


def test_train_api_and_command_write_the_same_files(tmp_path, monkeypatch):
    (tmp_path / "cli").mkdir()
    (tmp_path / "api").mkdir()
    monkeypatch.chdir(tmp_path / "cli")  # the same relative --out, so run.json's config is the same too
    assert train_main(TRAIN_FLAGS) == 0
    monkeypatch.chdir(tmp_path / "api")
    result = trainer.train(**TRAIN_OPTIONS)

    cli, api = tmp_path / "cli" / "ckpts", tmp_path / "api" / "ckpts"
    assert files(cli) == files(api) and len(files(cli)) == 17  # 5 checkpoints; per run: 2 logs, run.json, resume
    for name in files(cli):
        if name.endswith("epochs.parquet"):
            same_parquet(cli / name, api / name)  # differs only in its `seconds` column
            assert pd.read_parquet(api / name)["seconds"].iloc[1:].gt(0).all()
        else:  # checkpoints (tensors and metadata), run.json, steps.parquet, resume state
            assert (cli / name).read_bytes() == (api / name).read_bytes(), name
    assert json.loads((api / "ffnn-1x8-trunk" / "run.json").read_text())["config"]["nesterov"] is False

    assert result.ok and result.out == Path("ckpts")
    assert result.runs == {"ffnn-1x8-trunk": "complete", "ffnn-1x8-swap-sgd": "complete",
                           "ffnn-1x8-swap-ngd": "complete"}
    assert [p.name for p in result.checkpoints["ffnn-1x8-trunk"]] == [f"epoch-000{e}.safetensors" for e in range(3)]
    assert result.checkpoints["ffnn-1x8-swap-ngd"] == [Path("ckpts/ffnn-1x8-swap-ngd/epoch-0003.safetensors")]
    assert result.config.hidden_nodes == [8] and result.config.nesterov is False
    assert "3 run(s) in ckpts/" in repr(result) and "next: analyze.run('ckpts')" in repr(result)


@pytest.mark.parametrize("flags, options", [
    (["--batch-size", "0"], dict(batch_size=0)),
    (["--experiment-type", "swap", "--optimizer", "sgd"], dict(optimizer="sgd")),
    (["--hidden-nodes", "8", "16"], dict(hidden_nodes=[8, 16])),
    (["--dataset", "imagenet"], dict(dataset="imagenet")),
])
def test_train_api_rejects_bad_values_with_the_flags_message(tmp_path, capsys, flags, options):
    assert train_main(flags + ["--out", str(tmp_path / "cli")]) == 2
    line = capsys.readouterr().err.strip()
    with pytest.raises(ConfigError) as raised:
        trainer.train(out=tmp_path / "api", **options)
    assert line == f"train-ckpts: error: {raised.value}" and "\n" not in line
    assert not (tmp_path / "api").exists()


def test_train_api_names_unknown_options_and_wrong_types(tmp_path):
    with pytest.raises(ConfigError, match=r"^unknown option 'hidden_node'; did you mean 'hidden_nodes'\?$"):
        trainer.train(out=tmp_path, hidden_node=[8])
    with pytest.raises(ConfigError, match=r"^invalid value for 'num_epochs': '3' must be an integer$"):
        trainer.train(out=tmp_path, num_epochs="3")
    config = tmp_path / "study.json"  # a config file, as --config, with keyword arguments overriding it
    config.write_text(json.dumps({"num_epochs": 4, "cut_off_epochs": 5}))
    with pytest.raises(ConfigError, match="'cut_off_epochs': 5 must lie strictly between 0 and num_epochs=4"):
        trainer.train(config, out=tmp_path)
    with pytest.raises(ConfigError, match="'cut_off_epochs': 5 must lie strictly between 0 and num_epochs=5"):
        trainer.train(config, out=tmp_path, num_epochs=5)


# The analysis: real dask local clusters (the default workers), every table of these estimators.
ANALYZE_FLAGS = ["--estimators", "evaluate,weights,llc,hsic", "--llc-chains", "2", "--llc-draws", "20",
                 "--llc-burnin", "10", "--hsic-probe", "200", "--epochs", "1-"]


def test_analyze_api_and_command_write_the_same_tables(tiny_ckpts, capsys):
    cli, api = tiny_ckpts.parent / "out-cli", tiny_ckpts.parent / "out-api"
    assert analyze_main([str(tiny_ckpts), "--out", str(cli)] + ANALYZE_FLAGS) == 0
    printed = capsys.readouterr().out
    # the two spellings of estimator options: a section, and the flag's name
    result = analyze.run(tiny_ckpts, estimators=["evaluate", "weights", "llc", "hsic"], out=api,
                         llc={"chains": 2, "draws": 20}, llc_burnin=10, hsic_probe=200, epochs="1-")
    assert capsys.readouterr().out == printed.replace(str(cli.resolve()), str(api.resolve()))  # the same summary

    assert files(cli) == files(api)
    names = files(api)
    for table in ("evaluate", "weights", "llc", "llc_chains", "hsic", "runs", "training", "xcorr"):
        assert any(n.startswith(f"{table}/") for n in names), table
    assert sum(n.startswith("_tasks/") for n in names) == 4 * 4  # 4 checkpoints (epochs 1-3) x 4 estimators
    for name in names:
        if name.endswith(".parquet"):
            same_parquet(cli / name, api / name)
        elif name.startswith("_tasks/"):
            a, b = (json.loads((root / name).read_text()) for root in (cli, api))
            assert {k: v for k, v in a.items() if k not in MARKER_VARYING} == \
                   {k: v for k, v in b.items() if k not in MARKER_VARYING}
    assert (api / "report.html").is_file() and (cli / "report.html").is_file()

    assert result.ok and result.exit_code == 0 and result.failures == []
    assert result.out == api.resolve() and result.report == (api / "report.html").resolve()
    summary = result.summary.set_index("run")
    assert summary.loc["ffnn-1x8-trunk", "analysed"] == 2 and summary["failed"].eq(0).all()
    last = summary.loc["ffnn-1x8-swap-ngd", "last_estimates"]
    assert last.startswith("val loss ") and ", LLC " in last  # evaluate's headline first, then the LLC
    assert set(result.load()) == set(analyze.load(cli))
    assert repr(result).startswith("AnalysisResult: 3 run(s), 16 task(s) computed, 0 skipped, 0 failed\n")
    assert f"report: {result.report}" in repr(result)


@pytest.mark.parametrize("flags, options, message", [
    (["--evaluate-batch-size", "many"], dict(evaluate_batch_size="many"),
     "--evaluate-batch-size: 'many' is not a valid int"),
    (["--evaluate-batch-size", "0"], dict(evaluate={"batch_size": 0}), "--evaluate-batch-size: must be at least 1"),
    (["--estimators", "weights", "--evaluate-batch-size", "8"], dict(estimators="weights", evaluate_batch_size=8),
     "--evaluate-batch-size: estimator 'evaluate' is not selected"),
    (["--frobnicate"], dict(frobnicate=1), "unrecognized argument --frobnicate"),
    (["--workers", "-2"], dict(workers=-2), "--workers: -2 is not a number of workers"),
    (["--epochs", "3-1"], dict(epochs="3-1"), "--epochs: range '3-1' ends before it starts"),
    (["--estimators", "nope"], dict(estimators=["nope"]), "--estimators: unknown estimator 'nope'"),
    (["--runs", "zzz*"], dict(runs=["zzz*"]), "--runs 'zzz*': matches none of the runs"),
])
def test_analyze_api_rejects_bad_options_with_the_flags_message(tiny_ckpts, capsys, flags, options, message):
    assert analyze_main([str(tiny_ckpts)] + flags) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"analyze: error: {message}") and "\n" not in line
    with pytest.raises(UsageError) as raised:
        analyze.run(tiny_ckpts, **options)
    assert f"analyze: error: {raised.value}" == line
    assert isinstance(raised.value, ValueError)
    assert not (tiny_ckpts / "analysis").exists()


def test_analyze_api_rejects_options_of_unselected_estimators_given_as_sections(tiny_ckpts):
    with pytest.raises(UsageError, match=r"^llc: estimator 'llc' is not selected \(estimators evaluate,weights\)$"):
        analyze.run(tiny_ckpts, llc={"chains": 2})
    with pytest.raises(UsageError, match=r"^evaluate: must be a dict of the estimator's options"):
        analyze.run(tiny_ckpts, evaluate=8)
    with pytest.raises(UsageError, match=r"^estimator 'evaluate' has no option --evaluate-chains$"):
        analyze.run(tiny_ckpts, evaluate={"chains": 2})


def test_load_shows_a_summary_and_stays_a_dict_of_dataframes(tiny_ckpts, capsys):
    out = tiny_ckpts / "analysis"
    assert analyze_main([str(tiny_ckpts), "--estimators", "evaluate,weights,llc", "--llc-chains", "2",
                         "--llc-draws", "20", "--llc-burnin", "10", "--workers", "0", "--no-report"]) == 0
    tables = analyze.load(out)
    assert isinstance(tables, dict) and all(isinstance(v, pd.DataFrame) for v in tables.values())
    assert set(tables) == {"evaluate", "weights", "llc", "llc_chains", "runs", "training", "epochs"}
    assert dict(tables).keys() == tables.keys() and len(tables["evaluate"]) == 5 * 3  # 5 checkpoints x 3 splits

    text = repr(tables)
    assert text == str(tables) and text.startswith(f"analysis tables in {out}")
    assert "ffnn-1x8-trunk: trunk, sgd, epochs 0-2" in text
    assert "ffnn-1x8-swap-ngd: branch, ngd from ffnn-1x8-trunk at epoch 2, epochs 3" in text
    summary = tables.summary()
    assert summary.loc["evaluate", "rows"] == 15 and summary.loc["evaluate", "epochs"] == "0-3"
    assert summary.loc["evaluate", "settings"] == "evaluate: defaults"
    assert summary.loc["llc", "settings"] == "llc: chains=2, draws=20, burnin=10"
    assert summary.loc["llc", "runs"] == 3 and summary.loc["epochs", "rows"] == 5
    html = tables._repr_html_()
    assert "<table" in html and "llc: chains=2, draws=20, burnin=10" in html and "ffnn-1x8-swap-sgd" in html

    # two settings of one estimator are both named; a folder without markers still loads and shows
    assert analyze_main([str(tiny_ckpts), "--estimators", "weights", "--weights-min-tail", "3", "--workers", "0",
                         "--no-report", "--epochs", "0"]) == 0
    settings = analyze.load(out).summary().loc["weights", "settings"]
    assert "weights: defaults" in settings and "weights: min_tail=3" in settings
    shutil.rmtree(out / "_tasks")  # no complete task: only the run tables load, and the summary still shows
    bare = analyze.load(out)
    assert "evaluate" not in bare and "ffnn-1x8-trunk: trunk" in repr(bare) and "training" in repr(bare)

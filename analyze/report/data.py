"""What the report draws from: the tables, each run's family, role and lineage, and per-epoch series.

`ReportData.from_tables` computes everything once; the figure functions only read it. Every value is
placed at the epoch of its checkpoint, and per-epoch series use epoch-end checkpoints only.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analyze.series import epoch_end_rows, epoch_end_steps, lineage, own_series, run_parents
from analyze.tables import XCORR_TABLE, most_common_config, present
from analyze.xcorr import compute_xcorr

OPT_COLORS = {"sgd": "rgb(200, 0, 0)", "ngd": "rgb(32, 102, 168)", "adam": "rgb(44, 160, 44)"}
TRUNK_COLOR = "rgb(100, 100, 100)"
PALETTE = ("#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#2ca02c", "#7f7f7f")
EPOCH_TABLES = ("llc", "hessian", "fim")  # one row per checkpoint: read per run and epoch


@dataclass
class RunInfo:
    run: str
    family: str
    role: str
    optimizer: str
    parent: str | None = None
    cut: int | None = None
    experiment_type: str = ""
    path: str | None = None
    record: dict = field(default_factory=dict)  # run.json, when the checkpoint folder is readable


def _family_of(run: str, optimizer: str) -> str:
    m = re.fullmatch(r"(.+)-(trunk|swap-[^-]+)", run)
    if m:
        return m.group(1)
    if optimizer and run.endswith("-" + optimizer):
        return run[: -len(optimizer) - 1]
    return run


def _optional(row: dict, key: str) -> str | None:
    return str(row.get(key)) if present(row.get(key)) else None


def run_infos(tables: dict[str, pd.DataFrame], ckpt_dir: str | Path | None = None) -> dict[str, RunInfo]:
    """Every run the tables mention, with its family, role, optimizer and parent (from `runs` if present)."""
    parents = run_parents(tables)
    infos: dict[str, RunInfo] = {}
    runs = tables.get("runs")
    if runs is not None and len(runs) and "run" in runs:
        for row in runs.to_dict("records"):
            run = str(row["run"])
            opt = _optional(row, "optimizer") or ""
            fam = _optional(row, "family") or _family_of(run, opt)
            role = _optional(row, "role") or ("branch" if run in parents else "standard")
            infos[run] = RunInfo(run, fam, role, opt, experiment_type=_optional(row, "experiment_type") or "",
                                 path=_optional(row, "path"))
    seen_opt: dict[str, str] = {}
    for name, frame in tables.items():
        if frame is None or not len(frame) or "run" not in frame or name in ("runs", XCORR_TABLE):
            continue
        if "optimizer" in frame:
            for run, opt in frame.drop_duplicates("run")[["run", "optimizer"]].itertuples(index=False):
                seen_opt.setdefault(str(run), str(opt))
        for run in pd.unique(frame["run"].astype(str)):
            seen_opt.setdefault(run, "")
    for run, opt in seen_opt.items():
        if run not in infos:
            role = "branch" if run in parents else ("trunk" if run.endswith("-trunk") else "standard")
            infos[run] = RunInfo(run, _family_of(run, opt), role, opt)
        elif not infos[run].optimizer:
            infos[run].optimizer = opt
    for run, (parent, cut) in parents.items():
        if run in infos:
            infos[run].parent, infos[run].cut = parent, cut
    for info in infos.values():
        folder = Path(ckpt_dir) / info.run if ckpt_dir else (Path(info.path) if info.path else None)
        if folder is not None:
            try:
                info.record = json.loads((folder / "run.json").read_text())
                info.path = str(folder)
            except (OSError, ValueError):
                pass
    return infos


def _epoch_frame(frame: pd.DataFrame | None, ends: pd.DataFrame) -> pd.DataFrame | None:
    """A per-checkpoint table's epoch-end rows of its main config, one per (run, epoch)."""
    if frame is None or not len(frame):
        return None
    frame = epoch_end_rows(most_common_config(frame), ends)
    frame = frame.sort_values(["run", "epoch", "step"]).drop_duplicates(["run", "epoch"], keep="last")
    return frame.assign(run=frame["run"].astype(str))


def _family_order(infos: dict[str, RunInfo]) -> dict[str, list[str]]:
    """family -> its runs: trunk first, then standard runs, then branches; SGD before NGD."""
    order = {"trunk": 0, "standard": 1, "branch": 2}
    opt_order = {"sgd": 0, "ngd": 1}
    out: dict[str, list[str]] = {}
    for info in sorted(infos.values(), key=lambda i: (order.get(i.role, 3), opt_order.get(i.optimizer, 9),
                                                      i.optimizer, i.run)):
        out.setdefault(info.family, []).append(info.run)
    return dict(sorted(out.items()))


def _labels(infos: dict[str, RunInfo], families: dict[str, list[str]]) -> dict[str, str]:
    labels = {}
    for info in infos.values():
        opt = info.optimizer or "?"
        if info.role == "trunk":
            labels[info.run] = f"trunk ({opt})"
        elif info.parent is not None:
            labels[info.run] = f"{opt} after swap"
        else:
            labels[info.run] = opt
    for runs in families.values():  # label clashes within a family: use run names
        names = [labels[r] for r in runs]
        for r in runs:
            if names.count(labels[r]) > 1:
                labels[r] = r
    return labels


@dataclass(frozen=True)
class ReportData:
    """The tables and everything derived from them that more than one figure reads."""

    tables: dict[str, pd.DataFrame]
    ckpt_dir: Path | None
    infos: dict[str, RunInfo]
    parents: dict[str, tuple[str, int]]
    ends: pd.DataFrame  # run, epoch, end_step
    frames: dict[str, pd.DataFrame | None]  # EPOCH_TABLES: one row per (run, epoch)
    main: dict[str, pd.DataFrame]  # every non-empty table's rows of its most common config
    series: dict[tuple[str, str], pd.Series]  # (run, series name) -> values by epoch
    end_index: dict[tuple[str, int], int]
    runs_by_family: dict[str, list[str]]
    labels: dict[str, str]
    xcorr: pd.DataFrame | None
    notes: tuple[str, ...]

    @classmethod
    def from_tables(cls, tables: dict[str, pd.DataFrame], ckpt_dir: str | Path | None = None) -> "ReportData":
        tables = {k: v for k, v in tables.items() if v is not None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "several configs" warnings: the settings table lists them
            parents = run_parents(tables)
            infos = run_infos(tables, ckpt_dir)
            ends = epoch_end_steps(tables)
            series = own_series(tables)
            frames = {name: _epoch_frame(tables.get(name), ends) for name in EPOCH_TABLES}
            xcorr, notes = tables.get(XCORR_TABLE), ()
            if xcorr is None and infos:
                xcorr = compute_xcorr(tables)
                notes = ("xcorr: computed for this report (no xcorr table in the folder)",)
        families = _family_order(infos)
        return cls(
            tables=tables, ckpt_dir=Path(ckpt_dir) if ckpt_dir else None, infos=infos, parents=parents, ends=ends,
            frames=frames, main={k: most_common_config(v) for k, v in tables.items() if len(v)},
            series={key: g.set_index("epoch")["value"].sort_index() for key, g in series.groupby(["run", "series"])},
            end_index={(r, int(e)): int(s) for r, e, s in ends.itertuples(index=False)},
            runs_by_family=families, labels=_labels(infos, families), xcorr=xcorr, notes=notes)

    # ------------------------------------------------------------------ runs
    def families(self) -> list[str]:
        return list(self.runs_by_family)

    def family_runs(self, family: str) -> list[str]:
        return self.runs_by_family.get(family, [])

    def label(self, run: str) -> str:
        return self.labels.get(run, run)

    def color(self, run: str) -> str:
        info = self.infos.get(run)
        if info is not None and info.role == "trunk":
            return TRUNK_COLOR
        opt = info.optimizer if info else ""
        if opt in OPT_COLORS:
            same = [r for r in self.family_runs(info.family) if self.infos[r].optimizer == opt
                    and self.infos[r].role != "trunk"]
            if len(same) <= 1 or same.index(run) == 0:
                return OPT_COLORS[opt]
        runs = sorted(self.infos)
        return PALETTE[runs.index(run) % len(PALETTE)] if run in runs else PALETTE[0]

    def cutoffs(self, family: str) -> list[int]:
        return sorted({self.infos[r].cut for r in self.family_runs(family) if self.infos[r].cut is not None})

    def has(self, table: str) -> bool:
        return table in self.main

    # ------------------------------------------------------------------ values
    def metric(self, run: str, name: str) -> pd.Series:
        """A run's own per-epoch series (val_loss, train_loss, llc, ...), indexed by epoch."""
        return self.series.get((run, name), pd.Series(dtype=float))

    def column(self, run: str, table: str, col: str) -> pd.Series:
        """A run's values of one column of an EPOCH_TABLES table, indexed by epoch."""
        frame = self.frames.get(table)
        if frame is None or col not in frame:
            return pd.Series(dtype=float)
        rows = frame[frame["run"] == run]
        values = pd.to_numeric(rows[col], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        return pd.Series(values, index=rows["epoch"].astype(int).to_numpy()).dropna().sort_index()

    def joined_metric(self, run: str, name: str) -> pd.Series:
        return self._joined(run, lambda r: self.metric(r, name))

    def joined_column(self, run: str, table: str, col: str) -> pd.Series:
        return self._joined(run, lambda r: self.column(r, table, col))

    def _joined(self, run: str, getter) -> pd.Series:
        """A branch's values with its parent's value at the cut-off epoch in front (the branch starts there)."""
        values = getter(run)
        info = self.infos.get(run)
        if info is None or info.parent is None or info.cut is None:
            return values
        parent = getter(info.parent)
        if info.cut in parent.index and info.cut not in values.index:
            values = pd.concat([parent.loc[[info.cut]], values]).sort_index()
        return values

    def checkpoint_rows(self, table: str, run: str, epoch: int) -> pd.DataFrame:
        """The rows of the epoch-end checkpoint of (run, epoch) in a table (main config)."""
        frame = self.main[table]
        rows = frame[(frame["run"].astype(str) == run) & (frame["epoch"] == epoch)]
        return epoch_end_rows(rows, self.ends)

    # ------------------------------------------------------------------ epochs and steps
    def end_step(self, run: str, epoch: int) -> int | None:
        """The global step at the end of `epoch` in run's history (its own or an ancestor's)."""
        for source, first, last in reversed(lineage(run, self.parents)):
            if (first is None or epoch >= first) and (last is None or epoch <= last):
                found = self.end_index.get((source, epoch))
                if found is not None:
                    return found
        return self.end_index.get((run, epoch))

    def fractional_epoch(self, run: str, epoch: int, step: int) -> float:
        end = self.end_step(run, epoch)
        if end is None or step >= end:
            return float(epoch)
        start = self.end_step(run, epoch - 1) if epoch > 0 else None
        if start is None or end <= start:
            return float(epoch)
        return epoch - 1 + max(0.0, (step - start) / (end - start))

    def where(self, row: dict) -> str:
        """"<label>, epoch E" for a table row, noting a mid-epoch checkpoint's step."""
        run, epoch, step = str(row["run"]), int(row["epoch"]), row.get("step")
        text = f"{self.label(run)}, epoch {epoch}"
        end = self.end_step(run, epoch)
        if present(step) and end is not None and int(step) != end:
            text += f" (mid-epoch, step {int(step)})"
        return text

    def chosen_checkpoints(self, family: str, table: str) -> list[tuple[str, int, str]]:
        """(run, epoch, label) at the first epoch, the cut-off and each run's last epoch, among the epoch-end
        checkpoints present in `table` (the nearest present epoch where the exact one is missing)."""
        frame = self.main.get(table)
        if frame is None:
            return []
        keys = epoch_end_rows(frame[["run", "epoch", "step"]].drop_duplicates(), self.ends)
        epochs_of = {r: sorted(set(g["epoch"].astype(int))) for r, g in keys.groupby(keys["run"].astype(str))}
        runs = [r for r in self.family_runs(family) if r in epochs_of]
        wanted: list[tuple[str, int, str]] = []
        has_children = {self.infos[r].parent for r in self.infos if self.infos[r].parent}
        for run in runs:
            if self.infos[run].parent is None:
                wanted.append((run, epochs_of[run][0], "first"))
            if run in has_children:
                cut = [self.infos[c].cut for c in self.infos if self.infos[c].parent == run]
                wanted.append((run, int(cut[0]), "cut-off"))
            else:
                wanted.append((run, epochs_of[run][-1], "last"))
        out = []
        for run, epoch, what in wanted:
            nearest = min(epochs_of[run], key=lambda e: (abs(e - epoch), e))
            if all((o[0], o[1]) != (run, nearest) for o in out):
                out.append((run, nearest, f"{self.label(run)}, epoch {nearest} ({what})"))
        return out

"""The `analyze` command's options: flags, config files and `analyze.run` keyword arguments, typed and
checked, into one Settings.

Arguments are parsed in two passes: the first finds --estimators and --config, the second adds the
option flags (--<estimator>-<option>) of exactly the estimators selected, custom ones included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analyze.estimators import DEFAULT, ENTRY_POINT_GROUP, parse_list, registered, resolve
from common import budget
from common.checks import check_device, is_int
from common.files import read_text

PROG = "analyze"
DESCRIPTION = """\
Run estimators over the checkpoints of the runs in CKPT_DIR (folders with run.json, as train-ckpts
writes them) and write one Parquet table per kind of result: OUT/<table>/part-<task>.parquet, plus
OUT/runs/runs.parquet and OUT/training/epochs.parquet. A task is one (checkpoint, estimator, options);
finished tasks are skipped on a rerun, so an interrupted analysis resumes where it stopped and new
checkpoints or estimators compute only what is missing. In pandas: analyze.load("OUT")."""
EPILOG = f"""\
epochs (--epochs SPEC): comma-separated items, each one of
  N          epoch N (0 = initial weights)         A-B     epochs A to B
  A-B:S      every S-th epoch from A to B          A-      epoch A to the last
  last       each run's last epoch                 all     every epoch (the default)
  e.g. --epochs 0,5,10-20   --epochs 10-20:2   --epochs 0,last
  Mid-epoch (step) checkpoints belong to the epoch they were taken in.

config file (--config FILE, JSON or TOML): estimators and their options, and any option above
  {{"estimators": ["evaluate", "weights"], "evaluate": {{"batch_size": 1024}}, "workers": 4}}
  Command-line flags override the file.

custom estimators: --estimators package.module:ClassName, or an entry point in the group
  {ENTRY_POINT_GROUP}; see docs/estimators.md. With --scheduler, the module must be importable on
  every worker, and CKPT_DIR and OUT must be paths every worker reads and writes.

LLC calibration: analyze calibrate CKPT_FILE [--lr 1e-5,3e-5,1e-4 --localization 10,100 ...]
  sweeps SGLD settings on one checkpoint and recommends --llc-* options (analyze calibrate --help).

one analyze at a time per OUT: a second one started on the same OUT waits for the first (OUT/.analyze.lock),
  then skips what the first finished.

exit status: 0 all tasks done, 1 some task failed (rows in OUT/errors) or OUT could not be written,
  2 bad usage, 130 interrupted."""
BASE_CONFIG_KEYS = ("out", "runs", "epochs", "scheduler", "workers", "force", "device", "data_root", "report",
                    "report_path", "xcorr_max_lag", "max_memory_gb", "debug")


# What each option's value must be in a config file or `analyze.run` (flags are text, typed by argparse).
# Checked before argparse sees them: argparse applies `type` only to text defaults, so `"force": "no"`
# would mean force and `"workers": "4"` would pass as 4.
_TEXT, _PATH, _INT, _BOOL, _TEXTS, _EPOCHS, _NUMBER = ("text", "a path (text)", "an integer", "true or false",
                                                       "text or a list of text", "text, an epoch or a list of them",
                                                       "a number")
OPTION_TYPES = {"out": _PATH, "runs": _TEXTS, "epochs": _EPOCHS, "scheduler": _TEXT, "workers": _INT, "force": _BOOL,
                "device": _TEXT, "data_root": _PATH, "report": _BOOL, "report_path": _PATH, "xcorr_max_lag": _INT,
                "estimators": _TEXTS, "max_memory_gb": _NUMBER, "debug": _BOOL}


def _has_type(value: Any, kind: str, paths_ok: bool) -> bool:
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _INT:
        return is_int(value)
    if kind == _NUMBER:
        return is_int(value) or isinstance(value, float)
    if kind == _PATH:
        return isinstance(value, str) or (paths_ok and isinstance(value, os.PathLike))
    if kind == _TEXT:
        return isinstance(value, str)
    item = (lambda v: isinstance(v, str) or is_int(v)) if kind == _EPOCHS else (lambda v: isinstance(v, str))
    return item(value) or (isinstance(value, (list, tuple)) and all(item(v) for v in value))


def check_option_types(values: dict[str, Any], where: str, *, paths_ok: bool = False) -> None:
    """UsageError naming the key (and the file) for a value of the wrong type; `where` prefixes the message."""
    for key, kind in OPTION_TYPES.items():
        if key in values and values[key] is not None and not _has_type(values[key], kind, paths_ok):
            flag_ = "--" + key.replace("_", "-")
            raise UsageError(f"{where}{key!r} must be {kind} (as {flag_} takes), not {values[key]!r}"[:300])


class UsageError(ValueError):
    """Bad command line, config file or `analyze.run` option: `analyze: error: <message>` and exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def base_parser() -> Parser:
    p = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="folder of run folders (or one run folder)")
    p.add_argument("--estimators", metavar="LIST",
                   help=f"comma-separated estimator names or package.module:Class, or 'all' (default: {','.join(DEFAULT)})")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of estimators and options (flags override it)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: CKPT_DIR/analysis)")
    p.add_argument("--runs", metavar="GLOB", help="only runs whose name matches one of these comma-separated globs")
    p.add_argument("--epochs", metavar="SPEC", help="only these epochs, e.g. 0,5,10-20 or 10-20:2 or last (see below)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on an existing dask.distributed cluster, e.g. tcp://host:8786 (default: a local cluster)")
    p.add_argument("--workers", metavar="N", type=int, default=default_workers(),
                   help="local worker processes, one torch thread each (default: the cores available, "
                        "%(default)s here); 0 runs the tasks in this process without dask, for debugging")
    p.add_argument("--force", action="store_true", help="recompute tasks that are already complete")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="at the end, compute cross-correlations (the xcorr table) and write the HTML report "
                        "(default: on; --no-report skips both)")
    p.add_argument("--report-path", metavar="FILE", help="where the report goes (default: OUT/report.html)")
    p.add_argument("--xcorr-max-lag", metavar="K", type=int, default=10,
                   help="cross-correlations at lags -K..K epochs (default: 10)")
    p.add_argument("--device", default="cpu", help="torch device the workers use (default: cpu)")
    p.add_argument("--data-root", metavar="DIR",
                   help="dataset folder, overriding the one stored in the checkpoints (data on another machine)")
    p.add_argument("--max-memory-gb", metavar="GB", type=float, default=budget.DEFAULT_GB,
                   help="memory cap for what one checkpoint makes a worker build (model, shape probe, teacher "
                        "dataset); a checkpoint that needs more is an error row (default: %(default)s)")
    p.add_argument("--debug", action="store_true",
                   help="show tracebacks and dask's logs (default: one line per problem)")
    return p


def flag(estimator: str, option: str) -> str:
    return f"--{estimator}-{option.replace('_', '-')}"


def add_estimator_options(parser: Parser, cls) -> None:
    doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
    summary = doc.splitlines()[0].removeprefix(f"`{cls.name}`: ") if doc else None
    group = parser.add_argument_group(f"estimator {cls.name}", summary)
    for o in cls.options:
        extra = {"nargs": "?", "const": "true"} if o.type is bool else {}
        choices = f"; one of {', '.join(map(str, o.choices))}" if o.choices else ""
        group.add_argument(flag(cls.name, o.name), dest=f"opt:{cls.name}:{o.name}", default=argparse.SUPPRESS,
                           metavar=o.type.__name__.upper(), help=f"{o.help} (default: {o.default}{choices})", **extra)


def help_text(selected: list[type]) -> str:
    parser = base_parser()
    shown = set()
    for name, ref in sorted(registered().items()):
        try:
            _, cls = resolve(name)
        except Exception as e:  # a broken plug-in must not hide the others
            parser.add_argument_group(f"estimator {name}", f"({ref} cannot be imported: {e})")
            continue
        add_estimator_options(parser, cls)
        shown.add(cls)
    for cls in selected:
        if cls not in shown:
            add_estimator_options(parser, cls)
    return parser.format_help()


def read_config(path: str) -> dict[str, Any]:
    try:
        text = read_text(path)  # a regular file of bounded size: a FIFO or /dev/zero would hang or exhaust memory
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UsageError(f"--config {path}: not UTF-8 text") from None
    try:
        config = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--config {path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'} ({e})") from None
    if not isinstance(config, dict):
        raise UsageError(f"--config {path}: expected an object of estimators and options")
    return {k.replace("-", "_"): v for k, v in config.items()}


@dataclass
class Settings:
    ckpt_dir: Path
    out: Path
    estimators: list[tuple[str, Any]]  # (module:Class, configured instance)
    runs: str | None
    epochs: Any  # catalog.EpochSpec
    scheduler: str | None
    workers: int
    force: bool
    device: str
    data_root: str | None
    report: bool = True
    report_path: Path | None = None
    xcorr_max_lag: int = 10
    max_memory_gb: float = budget.DEFAULT_GB
    debug: bool = False


def select_estimators(text) -> list[tuple[str, type]]:
    from analyze.estimators.base import EstimatorError

    chosen: dict[str, tuple[str, type]] = {}
    for item in parse_list(text):
        try:
            ref, cls = resolve(item)
        except EstimatorError as e:
            raise UsageError(f"--estimators: {e}") from None
        if cls.name in chosen and chosen[cls.name][1] is not cls:
            raise UsageError(f"--estimators: {chosen[cls.name][0]} and {ref} are both named {cls.name!r}")
        chosen[cls.name] = (ref, cls)
    if not chosen:
        raise UsageError("--estimators: no estimator given")
    return list(chosen.values())


def parse_args(argv: list[str], options: dict[str, Any] | None = None) -> Settings | str:
    """Settings for a run, or the help text. Raises UsageError.

    `options` are `analyze.run`'s keyword arguments: option names without dashes, each estimator's options
    as a section (llc={"chains": 2}, as in a config file) or as its flag's name (llc_chains=2). They
    override the config file, as flags do.
    """
    from analyze.catalog import EpochSpec, EpochSpecError
    from analyze.estimators.base import EstimatorError
    from analyze.scheduler import SchedulerError, check_address

    first = Parser(prog=PROG, add_help=False, allow_abbrev=False)
    first.add_argument("--estimators")
    first.add_argument("--config")
    first.add_argument("-h", "--help", action="store_true")
    pre, _ = first.parse_known_args(argv)
    config = read_config(pre.config) if pre.config else {}
    options = {k.replace("-", "_"): v for k, v in (options or {}).items() if v is not None}
    check_option_types(config, f"--config {pre.config}: ")
    check_option_types(options, "", paths_ok=True)
    selection = pre.estimators or options.get("estimators") or config.get("estimators") or ",".join(DEFAULT)
    if pre.help:
        try:
            selected = [cls for _, cls in select_estimators(selection)]
        except UsageError:
            selected = []
        return help_text(selected)
    estimators = select_estimators(selection)
    names = {cls.name for _, cls in estimators}
    unknown = sorted(set(config) - set(BASE_CONFIG_KEYS) - {"estimators"} - names - set(registered()))
    if unknown:
        raise UsageError(f"--config {pre.config}: unknown key(s) {', '.join(unknown)} (not an estimator or option)")

    sections = option_sections(options, estimators)

    parser = base_parser()
    for _, cls in estimators:
        add_estimator_options(parser, cls)
    parser.set_defaults(**{k: config[k] for k in BASE_CONFIG_KEYS if k in config})
    parser.set_defaults(**{k: options[k] for k in BASE_CONFIG_KEYS if k in options})
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise UsageError(unrecognized(extra, names))

    instances = []
    for ref, cls in estimators:
        section = config.get(cls.name, {})
        if not isinstance(section, dict):
            raise UsageError(f"--config {pre.config}: {cls.name!r} must be an object of options")
        values = {k.replace("-", "_"): v for k, v in section.items()}
        check_section_types(values, cls, pre.config)
        values.update(sections.get(cls.name, {}))
        values.update({dest.split(":")[2]: v for dest, v in vars(args).items() if dest.startswith(f"opt:{cls.name}:")})
        try:
            instances.append((ref, cls(**values)))
        except EstimatorError as e:
            raise UsageError(str(e)) from None

    ckpt_dir = Path(args.ckpt_dir)
    if not ckpt_dir.is_dir():
        what = "is a file, not a folder of runs" if ckpt_dir.exists() else "no such directory"
        raise UsageError(f"CKPT_DIR {ckpt_dir}: {what}")
    if not (isinstance(args.max_memory_gb, (int, float)) and args.max_memory_gb > 0):
        raise UsageError(f"--max-memory-gb: {args.max_memory_gb!r} is not a positive number of GB")
    if args.scheduler is not None:
        try:
            check_address(str(args.scheduler))
        except SchedulerError as e:
            raise UsageError(str(e)) from None
    if not is_int(args.workers) or args.workers < 0:
        raise UsageError(f"--workers: {args.workers!r} is not a number of workers (0 or more)")
    try:
        check_device(str(args.device), local=not args.scheduler)  # with --scheduler, workers may have a GPU
    except ValueError as e:
        raise UsageError(f"--device {e}") from None
    try:
        epochs = EpochSpec.parse(None if args.epochs is None else comma_list(args.epochs))
    except EpochSpecError as e:
        raise UsageError(str(e)) from None
    return Settings(ckpt_dir=ckpt_dir, out=Path(args.out) if args.out else ckpt_dir / "analysis", estimators=instances,
                    runs=None if args.runs is None else comma_list(args.runs), epochs=epochs, scheduler=args.scheduler,
                    workers=args.workers,
                    force=bool(args.force), device=str(args.device), data_root=args.data_root,
                    report=bool(args.report), report_path=Path(args.report_path) if args.report_path else None,
                    xcorr_max_lag=int(args.xcorr_max_lag), max_memory_gb=float(args.max_memory_gb),
                    debug=bool(args.debug))


def check_section_types(values: dict[str, Any], cls, path: str) -> None:
    """An estimator's options in a config file: typed as JSON/TOML types (`"no"` is not false there, `"8"`
    not 8), each error one line naming the file, the estimator and the option."""
    from analyze.estimators.base import EstimatorError

    known = {o.name: o for o in cls.options}
    for key, value in values.items():
        where = f"--config {path}: {cls.name}.{key}: "
        if key not in known:
            raise UsageError(f"{where}estimator {cls.name!r} has no option {flag(cls.name, key)}")
        o = known[key]
        if o.type in (bool, int, float) and isinstance(value, str):
            kind = {bool: "true or false", int: "an integer", float: "a number"}[o.type]
            raise UsageError(f"{where}must be {kind} (as {flag(cls.name, key)} takes), not {value!r}"[:300])
        try:
            o.parse(value, cls.name)
        except EstimatorError as e:
            raise UsageError(f"{where}{e}") from None


def option_sections(options: dict[str, Any], estimators: list[tuple[str, type]]) -> dict[str, dict[str, Any]]:
    """`analyze.run`'s estimator options by estimator: llc={"chains": 2} and llc_chains=2 both give
    {"llc": {"chains": 2}}. An option that is neither a base option nor a selected estimator's gets the
    message its flag would get."""
    selected = {cls.name: cls for _, cls in estimators}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        if key in BASE_CONFIG_KEYS or key == "estimators":
            continue
        if key in registered() and key not in selected:
            raise UsageError(f"{key}: estimator {key!r} is not selected (estimators {','.join(selected)})")
        if key in selected:
            if not isinstance(value, dict):
                raise UsageError(f"{key}: must be a dict of the estimator's options, e.g. {key}={{...}}")
            sections.setdefault(key, {}).update({k.replace("-", "_"): v for k, v in value.items()})
            continue
        owner = next((name for name in selected if key.startswith(f"{name}_")
                      and key[len(name) + 1:] in {o.name for o in selected[name].options}), None)
        if owner is None:
            raise UsageError(unrecognized([flag(*key.split("_", 1)) if "_" in key else f"--{key}"], set(selected)))
        sections.setdefault(owner, {})[key[len(owner) + 1:]] = value
    return sections


def comma_list(value: Any) -> str:
    """--runs and --epochs take comma-separated text; a config file or `analyze.run` may give a list."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def unrecognized(extra: list[str], selected: set[str]) -> str:
    """Name the first unknown flag; say so when it belongs to an estimator that is not selected."""
    flag_ = next((a for a in extra if a.startswith("-")), extra[0]).split("=")[0]
    for name in registered():
        if flag_.startswith(f"--{name}-") and name not in selected:
            return f"{flag_}: estimator {name!r} is not selected (--estimators {','.join(sorted(selected))})"
    return f"unrecognized argument {flag_}" if flag_.startswith("-") else f"unexpected argument {flag_!r}"

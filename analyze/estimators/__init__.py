"""Estimator registry: built-in names, entry points, and `package.module:Class` references.

Built-ins are listed as "module:Class" strings and imported only when used, so `import analyze` (and
the workers' unpickling) stays fast. Adding a built-in estimator is one line in BUILTIN.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

BUILTIN: dict[str, str] = {
    "evaluate": "analyze.estimators.evaluate:Evaluate",
    "weights": "analyze.estimators.weights:Weights",
    "llc": "analyze.estimators.llc:LLCEstimator",
    "hsic": "analyze.estimators.hsic:HSICEstimator",
    "hessian": "analyze.estimators.hessian:HessianEstimator",
    "fim": "analyze.estimators.fim:FIMEstimator",
}
DEFAULT = ("evaluate", "weights")  # what `analyze` runs without --estimators (the cheap ones)
ENTRY_POINT_GROUP = "ckpt_dynamics.estimators"
# Folders of the output that are not estimator tables.
RESERVED_TABLES = ("errors", "runs", "training", "epochs")


def registered() -> dict[str, str]:
    """name -> "module:Class" for every built-in and every installed entry point (built-ins win)."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**found, **BUILTIN}


def load_class(ref: str):
    """Import "package.module:Class" and check that it is an Estimator subclass."""
    from analyze.estimators.base import Estimator, EstimatorError

    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise EstimatorError(f"estimator {ref!r}: expected a name or package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or an error raised while the module runs
        raise EstimatorError(f"estimator {ref!r}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    cls = module
    for part in attr.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise EstimatorError(f"estimator {ref!r}: {module_name} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Estimator)):
        raise EstimatorError(f"estimator {ref!r} is not a subclass of analyze.estimators.base.Estimator")
    for attribute in ("name", "tables"):
        if not getattr(cls, attribute, None):
            raise EstimatorError(f"estimator {ref!r} does not define {attribute!r}")
    from analyze.store import TABLE_NAME  # the store's rule: table names become folder names

    unsafe = [t for t in cls.tables if not isinstance(t, str) or not TABLE_NAME.fullmatch(t)]
    if unsafe:  # table names become folder names under OUT: no paths, no traversal
        raise EstimatorError(f"estimator {ref!r}: table name(s) {unsafe} must match {TABLE_NAME.pattern}")
    clash = sorted(set(cls.tables) & set(RESERVED_TABLES))
    if clash:
        raise EstimatorError(f"estimator {ref!r}: table name(s) {', '.join(clash)} are reserved")
    return cls


def resolve(name_or_ref: str) -> tuple[str, type]:
    """A registered name or a "module:Class" reference -> (reference, class)."""
    if ":" in name_or_ref:
        return name_or_ref, load_class(name_or_ref)
    known = registered()
    if name_or_ref not in known:
        from analyze.estimators.base import EstimatorError

        raise EstimatorError(f"unknown estimator {name_or_ref!r} (available: {', '.join(sorted(known))}, "
                             "or package.module:ClassName)")
    return known[name_or_ref], load_class(known[name_or_ref])


def parse_list(text: str | list | tuple) -> list[str]:
    """'a,b' or ['a', 'b'] or 'all' -> names/references, duplicates removed, order kept."""
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    items = [t.strip() for t in items if t.strip()]
    if items == ["all"]:
        items = sorted(registered())
    return list(dict.fromkeys(items))

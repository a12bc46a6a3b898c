"""Build the optimizer a run names, with the hyperparameters recorded in run.json."""

from __future__ import annotations

import math

import torch


def optimizer_settings(name: str, cfg) -> dict:
    """Everything that defines the optimizer of a run (recorded in run.json and checkpoints)."""
    if name == "sgd":
        return {"name": "sgd", "lr": cfg.sgd_lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov}
    if name == "ngd":
        settings = {"name": "ngd", "lr": cfg.ngd_lr, "alpha": cfg.alpha, "eta": cfg.eta, "epsilon": cfg.epsilon,
                    "delta": cfg.delta, "momentum": cfg.momentum, "nesterov": cfg.nesterov}
        # Named only when not the default, so that runs trained before the option existed keep their
        # settings (which --resume compares) and the exact mode's records stay as they were.
        if cfg.ngd_refresh != "exact":
            settings["refresh"] = cfg.ngd_refresh
        return settings
    raise ValueError(f"unknown optimizer {name!r}")


def memory_bytes(settings: dict, shapes: list[tuple[int, ...]], element_size: int = 4) -> float:
    """Memory training with this optimizer takes beyond the parameters: their gradients, the momentum
    buffer, and NGD's Fisher factors (trainer/optim/ngd.py). A float, for the memory cap (common/budget.py)."""
    params = sum(math.prod(float(d) for d in shape) for shape in shapes) * element_size
    need = params * (2.0 if settings.get("momentum", 0) else 1.0)
    if settings["name"] == "ngd":
        from trainer.optim.ngd import memory_bytes as ngd_bytes

        need += ngd_bytes(shapes, element_size)
    return need


def build_optimizer(settings: dict, params) -> torch.optim.Optimizer:
    kw = {k: v for k, v in settings.items() if k != "name"}
    if settings["name"] == "sgd":
        # torch refuses Nesterov without momentum; the study's configs always pair them.
        return torch.optim.SGD(params, **kw) if kw["momentum"] > 0 else torch.optim.SGD(params, lr=kw["lr"])
    if settings["name"] == "ngd":
        from trainer.optim.ngd import NGD

        return NGD(params, **kw)
    raise ValueError(f"unknown optimizer {settings['name']!r}")

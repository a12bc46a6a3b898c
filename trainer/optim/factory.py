"""Build the optimizer a run names, with the hyperparameters recorded in run.json."""

from __future__ import annotations

import torch


def optimizer_settings(name: str, cfg) -> dict:
    """Everything that defines the optimizer of a run (recorded in run.json and checkpoints)."""
    if name == "sgd":
        return {"name": "sgd", "lr": cfg.sgd_lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov}
    if name == "ngd":
        return {"name": "ngd", "lr": cfg.ngd_lr, "alpha": cfg.alpha, "eta": cfg.eta, "epsilon": cfg.epsilon,
                "delta": cfg.delta, "momentum": cfg.momentum, "nesterov": cfg.nesterov}
    raise ValueError(f"unknown optimizer {name!r}")


def build_optimizer(settings: dict, params) -> torch.optim.Optimizer:
    kw = {k: v for k, v in settings.items() if k != "name"}
    if settings["name"] == "sgd":
        # torch refuses Nesterov without momentum; the study's configs always pair them.
        return torch.optim.SGD(params, **kw) if kw["momentum"] > 0 else torch.optim.SGD(params, lr=kw["lr"])
    if settings["name"] == "ngd":
        from trainer.optim.ngd import NGD

        return NGD(params, **kw)
    raise ValueError(f"unknown optimizer {settings['name']!r}")

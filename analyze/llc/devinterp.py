"""SGLD through devinterp 2.x (the reference backend), adapted to classifiers and regressors.

devinterp 2 samples language models: it takes a dataset of `input_ids` rows (a HuggingFace dataset or
any map-style torch dataset) and a per-token loss `(model, input_ids) -> (batch, seq - 1)`. The adapter
stores each sample's row index twice as `input_ids` (sequences need length >= 2) in a small torch
dataset (HuggingFace's per-batch formatting cost more than the model here) and the loss looks the
samples up by index, so devinterp drives the chain, the batching and the noise while the loss is this
project's NLL.

devinterp 2.0.1 pitfalls handled here:
- it treats an existing `output_path` as a cache, even for a different model: every call gets a fresh
  folder, deleted afterwards (and with `output_path=None` it leaves temporary folders behind);
- it averages burn-in into its LLC and uses a few-batch init loss: we take only its per-step loss
  trace and compute LLC, WBIC and diagnostics ourselves, with the full-data L_n(w*);
- it samples in train mode: the loss puts the model in eval mode on every call;
- by default every chain sees the same minibatches (`match_sampling_input_ids_across_chains=True`),
  so chains are not independent and R-hat and standard errors look better than they are: turned off,
  each chain has its own batch order, as in the fast backend;
- it shuffles the data once and then replays that first epoch forever (`epoch_mode="cycle"` uses
  itertools.cycle, and `sample()` does not expose the mode): every chain cycles through the same
  n // batch batches, the samples dropped by drop_last are never seen, the loss trace is periodic,
  and ESS and standard errors come out several times too optimistic. The adapter hands it a dataset
  that holds each row index ceil(steps x batch / n) + 1 times, so its one shuffle is long enough for
  the whole chain and never replays; each batch is then a uniform draw from that multiset (unbiased,
  like a fresh epoch, though a batch may hold a sample twice);
- it always shows one progress bar per chain (devinterp.slt.sampler.trange, no option to turn it off):
  the adapter swaps in a disabled trange for the call;
- it imports transformers (~10 s): imported only when this backend runs.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from analyze.llc.sampler import SGLDSettings


@contextlib.contextmanager
def _quiet_chains():
    """devinterp 2.0.1 draws a tqdm bar per chain with no way to turn it off; disable it for one call."""
    from devinterp.slt import sampler as devinterp_sampler

    original = devinterp_sampler.trange
    devinterp_sampler.trange = functools.partial(original, disable=True)
    try:
        yield
    finally:
        devinterp_sampler.trange = original


class _RowIndices(torch.utils.data.Dataset):
    """Row i is {"input_ids": [index[i], index[i]]}: a two-token "sequence" naming one sample."""

    def __init__(self, index: torch.Tensor):
        self.ids = torch.stack([index, index], dim=1)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


# analyze.llc.sampler.SAMPLERS -> devinterp's sampling_method names
DEVINTERP_METHODS = {"sgld": "sgmcmc_sgld", "rmsprop-sgld": "rmsprop_sgld"}


def sample_losses_devinterp(model: torch.nn.Module, per_sample_loss: Callable, x: torch.Tensor,
                            y: torch.Tensor, settings: SGLDSettings) -> np.ndarray:
    """Same contract as analyze.llc.sampler.sample_losses: per-step minibatch losses, (chains, burnin + draws)."""
    from devinterp.slt.sampling import sample

    if settings.control_variate:
        raise ValueError("devinterp has no control-variate gradients (SGLD-CV); use the fast backend")
    n = len(y)
    batch = n if settings.batch_size <= 0 else min(settings.batch_size, n)
    # Full batch: every step sees all n rows. Minibatches: enough copies of every row index that
    # devinterp's single shuffle covers every step (see the module docstring).
    copies = 1 if batch == n else -(-settings.steps * batch // n) + 1
    rows = _RowIndices(torch.arange(n).repeat(copies))

    def loss_by_index(net: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        net.eval()  # devinterp calls model.train() before sampling
        idx = input_ids[:, 0].to(x.device)
        per_sample = per_sample_loss(net(x.index_select(0, idx)), y.index_select(0, idx))
        return per_sample.unsqueeze(1)  # (batch, 1) "tokens"

    folder = Path(tempfile.mkdtemp(prefix="devinterp-"))
    try:
        with _quiet_chains():
            tree = sample(model, rows, observables={}, lr=settings.lr, n_beta=settings.nbeta,
                          num_chains=settings.chains, num_draws=settings.draws, num_burnin_steps=settings.burnin,
                          batch_size=batch, localization=settings.localization, init_seed=settings.seed,
                          num_init_loss_batches=1, sampling_method=DEVINTERP_METHODS[settings.sampler],
                          match_sampling_input_ids_across_chains=False,
                          device=str(x.device), output_path=folder / "samples.zarr", loss_fn=loss_by_index)
        micro = tree.dataset["sampling_loss_micro"]  # (chain, step, batch_sampling, token_pos)
        trace = micro.mean(dim=[d for d in micro.dims if d not in ("chain", "step")]).values
        return np.asarray(trace, dtype=np.float64)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

"""Experiments: which runs to train (standard or swap), and training one run with its checkpoints and logs.

standard: every optimizer trains from the same initial weights with the same batch order.
swap:     an SGD trunk to the cut-off epoch, then two branches from the trunk's cut-off checkpoint
          (SGD with a fresh optimizer, and NGD) to num_epochs. Branches record their parent and hold
          only their own epochs (no padding); their epoch and step numbers continue the trunk's.
"""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from common import budget, checks
from common.atomic import (LockBusy, atomic_write_json, atomic_write_parquet, empty_folder, folder_lock, is_temp_file,
                            remove_temp_files)
from common.files import read_text
from trainer.checkpoints import (CheckpointError, check_name, checkpoint_name, name_mismatch,
                                 read_checkpoint, read_resume_state, save_checkpoint, save_resume_state)
from trainer.config import ConfigError, TrainConfig
from trainer.data import Splits, build_teacher, dataset_spec_from_config, load_dataset
from trainer.losses import nll_loss
from trainer.loop import EVAL_BATCH, NonFiniteLoss, evaluate, train_epoch
from trainer.models import build_model, family_name, model_sizes, model_spec_from_config
from trainer.optim.factory import build_optimizer, optimizer_settings
from trainer.optim.factory import memory_bytes as optimizer_memory
from trainer.parallel import train_in_processes
from trainer.truth import true_learning_coefficient

RUN_FORMAT = 1


class RunExistsError(RuntimeError):
    pass


@dataclass
class RunPlan:
    name: str
    family: str
    role: str  # "standard", "trunk", "branch", or "truth" (the teacher's own weights as epoch 0, never trained)
    optimizer: dict
    model_spec: dict
    first_epoch: int  # the epoch this run starts from (its checkpoint is the parent's for a branch)
    last_epoch: int
    parent: dict | None = None  # {"run": name, "epoch": cut-off}


def plan_runs(cfg: TrainConfig, model_specs: list[dict]) -> list[RunPlan]:
    plans = []
    for spec in model_specs:
        family = family_name(spec)
        if cfg.experiment_type == "standard":
            names = ["sgd", "ngd"] if cfg.optimizer == "both" else [cfg.optimizer]
            plans += [RunPlan(f"{family}-{o}", family, "standard", optimizer_settings(o, cfg), spec, 0, cfg.num_epochs)
                      for o in names]
        else:
            trunk = f"{family}-trunk"
            plans.append(RunPlan(trunk, family, "trunk", optimizer_settings("sgd", cfg), spec, 0, cfg.cut_off_epochs))
            parent = {"run": trunk, "epoch": cfg.cut_off_epochs}
            plans += [RunPlan(f"{family}-swap-{o}", family, "branch", optimizer_settings(o, cfg), spec,
                              cfg.cut_off_epochs, cfg.num_epochs, parent) for o in ("sgd", "ngd")]
        if cfg.truth_checkpoint:
            plans.append(RunPlan(f"{family}-truth", family, "truth", {"name": "none", "lr": 0.0}, spec, 0, 0))
    for plan in plans:  # run names become folder names under --out
        check_name(plan.name)
    return plans


def epoch_seed(seed: int, epoch: int) -> int:
    """Batch order and dropout of each epoch derive from (seed, epoch) alone: resuming needs no RNG state,
    and the two branches of a swap (and the runs of a standard experiment) see the same batches."""
    return (seed * 1_000_003 + epoch) % (2**63 - 1)


def versions() -> dict[str, str]:
    import safetensors

    return {"python": platform.python_version(), "torch": torch.__version__, "safetensors": safetensors.__version__}


def fingerprint(plan: RunPlan, cfg: TrainConfig, dataset_spec: dict) -> dict[str, Any]:
    """What must match for --resume to continue a run rather than start a different one."""
    return {"model_spec": plan.model_spec, "dataset_spec": dataset_spec, "optimizer": plan.optimizer,
            "seed": cfg.seed, "batch_size": cfg.batch_size, "first_epoch": plan.first_epoch,
            "last_epoch": plan.last_epoch, "parent": plan.parent, "ckpt_every_steps": cfg.ckpt_every_steps}


# The option that sizes each kind of model: the one to name when its model cannot be built.
MODEL_OPTION = {"ffnn": "hidden_nodes", "dlnn": "hidden_nodes", "cnn": "hidden_conv_layers", "layers": "layers"}


def run_experiment(cfg: TrainConfig, log=print) -> dict[str, str]:
    """Train every run the config describes. Returns {run name: status}."""
    cfg.validate()
    try:
        device = checks.check_device(cfg.device)
    except ValueError as e:
        raise ConfigError(f"invalid value for 'device': {e}") from None
    out = Path(cfg.out)
    dataset_spec = dataset_spec_from_config(cfg)
    limit = budget.cap_bytes(cfg.max_memory_gb)
    try:
        splits = load_dataset(dataset_spec, max_bytes=limit)
    except budget.OverBudget as e:
        raise ConfigError(f"invalid value for 'teacher_samples', 'teacher_input_dim' or 'teacher_hidden_nodes': {e}") from None
    specs = model_spec_from_config(cfg, splits.input_shape, splits.outputs)
    option = MODEL_OPTION[cfg.model_type]
    plans = plan_runs(cfg, specs)
    batch = min(cfg.batch_size, len(splits.train))
    for plan in plans:  # fail on an unbuildable or too large model before anything is allocated or written
        spec = plan.model_spec
        try:
            # the model and the activations of a training step (all kept for the backward pass) or of an
            # evaluation pass (one layer at a time, EVAL_BATCH samples), plus what its optimizer adds (gradients,
            # momentum, NGD's factors)
            sizes = model_sizes(spec)
            need = (max(sizes.bytes(batch, training=True), sizes.bytes(EVAL_BATCH))
                    + optimizer_memory(plan.optimizer, sizes.parameter_shapes))
            budget.check(need, limit, f"run {plan.name} (its model, the activations of a batch of {batch} and its "
                         "optimizer)")
        except budget.OverBudget as e:
            raise ConfigError(f"invalid value for '{option}' or 'batch_size': {e}") from None
        except ValueError as e:  # a spec build_model refuses
            raise ConfigError(f"invalid value for '{option}': {e}") from None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"invalid value for 'out': {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission: nothing was trained, so no --resume hint
        raise ConfigError(f"invalid value for 'out': cannot create folder {out} ({e.strerror or e})") from None
    try:
        with folder_lock(out, wait=False):  # one train-ckpts per output folder (a flock on the folder itself)
            return _train_plans(plans, cfg, splits, dataset_spec, out, device, log)
    except LockBusy as e:
        raise RunExistsError(f"another train-ckpts ({e.holder or 'unknown process'}) is writing to {out}/; "
                             "wait for it to finish, or choose another --out") from None


def _train_plans(plans: list[RunPlan], cfg: TrainConfig, splits: Splits, dataset_spec: dict, out: Path,
                 device: torch.device, log) -> dict[str, str]:
    existing = [p.name for p in plans if (out / p.name / "run.json").exists()]
    if existing and not (cfg.resume or cfg.overwrite):
        raise RunExistsError(f"run(s) {', '.join(existing)} already exist in {out}/; "
                             "use --resume to continue them or --overwrite to replace them")
    foreign = [p.name for p in plans if _holds_foreign_files(out / p.name)]
    if foreign and not cfg.overwrite:
        raise RunExistsError(f"folder(s) {', '.join(foreign)} in {out}/ hold files but no run.json; "
                             "move them away, or use --overwrite to replace them")
    statuses: dict[str, str] = {}
    for wave in _waves(plans):  # runs whose parents are trained: independent of each other
        ready = []
        for plan in wave:
            if plan.parent and statuses.get(plan.parent["run"]) != "complete":
                log(f"[{plan.name}] skipped: parent run {plan.parent['run']} did not complete")
                statuses[plan.name] = "skipped"
            else:
                ready.append(plan)
        if cfg.jobs > 1 and len(ready) > 1:
            statuses.update(train_in_processes(ready, cfg, dataset_spec, out, device, log))
        else:
            for plan in ready:
                statuses[plan.name] = RunTrainer(plan, cfg, splits, dataset_spec, out / plan.name, device, log).train()
    return statuses


def _waves(plans: list[RunPlan]) -> list[list[RunPlan]]:
    """The plans in dependency order: first those without a parent, then the branches of those, and so on."""
    waves, done, names = [], set(), {p.name for p in plans}
    left = list(plans)
    while left:
        wave = [p for p in left if not p.parent or p.parent["run"] in done or p.parent["run"] not in names]
        waves.append(wave)
        done |= {p.name for p in wave}
        left = [p for p in left if p.name not in done]
    return waves


def _holds_foreign_files(run_dir: Path) -> bool:
    """A run's folder without run.json that holds anything but a killed writer's temporary files."""
    if not run_dir.is_dir() or (run_dir / "run.json").exists():
        return False
    return any(not is_temp_file(p.name) for p in run_dir.iterdir())


class RunTrainer:
    """Train one run: fresh, resumed, or from a parent checkpoint; checkpoint and log every epoch."""

    def __init__(self, plan: RunPlan, cfg: TrainConfig, splits: Splits, dataset_spec: dict, run_dir: Path,
                 device: torch.device, log=print):
        self.plan, self.cfg, self.dataset_spec, self.run_dir, self.device, self.log = \
            plan, cfg, dataset_spec, run_dir, device, log
        self.train_split = _to(splits.train, device)
        self.eval_splits = {"val": _to(splits.val, device), "test": _to(splits.test, device)}
        self.loss_fn = nll_loss(splits.task, splits.noise_sigma)
        self.per_sample = nll_loss(splits.task, splits.noise_sigma, reduction="none")
        self.fingerprint = fingerprint(plan, cfg, dataset_spec)

    # ---------------------------------------------------------------- set-up
    def _run_record(self, status: str, **extra) -> dict:
        p = self.plan
        return {"format_version": RUN_FORMAT, "run": p.name, "family": p.family, "role": p.role,
                "experiment_type": self.cfg.experiment_type, "optimizer": p.optimizer, "model_spec": p.model_spec,
                "dataset_spec": self.dataset_spec, "seed": self.cfg.seed, "parent": p.parent,
                "epochs": {"first": p.first_epoch, "last": p.last_epoch}, "config": self.cfg.to_dict(),
                "fingerprint": self.fingerprint, "versions": versions(), "status": status,
                "learning_coefficient": true_learning_coefficient(p.model_spec, self.dataset_spec), **extra}

    def _prepare(self):
        """Return (model, optimizer, next epoch, global step, steps rows, epoch rows) to continue from."""
        run_json = self.run_dir / "run.json"
        # Temporary files of a killed earlier write (this process holds the output folder's lock, so
        # no other writer can be filling one): complete files are never touched.
        remove_temp_files([self.run_dir], everything=True)
        if run_json.exists() and self.cfg.resume:
            try:
                record = json.loads(read_text(run_json))  # a regular file of bounded size only
            except (OSError, ValueError, RecursionError) as e:
                raise ConfigError(f"{run_json}: cannot read ({str(e).splitlines()[0][:200] if str(e) else e!r}); "
                                  "use --overwrite to start the run again") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{run_json}: not a JSON object; use --overwrite to start the run again")
            if record.get("fingerprint") != json.loads(json.dumps(self.fingerprint)):
                raise ConfigError(f"{run_json}: --resume with a different configuration than the run was started "
                                  "with; use --overwrite to start it again")
            resume = self.run_dir / "resume.safetensors"
            complete = record.get("status") == "complete"
            if complete or resume.exists():
                # Trust no file: the resume state and the checkpoint it continues from are loaded in full
                # (and, for a complete run, must be its last epoch's) before the run counts as complete.
                try:
                    point = self._resume_point(resume, complete)
                except CheckpointError as e:
                    return self._redo(str(e))
                if complete:
                    return None
                self.log(f"[{self.plan.name}] resuming after epoch {point[2] - 1} (step {point[3]})")
                return point
        # --overwrite, or a resume of a run that never finished its first epoch: empty the folder but keep it,
        # so a reader listing the output folder meanwhile never finds a run folder vanishing under it.
        empty_folder(self.run_dir)
        atomic_write_json(run_json, self._run_record("running"))
        return self._start_fresh()

    def _start_fresh(self):
        p = self.plan
        if p.parent is None:
            torch.manual_seed(self.cfg.seed)  # same seed -> same initial weights for every optimizer
            model = build_model(p.model_spec)
            if p.role == "truth":  # the student's architecture equals the teacher's (checked by the config)
                model.load_state_dict(build_teacher(self.dataset_spec).state_dict())
            model.to(self.device)
            step = 0
            # Epoch 0 logs the initial weights' full training-set loss (no minibatches yet).
            train_loss, train_acc = evaluate(model, self.per_sample, self.train_split)
            epoch_rows = [self._epoch_row(model, 0, 0, train_loss, train_acc, [], 0.0)]
            self._save_ckpt(model, 0, step, train_loss, epoch_rows[0]["val_loss"])
            self._write_logs([], epoch_rows)
        else:
            parent_dir = self.run_dir.parent / p.parent["run"]
            parent = read_checkpoint(parent_dir / checkpoint_name(p.parent["epoch"]))
            model = build_model(p.model_spec)
            model.load_state_dict(parent.tensors)
            model.to(self.device)
            step = parent.meta["step"]
            epoch_rows = []
        optimizer = None if p.role == "truth" else build_optimizer(p.optimizer, model.parameters())
        return model, optimizer, p.first_epoch + 1, step, [], epoch_rows

    def _resume_point(self, resume_path: Path, complete: bool):
        """(model, optimizer, next epoch, step, steps rows, epoch rows) from the resume state and its epoch's
        checkpoint, each loaded in full and checked against the run; CheckpointError naming the file that
        cannot be used. A complete run must end at its last epoch."""
        p = self.plan
        if p.role == "truth":  # never trained: its one checkpoint is all there is
            epoch, step, opt_state = p.last_epoch, 0, None
        else:
            epoch, step, opt_state = read_resume_state(resume_path)
            if complete and epoch != p.last_epoch or not p.first_epoch < epoch <= p.last_epoch:
                raise CheckpointError(resume_path, f"holds epoch {epoch}, not one of this run's "
                                                   f"{'last epoch' if complete else 'epochs'} ({p.last_epoch})")
        path = self.run_dir / checkpoint_name(epoch)
        ckpt = read_checkpoint(path)
        mismatch = name_mismatch(path, ckpt.meta, p.name)
        if not mismatch and opt_state is not None and ckpt.meta["step"] != step:
            mismatch = f"step {ckpt.meta['step']} in its metadata, {step} in the resume state"
        if mismatch:
            raise CheckpointError(path, f"does not match its run: {mismatch}")
        model = build_model(p.model_spec)
        try:
            model.load_state_dict(ckpt.tensors)
        except Exception as e:  # names or shapes of another model
            raise CheckpointError(path, f"does not fit the run's model: {checks.one_line(e)}") from None
        model.to(self.device)
        optimizer = None
        if opt_state is not None:
            optimizer = build_optimizer(p.optimizer, model.parameters())
            try:
                optimizer.load_state_dict(opt_state)
            except Exception as e:
                raise CheckpointError(resume_path, f"invalid resume state: does not fit the optimizer: "
                                                   f"{checks.one_line(e)}") from None
        # Logs may hold rows of an epoch whose checkpoint was written but whose resume state was not.
        logs = {}
        for name in ("steps", "epochs"):
            log_path = self.run_dir / f"{name}.parquet"
            if name == "steps" and not log_path.exists():
                logs[name] = []
                continue
            try:
                frame = pd.read_parquet(log_path)
                logs[name] = frame[frame.epoch <= epoch].to_dict("records")
            except Exception as e:  # missing, truncated, not Parquet, no epoch column
                raise CheckpointError(log_path, f"cannot read: {checks.one_line(e)}") from None
        return model, optimizer, epoch + 1, step, logs["steps"], logs["epochs"]

    def _redo(self, problem: str):
        """Train the run again from its start: optimizer states of earlier epochs are not kept, so no later
        point continues it exactly. Nothing is deleted; the rewritten checkpoints have the same bytes."""
        p = self.plan
        start = (f"its parent's epoch {p.parent['epoch']}" if p.parent else "its initial weights (epoch 0)")
        self.log(f"[{p.name}] cannot resume: {problem}; redoing the run from {start}")
        atomic_write_json(self.run_dir / "run.json", self._run_record("running"))
        return self._start_fresh()

    # ---------------------------------------------------------------- records
    def _epoch_row(self, model, epoch, step, train_loss, train_acc, steps, seconds) -> dict:
        row = {"epoch": epoch, "step": step, "train_loss": train_loss,
               "train_acc": train_acc}
        for name, split in self.eval_splits.items():
            row[f"{name}_loss"], row[f"{name}_acc"] = evaluate(model, self.per_sample, split)
        norms = [s["update_norm"] for s in steps]
        row["update_norm_mean"] = sum(norms) / len(norms) if norms else float("nan")
        row["seconds"] = seconds
        return row

    def _save_ckpt(self, model, epoch, step, train_loss, val_loss, kind="epoch"):
        name = checkpoint_name(epoch) if kind == "epoch" else checkpoint_name(epoch, step)
        save_checkpoint(self.run_dir / name, model.state_dict(), run=self.plan.name, epoch=epoch, step=step,
                        optimizer=self.plan.optimizer["name"], model_spec=self.plan.model_spec,
                        dataset_spec=self.dataset_spec, kind=kind, train_loss=train_loss,
                        val_loss=float("nan") if val_loss is None else val_loss)

    def _write_logs(self, step_rows, epoch_rows):
        if step_rows:
            atomic_write_parquet(self.run_dir / "steps.parquet", pd.DataFrame(step_rows))
        frame = pd.DataFrame(epoch_rows)
        atomic_write_parquet(self.run_dir / "epochs.parquet", frame)

    # ---------------------------------------------------------------- training
    def train(self) -> str:
        prepared = self._prepare()
        if prepared is None:
            self.log(f"[{self.plan.name}] already complete")
            return "complete"
        model, optimizer, first, step, step_rows, epoch_rows = prepared
        batches = -(-len(self.train_split) // self.cfg.batch_size)
        every = self.cfg.ckpt_every_steps
        for epoch in range(first, self.plan.last_epoch + 1):
            seed = epoch_seed(self.cfg.seed, epoch)
            torch.manual_seed(seed)  # dropout
            generator = torch.Generator().manual_seed(seed)  # batch order

            def on_step(s, epoch=epoch):
                if every and s % every == 0 and s % batches != 0:
                    self._save_ckpt(model, epoch, s, float("nan"), None, kind="step")

            with tqdm(total=batches, desc=f"{self.plan.name} epoch {epoch}", leave=False, unit="batch",
                      disable=True if self.cfg.quiet else None, file=sys.stderr) as bar:  # None: off when not a TTY
                try:
                    result = train_epoch(model, optimizer, self.loss_fn, self.train_split, self.cfg.batch_size,
                                         generator, epoch=epoch, first_step=step, on_step=on_step, progress=bar)
                except NonFiniteLoss as e:
                    self.log(f"[{self.plan.name}] stopped: {e} (epoch {epoch}); checkpoints up to epoch "
                             f"{epoch - 1} are kept")
                    atomic_write_json(self.run_dir / "run.json", self._run_record(
                        "diverged", diverged_at={"epoch": epoch, "step": e.step, "loss": repr(e.loss)}))
                    return "diverged"
            step = result.steps[-1]["step"]
            step_rows += result.steps
            row = self._epoch_row(model, epoch, step, result.train_loss, result.train_acc, result.steps, result.seconds)
            epoch_rows.append(row)
            self._save_ckpt(model, epoch, step, row["train_loss"], row["val_loss"])
            self._write_logs(step_rows, epoch_rows)
            save_resume_state(self.run_dir / "resume.safetensors", epoch=epoch, step=step,
                              optimizer_state=optimizer.state_dict())
            acc = f" acc {row['val_acc']:.3f}" if row["val_acc"] == row["val_acc"] else ""
            self.log(f"[{self.plan.name}] epoch {epoch}/{self.plan.last_epoch}  train {row['train_loss']:.4f}  "
                     f"val {row['val_loss']:.4f}{acc}  |dw| {row['update_norm_mean']:.3g}  {row['seconds']:.1f}s")
        atomic_write_json(self.run_dir / "run.json", self._run_record("complete"))
        return "complete"


def _to(split, device):
    from trainer.data import Split

    return Split(split.x.to(device), split.y.to(device))

"""The training loop: iteration-based, with hooks, DDP, AMP and gradient accumulation.

A trainable method is an ``nn.Module`` with

- ``loss(batch) -> dict[str, Tensor]``: scalar losses of one batch; the total is their sum.
  Make each a mean over the batch's images, so that DDP's gradient averaging over processes
  gives the gradient of one process with the whole batch;
- ``train_dataset(cfg) -> Sequence``: its training samples (dicts of arrays, collated by
  torch's ``default_collate`` unless the method has a ``collate(samples)``);
- optionally ``trainable_parameters()``: what the optimizer updates; by default every
  parameter with ``requires_grad``. Frozen encoders never enter the optimizer;
- optionally ``optimizer_param_groups(solver) -> list[dict]``: the trainable parameters split
  into named groups (``{"name": str, "params": [...]}``, torch's param-group dicts); each
  group trains at the ``lr`` of its entry in ``solver.param_groups`` (default
  ``solver.base_lr``), or at its own ``"lr"`` when the method sets one.

One iteration is one optimizer step over ``solver.ims_per_batch`` images, split over the
processes and ``solver.grad_accum_steps`` micro-batches. Hooks (``ovseg.engine.hooks``) do
the rest: LR schedule, checkpoints, evaluation, metrics and logs.
"""

from __future__ import annotations

import bisect
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, default_collate

from ovseg.data.samplers import InfiniteSampler, seed_worker
from ovseg.engine import comm
from ovseg.errors import ConfigError, OvsegError

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULERS = ("poly", "step", "cosine", "constant")
WARMUP_METHODS = ("linear", "constant")


class TrainingError(OvsegError, RuntimeError):
    """Training cannot go on: a training-free method, a NaN/Inf loss, NaN weights."""


# --------------------------------------------------------------------------- the method


def check_trainable(method: nn.Module, name: str) -> None:
    """Raise a TrainingError unless ``method`` can be trained (has ``loss``)."""
    if not callable(getattr(method, "loss", None)):
        raise TrainingError(f"method {name} is training-free; use --eval-only")
    if not callable(getattr(method, "train_dataset", None)):
        raise TrainingError(
            f"method {name} has a loss but no train_dataset(cfg) to say what it trains on"
        )


def trainable_parameters(method: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates (see the module docstring).

    When the method lists them with ``trainable_parameters()``, every other parameter is
    frozen here (``requires_grad`` False), so DDP does not wait for gradients that never come.
    """
    if callable(getattr(method, "trainable_parameters", None)):
        params = list(method.trainable_parameters())
        chosen = {id(p) for p in params}
        for p in method.parameters():
            if id(p) not in chosen:
                p.requires_grad_(False)
    else:
        params = [p for p in method.parameters() if p.requires_grad]
    if not params:
        raise TrainingError(f"{type(method).__name__} has no trainable parameters")
    unique, seen = [], set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- optimizer, LR


def param_groups(
    solver, params: Sequence[nn.Parameter], method: nn.Module | None = None
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one group of ``params``, or the method's named groups
    (``optimizer_param_groups(solver)``, see the module docstring) with their learning rates.

    Raises:
        ConfigError: ``solver.param_groups`` names a group the method does not have.
        TrainingError: the groups do not hold each of ``params`` exactly once.
    """
    group_lrs: dict[str, float] = {}
    for entry in getattr(solver, "param_groups", None) or []:
        name = str(entry.name)
        if not name or name in group_lrs:
            problem = f"group {name!r} is listed twice" if name else "an entry has no name"
            raise ConfigError(f"solver.param_groups: {problem}")
        group_lrs[name] = float(entry.lr)
    provider = getattr(method, "optimizer_param_groups", None)
    if not callable(provider):
        if group_lrs:
            raise ConfigError(
                f"solver.param_groups names groups {sorted(group_lrs)}, but "
                f"{type(method).__name__} trains one group of parameters (at solver.base_lr)"
            )
        return [{"params": list(params)}]
    groups = []
    for group in provider(solver):
        group = dict(group)
        group["params"] = list(group["params"])
        group.setdefault("name", f"group{len(groups)}")
        if "lr" not in group:
            group["lr"] = group_lrs.get(group["name"], float(solver.base_lr))
        groups.append(group)
    names = [g["name"] for g in groups]
    unknown = sorted(set(group_lrs) - set(names))
    if unknown:
        raise ConfigError(f"solver.param_groups: unknown parameter groups {unknown}; "
                          f"{type(method).__name__} has {names}")
    grouped = [id(p) for g in groups for p in g["params"]]
    if len(grouped) != len(set(grouped)) or set(grouped) != {id(p) for p in params}:
        raise TrainingError(
            f"{type(method).__name__}.optimizer_param_groups must hold each trainable "
            f"parameter exactly once ({len(grouped)} in groups {names}, {len(params)} trainable)"
        )
    return groups


def build_optimizer(
    solver, params: Sequence[nn.Parameter], method: nn.Module | None = None
) -> torch.optim.Optimizer:
    """AdamW or SGD over ``params`` with the settings of ``cfg.solver``; with ``method``, in
    its parameter groups (:func:`param_groups`)."""
    if method is not None:
        params = param_groups(solver, params, method)  # type: ignore[assignment]
    name = str(solver.optimizer).lower()
    if name == "adamw":
        betas = tuple(float(b) for b in solver.betas)
        if len(betas) != 2:
            raise ConfigError(f"solver.betas must be two numbers, got {list(solver.betas)}")
        return torch.optim.AdamW(
            params, lr=solver.base_lr, betas=betas, eps=solver.eps,
            weight_decay=solver.weight_decay,
        )
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=solver.base_lr, momentum=solver.momentum, nesterov=solver.nesterov,
            weight_decay=solver.weight_decay,
        )
    raise ConfigError(f"solver.optimizer: unknown optimizer {solver.optimizer!r}; one of "
                      f"{OPTIMIZERS}")


@dataclass
class LRSchedule:
    """The LR factor (times ``base_lr``) after ``iteration`` completed steps.

    Warmup multiplies the first ``warmup_iters`` iterations by a factor rising linearly from
    ``warmup_factor`` to 1 (``linear``) or held at ``warmup_factor`` (``constant``). The main
    schedule runs over ``[0, max_iter]``: ``poly`` (1 - t)^power, ``cosine`` (1 + cos(pi t)) / 2,
    both from 1 to ``end_factor``; ``step`` multiplies by ``gamma`` at each of ``steps``. With
    ``step_every`` N > 1 the main factor changes only every N iterations (an epoch of N
    iterations: a per-epoch schedule); warmup stays per iteration.
    """

    max_iter: int
    name: str = "poly"
    poly_power: float = 0.9
    steps: list[int] = field(default_factory=list)
    gamma: float = 0.1
    end_factor: float = 0.0
    warmup_method: str = "linear"
    warmup_iters: int = 0
    warmup_factor: float = 0.001
    step_every: int = 1

    def __post_init__(self) -> None:
        if self.name not in LR_SCHEDULERS:
            raise ConfigError(f"solver.lr_scheduler: unknown schedule {self.name!r}; one of "
                              f"{LR_SCHEDULERS}")
        if self.warmup_method not in WARMUP_METHODS:
            raise ConfigError(f"solver.warmup_method: unknown method {self.warmup_method!r}; "
                              f"one of {WARMUP_METHODS}")
        if list(self.steps) != sorted(self.steps):
            raise ConfigError(f"solver.steps must be increasing, got {list(self.steps)}")

    def __call__(self, iteration: int) -> float:
        return self.main_factor(iteration) * self.warmup(iteration)

    def main_factor(self, iteration: int) -> float:
        # a per-epoch schedule holds the factor through each block of step_every iterations
        iteration = iteration // self.step_every * self.step_every
        t = min(max(iteration / max(self.max_iter, 1), 0.0), 1.0)
        if self.name == "poly":
            return self.end_factor + (1 - self.end_factor) * (1 - t) ** self.poly_power
        if self.name == "cosine":
            return self.end_factor + (1 - self.end_factor) * 0.5 * (1 + math.cos(math.pi * t))
        if self.name == "step":
            return self.gamma ** bisect.bisect_right(list(self.steps), iteration)
        return 1.0

    def warmup(self, iteration: int) -> float:
        if iteration >= self.warmup_iters:
            return 1.0
        if self.warmup_method == "constant":
            return self.warmup_factor
        alpha = iteration / self.warmup_iters
        return self.warmup_factor * (1 - alpha) + alpha


class ConfiguredLR(torch.optim.lr_scheduler.LambdaLR):
    """A LambdaLR whose state is its position only: the schedule itself comes from the config,
    so a run resumed with a larger ``solver.max_iter`` follows the new schedule (LambdaLR
    would restore the old one from the checkpoint)."""

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("lr_lambdas", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)})


def build_lr_scheduler(solver, optimizer: torch.optim.Optimizer) -> ConfiguredLR:
    """A per-iteration LR scheduler with the schedule of ``cfg.solver`` (stepped by a hook)."""
    schedule = LRSchedule(
        max_iter=solver.max_iter, name=str(solver.lr_scheduler), poly_power=solver.poly_power,
        steps=[int(s) for s in solver.steps], gamma=solver.gamma,
        end_factor=solver.end_lr_factor, warmup_method=str(solver.warmup_method),
        warmup_iters=solver.warmup_iters, warmup_factor=solver.warmup_factor,
        step_every=solver.lr_step_every,
    )
    return ConfiguredLR(optimizer, schedule)


# --------------------------------------------------------------------------- data


def per_process_batch_size(ims_per_batch: int, world_size: int, grad_accum_steps: int) -> int:
    """Images per micro-batch in one process; ``ims_per_batch`` must divide evenly."""
    if grad_accum_steps < 1:
        raise ConfigError(f"solver.grad_accum_steps must be at least 1, got {grad_accum_steps}")
    parts = world_size * grad_accum_steps
    if ims_per_batch < parts or ims_per_batch % parts:
        raise ConfigError(
            f"solver.ims_per_batch {ims_per_batch} (images per step over all processes) must "
            f"be a multiple of processes x grad_accum_steps = {world_size} x "
            f"{grad_accum_steps} = {parts}"
        )
    return ims_per_batch // parts


def build_train_loader(
    dataset: Sequence[Any],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    pin_memory: bool = False,
) -> tuple[DataLoader, InfiniteSampler]:
    """An endless loader of this process's share of ``dataset`` (see ``data/samplers.py``).

    Workers are seeded through the loader's own generator (``Trainer.train`` seeds it from the
    seed, the rank and the start position), so creating the loader draws nothing from the
    global torch RNG and a resumed run's workers are seeded the same way each time.
    """
    if len(dataset) == 0:
        raise TrainingError("the training set is empty")
    sampler = InfiniteSampler(len(dataset), seed=seed, shuffle=shuffle)
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn or default_collate,
        worker_init_fn=seed_worker,
        generator=torch.Generator(),
        pin_memory=pin_memory,
        drop_last=True,
    )
    return loader, sampler


def move_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (in dicts, lists, tuples) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


class _LossForward(nn.Module):
    """``forward(batch) = method.loss(batch)``: DDP synchronises gradients only for what goes
    through ``forward``, and methods keep ``forward`` for their own use."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.method.loss(batch)


# --------------------------------------------------------------------------- trainer


def _next_batch(batches):
    """``next(batches)``; an OvsegError raised in a loader worker process (which the DataLoader
    hands over as "Caught X in DataLoader worker process N" plus the worker's traceback) is
    raised again with its own one-line message."""
    try:
        return next(batches)
    except OvsegError as error:
        text = str(error)
        if not text.startswith("Caught ") or "Original Traceback" not in text:
            raise
        # the traceback's last line is "module.ErrorClass: the message"
        last = text.rstrip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
        raise type(error)(message) from None


class Trainer:
    """Runs optimizer steps of ``method.loss`` and calls the hooks around each.

    Args:
        method: the trainable method (on its device; parameters to train have requires_grad).
        data_loader: an endless loader of micro-batches (``build_train_loader``).
        sampler: its sampler; the trainer advances it by ``ims_per_batch`` per step.
        optimizer, scheduler: from ``build_optimizer`` / ``build_lr_scheduler``.
        ims_per_batch: images per step over all processes (the sampler's stride).
        grad_accum_steps: micro-batches per step.
        clip_grad_norm: max L2 norm of all gradients; 0 = off.
        amp: ``none`` | ``bf16`` | ``fp16``; only on CUDA (a warning on CPU).
        seed: seeds the loader's workers (with the rank and the start position).

    A method with ``set_training_progress(samples_seen=...)`` is told, before each step, how many
    samples all processes have consumed in the steps before it (``iter * ims_per_batch``).

    Attributes read by hooks: ``iter`` (completed steps), ``start_iter``, ``max_iter``,
    ``last_losses`` ({name: float} of the last step, this process), ``last_lr`` (of the first
    parameter group), ``last_lrs`` ({group name: lr} when there are several groups, else {}),
    ``last_step_time``, ``last_data_time`` (seconds).
    """

    def __init__(
        self,
        method: nn.Module,
        data_loader: DataLoader,
        sampler: InfiniteSampler | None,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        ims_per_batch: int,
        grad_accum_steps: int = 1,
        clip_grad_norm: float = 0.0,
        amp: str = "none",
        seed: int = 0,
        params: Sequence[nn.Parameter] | None = None,
    ) -> None:
        self.method = method
        self.data_loader = data_loader
        self.sampler = sampler
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.ims_per_batch = ims_per_batch
        self.grad_accum_steps = grad_accum_steps
        self.clip_grad_norm = clip_grad_norm
        self.seed = seed
        self.params = list(params) if params is not None else trainable_parameters(method)
        self.device = self.params[0].device
        self.amp_dtype = self._amp_dtype(amp)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        wrapped = _LossForward(method)
        if comm.get_world_size() > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(
                wrapped, device_ids=device_ids, find_unused_parameters=False
            )
        else:
            self.model = wrapped
        self.hooks: list[Any] = []
        self.iter = 0
        self.start_iter = 0
        self.max_iter = 0
        self.last_losses: dict[str, float] = {}
        self.last_lr = float(optimizer.param_groups[0]["lr"])
        self.last_lrs = self._group_lrs()
        self.last_step_time = 0.0
        self.last_data_time = 0.0
        self.failed = False
        self._data_iter: Any = None

    def _amp_dtype(self, amp: str) -> torch.dtype | None:
        amp = str(amp).lower()
        if amp == "none":
            return None
        if amp not in AMP_DTYPES:
            raise ConfigError(f"solver.amp: unknown mode {amp!r}; one of none, bf16, fp16")
        if self.device.type != "cuda":
            logger.warning("solver.amp %s is ignored: mixed precision is for GPUs and this "
                           "run trains on %s", amp, self.device)
            return None
        return AMP_DTYPES[amp]

    def register_hooks(self, hooks: Sequence[Any]) -> None:
        """Append hooks (``ovseg.engine.hooks.HookBase``); they run in the order given."""
        for hook in hooks:
            if hook is None:
                continue
            hook.trainer = self
            self.hooks.append(hook)

    def state_dicts(self) -> dict[str, Any]:
        """What a checkpoint stores besides the model, by name."""
        return {"optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler, "sampler": self.sampler}

    # ---- loop --------------------------------------------------------------------------------
    def train(self, start_iter: int, max_iter: int) -> None:
        """Run steps ``start_iter + 1 .. max_iter`` with the hooks around them."""
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        logger.info("training from iteration %d to %d", start_iter, max_iter)
        if self.data_loader.generator is not None:
            # the workers' seeds depend on where this run starts, not on the global RNG
            self.data_loader.generator.manual_seed(
                int(np.random.SeedSequence([self.seed, comm.get_rank(), start_iter])
                    .generate_state(1)[0])
            )
        self._data_iter = iter(self.data_loader)
        try:
            for hook in self.hooks:
                hook.before_train()
            while self.iter < max_iter:
                for hook in self.hooks:
                    hook.before_step()
                self.run_step()
                for hook in self.hooks:
                    hook.after_step()
        except BaseException:
            self.failed = True
            raise
        finally:
            try:
                for hook in self.hooks:
                    hook.after_train()
            finally:
                # shuts the loader's workers down
                self._data_iter = None

    def run_step(self) -> None:
        """One optimizer step: ``grad_accum_steps`` micro-batches, clip, step; ``iter`` += 1."""
        started = time.perf_counter()
        self.model.train()
        # methods with an epoch-dependent loss (CLIP2Scene's self-training) read their position
        # from here: derived from the restored iteration, it survives a resume
        set_progress = getattr(self.method, "set_training_progress", None)
        if callable(set_progress):
            set_progress(samples_seen=self.iter * self.ims_per_batch)
        data_time = 0.0
        summed: dict[str, torch.Tensor] = {}
        for micro in range(self.grad_accum_steps):
            fetch = time.perf_counter()
            batch = move_to_device(_next_batch(self._data_iter), self.device)
            data_time += time.perf_counter() - fetch
            last = micro == self.grad_accum_steps - 1
            # accumulate locally; DDP all-reduces once, in the last micro-batch's backward
            no_sync = getattr(self.model, "no_sync", None)
            with no_sync() if (no_sync is not None and not last) else nullcontext():
                with self._autocast():
                    losses = self.model(batch)
                total = self._total_loss(losses)
                self.scaler.scale(total / self.grad_accum_steps).backward()
            for name, value in losses.items():
                detached = value.detach().float() / self.grad_accum_steps
                summed[name] = summed[name] + detached if name in summed else detached
        if self.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.last_lrs = self._group_lrs()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.sampler is not None:
            self.sampler.advance(self.ims_per_batch)
        self.iter += 1
        self.last_losses = {name: float(value) for name, value in summed.items()}
        self.last_data_time = data_time
        self.last_step_time = time.perf_counter() - started

    def _group_lrs(self) -> dict[str, float]:
        """{group name: lr} when the optimizer has more than one group, else {}."""
        groups = self.optimizer.param_groups
        if len(groups) < 2:
            return {}
        return {str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(groups)}

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _total_loss(self, losses: Any) -> torch.Tensor:
        """Sum of the loss terms, after checking each is a finite scalar."""
        if not isinstance(losses, Mapping) or not losses:
            raise TrainingError(
                f"{type(self.method).__name__}.loss must return a non-empty dict of scalar "
                f"tensors, got {type(losses).__name__}"
            )
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = [name for name, ok in zip(losses, finite.tolist(), strict=True) if not ok]
            value = float(values[list(losses).index(bad[0])])
            raise TrainingError(
                f"loss {bad[0]} is {value} at iteration {self.iter + 1}; stopped before the "
                "update, so the last checkpoint stays the last good one (try a lower "
                "solver.base_lr, solver.clip_grad_norm, or check the data)"
            )
        return sum(losses.values())  # type: ignore[return-value]


def build_trainer(cfg, method: nn.Module) -> Trainer:
    """A Trainer of ``method`` with the optimizer, schedule and loader of ``cfg``.

    The hooks are added by ``ovseg.engine.hooks.default_hooks``.
    """
    solver = cfg.solver
    world = comm.get_world_size()
    batch_size = per_process_batch_size(solver.ims_per_batch, world, solver.grad_accum_steps)
    params = trainable_parameters(method)
    optimizer = build_optimizer(solver, params, method)
    scheduler = build_lr_scheduler(solver, optimizer)
    dataset = method.train_dataset(cfg)
    device = params[0].device
    loader, sampler = build_train_loader(
        dataset, batch_size, seed=cfg.seed, shuffle=cfg.dataloader.shuffle,
        num_workers=cfg.dataloader.num_workers, collate_fn=getattr(method, "collate", None),
        pin_memory=device.type == "cuda",
    )
    logger.info(
        "%d training samples; %d images per step = %d processes x %d accumulation x %d",
        len(dataset), solver.ims_per_batch, world, solver.grad_accum_steps, batch_size,
    )
    return Trainer(
        method, loader, sampler, optimizer, scheduler, ims_per_batch=solver.ims_per_batch,
        grad_accum_steps=solver.grad_accum_steps, clip_grad_norm=solver.clip_grad_norm,
        amp=solver.amp, seed=cfg.seed, params=params,
    )


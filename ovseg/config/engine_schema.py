"""Config schema of training: solver, LR schedule, data loading, checkpoints, periodic eval.

``cfg.solver`` holds everything one optimizer step and the loop around it need; iterations count
optimizer steps (a step may accumulate ``grad_accum_steps`` micro-batches). ``cfg.dataloader``
holds how training samples are read. The defaults are those of a small fine-tuning run; each
method's config sets its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ParamGroupConfig:
    """The learning rate of one named parameter group of a method (``solver.param_groups``)."""

    name: str = ""
    lr: float = 1e-4


@dataclass
class SolverConfig:
    max_iter: int = 1000
    # images per optimizer step over all processes and accumulation steps together, so that
    # a config means the same training on 1 GPU or 8 (it must divide by processes x accum)
    ims_per_batch: int = 16
    grad_accum_steps: int = 1

    optimizer: str = "adamw"  # adamw | sgd
    base_lr: float = 1e-4
    # learning rates of a method's named parameter groups (clip_dinoiser: correlation,
    # background), e.g. [{name: background, lr: 0.01}]; a group not listed trains at base_lr
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8  # adamw
    clip_grad_norm: float = 0.0  # max L2 norm of all gradients together; 0 = no clipping

    lr_scheduler: str = "poly"  # poly | step | cosine | constant
    poly_power: float = 0.9
    steps: list[int] = field(default_factory=list)  # step: iterations where lr *= gamma
    gamma: float = 0.1
    end_lr_factor: float = 0.0  # poly / cosine: the lr at max_iter, as a factor of base_lr
    warmup_method: str = "linear"  # linear | constant
    warmup_iters: int = 0
    warmup_factor: float = 0.001  # lr factor at iteration 0 of the warmup
    # the schedule's factor changes every N iterations: N = iterations per epoch gives a
    # per-epoch schedule (CLIP2Scene's cosine); 1 = every iteration
    lr_step_every: int = 1

    amp: str = "none"  # none | bf16 | fp16; GPU only (ignored with a warning on CPU)

    checkpoint_period: int = 1000  # iterations between checkpoints; one more at max_iter
    max_checkpoints: int = 0  # keep the newest N checkpoints; 0 = keep all
    # checkpoints hold the trainable parameters only; true also stores the frozen encoders
    checkpoint_frozen: bool = False
    eval_period: int = 0  # iterations between evaluations on datasets.test; 0 = only at the end
    log_period: int = 20  # iterations between metrics.json lines and console logs


@dataclass
class DataLoaderConfig:
    num_workers: int = 0  # worker processes per training process; 0 = load in the main process
    crop_size: int = 224  # side of the square training crop for methods that train on crops
    shuffle: bool = True  # a new permutation of the training set per epoch, seeded by cfg.seed

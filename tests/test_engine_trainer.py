"""Tests of ovseg.engine.trainer and ovseg.engine.hooks, in one process on a toy method."""

from __future__ import annotations

import json
import logging
import math
import sys
import types

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ovseg.config import apply_overrides
from ovseg.config.schema import Config
from ovseg.engine.checkpoint import Checkpointer
from ovseg.engine.hooks import EvalHook, HookBase, default_hooks
from ovseg.engine.trainer import (
    LRSchedule,
    TrainingError,
    build_lr_scheduler,
    build_optimizer,
    build_trainer,
    check_trainable,
    per_process_batch_size,
    trainable_parameters,
)
from ovseg.errors import ConfigError


class ToyRegression(nn.Module):
    """A linear head on a frozen linear 'encoder', fitting y = x . w on 32 fixed samples."""

    def __init__(self, bad_call: int | None = None) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.encoder = nn.Linear(4, 4).requires_grad_(False)
        self.head = nn.Linear(4, 1)
        for p in [*self.encoder.parameters(), *self.head.parameters()]:
            p.data = torch.randn(p.shape, generator=generator)
        self.bad_call = bad_call
        self.calls = 0

    def loss(self, batch):
        self.calls += 1
        prediction = self.head(self.encoder(batch["x"])).squeeze(-1)
        mse = ((prediction - batch["y"]) ** 2).mean()
        if self.calls == self.bad_call:
            mse = mse * float("nan")
        return {"loss_mse": mse, "loss_zero": mse.detach() * 0}

    def train_dataset(self, cfg):
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(32, 4, generator=generator)
        y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        return [{"x": x[i], "y": y[i]} for i in range(32)]


def make_cfg(tmp_path, *overrides: str):
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    base = ["output_dir", str(tmp_path), "solver.max_iter", "6", "solver.ims_per_batch", "8",
            "solver.optimizer", "sgd", "solver.base_lr", "0.05", "solver.momentum", "0.0",
            "solver.weight_decay", "0.0", "solver.lr_scheduler", "constant",
            "solver.checkpoint_period", "1", "solver.log_period", "1"]
    return apply_overrides(cfg, [*base, *overrides])


def train(cfg, method, evaluate=None):
    trainer = build_trainer(cfg, method)
    checkpointer = Checkpointer(method, cfg.output_dir, **trainer.state_dicts())
    trainer.register_hooks(default_hooks(cfg, checkpointer, evaluate))
    trainer.train(checkpointer.resume_or_load(resume=False), cfg.solver.max_iter)
    return trainer, checkpointer


# --------------------------------------------------------------------------- the loop


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    one = ToyRegression()
    train(make_cfg(tmp_path / "one"), one)
    accumulated = ToyRegression()
    trainer, _ = train(make_cfg(tmp_path / "two", "solver.grad_accum_steps", "2"), accumulated)
    assert trainer.data_loader.batch_size == 4
    torch.testing.assert_close(accumulated.head.weight, one.head.weight)
    assert not torch.equal(one.head.weight, ToyRegression().head.weight)
    # the frozen encoder never moved and never entered the optimizer
    assert torch.equal(one.encoder.weight, ToyRegression().encoder.weight)
    assert len(trainer.optimizer.param_groups[0]["params"]) == 2


def test_metrics_lines_and_loss_falls(tmp_path):
    cfg = make_cfg(tmp_path, "solver.max_iter", "20", "solver.log_period", "5",
                   "solver.checkpoint_period", "10")
    train(cfg, ToyRegression())
    records = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [5, 10, 15, 20]
    for record in records:
        assert {"total_loss", "loss_mse", "loss_zero", "lr", "time", "data_time",
                "eta_seconds"} <= set(record)
        assert record["total_loss"] == pytest.approx(record["loss_mse"] + record["loss_zero"])
    assert records[-1]["loss_mse"] < 0.5 * records[0]["loss_mse"]
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000020"


def test_tensorboard_gets_the_same_scalars_when_installed(tmp_path, monkeypatch):
    scalars, closed = [], []

    class SummaryWriter:
        def __init__(self, log_dir):
            assert log_dir == str(tmp_path / "tensorboard")

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            closed.append(True)

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    train(make_cfg(tmp_path, "solver.max_iter", "2"), ToyRegression())
    assert ("loss_mse", 1) in scalars and ("lr", 2) in scalars and ("time", 2) in scalars
    assert closed == [True]


def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path):
    method = ToyRegression(bad_call=3)
    with pytest.raises(TrainingError, match=r"loss loss_mse is nan at iteration 3"):
        train(make_cfg(tmp_path), method)
    checkpointer = Checkpointer(method, tmp_path)
    assert checkpointer.last_checkpoint() == "model_0000002"
    assert checkpointer.all_checkpoints() == ["model_0000001", "model_0000002"]
    assert torch.isfinite(method.head.weight).all()


def test_non_finite_weights_are_never_saved(tmp_path):
    class Poison(HookBase):
        # runs between step 3's update and its checkpoint
        def after_step(self):
            if self.trainer.iter == 3:
                with torch.no_grad():
                    self.trainer.method.head.bias.fill_(float("inf"))

    cfg = make_cfg(tmp_path)
    method = ToyRegression()
    trainer = build_trainer(cfg, method)
    checkpointer = Checkpointer(method, tmp_path, **trainer.state_dicts())
    trainer.register_hooks([Poison(), *default_hooks(cfg, checkpointer)])
    with pytest.raises(TrainingError, match="NaN/Inf after iteration 3"):
        trainer.train(0, 6)
    assert checkpointer.last_checkpoint() == "model_0000002"


def test_loss_must_be_a_dict(tmp_path):
    class NoDict(ToyRegression):
        def loss(self, batch):
            return super().loss(batch)["loss_mse"]

    with pytest.raises(TrainingError, match="must return a non-empty dict"):
        train(make_cfg(tmp_path), NoDict())


def test_amp_is_ignored_on_cpu_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ovseg"):
        trainer = build_trainer(make_cfg(tmp_path, "solver.amp", "bf16"), ToyRegression())
    assert trainer.amp_dtype is None
    assert "solver.amp bf16 is ignored" in caplog.text
    with pytest.raises(ConfigError, match="solver.amp"):
        build_trainer(make_cfg(tmp_path, "solver.amp", "fp8"), ToyRegression())


def test_eval_hook_runs_at_its_period_and_leaves_the_rng_alone(tmp_path):
    calls = []

    def evaluate(iteration):
        calls.append(iteration)
        torch.rand(100)  # an evaluation that draws numbers must not shift training's RNG
        return {"toy": {"mIoU": 50.0 + iteration, "per_class": {}}}

    cfg = make_cfg(tmp_path, "solver.eval_period", "2")
    trainer = build_trainer(cfg, ToyRegression())
    checkpointer = Checkpointer(trainer.method, tmp_path, **trainer.state_dicts())
    trainer.register_hooks(default_hooks(cfg, checkpointer, evaluate))
    hook = next(h for h in trainer.hooks if isinstance(h, EvalHook))
    trainer.iter, trainer.max_iter = 2, 6
    before = torch.get_rng_state()
    hook.after_step()
    assert torch.equal(torch.get_rng_state(), before)
    trainer.train(0, 6)
    assert calls == [2, 2, 4]  # the direct call, then 2 and 4; not 6 (the final evaluation)
    lines = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert {"iteration": 4, "eval/toy/mIoU": 54.0} in lines


# --------------------------------------------------------------------------- building blocks


def test_trainable_parameters_and_check_trainable():
    method = ToyRegression()
    assert [p.shape for p in trainable_parameters(method)] == [(1, 4), (1,)]

    class Declared(ToyRegression):
        def trainable_parameters(self):
            return [self.head.weight]

    declared = Declared()
    assert trainable_parameters(declared) == [declared.head.weight]
    assert not declared.head.bias.requires_grad  # frozen, so DDP waits for no gradient

    with pytest.raises(TrainingError, match="method dense_clip is training-free; use --eval-only"):
        check_trainable(nn.Linear(1, 1), "dense_clip")
    frozen = ToyRegression().requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        trainable_parameters(frozen)


def test_lr_schedules():
    poly = LRSchedule(max_iter=100, name="poly", poly_power=1.0, warmup_iters=10,
                      warmup_factor=0.1)
    assert poly(0) == pytest.approx(0.1)
    assert poly(5) == pytest.approx((0.1 * 0.5 + 0.5) * 0.95)
    assert poly(10) == pytest.approx(0.9)
    assert poly(100) == pytest.approx(0.0)
    constant_warmup = LRSchedule(max_iter=100, name="constant", warmup_method="constant",
                                 warmup_iters=3, warmup_factor=0.2)
    assert [constant_warmup(i) for i in range(5)] == [0.2, 0.2, 0.2, 1.0, 1.0]
    step = LRSchedule(max_iter=100, name="step", steps=[30, 60], gamma=0.1)
    assert [step(i) for i in (0, 29, 30, 59, 60, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = LRSchedule(max_iter=100, name="cosine", end_factor=0.1)
    assert cosine(0) == pytest.approx(1.0)
    assert cosine(50) == pytest.approx(0.55)
    assert cosine(100) == pytest.approx(0.1)
    assert math.isclose(LRSchedule(max_iter=10, name="poly", end_factor=0.2)(10), 0.2)
    with pytest.raises(ConfigError, match="solver.lr_scheduler"):
        LRSchedule(max_iter=10, name="exp")
    with pytest.raises(ConfigError, match="solver.steps"):
        LRSchedule(max_iter=10, name="step", steps=[5, 2])


def test_scheduler_is_stepped_per_iteration(tmp_path):
    cfg = make_cfg(tmp_path, "solver.lr_scheduler", "step", "solver.steps", "[3]",
                   "solver.gamma", "0.5")
    trainer, _ = train(cfg, ToyRegression())
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert lrs == pytest.approx([0.05, 0.05, 0.05, 0.025, 0.025, 0.025])


def test_resuming_with_a_longer_run_follows_the_new_schedule(tmp_path):
    params = [nn.Parameter(torch.zeros(2))]
    short = make_cfg(tmp_path, "solver.lr_scheduler", "poly", "solver.poly_power", "1.0",
                     "solver.max_iter", "10").solver
    optimizer = build_optimizer(short, params)
    scheduler = build_lr_scheduler(short, optimizer)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = torch.load(_saved(scheduler.state_dict(), tmp_path), weights_only=True)
    assert "lr_lambdas" not in state

    longer = make_cfg(tmp_path, "solver.lr_scheduler", "poly", "solver.poly_power", "1.0",
                      "solver.max_iter", "20").solver
    resumed = build_lr_scheduler(longer, build_optimizer(longer, params))
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 5
    resumed.optimizer.step()
    resumed.step()
    assert resumed.get_last_lr()[0] == pytest.approx(0.05 * (1 - 6 / 20))


def _saved(state, tmp_path):
    path = tmp_path / "scheduler.pth"
    torch.save(state, path)
    return path


def test_optimizers(tmp_path):
    params = [nn.Parameter(torch.zeros(2))]
    adamw = build_optimizer(make_cfg(tmp_path, "solver.optimizer", "adamw",
                                     "solver.betas", "[0.8, 0.9]").solver, params)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.8, 0.9)
    sgd = build_optimizer(make_cfg(tmp_path, "solver.momentum", "0.7").solver, params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.7
    with pytest.raises(ConfigError, match="solver.optimizer: unknown optimizer 'lamb'"):
        build_optimizer(make_cfg(tmp_path, "solver.optimizer", "lamb").solver, params)


def test_batch_split_over_processes_and_accumulation():
    assert per_process_batch_size(16, 2, 2) == 4
    with pytest.raises(ConfigError, match="multiple of processes x grad_accum_steps = 2 x 3"):
        per_process_batch_size(16, 2, 3)
    with pytest.raises(ConfigError, match="at least 1"):
        per_process_batch_size(16, 1, 0)


def test_resume_drops_metrics_lines_past_the_checkpoint(tmp_path):
    from ovseg.engine.hooks import drop_metrics_after

    path = tmp_path / "metrics.json"
    lines = [json.dumps({"iteration": i, "total_loss": 1.0 / i}) for i in range(1, 8)]
    path.write_text("\n".join(lines) + '\n{"iteration": 8, "tot')  # cut short by a kill
    assert drop_metrics_after(path, 5) == 3
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [
        1, 2, 3, 4, 5]
    assert drop_metrics_after(path, 5) == 0
    assert drop_metrics_after(tmp_path / "absent.json", 5) == 0


def test_per_epoch_cosine_equals_torch_cosine_annealing_stepped_each_epoch():
    # CLIP2Scene's schedule: CosineAnnealingLR(T_max=30 epochs) stepped once an epoch
    epochs, iters_per_epoch = 30, 150
    schedule = LRSchedule(max_iter=epochs * iters_per_epoch, name="cosine",
                          step_every=iters_per_epoch)
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    for epoch in range(epochs):
        expected = optimizer.param_groups[0]["lr"]
        for iteration in (epoch * iters_per_epoch, (epoch + 1) * iters_per_epoch - 1):
            assert 0.1 * schedule(iteration) == pytest.approx(expected, rel=1e-12, abs=1e-15)
        optimizer.step()
        reference.step()
    # per iteration (step_every 1) differs inside an epoch
    assert LRSchedule(max_iter=4500, name="cosine")(149) < schedule(149) == 1.0


def test_lr_step_every_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="solver.lr_step_every"):
        make_cfg(tmp_path, "solver.lr_step_every", "0")


class ProgressRecorder(ToyRegression):
    """Records what the trainer says it has consumed before each step."""

    def __init__(self) -> None:
        super().__init__()
        self.progress: list[int] = []

    def set_training_progress(self, samples_seen: int) -> None:
        self.progress.append(samples_seen)


def test_trainer_tells_the_method_its_progress_and_a_resume_continues_it(tmp_path):
    method = ProgressRecorder()
    train(make_cfg(tmp_path, "solver.max_iter", "3"), method)
    assert method.progress == [0, 8, 16]  # iterations before each step x ims_per_batch 8
    resumed = ProgressRecorder()
    cfg = make_cfg(tmp_path, "solver.max_iter", "5")
    trainer = build_trainer(cfg, resumed)
    checkpointer = Checkpointer(resumed, cfg.output_dir, **trainer.state_dicts())
    trainer.train(checkpointer.resume_or_load(resume=True), cfg.solver.max_iter)
    assert resumed.progress == [24, 32]

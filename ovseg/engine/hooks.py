"""Training hooks: LR schedule, checkpoints, periodic evaluation, metrics, console progress.

A hook is called by the trainer before and after training and around every step; after a
step ``trainer.iter`` is the number of completed steps. ``default_hooks`` builds the usual set
from a config, in the order that matters: the LR schedule steps first (so a checkpoint holds
the schedule of its iteration), checkpoints are saved before evaluation (a failing evaluation
loses no training), and metrics are written last.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from ovseg.engine import comm
from ovseg.engine.checkpoint import Checkpointer, rng_state, set_rng_state
from ovseg.engine.trainer import TrainingError
from ovseg.io import atomic_write_bytes, raise_if_disk_full

if TYPE_CHECKING:
    from ovseg.engine.trainer import Trainer

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
TENSORBOARD_DIR = "tensorboard"
# tests only: the iteration after which the training process SIGKILLs itself
KILL_AFTER_ITER_ENV = "OVSEG_TEST_KILL_AFTER_ITER"


class HookBase:
    """Does nothing at every point; subclasses override what they need.

    ``self.trainer`` is set by ``Trainer.register_hooks``.
    """

    trainer: Trainer

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass


def _is_due(iteration: int, period: int, max_iter: int) -> bool:
    return period > 0 and iteration % period == 0 and iteration < max_iter


def append_metrics(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``path`` (the caller is rank 0); a full disk is a WriteError."""
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(record), sort_keys=False) + "\n")
    except OSError as error:
        raise_if_disk_full(path, error)
        raise


def drop_metrics_after(path: str | os.PathLike[str], iteration: int) -> int:
    """Rewrite ``path`` without the lines of iterations after ``iteration``; returns how many
    were dropped. A run resumed from iteration k redoes the steps after k, so the lines a killed
    run wrote past its checkpoint would otherwise appear twice."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record_iteration = json.loads(line).get("iteration", 0)
        except (json.JSONDecodeError, AttributeError):
            dropped += 1  # a line cut short by the kill
            continue
        if record_iteration > iteration:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        atomic_write_bytes(path, "".join(kept).encode("utf-8"))
    return dropped


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the body and put every RNG back as it was: an evaluation in the middle of training
    must not change what the rest of the run draws (a resumed run never ran it)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class LRScheduler(HookBase):
    """Steps the trainer's LR scheduler after every optimizer step."""

    def after_step(self) -> None:
        self.trainer.scheduler.step()


class PeriodicCheckpointer(HookBase):
    """Saves a checkpoint every ``period`` iterations and at the last one.

    Weights that are no longer finite are not saved: training stops with a TrainingError and
    the previous checkpoint stays the last one.
    """

    def __init__(self, checkpointer: Checkpointer, period: int) -> None:
        self.checkpointer = checkpointer
        self.period = period

    def after_step(self) -> None:
        iteration, max_iter = self.trainer.iter, self.trainer.max_iter
        if not (_is_due(iteration, self.period, max_iter) or iteration == max_iter):
            return
        for p in self.trainer.params:
            if not bool(torch.isfinite(p.detach()).all()):
                raise TrainingError(
                    f"the weights hold NaN/Inf after iteration {iteration}; not saving them, so "
                    f"the last checkpoint ({self.checkpointer.last_checkpoint()}) stays the "
                    "last good one (try a lower solver.base_lr or solver.clip_grad_norm)"
                )
        self.checkpointer.save(iteration)


class EvalHook(HookBase):
    """Calls ``evaluate(iteration)`` every ``period`` iterations (not at the last one: the
    command line evaluates the final model) and logs its scalar results to ``metrics.json``.

    ``evaluate`` runs on every process (it is collective) and returns results on rank 0:
    ``{benchmark: {metric: value, ...}}``.
    """

    def __init__(self, period: int, evaluate: Callable[[int], Mapping[str, Any] | None],
                 output_dir: str | os.PathLike[str] | None = None) -> None:
        self.period = period
        self.evaluate = evaluate
        self.metrics_path = Path(output_dir) / METRICS_FILE if output_dir else None

    def after_step(self) -> None:
        iteration = self.trainer.iter
        if not _is_due(iteration, self.period, self.trainer.max_iter):
            return
        method = self.trainer.method
        was_training = method.training
        method.eval()
        try:
            with preserved_rng():
                results = self.evaluate(iteration)
        finally:
            method.train(was_training)
        comm.synchronize()
        if results and comm.is_main_process() and self.metrics_path is not None:
            record: dict[str, Any] = {"iteration": iteration}
            for benchmark, metrics in results.items():
                for name, value in (metrics or {}).items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        record[f"eval/{benchmark}/{name}"] = value
            append_metrics(self.metrics_path, record)


class MetricsWriter(HookBase):
    """Every ``period`` iterations (and at the last): one ``metrics.json`` line, TensorBoard
    scalars when ``torch.utils.tensorboard`` imports, and one console log line.

    Losses are averaged over the iterations since the last line and over the processes;
    ``time`` and ``data_time`` are seconds per iteration (median over those iterations).
    """

    def __init__(self, output_dir: str | os.PathLike[str], period: int,
                 tensorboard: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.period = max(1, period)
        self.use_tensorboard = tensorboard
        self._tensorboard: Any = None
        self._losses: dict[str, list[float]] = defaultdict(list)
        self._times: list[float] = []
        self._data_times: list[float] = []

    def before_train(self) -> None:
        if not comm.is_main_process():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        dropped = drop_metrics_after(self.output_dir / METRICS_FILE, self.trainer.start_iter)
        if dropped:
            logger.info("dropped %d %s lines past iteration %d (redone by this run)", dropped,
                        METRICS_FILE, self.trainer.start_iter)
        if self.use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.debug("tensorboard is not installed; metrics go to %s only", METRICS_FILE)
            else:
                self._tensorboard = SummaryWriter(str(self.output_dir / TENSORBOARD_DIR))

    def after_step(self) -> None:
        trainer = self.trainer
        for name, value in trainer.last_losses.items():
            self._losses[name].append(value)
        self._times.append(trainer.last_step_time)
        self._data_times.append(trainer.last_data_time)
        if trainer.iter % self.period == 0 or trainer.iter == trainer.max_iter:
            self.write()

    def write(self) -> None:
        trainer = self.trainer
        names = sorted(self._losses)
        means = torch.tensor([sum(self._losses[n]) / len(self._losses[n]) for n in names],
                             dtype=torch.float64)
        # collective: every process reaches this line at the same iteration
        means = comm.all_reduce_sum(means) / comm.get_world_size()
        losses = dict(zip(names, means.tolist(), strict=True))
        step_time = statistics.median(self._times) if self._times else 0.0
        data_time = statistics.median(self._data_times) if self._data_times else 0.0
        eta = step_time * (trainer.max_iter - trainer.iter)
        self._losses.clear()
        self._times.clear()
        self._data_times.clear()
        if not comm.is_main_process():
            return
        record = {
            "iteration": trainer.iter,
            "total_loss": sum(losses.values()),
            **losses,
            "lr": trainer.last_lr,
            **{f"lr/{name}": lr for name, lr in getattr(trainer, "last_lrs", {}).items()},
            "time": step_time,
            "data_time": data_time,
            "eta_seconds": eta,
        }
        append_metrics(self.output_dir / METRICS_FILE, record)
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "iteration":
                    self._tensorboard.add_scalar(key, value, trainer.iter)
        loss_text = "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                              if k == "total_loss" or k in losses)
        logger.info(
            "iter %d/%d  %s  lr %.3g  %.4f s/it  data %.4f s  eta %s", trainer.iter,
            trainer.max_iter, loss_text, trainer.last_lr, step_time, data_time,
            datetime.timedelta(seconds=round(eta)),
        )

    def after_train(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


class ProgressBar(HookBase):
    """A tqdm bar of the iterations with the last total loss, on rank 0.

    By default only when stderr is a terminal: in a log file the console lines of
    ``MetricsWriter`` say the same without carriage-return clutter.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = enabled
        self._bar: tqdm | None = None

    def before_train(self) -> None:
        enabled = sys.stderr.isatty() if self.enabled is None else self.enabled
        if enabled and comm.is_main_process():
            self._bar = tqdm(total=self.trainer.max_iter, initial=self.trainer.start_iter,
                             desc="train", unit="it", dynamic_ncols=True)

    def after_step(self) -> None:
        if self._bar is not None:
            total = sum(self.trainer.last_losses.values())
            self._bar.set_postfix(loss=f"{total:.4g}", lr=f"{self.trainer.last_lr:.3g}",
                                  refresh=False)
            self._bar.update(1)

    def after_train(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class KillAfterIteration(HookBase):
    """Tests only: SIGKILL this process right after iteration ``iteration`` (its hooks done),
    to check that a run that really died resumes exactly."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def after_step(self) -> None:
        if self.trainer.iter == self.iteration:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def default_hooks(
    cfg,
    checkpointer: Checkpointer,
    evaluate: Callable[[int], Mapping[str, Any] | None] | None = None,
) -> list[HookBase]:
    """LR schedule, checkpoints, periodic evaluation (when ``evaluate`` is given and
    ``solver.eval_period`` > 0), metrics and the progress bar, from ``cfg.solver``."""
    solver = cfg.solver
    hooks: list[HookBase] = [
        LRScheduler(),
        PeriodicCheckpointer(checkpointer, solver.checkpoint_period),
    ]
    if evaluate is not None and solver.eval_period > 0:
        hooks.append(EvalHook(solver.eval_period, evaluate, cfg.output_dir))
    hooks += [MetricsWriter(cfg.output_dir, solver.log_period), ProgressBar()]
    kill_at = os.environ.get(KILL_AFTER_ITER_ENV, "").strip()
    if kill_at:
        hooks.append(KillAfterIteration(int(kill_at)))
    return hooks

"""The training command line: train a method, resume it, or evaluate it, on 1..N processes.

    python tools/train_net.py --config-file configs/tiny/linear_probe_tiny.yaml \\
        datasets.train '[my_set]' solver.max_iter 1000
    python tools/train_net.py --config-file CONFIG --num-gpus 8 --resume
    python tools/train_net.py --config-file CONFIG --eval-only
    python tools/train_net.py --config-file CONFIG --num-gpus 8 --num-machines 2 \\
        --machine-rank 0 --dist-url tcp://HOST:PORT

Trailing ``KEY VALUE`` pairs override config keys. Everything goes to ``output_dir``:
``config.yaml`` (the merged config), ``log.txt``, ``metrics.json``, checkpoints
(``model_XXXXXXX.*``, ``last_checkpoint``) and evaluation results (``<benchmark>/``).
Under ``torchrun`` the process group comes from its environment variables instead.

Exit status: 0 done; 2 a mistake that stops the run (config, data, weights, a training-free
method, a NaN loss, an output_dir that cannot be written, a full disk), reported as one
``error:`` line; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import ovseg
from ovseg.config import save_config
from ovseg.console import TqdmHandler
from ovseg.engine import comm
from ovseg.engine.launch import launch
from ovseg.engine.run_lock import hold_output_dir
from ovseg.errors import ConfigError, OvsegError
from ovseg.io import ensure_writable_dir

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

logger = logging.getLogger("ovseg.train_net")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_net.py",
        description="Train or evaluate an ovseg method, on one or more processes and machines.",
        epilog="Config overrides go last, as KEY VALUE pairs: solver.max_iter 1000",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config YAML")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last good checkpoint in output_dir (with "
                        "--eval-only: evaluate its weights and continue an interrupted evaluation)")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate on datasets.test without training")
    parser.add_argument("--save-predictions", action="store_true",
                        help="also write each predicted label map under OUTPUT_DIR/<benchmark>")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="processes per machine: one per GPU; without GPUs, CPU processes")
    parser.add_argument("--num-machines", type=int, default=1, help="machines in the job")
    parser.add_argument("--machine-rank", type=int, default=0,
                        help="this machine's index in [0, num-machines)")
    parser.add_argument("--overwrite", action="store_true",
                        help="train from scratch into an output_dir that already holds "
                        "checkpoints (also: OUTPUT_DIR_OVERWRITE=1 in the environment)")
    parser.add_argument("--dist-url", default="auto",
                        help="tcp://HOST:PORT of machine 0; 'auto' = a free local port (one "
                        "machine only)")
    parser.add_argument("opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, detectron2 style, at the end of the command line")
    return parser


class _LogFile(logging.FileHandler):
    """``log.txt``; when a line cannot be written (a full disk) one warning line says so and the
    log goes on on the console only, instead of logging's traceback for every record."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        error = sys.exc_info()[1]
        reason = getattr(error, "strerror", None) or error
        tqdm.write(f"warning: cannot write {self.baseFilename} ({reason}); the log goes on on "
                   "the console only", file=sys.stderr)


def setup_logging(output_dir: str | Path) -> None:
    """INFO on rank 0 (console + ``output_dir/log.txt``), warnings only on the other ranks."""
    package_logger = logging.getLogger("ovseg")
    for handler in list(package_logger.handlers):
        package_logger.removeHandler(handler)
        handler.close()
    # tqdm's default lock holds a multiprocessing semaphore that a killed process leaks (a
    # resource_tracker warning after the launcher's error line); one process draws the bars
    tqdm.set_lock(threading.RLock())
    rank = comm.get_rank()
    prefix = f"[rank {rank}] " if comm.get_world_size() > 1 else ""
    formatter = logging.Formatter(f"[%(asctime)s] {prefix}%(message)s", "%m/%d %H:%M:%S")
    console = TqdmHandler()  # through tqdm: a running progress bar stays intact
    console.setFormatter(formatter)
    package_logger.addHandler(console)
    if rank == 0:
        package_logger.setLevel(logging.INFO)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        log_file = _LogFile(Path(output_dir) / "log.txt", encoding="utf-8")
        log_file.setFormatter(formatter)
        package_logger.addHandler(log_file)
    else:
        package_logger.setLevel(logging.WARNING)
    # the console handler is ours; the root logger's would print every line twice
    package_logger.propagate = False


def load_config(args: argparse.Namespace):
    """The merged config, with ``model.device`` set to the GPU when the run uses GPUs."""
    cfg = ovseg.get_config(args.config_file, args.opts)
    if args.save_predictions:
        cfg.evaluation.save_predictions = True
    if torch.cuda.is_available() and args.num_gpus >= 1 and cfg.model.device == "cpu":
        # --num-gpus on a GPU machine means train on them (NCCL needs CUDA tensors)
        cfg.model.device = "cuda"
    return cfg


def _weights_spec(cfg) -> str:
    return str(cfg.model.weights or "")


def evaluate(model, cfg, output_dir: str | Path, **options):
    """Evaluate ``model`` on ``cfg.datasets.test`` (collective; results on rank 0);
    ``options``: ``evaluate_model``'s (resume, and the checkpoint or training iteration of the
    weights, which results.json records)."""
    from ovseg.engine.evaluate import evaluate_model

    model.eval()
    return evaluate_model(model, cfg, str(output_dir), **options)


def main_worker(args: argparse.Namespace) -> None:
    """What every process runs: build, then train (and evaluate) or evaluate only."""
    from ovseg.engine.checkpoint import Checkpointer
    from ovseg.engine.hooks import default_hooks
    from ovseg.engine.trainer import build_trainer, check_trainable, seed_everything

    cfg = load_config(args)
    output_dir = Path(cfg.output_dir)
    setup_logging(output_dir)
    if comm.is_main_process():
        save_config(cfg, output_dir / "config.yaml")
        logger.info("config saved to %s", output_dir / "config.yaml")
    # different streams per process (augmentation); DDP broadcasts rank 0's initial weights
    seed_everything(cfg.seed + comm.get_rank())
    model = ovseg.build_model(cfg)
    weights = _weights_spec(cfg)

    if args.eval_only:
        if not cfg.datasets.test:
            raise ConfigError("--eval-only needs benchmarks in datasets.test, e.g. "
                              "datasets.test '[ade20k_150]'")
        checkpointer = Checkpointer(model, output_dir,
                                    include_frozen=cfg.solver.checkpoint_frozen)
        name = checkpointer.find_resumable() if args.resume else None
        checkpoint = None
        if name is not None:
            checkpointer.load(name, model_only=True)
            checkpoint = checkpointer.paths(name)["model"]
        elif weights:
            logger.info("evaluating with model.weights %s", weights)  # build_model loaded them
        elif callable(getattr(model, "loss", None)):
            logger.warning("evaluating %s with untrained weights: pass --resume (the last "
                           "checkpoint of output_dir) or model.weights", cfg.model.name)
        # --resume also continues an interrupted evaluation (its saved state, if it fits)
        evaluate(model, cfg, output_dir, resume=args.resume, checkpoint=checkpoint)
        return

    check_trainable(model, cfg.model.name)
    trainer = build_trainer(cfg, model)
    checkpointer = Checkpointer(
        model, output_dir, include_frozen=cfg.solver.checkpoint_frozen,
        max_to_keep=cfg.solver.max_checkpoints, **trainer.state_dicts(),
    )

    def periodic_evaluation(iteration: int):
        return evaluate(model, cfg, output_dir / "eval" / f"iter_{iteration:07d}",
                        iteration=iteration)

    trainer.register_hooks(
        default_hooks(cfg, checkpointer, periodic_evaluation if cfg.datasets.test else None)
    )
    # model.weights are already in the model (ovseg.build_model loads them); a resumable
    # checkpoint of output_dir replaces them
    start_iter = checkpointer.resume_or_load("", resume=args.resume)
    if start_iter >= cfg.solver.max_iter:
        logger.info("the checkpoint is at iteration %d, solver.max_iter is %d: nothing to "
                    "train", start_iter, cfg.solver.max_iter)
    else:
        trainer.train(start_iter, cfg.solver.max_iter)
    if cfg.datasets.test:
        evaluate(model, cfg, output_dir, iteration=max(start_iter, cfg.solver.max_iter))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# switches that may also come after the config overrides, as detectron2 accepts them
_TRAILING_SWITCHES = {"--resume": "resume", "--eval-only": "eval_only",
                      "--save-predictions": "save_predictions", "--overwrite": "overwrite"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with ``--resume`` (and the other switches) accepted anywhere, also
    among the trailing ``KEY VALUE`` overrides."""
    args = build_parser().parse_args(argv)
    opts = []
    for item in args.opts:
        if item in _TRAILING_SWITCHES:
            setattr(args, _TRAILING_SWITCHES[item], True)
        else:
            opts.append(item)
    args.opts = opts
    return args


def check_output_dir(args: argparse.Namespace, cfg) -> None:
    """Training (not resuming) into an output_dir that holds checkpoints would mix two runs:
    refuse unless ``--overwrite`` (or ``OUTPUT_DIR_OVERWRITE=1``) says so."""
    if args.eval_only or args.resume or args.overwrite:
        return
    if os.environ.get("OUTPUT_DIR_OVERWRITE", "") not in ("", "0"):
        return
    output_dir = Path(cfg.output_dir)
    found = sorted(p.name for p in output_dir.glob("model_*.safetensors"))
    if (output_dir / "last_checkpoint").exists() or found:
        example = f" ({found[-1]})" if found else ""
        raise ConfigError(
            f"output_dir {output_dir} already holds checkpoints{example}: pass --resume to "
            "continue that run, --overwrite (or OUTPUT_DIR_OVERWRITE=1) to train from scratch "
            "into it, or another output_dir"
        )


def _cpu_process_memory(args: argparse.Namespace, cfg) -> tuple[int, str] | None:
    """What one CPU process needs, when several are about to start (else None: no check)."""
    if args.num_gpus <= 1 or torch.cuda.is_available():
        return None
    from ovseg.engine.resources import process_memory_bytes

    return process_memory_bytes(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # read the config here too: a mistake in it is reported before any process starts
        cfg = load_config(args)
        check_output_dir(args, cfg)
        if args.machine_rank == 0:
            # a read-only output_dir, or a file in its place, is one line before any process
            # starts (root passes permission bits, so a probe file is written)
            ensure_writable_dir(cfg.output_dir)
        # one live run per output_dir (machine 0 holds it for a multi-machine job)
        holding = hold_output_dir(cfg.output_dir) if args.machine_rank == 0 else nullcontext()
        with holding:
            launch(main_worker, args.num_gpus, num_machines=args.num_machines,
                   machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,),
                   job="evaluation" if args.eval_only else "training",
                   memory_per_process=_cpu_process_memory(args, cfg))
    except OvsegError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

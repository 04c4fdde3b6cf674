"""Process launching: run a function once per GPU (or CPU process), on one machine or several.

``launch(main_func, num_gpus_per_machine, ...)`` hides torch.distributed setup:

- under ``torchrun`` (its RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR variables are set), the
  process group is initialised from the environment and ``main_func`` runs in this process;
- otherwise one process per GPU is spawned on this machine (``--num-gpus N`` on a machine
  without GPUs spawns N CPU processes), each joining the group at ``dist_url``;
- one process in all (one machine, ``num_gpus_per_machine <= 1``) runs ``main_func`` directly,
  without a process group.

NCCL is the backend on GPUs and gloo on CPUs. An :class:`~ovseg.errors.OvsegError` raised by
``main_func`` in a spawned process is raised again by ``launch`` in the parent, so a command
line reports it as one error line whatever the number of processes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ovseg.engine import comm
from ovseg.engine.resources import available_memory_bytes
from ovseg.errors import OvsegError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)
# the variables torchrun (and torch.distributed.launch) sets in every process it starts
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
# set to 1 to start more CPU processes than cores (tests on a one-core machine do)
OVERSUBSCRIBE_VARIABLE = "OVSEG_ALLOW_OVERSUBSCRIBE"
# a spawned process whose launcher is gone exits with this code
_PARENT_GONE_EXIT_CODE = 3
# a spawned process that hits an OvsegError exits with this code after handing the error over
_USER_ERROR_EXIT_CODE = 2


class LaunchError(OvsegError, RuntimeError):
    """Processes cannot be started as asked (GPU count, machine rank, address)."""


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def under_torchrun() -> bool:
    """True when torchrun's variables are set, so this process is one of a started job."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    args: Sequence[Any] = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    job: str = "training",
    memory_per_process: tuple[int, str] | None = None,
) -> Any:
    """Run ``main_func(*args)`` in every process of a (possibly multi-machine) job.

    Args:
        main_func: a module-level function (spawned processes import it by name).
        num_gpus_per_machine: processes per machine: one per GPU, or CPU processes where there
            is no GPU; 0 counts as 1.
        num_machines: machines in the job; every machine runs this same call.
        machine_rank: this machine's index in [0, num_machines).
        dist_url: ``tcp://host:port`` of machine 0 (or ``env://``); ``"auto"`` picks a free
            local port, which only a single machine can use.
        args: positional arguments of ``main_func`` (picklable when processes are spawned).
        timeout: how long collectives wait for a missing process before failing.
        job: what the processes do ("training", "evaluation"), for the message when one dies.
        memory_per_process: (bytes, what they are) one CPU process needs at least
            (:func:`ovseg.engine.resources.process_memory_bytes`); N processes that need more
            than the machine has available are refused before any starts.

    Returns:
        ``main_func``'s return value when it ran in this process, else None.

    Raises:
        LaunchError: invalid counts or ranks, more GPUs asked than present, or several
            machines without an explicit ``dist_url``.
        OvsegError: the error a spawned process raised.
    """
    if under_torchrun():
        return _run_under_torchrun(main_func, args, timeout)
    if num_machines < 1:
        raise LaunchError(f"--num-machines must be at least 1, got {num_machines}")
    if not 0 <= machine_rank < num_machines:
        raise LaunchError(
            f"--machine-rank {machine_rank} is not in [0, {num_machines}) for "
            f"--num-machines {num_machines}"
        )
    if num_gpus_per_machine < 0:
        raise LaunchError(f"--num-gpus must not be negative, got {num_gpus_per_machine}")
    processes = max(1, num_gpus_per_machine)
    world_size = processes * num_machines
    if world_size == 1:
        return main_func(*args)

    backend = default_backend()
    if backend == "nccl" and processes > torch.cuda.device_count():
        raise LaunchError(
            f"--num-gpus {processes} but this machine has {torch.cuda.device_count()} GPUs"
        )
    cores = os.cpu_count() or 1
    oversubscribe = os.environ.get(OVERSUBSCRIBE_VARIABLE, "") not in ("", "0")
    if backend != "nccl" and processes > cores and not oversubscribe:
        raise LaunchError(
            f"--num-gpus {processes} on a machine without GPUs starts {processes} CPU "
            f"processes, but it has {cores} cores: use at most --num-gpus {cores} (or set "
            f"{OVERSUBSCRIBE_VARIABLE}=1 to run them anyway)"
        )
    if backend != "nccl" and memory_per_process is not None and not oversubscribe:
        _check_memory(processes, *memory_per_process)
    if dist_url == "auto":
        if num_machines > 1:
            raise LaunchError(
                "--num-machines > 1 needs --dist-url tcp://HOST:PORT with the address of "
                "machine 0 (a port free on it), the same on every machine"
            )
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    if num_machines > 1 and dist_url.startswith("tcp://127.0.0.1"):
        logger.warning("dist_url %s is local, but the job spans %d machines", dist_url,
                       num_machines)

    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    try:
        mp.start_processes(
            _spawned_worker,
            nprocs=processes,
            args=(main_func, args, world_size, processes, num_machines, machine_rank, dist_url,
                  backend, timeout, errors, os.getpid()),
            join=True,
            daemon=False,
            start_method="spawn",
        )
    except mp.ProcessExitedException as exc:
        error = _reported_error(errors)
        if error is not None:
            raise error from None
        raise LaunchError(f"a{'n' if job[:1] in 'aeiou' else ''} {job} process died: {exc}") \
            from exc
    except mp.ProcessRaisedException:
        error = _reported_error(errors)
        if error is not None:
            raise error from None
        raise
    return None


def _check_memory(processes: int, need: int, what: str) -> None:
    """Refuse N CPU processes whose model copies need more memory than is available."""
    available = available_memory_bytes()
    if available is None or processes * need <= available:
        return
    fits = max(1, available // max(need, 1))
    raise LaunchError(
        f"--num-gpus {processes} on a machine without GPUs starts {processes} CPU processes, "
        f"each with its own model (at least {need / 2**30:.1f} GiB: {what}), "
        f"{processes * need / 2**30:.1f} GiB in all, but {available / 2**30:.1f} GiB of memory "
        f"is available: use at most --num-gpus {fits} (or set {OVERSUBSCRIBE_VARIABLE}=1 to "
        "run them anyway)"
    )


def _reported_error(errors) -> BaseException | None:
    """The first error a spawned process handed over, if any."""
    try:
        return None if errors.empty() else errors.get()
    except Exception:  # an exception class that cannot be rebuilt here
        return LaunchError("a training process failed (its error could not be read back)")


def die_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """End this process when the launcher ``parent_pid`` ends (SIGKILL or SIGTERM of
    ``train_net`` included), so that no worker runs on and writes into an output_dir that a
    rerun uses: the kernel's parent-death signal where there is one (Linux), and a watchdog
    thread that polls the parent everywhere (it also covers a parent that died before this
    call)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watchdog alone
        pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(_PARENT_GONE_EXIT_CODE)
            time.sleep(poll_seconds)

    threading.Thread(target=watch, name="ovseg-parent-watchdog", daemon=True).start()


def _create_local_groups(num_machines: int, per_machine: int, machine_rank: int) -> None:
    # every process must take part in creating every group, in the same order
    for machine in range(num_machines):
        ranks = list(range(machine * per_machine, (machine + 1) * per_machine))
        group = dist.new_group(ranks)
        if machine == machine_rank:
            comm.set_local_group(group)


def _spawned_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    args: Sequence[Any],
    world_size: int,
    per_machine: int,
    num_machines: int,
    machine_rank: int,
    dist_url: str,
    backend: str,
    timeout: timedelta,
    errors,
    parent_pid: int,
) -> None:
    die_with_parent(parent_pid)
    rank = machine_rank * per_machine + local_rank
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    else:
        # N CPU processes on one machine share its cores; without this each takes them all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_machine))
    os.environ["LOCAL_RANK"] = str(local_rank)
    try:
        dist.init_process_group(
            backend, init_method=dist_url, world_size=world_size, rank=rank, timeout=timeout
        )
    except Exception as exc:
        errors.put(LaunchError(f"process {rank} cannot join the process group at {dist_url}: "
                               f"{exc}"))
        sys.exit(_USER_ERROR_EXIT_CODE)
    _create_local_groups(num_machines, per_machine, machine_rank)
    comm.synchronize()
    try:
        main_func(*args)
    except OvsegError as exc:
        # hand the error to the parent, which raises it again: one error line, not N tracebacks
        try:
            errors.put(exc)
        except Exception:
            errors.put(OvsegError(str(exc)))
        sys.exit(_USER_ERROR_EXIT_CODE)
    comm.synchronize()
    dist.destroy_process_group()


def _run_under_torchrun(main_func: Callable[..., Any], args: Sequence[Any], timeout) -> Any:
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size <= 1 or comm.is_distributed():
        return main_func(*args)
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method="env://", timeout=timeout)
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size % per_machine == 0:
        # torchrun numbers the processes of one machine contiguously
        _create_local_groups(world_size // per_machine, per_machine,
                             dist.get_rank() // per_machine)
    try:
        result = main_func(*args)
        comm.synchronize()
        return result
    finally:
        dist.destroy_process_group()

"""One live run per output_dir: a lock file naming the holder's pid and host.

A second ``train_net`` into an output_dir that a live run holds would race it (checkpoints,
``results.json``): it refuses with one line naming the holder. A lock left by a run that died
(its pid is gone on this host) is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ovseg.errors import OvsegError

LOCK_NAME = ".ovseg.lock"


class OutputDirInUse(OvsegError, RuntimeError):
    """Another live run holds the output_dir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def hold_output_dir(output_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``output_dir`` (created if needed) for the duration of the block.

    Raises:
        OutputDirInUse: a live run on this host, or a run on another host, holds it.
    """
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    host = socket.gethostname()
    record = json.dumps({"pid": os.getpid(), "host": host, "started": time.time()})
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            pid, holder_host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and holder_host == host and not _alive(pid):
                path.unlink(missing_ok=True)  # a dead run's lock: take it over
                continue
            raise OutputDirInUse(
                f"output_dir {directory} is in use by another run (pid {pid} on host "
                f"{holder_host}, lock file {path}); wait for it, use another output_dir, or "
                "delete the lock file if that run is dead"
            ) from None
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(record)
        break
    else:
        raise OutputDirInUse(f"output_dir {directory}: cannot take the lock file {path}")
    try:
        yield path
    finally:
        if _read(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)

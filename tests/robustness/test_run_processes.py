"""Process hygiene of tools/train_net.py: workers die with their launcher, one live run per
output_dir, --num-gpus checked against the cores (issue 23)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ovseg.engine.launch import LaunchError, launch
from ovseg.engine.run_lock import LOCK_NAME, OutputDirInUse, hold_output_dir
from tests.test_engine_train import _command, _env, make_toy_dataset, write_config


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the field after the ")" that ends the command name: state, then ppid
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_live_runs_lock_refuses_a_second_run_in_one_line(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps(
            {"pid": sleeper.pid, "host": socket.gethostname(), "started": 0}))
        with pytest.raises(OutputDirInUse) as info, hold_output_dir(tmp_path):
            pass
        text = str(info.value)
        assert f"pid {sleeper.pid} on host {socket.gethostname()}" in text and "\n" not in text
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: its lock is taken over, and released after the block
    with hold_output_dir(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_killing_the_launcher_kills_its_workers(tmp_path):
    config = write_config(tmp_path / "toy.yaml", make_toy_dataset(tmp_path / "data", count=4))
    config.write_text(config.read_text().replace("max_iter: 300", "max_iter: 100000"))
    output = tmp_path / "run"
    launcher = subprocess.Popen(_command(config, output, ["--num-gpus", "2"]),
                                cwd=Path(__file__).resolve().parents[2], env=_env(None),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (output / "metrics.json").exists():
            time.sleep(0.5)
        assert (output / "metrics.json").exists(), "the workers never started training"
        workers = [pid for pid in _children(launcher.pid) if _alive(pid)]
        assert len(workers) >= 2
        # a second run into the same output_dir is refused while this one lives
        second = subprocess.run(_command(config, output, ["--resume"]), capture_output=True,
                                text=True, timeout=120, env=_env(None),
                                cwd=Path(__file__).resolve().parents[2])
        assert second.returncode == 2 and f"pid {launcher.pid}" in second.stderr
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "a worker outlived its launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()


def _never_called() -> None:  # pragma: no cover - launch refuses before spawning
    raise AssertionError


def test_more_cpu_processes_than_cores_is_refused(monkeypatch):
    cores = os.cpu_count() or 1
    if __import__("torch").cuda.is_available():
        pytest.skip("with GPUs --num-gpus counts GPUs")
    monkeypatch.delenv("OVSEG_ALLOW_OVERSUBSCRIBE", raising=False)
    with pytest.raises(LaunchError, match=f"it has {cores} cores"):
        launch(_never_called, cores + 1)


def _die_on_rank_one() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        os._exit(1)


def test_a_dead_process_during_evaluation_is_an_evaluation_failure():
    with pytest.raises(LaunchError, match="an evaluation process died"):
        launch(_die_on_rank_one, 2, job="evaluation")


def test_the_memory_estimate_counts_the_encoders_the_build_holds():
    import ovseg
    from ovseg.engine.resources import RUNTIME_BYTES, process_memory_bytes

    # open_clip's ViT-B-16: 149,620,737 parameters (image and text towers), float32
    need, what = process_memory_bytes(ovseg.get_config("dense_clip/maskclip_vitb16.yaml"))
    assert need == RUNTIME_BYTES + 149_620_737 * 4
    assert what.startswith("clip ViT-B-16 0.6 GiB") and "dino" not in what  # MaskCLIP: no DINO
    # ProxyCLIP's proxy adds DINO ViT-B/8 (85,807,872 parameters in timm, head-less)
    proxy, what = process_memory_bytes(ovseg.get_config("dense_clip/proxyclip_vitb16.yaml"))
    assert "dino vit_base_patch8_224.dino" in what and proxy - need > 80e6 * 4


def test_more_cpu_processes_than_the_memory_holds_is_refused(monkeypatch):
    import ovseg.engine.launch as launch_module

    if __import__("torch").cuda.is_available():
        pytest.skip("with GPUs --num-gpus counts GPUs")
    monkeypatch.delenv("OVSEG_ALLOW_OVERSUBSCRIBE", raising=False)
    monkeypatch.setattr(launch_module.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(launch_module, "available_memory_bytes", lambda: 5 * 2**30)
    with pytest.raises(LaunchError, match=r"at least 2\.0 GiB: clip .*, 8\.0 GiB in all, but "
                                          r"5\.0 GiB .*use at most --num-gpus 2"):
        launch(_never_called, 4, memory_per_process=(2 * 2**30, "clip ViT-B-16 1.0 GiB"))
    monkeypatch.setenv("OVSEG_ALLOW_OVERSUBSCRIBE", "1")  # the user's override runs them
    monkeypatch.setattr(launch_module.mp, "start_processes", lambda *a, **k: None)
    assert launch(_never_called, 4, memory_per_process=(2 * 2**30, "clip")) is None


def test_train_net_checks_the_memory_of_n_cpu_processes_before_spawning(
        tmp_path, monkeypatch, capsys):
    import ovseg.engine.launch as launch_module
    from tools.train_net import main

    if __import__("torch").cuda.is_available():
        pytest.skip("with GPUs --num-gpus counts GPUs")
    monkeypatch.delenv("OVSEG_ALLOW_OVERSUBSCRIBE", raising=False)
    monkeypatch.setattr(launch_module.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(launch_module, "available_memory_bytes", lambda: 2**30)
    monkeypatch.setattr(launch_module.mp, "start_processes", _never_called)
    code = main(["--config-file", "configs/tiny/dense_clip_tiny.yaml", "--eval-only",
                 "--num-gpus", "2", "output_dir", str(tmp_path / "out"),
                 "datasets.test", "[voc_21]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: --num-gpus 2 on a machine without GPUs") and \
        "use at most --num-gpus 1" in err[0]

"""Tests of ovseg.engine.launch and ovseg.engine.comm: spawning, torchrun, collectives, sharding.

Spawned processes (gloo, CPU) run this module's functions, so they are module-level.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ovseg.engine import comm
from ovseg.engine.launch import LaunchError, find_free_port, launch, under_torchrun
from ovseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _report(output_dir: str) -> None:
    total = comm.all_reduce_sum(torch.tensor([comm.get_rank() + 1.0]))
    gathered = comm.all_gather_objects(comm.get_rank() * 10)
    comm.synchronize()
    record = {
        "rank": comm.get_rank(), "world": comm.get_world_size(),
        "local_rank": comm.get_local_rank(), "main": comm.is_main_process(),
        "sum": total.item(), "gathered": gathered, "backend": torch.distributed.get_backend(),
        "broadcast": comm.broadcast_object(f"from {comm.get_rank()}"),
    }
    Path(output_dir, f"rank{comm.get_rank()}.json").write_text(json.dumps(record))


def _fail_on_rank_one() -> None:
    if comm.get_rank() == 1:
        raise ConfigError("solver.base_lr: rank 1 does not like it")
    comm.synchronize()  # rank 0 waits here until the launcher stops it


def test_two_cpu_processes_form_a_gloo_group(tmp_path):
    launch(_report, 2, args=(str(tmp_path),))
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, record in enumerate(records):
        assert record["rank"] == rank and record["world"] == 2
        assert record["local_rank"] == rank and record["main"] == (rank == 0)
        assert record["sum"] == 3.0  # 1 + 2
        assert record["gathered"] == [0, 10]
        assert record["backend"] == "gloo"
        assert record["broadcast"] == "from 0"


def test_user_error_in_a_spawned_process_is_raised_in_the_parent():
    with pytest.raises(ConfigError, match="rank 1 does not like it"):
        launch(_fail_on_rank_one, 2)


def test_one_process_runs_directly_without_a_process_group():
    def main(x, y):
        assert not comm.is_distributed()
        return x + y

    assert launch(main, 1, args=(2, 3)) == 5
    assert launch(main, 0, args=(2, 3)) == 5  # --num-gpus 0: one CPU process


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_machines": 2}, "needs --dist-url"),
        ({"num_machines": 2, "machine_rank": 2, "dist_url": "tcp://h:1"}, "--machine-rank 2"),
        ({"num_machines": 0}, "--num-machines must be at least 1"),
    ],
)
def test_launch_mistakes_are_errors(kwargs, message):
    with pytest.raises(LaunchError, match=message):
        launch(lambda: None, 1, **kwargs)


def test_negative_gpu_count_is_an_error():
    with pytest.raises(LaunchError, match="--num-gpus"):
        launch(lambda: None, -1)


def test_torchrun_variables_with_one_process_run_directly(monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    assert under_torchrun()
    # num_gpus_per_machine is ignored: torchrun already started the processes
    assert launch(lambda: comm.get_world_size(), 8) == 1


def test_under_torchrun_the_group_comes_from_the_environment(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from ovseg.engine.launch import launch
        from tests.test_engine_launch import _report
        launch(_report, 1, args=({str(tmp_path)!r},))
    """))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(find_free_port()), str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in records] == [2, 2]
    assert [r["local_rank"] for r in records] == [0, 1]
    assert records[1]["sum"] == 3.0


def test_comm_without_a_process_group():
    assert comm.get_rank() == 0 and comm.get_world_size() == 1
    assert comm.is_main_process() and comm.get_local_rank() == 0
    comm.synchronize()
    tensor = torch.tensor([2.0])
    assert comm.all_reduce_sum(tensor) is tensor and tensor.item() == 2.0
    assert comm.all_gather_objects("x") == ["x"]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shard_indices_cover_every_index_once(world):
    for n in [0, 1, 2, 3, 5, 10, 11, 100, 101]:
        shards = [list(comm.shard_indices(n, rank, world)) for rank in range(world)]
        assert sorted(i for shard in shards for i in shard) == list(range(n))
        sizes = [len(shard) for shard in shards]
        assert max(sizes) - min(sizes) <= 1
        assert shards == [list(comm.shard_indices(n, rank, world)) for rank in range(world)]


def test_shard_indices_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2"):
        comm.shard_indices(10, 2, 2)

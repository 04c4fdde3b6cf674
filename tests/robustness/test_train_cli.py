"""tools/train_net.py as users called it: --resume among the overrides, and a second training
run into an output_dir that holds checkpoints (issue 23, "Small things users saw")."""

from __future__ import annotations

import pytest

from tests.test_engine_train import make_toy_dataset, train_net, write_config


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_cli")
    config = base / "toy.yaml"
    write_config(config, make_toy_dataset(base / "data", count=4))
    text = config.read_text().replace("max_iter: 300", "max_iter: 4").replace(
        "checkpoint_period: 100", "checkpoint_period: 2")
    config.write_text(text)
    output = base / "run"
    train_net(config, output)
    return config, output


def test_training_again_into_a_run_with_checkpoints_refuses_in_one_line(short_run):
    config, output = short_run
    before = sorted(p.name for p in output.iterdir())
    done = train_net(config, output, expect=2)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and "already holds checkpoints" in lines[-1]
    assert "--resume" in lines[-1] and "--overwrite" in lines[-1]
    assert sorted(p.name for p in output.iterdir()) == before  # nothing touched


def test_resume_anywhere_on_the_command_line(short_run):
    config, output = short_run
    # after the overrides, detectron2 style: nothing left to train, exit 0
    done = train_net(config, output, "solver.log_period", "1", "--resume")
    assert "nothing to train" in done.stderr


def test_overwrite_trains_from_scratch(short_run, tmp_path):
    config, output = short_run
    done = train_net(config, output, "--overwrite")
    assert "nothing to train" not in done.stderr
    done = train_net(config, output, env={"OUTPUT_DIR_OVERWRITE": "1"})
    assert "nothing to train" not in done.stderr

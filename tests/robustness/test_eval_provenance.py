"""What was evaluated (issue 23): ``results.json`` records the trained weights the model held
(the checkpoint ``--eval-only --resume`` picked, or ``model.weights``, with their sha256) and
the encoders the model used, not every encoder section of its config; the run logs
``<benchmark>: mIoU .., mAcc .. -> <results.json>`` to the console and ``log.txt``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

import ovseg
from ovseg.engine.evaluate import (
    TRAINING_FREE,
    UNTRAINED,
    evaluate_model,
    trained_weights_protocol,
    weights_protocol,
)
from tests.test_engine_train import make_toy_dataset, train_net, write_config


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("config", "encoders"), [
    ("tiny/dense_clip_tiny.yaml", ["clip"]),  # MaskCLIP: its config also has dino and sam
    ("tiny/dense_clip_tiny_proxy.yaml", ["clip", "dino"]),  # ProxyCLIP's DINO proxy
    ("tiny/clip_dinoiser_tiny.yaml", ["clip"]),  # DINO is the training teacher only
    ("tiny/trident_tiny.yaml", ["clip", "dino", "sam"]),
])
def test_results_name_only_the_encoders_the_model_holds(config, encoders):
    cfg = ovseg.get_config(config)
    assert {"clip", "dino"} <= set(cfg.model)  # the config has more than the model uses
    protocol = weights_protocol(cfg, ovseg.build_model(cfg))
    assert list(protocol) == encoders
    assert protocol["clip"] == {"arch": str(cfg.model.clip.arch), "weights": "random"}


def test_training_free_and_untrained_are_told_apart():
    dense = ovseg.get_config("tiny/dense_clip_tiny.yaml")
    assert trained_weights_protocol(ovseg.build_model(dense), dense) == TRAINING_FREE
    dinoiser = ovseg.get_config("tiny/clip_dinoiser_tiny.yaml")
    assert trained_weights_protocol(ovseg.build_model(dinoiser), dinoiser) == UNTRAINED


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-iteration linear-probe run on the toy set, evaluated at its end."""
    base = tmp_path_factory.mktemp("provenance")
    config = write_config(base / "toy.yaml", make_toy_dataset(base / "data", count=3),
                          test=True)
    config.write_text(config.read_text().replace("max_iter: 300", "max_iter: 2").replace(
        "checkpoint_period: 100", "checkpoint_period: 2"))
    output = base / "run"
    train_net(config, output)
    return config, output


def test_a_training_runs_evaluation_names_its_iteration(trained_run):
    _, output = trained_run
    results = json.loads((output / "toy" / "results.json").read_text())
    assert results["protocol"]["trained_weights"] == {"source": "training", "iteration": 2}


def test_eval_only_resume_records_the_checkpoint_and_logs_the_numbers(trained_run):
    config, output = trained_run
    done = train_net(config, output, "--eval-only", "--resume")
    results_path = output / "toy" / "results.json"
    results = json.loads(results_path.read_text())
    checkpoint = output / "model_0000002.safetensors"
    assert results["protocol"]["trained_weights"] == {
        "source": "checkpoint", "path": os.path.abspath(checkpoint),
        "sha256": _sha256(checkpoint),
    }
    assert list(results["protocol"]["weights"]) == ["clip"]
    line = (f"toy: mIoU {results['mIoU']:.2f}, mAcc {results['mAcc']:.2f} -> "
            f"{results_path}")
    assert line in (output / "log.txt").read_text()
    assert line in done.stderr  # the console


def test_model_weights_are_recorded_with_their_sha256(trained_run, tmp_path, caplog):
    config, output = trained_run
    weights = output / "model_0000002.safetensors"
    cfg = ovseg.get_config(config, ["model.weights", str(weights)])
    with caplog.at_level(logging.INFO, logger="ovseg"):
        evaluate_model(ovseg.build_model(cfg).eval(), cfg, tmp_path)
    results_path = tmp_path / "toy" / "results.json"
    protocol = json.loads(results_path.read_text())["protocol"]
    assert protocol["trained_weights"] == {
        "source": "model.weights", "path": os.path.abspath(weights), "sha256": _sha256(weights),
    }
    assert "toy: mIoU " in caplog.text and f"-> {results_path}" in caplog.text


def test_an_untrained_model_says_so(trained_run, tmp_path):
    config, _ = trained_run
    cfg = ovseg.get_config(config)
    evaluate_model(ovseg.build_model(cfg).eval(), cfg, tmp_path)
    protocol = json.loads((tmp_path / "toy" / "results.json").read_text())["protocol"]
    assert protocol["trained_weights"] == UNTRAINED

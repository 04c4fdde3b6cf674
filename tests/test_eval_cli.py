"""``tools/train_net.py --eval-only`` end to end on a tiny benchmark, with 1 and 2 processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from ovseg.engine.evaluate import weights_protocol
from ovseg.io import sha256_file
from tests.fixtures.builders import build_voc
from tests.helpers import REPO_ROOT


def run_eval(config: str, root, output, *extra: str) -> dict:
    command = [
        sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--config-file", config,
        "--eval-only", *extra, "datasets.test", "[voc_21]", "datasets.root", str(root),
        "output_dir", str(output),
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((output / "voc_21" / "results.json").read_text())


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    build_voc(root)  # 3 images: not a multiple of 2 processes
    return root


def test_eval_only_writes_results_with_protocol(voc_root, tmp_path):
    results = run_eval("configs/tiny/dense_clip_tiny.yaml", voc_root, tmp_path / "one")
    assert results["num_images"] == 3 and results["absent_classes"] == "zero"
    assert 0.0 <= results["mIoU"] <= 100.0
    protocol = results["protocol"]
    assert protocol["benchmark"] == "voc_21" and protocol["images"] == 3
    assert len(protocol["class_file_sha256"]) == 64
    assert protocol["prompt_file_sha256"] == protocol["class_file_sha256"]  # no prompt set
    assert "dense_clip" in protocol["config"]
    assert (tmp_path / "one" / "voc_21" / "results.md").is_file()
    assert (tmp_path / "one" / "config.yaml").is_file()


def test_two_processes_give_the_same_numbers_as_one(voc_root, tmp_path):
    one = run_eval("configs/tiny/dense_clip_tiny.yaml", voc_root, tmp_path / "one")
    two = run_eval("configs/tiny/dense_clip_tiny.yaml", voc_root, tmp_path / "two",
                   "--num-gpus", "2")
    assert two["protocol"]["processes"] == 2
    assert two["num_images"] == one["num_images"] == 3
    assert two["pixels"] == one["pixels"]
    assert two["per_class"] == one["per_class"]  # gt/pred pixel counts: the matrix marginals
    assert two["mIoU"] == one["mIoU"]


def test_save_predictions_writes_label_pngs(voc_root, tmp_path):
    run_eval("configs/tiny/dense_clip_tiny.yaml", voc_root, tmp_path / "out",
             "--save-predictions")
    assert len(list((tmp_path / "out" / "voc_21" / "predictions").glob("*.png"))) == 3


def test_weights_protocol_hashes_local_files_of_the_encoder_sections_there_are(tmp_path):
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"not really weights")
    cfg = OmegaConf.create({"model": {
        "name": "trident",
        "clip": {"arch": "ViT-B-16", "weights": str(weights)},
        "dino": {"arch": "vit_base_patch16_224.dino", "weights": "timm"},
    }})
    assert weights_protocol(cfg) == {
        "clip": {"arch": "ViT-B-16", "weights": str(weights), "sha256": sha256_file(weights)},
        "dino": {"arch": "vit_base_patch16_224.dino", "weights": "timm"},
    }

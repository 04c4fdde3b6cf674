"""Every config under configs/ loads, builds on tiny encoders and keeps its settings (issue 18).

Each file is loaded as it is (its settings, benchmarks and prompt names are checked) and again
with its encoders swapped for the tiny random ones, which must build. The new paths of issue 18
are pinned with numbers: SAM's image encoder as ProxyCLIP's proxy, MAE and DINOv2-with-registers
proxies on tiny timm ViTs, and CLIP's ImageNet input normalisation (MaskCLIP's own protocol).
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import ovseg
from ovseg.config.loader import apply_overrides
from ovseg.data.catalog import class_vocabulary, get_benchmark, list_benchmarks
from ovseg.encoders.clip import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, TINY_CLIP
from ovseg.encoders.dino import TINY_KWARGS, DinoEncoder
from ovseg.layers.resize import rescale_size
from ovseg.methods import METHODS
from ovseg.text import get_templates
from tests.helpers import REPO_ROOT

CONFIGS_DIR = REPO_ROOT / "configs"
CONFIGS = sorted(CONFIGS_DIR.rglob("*.yaml"))
BENCHMARKS_2D = (
    "voc_21", "voc_20", "pcontext_60", "pcontext_59", "coco_object_81", "coco_stuff_171",
    "cityscapes_19", "ade20k_150", "ade20k_847", "pcontext_459",
)  # fmt: skip
# config folders with one file per 2D benchmark
PER_BENCHMARK = ("dense_clip/sclip", "dense_clip/naclip", "dense_clip/maskclip",
                 "dense_clip/proxyclip", "dense_clip/proxyclip_vitl14",
                 "dense_clip/proxyclip_vith14")
PROXIES = ("dino_vitb8", "dino_vitb16", "dinov2_vitb14", "dinov2_vitb14_reg", "dinov2_vitl14",
           "dinov2_vitl14_reg", "mae_vitb16", "sam_vitb")


def _name(path: Path) -> str:
    return path.relative_to(CONFIGS_DIR).as_posix()


def _tiny_dino(arch: str) -> str:
    """The tiny random DINO of the same patch family: patch 8 -> tiny-p8, else tiny-p16."""
    if arch.startswith("tiny-"):
        return arch
    patch = re.search(r"patch(\d+)", arch)
    return "tiny-p8" if patch and int(patch.group(1)) == 8 else "tiny-p16"


def tiny_overrides(raw, cache_dir: Path) -> list[str]:
    """KEY VALUE overrides that put tiny random encoders into a loaded config."""
    overrides = ["model.device", "cpu", "text.templates", "single",
                 "text.cache_dir", str(cache_dir)]
    model = raw.model
    if "clip" in model:
        overrides += ["model.clip.arch", TINY_CLIP, "model.clip.weights", "random"]
    if "dino" in model:
        overrides += ["model.dino.arch", _tiny_dino(model.dino.arch),
                      "model.dino.weights", "random"]
    if "sam" in model:
        overrides += ["model.sam.arch", "tiny", "model.sam.weights", "random"]
    if "mask_adapted" in model:  # R101c / Swin-B proposals are too big to build per file
        overrides += ["model.mask_adapted.proposal_backbone", "tiny",
                      "model.mask_adapted.checkpoint", ""]
    return overrides


def cloc_region_sets(raw) -> set[str]:
    from ovseg.methods.cloc.data import BUILTIN_REGION_SETS

    return {*BUILTIN_REGION_SETS, *(str(entry["name"]) for entry in raw.model.cloc.region_sets)}


@functools.cache
def _raw(path: Path):
    """A config file as it is (cached: the tests only read it)."""
    return ovseg.get_config(path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("text_cache")


@pytest.fixture(scope="module", autouse=True)
def _one_tokenizer():
    # reading CLIP's BPE vocabulary is most of a tiny build; no test here encodes text twice
    # with different tokenizers, so one per architecture is enough
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(open_clip, "get_tokenizer", functools.cache(open_clip.get_tokenizer))
        yield


def _section(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


# --------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_config_loads_builds_on_tiny_encoders_and_keeps_its_settings(path, cache_dir):
    raw = _raw(path)
    get_templates(raw.text.templates)  # the template set exists
    for bench in raw.datasets.test:
        if raw.model.name == "cloc":  # CLOC's benchmarks are region sets (its own registry)
            assert bench in cloc_region_sets(raw), bench
            continue
        assert bench in list_benchmarks(), bench
        info = get_benchmark(bench)
        # the prompt-name set has a file for the benchmark, one class per label value
        vocabulary = class_vocabulary(bench, raw.text.prompt_names)
        assert vocabulary.num_classes == info.num_classes, (bench, raw.text.prompt_names)

    overrides = tiny_overrides(raw, cache_dir)
    if raw.model.name == "linear_probe" and not raw.datasets.train:
        overrides += ["datasets.train", "[voc_20]"]  # its classes are the training set's
    cfg = apply_overrides(raw, overrides, METHODS)
    model = ovseg.build_model(cfg)
    name = raw.model.name
    assert cfg.model.name == name
    # the built model runs the config's settings, untouched by the encoder overrides
    if "inference" in raw.model:
        assert asdict(model.inference) == _section(raw.model.inference)
    if name == "cloc":
        assert asdict(model.settings) == _section(raw.model.cloc)
    if name in ("dense_clip", "trident", "clip_dinoiser"):
        assert asdict(model.settings) == _section(raw.model[name])
    if name == "dense_clip":
        assert (model.dino is not None) == (raw.model.dense_clip.mode == "proxy")


# --------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("folder", PER_BENCHMARK)
def test_every_2d_benchmark_has_a_config(folder):
    for bench in BENCHMARKS_2D:
        cfg = _raw(CONFIGS_DIR / folder / f"{bench}.yaml")
        assert list(cfg.datasets.test) == [bench]
        assert cfg.output_dir.endswith(f"{folder}/{bench}")


def test_trident_has_every_2d_benchmark_at_both_sizes():
    for bench in BENCHMARKS_2D:
        base = _raw(CONFIGS_DIR / "trident" / f"{bench}.yaml")
        big = _raw(CONFIGS_DIR / "trident" / f"{bench}_vith14.yaml")
        assert list(base.datasets.test) == list(big.datasets.test) == [bench]
        assert (big.model.clip.arch, big.model.clip.weights) == ("ViT-H-14", "laion2b_s32b_b79k")
        assert _section(big.model.trident) == _section(base.model.trident)
        assert _section(big.model.inference) == _section(base.model.inference)


@pytest.mark.parametrize("bench", ("ade20k_847", "pcontext_459"))
def test_847_and_459_follow_proxyclip_short_side_and_keep_labels(bench):
    info = get_benchmark(bench)
    # labels are read as stored (detectron2-prepared 16-bit TIFF, ignore 65535): not reduced
    assert info.label_mapping == "none" and info.ignore_value == 65535
    for path in (f"dense_clip/proxyclip/{bench}.yaml", f"trident/{bench}.yaml"):
        assert _raw(CONFIGS_DIR / path).model.inference.short_side == 448, path
    proxy = _raw(CONFIGS_DIR / "dense_clip" / "proxyclip" / f"{bench}.yaml")
    assert (proxy.model.inference.crop, proxy.model.inference.stride) == (336, 112)
    assert proxy.text.prompt_names == "proxyclip"


def test_proxyclip_sizes_change_only_the_clip():
    for bench in BENCHMARKS_2D:
        base = _raw(CONFIGS_DIR / "dense_clip" / "proxyclip" / f"{bench}.yaml")
        for size, clip in (("vitl14", ("ViT-L-14", "openai")),
                           ("vith14", ("ViT-H-14", "laion2b_s32b_b79k"))):
            cfg = _raw(CONFIGS_DIR / "dense_clip" / f"proxyclip_{size}" /
                                   f"{bench}.yaml")
            assert (cfg.model.clip.arch, cfg.model.clip.weights) == clip
            for section in ("inference", "dense_clip", "dino"):
                assert _section(cfg.model[section]) == _section(base.model[section]), section
            assert cfg.model.inference.pad_multiple == 56
            assert cfg.text == base.text


def test_proxy_bases_pick_the_proxy_and_combine_with_a_benchmark(tmp_path):
    expected = {
        "dino_vitb8": ("vit_base_patch8_224.dino", "offset", "none"),
        "dino_vitb16": ("vit_base_patch16_224.dino", "offset", "none"),
        "dinov2_vitb14": ("vit_base_patch14_dinov2.lvd142m", "offset", "none"),
        "dinov2_vitb14_reg": ("vit_base_patch14_reg4_dinov2.lvd142m", "size", "none"),
        "dinov2_vitl14": ("vit_large_patch14_dinov2.lvd142m", "offset", "none"),
        "dinov2_vitl14_reg": ("vit_large_patch14_reg4_dinov2.lvd142m", "size", "none"),
        "mae_vitb16": ("vit_base_patch16_224.mae", "size", "crop"),
    }
    assert sorted(p.stem for p in (CONFIGS_DIR / "dense_clip" / "proxyclip_proxies").glob(
        "*.yaml")) == sorted(PROXIES)
    for proxy in PROXIES:
        combined = tmp_path / f"{proxy}.yaml"
        combined.write_text(
            f"_base_: [{CONFIGS_DIR}/dense_clip/proxyclip_vitl14/cityscapes_19.yaml, "
            f"{CONFIGS_DIR}/dense_clip/proxyclip_proxies/{proxy}.yaml]\n", encoding="utf-8")
        cfg = ovseg.get_config(combined)
        # the benchmark's row and the CLIP size survive the proxy base
        assert (cfg.model.inference.short_side, cfg.model.inference.crop) == (448, 224)
        assert cfg.model.clip.arch == "ViT-L-14" and cfg.model.inference.pad_multiple == 56
        assert cfg.model.dense_clip.mode == "proxy"
        if proxy == "sam_vitb":
            assert cfg.model.dense_clip.proxy == "sam" and cfg.model.sam.arch == "vit_b"
            continue
        dino = cfg.model.dino
        assert (dino.arch, dino.pos_embed_resize, cfg.model.dense_clip.proxy_resize) == \
            expected[proxy]
        assert cfg.model.dense_clip.proxy == "dino" and timm.is_model(dino.arch)


def test_maskclip_own_protocol():
    scales = {  # bench -> (short side, max long side) = MaskCLIP's test scale
        "voc_20": (512, 2048), "pcontext_59": (520, 520), "coco_stuff_171": (512, 2048),
        "cityscapes_19": (512, 1024),
    }
    for bench, (short, long) in scales.items():
        cfg = _raw(CONFIGS_DIR / "dense_clip" / "maskclip_own" / f"{bench}.yaml")
        inference = cfg.model.inference
        assert (inference.short_side, inference.max_long_side, inference.crop) == (short, long, 0)
        assert cfg.model.dense_clip.mode == "maskclip" and cfg.model.dense_clip.logit_scale == 100
        assert cfg.model.clip.normalize == "imagenet" and cfg.model.clip.pos_embed_resize == "size"
        assert (cfg.text.templates, cfg.text.prompt_names) == ("maskclip", "maskclip")
        assert not get_benchmark(bench).has_background
    # mmcv keep-ratio: Pascal 375x500 at (520, 520) -> long side 520; Cityscapes 1024x2048 at
    # (1024, 512) -> 512x1024; VOC 375x500 at (2048, 512) -> short side 512
    assert rescale_size(375, 500, 520, 520) == (390, 520)
    assert rescale_size(1024, 2048, 512, 1024) == (512, 1024)
    assert rescale_size(375, 500, 512, 2048) == (512, 683)
    templates = get_templates("maskclip")
    assert len(templates) == 85 and templates[:80] == get_templates("openai_imagenet")
    assert templates[80:] == ["there is a {} in the scene.", "there is the {} in the scene.",
                              "this is a {} in the scene.", "this is the {} in the scene.",
                              "this is one {} in the scene."]
    voc = class_vocabulary("voc_20", "maskclip")
    assert voc.class_names[0] == "airplane" and voc.classes[-1] == ("tv monitor",)


# --------------------------------------------------------------------------- new paths, pinned


def _tiny(path: str, cache_dir: Path, extra: tuple[str, ...] = ()):
    raw = _raw(CONFIGS_DIR / path)
    return ovseg.build_model(
        apply_overrides(raw, [*tiny_overrides(raw, cache_dir), *extra], METHODS))


def _image(height: int = 70, width: int = 90) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _stats(values) -> torch.Tensor:
    return torch.tensor(values).view(1, 3, 1, 1)


@torch.inference_mode()
def test_sam_proxy_features_equal_a_direct_computation(cache_dir):
    model = _tiny("dense_clip/proxyclip_proxies/sam_vitb.yaml", cache_dir,
                  ("model.inference.short_side", "96", "model.inference.crop", "64",
                   "model.inference.stride", "32"))
    windows = torch.randn(2, 3, 56, 64, generator=torch.Generator().manual_seed(0))
    tokens, grid = model.proxy_features(windows)
    # ProxyCLIP: un-normalise CLIP's statistics, ImageNet's (SAM's own) normalisation, stretch
    # to SAM's square input, the image encoder with its neck
    rgb = windows * _stats(OPENAI_STD) + _stats(OPENAI_MEAN)
    x = (rgb - _stats(IMAGENET_MEAN)) / _stats(IMAGENET_STD)
    x = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
    embedding = model.dino.sam.sam.image_encoder(x)  # tiny SAM: (2, 32, 16, 16)
    assert grid == (16, 16)
    assert torch.allclose(tokens, embedding.flatten(2).transpose(1, 2), atol=1e-5)
    prediction = model.predict(_image(), ["cat", "dog", "sky"])
    assert prediction.labels.shape == (70, 90)
    assert set(np.unique(prediction.labels)) <= {0, 1, 2}


@torch.inference_mode()
def test_imagenet_normalisation_is_exact_and_the_proxy_input_stays_right(cache_dir):
    model = _tiny("dense_clip/proxyclip/voc_20.yaml", cache_dir,
                  ("model.clip.normalize", "imagenet", "model.inference.short_side", "96",
                   "model.inference.crop", "64", "model.inference.stride", "32"))
    pixels = torch.from_numpy(_image(12, 16)).permute(2, 0, 1)[None].float()
    expected = (pixels / 255 - _stats(IMAGENET_MEAN)) / _stats(IMAGENET_STD)
    normalised = model.clip.normalize(pixels)
    assert torch.allclose(normalised, expected, atol=1e-6, rtol=0)
    assert model.clip.input_stats == (IMAGENET_MEAN, IMAGENET_STD)
    # the proxy re-normalises from the statistics CLIP's input really has: DINO (ImageNet) sees
    # its own normalisation of the image, not one offset by OpenAI's statistics
    dino_input = model.dino.renormalize(normalised, *model.clip.input_stats)
    assert torch.allclose(dino_input, model.dino.normalize(pixels), atol=1e-5)
    openai = _tiny("dense_clip/proxyclip/voc_20.yaml", cache_dir)
    assert openai.clip.input_stats == (OPENAI_MEAN, OPENAI_STD)
    own = _tiny("dense_clip/maskclip_own/voc_20.yaml", cache_dir)
    state = own.encode(_image(60, 80))
    assert state.resized == rescale_size(60, 80, 512, 2048) == (512, 683)
    assert len(state.windows) == 1 and state.windows[0][0] is None  # whole image, no windows


@pytest.mark.parametrize(("arch", "proxy_resize", "window", "grid"), [
    # MAE: every window is stretched to crop x crop first (ProxyCLIP builds MAE for that size)
    ("vit_base_patch16_224.mae", "crop", (56, 48), (4, 4)),
    # DINOv2 with 4 registers and no class position (timm no_embed_class)
    ("vit_base_patch14_reg4_dinov2.lvd142m", "none", (56, 42), (4, 3)),
])
@torch.inference_mode()
def test_mae_and_dinov2_register_proxies_on_tiny_vits(arch, proxy_resize, window, grid, cache_dir):
    model = _tiny("dense_clip/proxyclip/voc_20.yaml", cache_dir,
                  ("model.dense_clip.proxy_resize", proxy_resize,
                   "model.inference.short_side", "96", "model.inference.crop", "64",
                   "model.inference.stride", "32"))
    kwargs = {**TINY_KWARGS, "num_classes": 0, "dynamic_img_size": False}
    if "dinov2" in arch:
        kwargs["img_size"] = 518  # the 37 x 37 grid DINOv2 trains with
    vit = timm.create_model(arch, pretrained=False, **kwargs)
    model.dino = DinoEncoder(vit, pos_embed_resize="size")
    windows = torch.randn(2, 3, *window, generator=torch.Generator().manual_seed(1))
    tokens, proxy_grid = model.proxy_features(windows)
    assert proxy_grid == grid and tokens.shape == (2, grid[0] * grid[1], 64)
    x = model.dino.normalize((windows * _stats(OPENAI_STD) + _stats(OPENAI_MEAN)) * 255)
    if proxy_resize == "crop":
        x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(tokens, model.dino(x).tokens, atol=1e-5)
    assert model.predict(_image(), ["cat", "dog"]).labels.shape == (70, 90)

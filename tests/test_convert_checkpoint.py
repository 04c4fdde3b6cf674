"""tools/convert_checkpoint.py and ovseg.modeling.convert: every released format, as a tiny fake
with the authors' key names and shapes, converts strictly, loads through the normal config path
and gives what loading the original through the existing map gives; wrong files fail in one
line naming the keys."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import ovseg
from ovseg.encoders.dino import build_dino
from ovseg.encoders.sam import SAM_SIZES, build_sam, make_sam
from ovseg.errors import WeightsError
from ovseg.modeling.convert import FORMATS, convert_checkpoint, read_checkpoint
from ovseg.modeling.found import load_found_decoder
from ovseg.modeling.mask_proposal.checkpoint import authors_key
from ovseg.modeling.minkunet import student_input
from tests.fixtures.checkpoints import minkowski_minkunet_state
from tests.helpers import REPO_ROOT

VOCAB = ["cat", "dog", "sky"]
TOOL = REPO_ROOT / "tools" / "convert_checkpoint.py"
TINY_CLIP_WIDTH, TINY_CLIP_EMBED = 128, 64  # ovseg-tiny-ViT-16


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: threads only add overhead
    yield
    torch.set_num_threads(threads)


def main(argv: list[str]) -> int:
    """tools/convert_checkpoint.py's main, run in this process."""
    spec = importlib.util.spec_from_file_location("ovseg_convert_checkpoint_cli", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def photo(seed: int = 0, size=(70, 90)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def tiny_model(name: str, *overrides: str):
    return ovseg.build_model(ovseg.get_config(f"tiny/{name}.yaml", list(overrides)))


def noise(shape, seed: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A state dict with noise on every float tensor, so that loading it visibly changes a
    freshly built network."""
    return {key: value + noise(value.shape, seed + i, 0.02) if value.is_floating_point()
            else value.clone() for i, (key, value) in enumerate(state.items())}


# --------------------------------------------------------------------------- the fakes
# Each writes the authors' file layout with their key names at a tiny width.


def dinoiser_last_pt(path: Path, in_dim: int = TINY_CLIP_WIDTH, proj_dim: int = 32) -> Path:
    state = {"module.obj_proj.weight": noise((proj_dim, in_dim, 3, 3), 1),
             "module.obj_proj.bias": noise((proj_dim,), 2),
             "module.bkg_decoder.weight": noise((1, in_dim, 1, 1), 3, 1.0),
             "module.bkg_decoder.bias": noise((1,), 4)}
    torch.save({"epoch": 100, "model_state_dict": state}, path)
    return path


def found_decoder_pt(path: Path, in_dim: int = 64) -> Path:
    torch.save({"decoder": {"weight": noise((1, in_dim, 1, 1), 5, 1.0),
                            "bias": noise((1,), 6)}}, path)
    return path


@functools.cache
def _tiny_mask_adapted():
    return tiny_model("mask_adapted_tiny")


def ovseg_state(seed: int = 7) -> dict[str, torch.Tensor]:
    """The tiny mask-adapted model under the authors' OVSeg names: ``model`` of their
    detectron2 checkpoint (proposals, ``clip_adapter.clip_model.*`` with the mask prompts, and
    the constants their file carries)."""
    model = _tiny_mask_adapted()
    state = {authors_key(key): value
             for key, value in perturbed(model.proposals.state_dict(), seed).items()}
    clip = perturbed(model.clip.model.state_dict(), seed + 1000)
    state.update({f"clip_adapter.clip_model.{key}": value for key, value in clip.items()})
    state["clip_adapter.clip_model.visual.mask_embedding"] = noise((3, 196, TINY_CLIP_WIDTH), 8)
    state["clip_adapter.pixel_mean"] = torch.tensor([122.7709, 116.7460, 104.0937]).view(
        1, 3, 1, 1)
    state["clip_adapter.pixel_std"] = torch.tensor([68.5005, 66.6322, 70.3232]).view(1, 3, 1, 1)
    state["criterion.empty_weight"] = torch.tensor([1.0] * 171 + [0.1])
    return state


def ovseg_pth(path: Path) -> Path:
    torch.save({"model": ovseg_state(), "iteration": 119999}, path)
    return path


def ovseg_clip_pt(path: Path) -> Path:
    """OVSeg's CLIP alone as their open_clip training writes it: ``state_dict`` with
    ``module.`` keys in OpenAI's layout, the mask prompts inside."""
    prefix = "clip_adapter.clip_model."
    clip = {f"module.{k[len(prefix):]}": v for k, v in ovseg_state().items()
            if k.startswith(prefix)}
    torch.save({"epoch": 5, "name": "mpt", "state_dict": clip}, path)
    return path


def minkunet_state(init: int = 16, planes=(16,) * 8, head: int = TINY_CLIP_EMBED
                   ) -> dict[str, torch.Tensor]:
    """CLIP2Scene's MinkowskiEngine MinkUNet14A at a tiny width."""
    return minkowski_minkunet_state(init, tuple(planes), head)


def clip2scene_ckpt(path: Path) -> Path:
    """A Lightning file: ``state_dict`` with the student under ``model_points.``."""
    state = {f"model_points.{k}": v for k, v in minkunet_state().items()}
    state["model_images.proj.weight"] = torch.zeros(2)
    torch.save({"state_dict": state, "epoch": 30}, path)
    return path


def dino_state(embed: int = 64, depth: int = 2, patch: int = 8, image: int = 224
               ) -> dict[str, torch.Tensor]:
    """DINO's VisionTransformer (facebookresearch/dino vision_transformer.py) state dict,
    spelt out: the names of its backbone files."""
    grid = image // patch
    shapes = {"cls_token": (1, 1, embed), "pos_embed": (1, grid * grid + 1, embed),
              "patch_embed.proj.weight": (embed, 3, patch, patch),
              "patch_embed.proj.bias": (embed,)}
    for i in range(depth):
        shapes |= {f"blocks.{i}.norm1.weight": (embed,), f"blocks.{i}.norm1.bias": (embed,),
                   f"blocks.{i}.attn.qkv.weight": (3 * embed, embed),
                   f"blocks.{i}.attn.qkv.bias": (3 * embed,),
                   f"blocks.{i}.attn.proj.weight": (embed, embed),
                   f"blocks.{i}.attn.proj.bias": (embed,),
                   f"blocks.{i}.norm2.weight": (embed,), f"blocks.{i}.norm2.bias": (embed,),
                   f"blocks.{i}.mlp.fc1.weight": (4 * embed, embed),
                   f"blocks.{i}.mlp.fc1.bias": (4 * embed,),
                   f"blocks.{i}.mlp.fc2.weight": (embed, 4 * embed),
                   f"blocks.{i}.mlp.fc2.bias": (embed,)}
    shapes |= {"norm.weight": (embed,), "norm.bias": (embed,)}
    state = {key: noise(shape, i, 0.05) for i, (key, shape) in enumerate(shapes.items())}
    for key in state:
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            state[key] = state[key] + 1
    return state


def dino_pth(path: Path) -> Path:
    torch.save(dino_state(), path)
    return path


def sam_pth(path: Path) -> Path:
    """segment_anything's own Sam state dict (the names of sam_vit_*.pth) at the tiny size."""
    torch.manual_seed(11)
    torch.save(perturbed(make_sam(SAM_SIZES["tiny"]).state_dict(), 12), path)
    return path


FAKES = {"clip_dinoiser": ("last.pt", dinoiser_last_pt),
         "found": ("decoder_weights.pt", found_decoder_pt),
         "ovseg": ("ovseg_tiny_ft_mpt.pth", ovseg_pth),
         "ovseg_clip": ("ovseg_clip_tiny.pt", ovseg_clip_pt),
         "clip2scene": ("clip2scene.ckpt", clip2scene_ckpt),
         "dino": ("dino_tiny8_pretrain.pth", dino_pth),
         "sam": ("sam_tiny.pth", sam_pth)}


def fake(format_name: str, folder: Path) -> Path:
    name, write = FAKES[format_name]
    return write(folder / name)


def test_every_format_has_a_fake():
    assert set(FAKES) == set(FORMATS)


def test_the_fakes_use_the_authors_names():
    # the OVSeg proposal keys are those spelt out from detectron2's and MaskFormer's modules
    from tests.test_mask_proposal import authors_r101c_keys

    proposal = {k for k in ovseg_state() if not k.startswith(("clip_adapter.", "criterion."))}
    # the tiny backbone's GroupNorm has no running statistics (R101c's frozen BN has), and its
    # res2 keeps the stem's width, so it needs no shortcut
    expected = {k for k in authors_r101c_keys(blocks=(1, 1, 1, 3), dec_layers=3)
                if not k.endswith(("running_mean", "running_var"))
                and not k.startswith("backbone.res2.0.shortcut")}
    assert proposal | {"clip_adapter.non_object_embedding"} == expected
    # DINO's names are timm's: the converted file is the same keys
    model_keys = set(build_dino(SimpleNamespace(arch="tiny-p8", weights="random",
                                                pos_embed_resize="offset")).model.state_dict())
    assert set(dino_state()) == model_keys


# --------------------------------------------------------------------------- each format


def converted_config(conversion, config: str, *extra: str):
    return ovseg.get_config(f"tiny/{config}.yaml", [*conversion.overrides, *extra])


def test_clip_dinoiser_last_pt_loads_like_the_original(tmp_path):
    source = fake("clip_dinoiser", tmp_path)
    conversion = convert_checkpoint("clip_dinoiser", source, tmp_path / "heads.safetensors")
    assert conversion.arch == "heads 128 -> 32"
    assert sorted(load_file(str(tmp_path / "heads.safetensors"))) == [
        "heads.background.bias", "heads.background.weight", "heads.correlation.bias",
        "heads.correlation.weight"]
    converted = ovseg.build_model(converted_config(conversion, "clip_dinoiser_tiny"))
    original = tiny_model("clip_dinoiser_tiny", "model.clip_dinoiser.heads", str(source))
    untrained = tiny_model("clip_dinoiser_tiny")
    image = photo(1)
    expected = original.predict(image, VOCAB).scores
    assert torch.equal(converted.predict(image, VOCAB).scores, expected)
    assert not torch.equal(untrained.predict(image, VOCAB).scores, expected)


def test_found_decoder_loads_like_the_original(tmp_path):
    source = fake("found", tmp_path)
    conversion = convert_checkpoint("found", source, tmp_path / "found.safetensors")
    assert conversion.settings == {"model.name": "clip_dinoiser"}
    [part] = conversion.parts
    assert part.config_key == "model.clip_dinoiser.found_weights"
    keys = torch.randn(2, 64, 5, 6)
    expected = load_found_decoder(source, in_dim=64)(keys)
    assert torch.equal(load_found_decoder(part.path, in_dim=64)(keys), expected)


def test_ovseg_file_loads_like_the_original(tmp_path):
    source = fake("ovseg", tmp_path)
    conversion = convert_checkpoint("ovseg", source, tmp_path / "ovseg.safetensors")
    assert conversion.arch == "tiny"  # found by fitting: r101c and swin_b do not
    main_part, clip_part = conversion.parts
    assert clip_part.path == (tmp_path / "ovseg.clip.safetensors").resolve()
    assert "prompts.mask_embedding" in main_part.tensors
    assert all(k.startswith(("proposals.", "prompts.")) for k in main_part.tensors)
    assert "visual.mask_embedding" not in clip_part.tensors
    assert set(conversion.dropped) == {"criterion.empty_weight", "clip_adapter.pixel_mean",
                                       "clip_adapter.pixel_std"}
    assert conversion.settings["model.clip.quick_gelu"] is True
    converted = ovseg.build_model(converted_config(conversion, "mask_adapted_tiny"))
    original = tiny_model("mask_adapted_tiny", "model.mask_adapted.checkpoint", str(source))
    for key, value in original.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    image = photo(2)
    torch.testing.assert_close(converted.predict(image, VOCAB).scores,
                               original.predict(image, VOCAB).scores, atol=0, rtol=0)


def test_ovseg_clip_alone_loads_clip_and_prompts(tmp_path):
    source = fake("ovseg_clip", tmp_path)
    conversion = convert_checkpoint("ovseg_clip", source, tmp_path / "clip.safetensors",
                                    arch="ovseg-tiny-ViT-16")
    clip_part, prompts_part = conversion.parts
    assert (clip_part.config_key, prompts_part.config_key) == (
        "model.clip.weights", "model.mask_adapted.trained_weights")
    assert prompts_part.path.name == "clip.prompts.safetensors"
    converted = ovseg.build_model(converted_config(conversion, "mask_adapted_tiny"))
    state = ovseg_state()
    prefix = "clip_adapter.clip_model."
    for key, value in converted.clip.model.state_dict().items():
        assert torch.equal(value, state[prefix + key]), key
    assert torch.equal(converted.prompts.mask_embedding, state[prefix + "visual.mask_embedding"])


def test_clip2scene_student_loads_like_the_original(tmp_path):
    source = fake("clip2scene", tmp_path)
    conversion = convert_checkpoint("clip2scene", source, tmp_path / "student.safetensors")
    assert conversion.arch == "MinkUNet14A"
    assert conversion.settings["model.clip2scene.student_planes"] == [16] * 8
    assert set(conversion.dropped) == {"classifier.kernel", "classifier.bias",
                                       "text_embeddings"}
    # the Lightning file's image model is not the student's
    assert "model_images.proj.weight" not in conversion.dropped
    [part] = conversion.parts
    assert part.sources["student.bn0.running_var"] == "bn0.bn.running_var"
    assert part.sources["student.local.kernel"] == "local_feature.kernel"
    converted = ovseg.build_model(converted_config(conversion, "clip2scene_tiny"))
    original = tiny_model("clip2scene_tiny", "model.clip2scene.student_weights", str(source))
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(300, 3, generator=generator) * 2
    colors = torch.randint(0, 256, (300, 3), generator=generator)
    x, _ = student_input([points], [colors])
    with torch.no_grad():
        expected = original.student.eval()(x)
        got = converted.student.eval()(x)
    assert torch.equal(got.final, expected.final) and torch.equal(got.local, expected.local)


def dino_section(weights: str, arch: str = "tiny-p8") -> SimpleNamespace:
    return SimpleNamespace(arch=arch, weights=str(weights), pos_embed_resize="offset")


def test_dino_pth_loads_like_the_original(tmp_path):
    source = fake("dino", tmp_path)
    conversion = convert_checkpoint("dino", source, tmp_path / "dino.safetensors")
    assert conversion.arch == "tiny-p8"
    assert conversion.settings == {"model.dino.arch": "tiny-p8"}
    images = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        expected = build_dino(dino_section(source))(images, last_qkv=True)
        got = build_dino(dino_section(conversion.parts[0].path))(images, last_qkv=True)
    assert torch.equal(got.tokens, expected.tokens) and torch.equal(got.k, expected.k)


def test_sam_pth_loads_like_the_original(tmp_path):
    source = fake("sam", tmp_path)
    conversion = convert_checkpoint("sam", source, tmp_path / "sam.safetensors", arch="tiny")
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = build_sam(SimpleNamespace(arch="tiny", weights=str(source)))(image)
        path = conversion.parts[0].path
        got = build_sam(SimpleNamespace(arch="tiny", weights=str(path)))(image)
    assert torch.equal(got.embedding, expected.embedding)


# --------------------------------------------------------------------------- wrong files


def _remove(state: dict, key: str) -> None:
    del state[key]


# format -> (how to spoil the file's state dict, names the error must give)
WRONG = {
    "clip_dinoiser": (lambda s: (_remove(s, "module.obj_proj.bias"),
                                 s.update({"module.obj_proj2.weight": torch.zeros(1)})),
                      ["missing keys: obj_proj.bias", "unexpected keys: obj_proj2.weight"]),
    "found": (lambda s: s.update({"weight": torch.zeros(1, 64, 3, 3)}),
              ["shape mismatches: weight (file (1, 64, 3, 3), expected (1, 64, 1, 1))"]),
    "ovseg": (lambda s: _remove(s, "sem_seg_head.pixel_decoder.layer_4.norm.bias"),
              ["missing keys: sem_seg_head.pixel_decoder.layer_4.norm.bias"]),
    "ovseg_clip": (lambda s: s.update({"module.visual.extra.weight": torch.zeros(2)}),
                   ["unexpected keys: visual.extra.weight"]),
    "clip2scene": (lambda s: (_remove(s, "model_points.block3.0.norm2.bn.running_var"),
                              s.update({"model_points.block9.0.conv1.kernel":
                                        torch.zeros(27, 16, 16)})),
                   ["missing keys: block3.0.norm2.bn.running_var",
                    "unexpected keys: block9.0.conv1.kernel"]),
    "dino": (lambda s: (_remove(s, "blocks.1.attn.qkv.bias"),
                        s.update({"blocks.1.attn.q_bias": torch.zeros(64)})),
             ["missing keys: blocks.1.attn.qkv.bias", "unexpected keys: blocks.1.attn.q_bias"]),
    "sam": (lambda s: _remove(s, "mask_decoder.iou_token.weight"),
            ["missing keys: mask_decoder.iou_token.weight"]),
}


@pytest.mark.parametrize("format_name", sorted(FAKES))
def test_a_wrong_file_fails_in_one_line_listing_the_keys(format_name, tmp_path):
    source = fake(format_name, tmp_path)
    whole = torch.load(source, weights_only=True)
    wrapper = next((k for k in ("model_state_dict", "decoder", "model", "state_dict")
                    if isinstance(whole.get(k), dict)), None)
    state = whole[wrapper] if wrapper else whole
    spoil, expected = WRONG[format_name]
    spoil(state)
    torch.save(whole, source)
    output = tmp_path / "out.safetensors"
    arch = {"ovseg": "tiny", "ovseg_clip": "ovseg-tiny-ViT-16", "sam": "tiny",
            "dino": "tiny-p8", "clip2scene": "MinkUNet14A"}.get(format_name)
    with pytest.raises(WeightsError) as raised:
        convert_checkpoint(format_name, source, output, arch=arch)
    message = str(raised.value)
    assert "\n" not in message and str(source) in message
    for text in expected:
        assert text in message, message
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_a_file_of_no_known_arch_names_the_closest(tmp_path):
    state = dino_state(embed=32)  # no DINO (nor tiny test model) is 32 wide
    torch.save(state, tmp_path / "narrow.pth")
    with pytest.raises(WeightsError, match=r"fits no dino arch .*the closest, tiny-p8: "
                                           r"shape mismatches: blocks\.0\.attn\.proj\.bias"):
        convert_checkpoint("dino", tmp_path / "narrow.pth", tmp_path / "out.safetensors")


def test_an_ovseg_file_with_a_foreign_key_is_refused(tmp_path):
    state = ovseg_state()
    state["roi_heads.box_predictor.weight"] = torch.zeros(2)
    torch.save({"model": state}, tmp_path / "maskrcnn.pth")
    with pytest.raises(WeightsError, match="roi_heads.box_predictor.weight"):
        convert_checkpoint("ovseg", tmp_path / "maskrcnn.pth", tmp_path / "out.safetensors")


class _Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_pickle_with_code_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "last.pt"
    torch.save({"model_state_dict": {"obj_proj.weight": _Payload()}}, path)
    with pytest.raises(WeightsError) as raised:
        read_checkpoint(path, ("model_state_dict",))
    message = str(raised.value)
    assert "\n" not in message and "weights_only=True" in message and "print" in message
    assert "this ran" not in capsys.readouterr().out
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(WeightsError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pth")


def test_arguments_are_checked(tmp_path):
    source = fake("found", tmp_path)
    with pytest.raises(WeightsError, match="unknown checkpoint format 'dinov3'"):
        convert_checkpoint("dinov3", source, tmp_path / "x.safetensors")
    with pytest.raises(WeightsError, match="must end in .safetensors"):
        convert_checkpoint("found", source, tmp_path / "x.pth")
    with pytest.raises(WeightsError, match="takes no --arch"):
        convert_checkpoint("found", source, tmp_path / "x.safetensors", arch="vit_b")
    with pytest.raises(WeightsError, match="has no arch 'vit_x'"):
        convert_checkpoint("sam", source, tmp_path / "x.safetensors", arch="vit_x")


# --------------------------------------------------------------------------- command line


def test_command_line_lists_converts_and_reports_shapes(tmp_path, capsys):
    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in FORMATS)
    assert "sam_vit_h_4b8939.pth" in listing and "dino_deitsmall8_pretrain.pth" in listing

    source = fake("clip2scene", tmp_path)
    output = tmp_path / "weights" / "clip2scene_student.safetensors"
    assert main(["--format", "clip2scene", str(source), str(output)]) == 0
    report = capsys.readouterr().out
    assert "bn0.bn.running_var" in report and "student.bn0.running_var" in report
    assert "(27, 3, 16)" in report  # conv0p1s1's MinkowskiEngine kernel shape
    assert "dropped text_embeddings" in report
    snippet = yaml.safe_load(output.with_suffix(".yaml").read_text())
    assert snippet["model"]["weights"] == str(output.resolve())
    assert snippet["model"]["clip2scene"]["student"] == "MinkUNet14A"
    metadata = load_file(str(output))  # readable; the tensors' dtypes kept
    assert metadata["student.bn0.num_batches_tracked"].dtype == torch.int64

    assert main(["--format", "clip2scene", "--quiet", str(source), str(output)]) == 0
    assert "bn0.bn.running_var" not in capsys.readouterr().out


def test_command_line_error_is_one_line_and_exit_2(tmp_path, capsys):
    source = fake("sam", tmp_path)
    assert main(["--format", "sam", str(source), str(tmp_path / "out.safetensors"),
                 "--arch", "vit_b"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing keys" in lines[0]
    assert captured.out == ""
    with pytest.raises(SystemExit) as raised:
        main(["--format", "sam", str(source)])
    assert raised.value.code == 2

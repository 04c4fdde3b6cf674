"""CLIP-DINOiser inference (specs/clip_dinoiser.md "Tests to pin"): pooling, the head tap, the
heads, the classifier, the background rule, head and FOUND files, predict end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ovseg
from ovseg.data.catalog import class_vocabulary
from ovseg.engine.checkpoint import load_model_state
from ovseg.errors import ConfigError, WeightsError
from ovseg.methods.clip_dinoiser.model import (
    ClipDinoiser,
    DinoiserWindows,
    apply_background_rule,
    pool_by_correlation,
)
from ovseg.modeling.dinoiser_heads import DinoiserHeads, convert_reference_heads, patch_cosines
from ovseg.modeling.found import FoundDecoder, load_found_decoder
from ovseg.text import as_vocabulary
from tests.helpers import REPO_ROOT

TINY = "tiny/clip_dinoiser_tiny.yaml"
TINY_WIDTH, TINY_PROJ, TINY_BLOCK = 128, 32, 1  # the tiny CLIP's width; the tiny config's heads
CONFIGS = REPO_ROOT / "configs" / "clip_dinoiser"
BENCHMARKS = ("voc_21", "pcontext_60", "coco_object_81", "voc_20", "pcontext_59",
              "coco_stuff_171", "cityscapes_19", "ade20k_150")
VOCABULARY = ["background", "cat", "dog", "sky"]


def tiny_model(*overrides: str) -> ClipDinoiser:
    return ovseg.build_model(ovseg.get_config(TINY, list(overrides)))


@pytest.fixture(scope="module")
def model() -> ClipDinoiser:
    return tiny_model()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)


def _windows(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _reference_state(in_dim: int = TINY_WIDTH, proj_dim: int = TINY_PROJ, seed: int = 1,
                     prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Random heads under the authors' key names (``last.pt``'s model_state_dict)."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}obj_proj.weight": torch.randn(proj_dim, in_dim, 3, 3, generator=g) * 0.05,
        f"{prefix}obj_proj.bias": torch.randn(proj_dim, generator=g) * 0.05,
        f"{prefix}bkg_decoder.weight": torch.randn(1, in_dim, 1, 1, generator=g),
        f"{prefix}bkg_decoder.bias": torch.randn(1, generator=g),
    }


def _save_last_pt(path, state) -> None:
    torch.save({"epoch": 100, "model_state_dict": state}, path)


# --------------------------------------------------------------------------- pooling


def test_pooling_with_identity_weights_returns_the_features(model):
    features = torch.randn(2, 8, 3, 4, generator=torch.Generator().manual_seed(0))
    identity = torch.eye(12).expand(2, 12, 12)
    pooled = pool_by_correlation(features, identity, 0.2, 1e-6)
    # F_i / (1 + 1e-6): within the epsilon of F
    assert (pooled - features).abs().max() <= 1e-6 * features.abs().max() + 1e-7
    assert torch.allclose(pooled * (1 + 1e-6), features, atol=1e-7)
    # the same through the correlation head's output: one-hot patches have cosines I
    one_hot = torch.eye(12).view(12, 3, 4)[None].expand(2, 12, 3, 4)
    assert torch.equal(patch_cosines(one_hot), identity)
    assert torch.allclose(model.correlation_pool(features, one_hot), pooled, atol=0)


def test_threshold_keeps_exactly_02_and_drops_01999_and_negatives():
    # five patches with one-hot features: patch 0's pooled feature is its weight row / sum
    cos_row = torch.tensor([1.0, 0.2, 0.1999, -0.5, 0.3])
    cosines = torch.eye(5)
    cosines[0] = cos_row
    features = torch.eye(5).view(1, 5, 1, 5)  # D = 5, grid 1 x 5: F_j = e_j
    pooled = pool_by_correlation(features, cosines[None], 0.2, 1e-6)[0, :, 0, 0]
    kept = torch.tensor([1.0, 0.2, 0.0, 0.0, 0.3])
    assert torch.allclose(pooled, kept / (1.5 + 1e-6), atol=1e-7)
    assert pooled[1] > 0 and pooled[2] == 0 and pooled[3] == 0


def test_each_patch_self_weight_is_one():
    corr = torch.randn(3, 16, 4, 5, generator=torch.Generator().manual_seed(2))
    cosines = patch_cosines(corr)
    assert cosines.shape == (3, 20, 20)
    assert torch.allclose(torch.diagonal(cosines, dim1=1, dim2=2), torch.ones(3, 20), atol=1e-6)
    assert torch.allclose(cosines, cosines.transpose(1, 2), atol=1e-6)


# --------------------------------------------------------------------------- the head tap


def test_head_input_is_the_ln2_output_of_the_head_block(model):
    seen: list[torch.Tensor] = []
    ln_2 = model.clip.model.visual.transformer.resblocks[TINY_BLOCK].ln_2
    handle = ln_2.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    try:
        features, ln2 = model.head_inputs(_windows(2, 64))
    finally:
        handle.remove()
    assert seen, "the hook did not fire"
    hooked = seen[0]
    if hooked.shape[0] != 2:  # an open_clip that runs the blocks sequence-first (L, B, W)
        hooked = hooked.transpose(0, 1)
    expected = hooked[:, 1:].transpose(1, 2).reshape(2, TINY_WIDTH, 4, 4)  # class token dropped
    assert ln2.shape == (2, TINY_WIDTH, 4, 4) and features.shape == (2, 64, 4, 4)
    assert torch.allclose(ln2, expected, atol=1e-6)


def test_head_block_outside_the_clip_is_a_config_error():
    model = tiny_model("model.clip_dinoiser.head_block", "9")  # the tiny CLIP has 3 blocks
    with pytest.raises(ConfigError, match="model.clip_dinoiser.head_block 9"):
        model.head_inputs(_windows(1, 32))
    with pytest.raises(ConfigError, match="head_block"):
        tiny_model("model.clip_dinoiser.head_block", "-1")


# --------------------------------------------------------------------------- the heads


def test_head_shapes_at_vit_b16_width():
    heads = DinoiserHeads(768)
    assert tuple(heads.correlation.weight.shape) == (256, 768, 3, 3)
    assert tuple(heads.correlation.bias.shape) == (256,)
    assert heads.correlation.padding == (1, 1) and heads.correlation.padding_mode == "replicate"
    assert tuple(heads.background.weight.shape) == (1, 768, 1, 1)
    assert tuple(heads.background.bias.shape) == (1,)


def test_heads_replicate_padding_and_normalised_background_input(model):
    heads = model.heads
    assert tuple(heads.correlation.weight.shape) == (TINY_PROJ, TINY_WIDTH, 3, 3)
    assert tuple(heads.background.weight.shape) == (1, TINY_WIDTH, 1, 1)
    x = torch.randn(2, TINY_WIDTH, 4, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        direct = F.conv2d(padded, heads.correlation.weight, heads.correlation.bias)
        assert torch.allclose(heads.correlation_features(x), direct, atol=1e-5)
        # zero padding would differ on the border
        zero = F.conv2d(x, heads.correlation.weight, heads.correlation.bias, padding=1)
        assert not torch.allclose(direct, zero, atol=1e-3)
        unit = x / x.norm(dim=1, keepdim=True)
        direct = F.conv2d(unit, heads.background.weight, heads.background.bias)
        assert torch.allclose(heads.background_logits(x), direct, atol=1e-5)
        assert torch.allclose(heads.background_logits(7 * x), heads.background_logits(x),
                              atol=1e-5)


# --------------------------------------------------------------------------- classifier


def test_text_classifier_is_the_renormalised_mean_of_80_template_embeddings():
    model = tiny_model("text.templates", "openai_imagenet")
    templates = model.text_classifier.templates
    assert len(templates) == 80
    text = model.text_classifier(["cat", "dog"])
    for row, name in zip(text, ["cat", "dog"], strict=True):
        prompts = [template.format(name) for template in templates]
        embeddings = F.normalize(model.clip.encode_text(prompts), dim=-1)
        assert torch.allclose(row.cpu(), F.normalize(embeddings.mean(0), dim=0), atol=1e-5)


def _direct_probabilities(model, windows, state, vocabulary, text) -> torch.Tensor:
    """CLIP-DINOiser's window probabilities written out from the heads' raw tensors ``state``
    (the authors' key names): pooling, cosine, softmax(100 cos)."""
    weights = {k.removeprefix("module."): v for k, v in state.items()}
    features, ln2 = model.head_inputs(windows)
    corr = F.conv2d(F.pad(ln2, (1, 1, 1, 1), mode="replicate"), weights["obj_proj.weight"],
                    weights["obj_proj.bias"])
    corr = corr.flatten(2)
    corr = corr / corr.norm(dim=1, keepdim=True)
    cos = torch.einsum("bci,bcj->bij", corr, corr)
    cos = torch.where(cos < 0.2, torch.zeros_like(cos), cos)
    flat = features.flatten(2)
    pooled = torch.einsum("bij,bdj->bdi", cos, flat) / (cos.sum(-1)[:, None] + 1e-6)
    pooled = pooled / pooled.norm(dim=1, keepdim=True)
    logits = 100 * torch.einsum("bdi,kd->bki", pooled, text)
    probs = logits.softmax(dim=1).view(windows.shape[0], len(vocabulary), *features.shape[-2:])
    return probs


# --------------------------------------------------------------------------- head files


def test_reference_last_pt_converts_loads_and_gives_the_direct_computation(tmp_path, model):
    state = _reference_state()
    last = tmp_path / "last.pt"
    _save_last_pt(last, state)
    converted = convert_reference_heads(last, tmp_path / "heads.safetensors")
    sidecar = json.loads(converted.with_suffix(".json").read_text())
    assert (sidecar["in_dim"], sidecar["proj_dim"]) == (TINY_WIDTH, TINY_PROJ)
    assert sidecar["keys"] == ["heads.background.bias", "heads.background.weight",
                               "heads.correlation.bias", "heads.correlation.weight"]
    loaded = tiny_model("model.clip_dinoiser.heads", str(converted))
    assert torch.equal(loaded.heads.correlation.weight, state["module.obj_proj.weight"])
    assert torch.equal(loaded.heads.background.bias, state["module.bkg_decoder.bias"])
    # the authors' file loads as it is too, and the engine's model.weights takes ours
    direct_load = tiny_model("model.clip_dinoiser.heads", str(last))
    assert torch.equal(direct_load.heads.correlation.bias, loaded.heads.correlation.bias)
    from safetensors.torch import load_file

    engine = tiny_model()
    load_model_state(engine, load_file(str(converted)), str(converted))
    assert torch.equal(engine.heads.background.weight, loaded.heads.background.weight)

    vocabulary = as_vocabulary(VOCABULARY)
    text = loaded.text_classifier(vocabulary.names)
    windows = _windows(3, 64, seed=4)
    with torch.inference_mode():
        ours = loaded.window_probabilities(loaded.window_outputs(windows), text, vocabulary)
        direct = _direct_probabilities(loaded, windows, state, vocabulary, text)
    assert ours.shape == (3, 4, 4, 4)
    assert torch.allclose(ours, direct, atol=1e-5)
    assert torch.allclose(ours.sum(1), torch.ones(3, 4, 4), atol=1e-5)


def test_a_wrong_last_pt_fails_with_the_key_list(tmp_path):
    state = _reference_state(prefix="")
    del state["bkg_decoder.bias"]
    state["obj_proj.extra"] = torch.zeros(1)
    bad = tmp_path / "last.pt"
    _save_last_pt(bad, state)
    with pytest.raises(WeightsError) as error:
        convert_reference_heads(bad, tmp_path / "out.safetensors")
    message = str(error.value)
    assert "\n" not in message and str(bad) in message
    assert "missing keys: bkg_decoder.bias" in message
    assert "unexpected keys: obj_proj.extra" in message
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(WeightsError, match="model.clip_dinoiser.heads"):
        tiny_model("model.clip_dinoiser.heads", str(bad))


def test_a_heads_file_of_the_wrong_shape_is_one_line_naming_file_and_key(tmp_path):
    last = tmp_path / "last.pt"
    _save_last_pt(last, _reference_state(proj_dim=16))  # 16 wide, the config says 32
    converted = convert_reference_heads(last, tmp_path / "narrow.safetensors")
    with pytest.raises(WeightsError) as error:
        tiny_model("model.clip_dinoiser.heads", str(converted))
    message = str(error.value)
    assert "\n" not in message and str(converted) in message
    assert "model.clip_dinoiser.heads" in message
    assert "correlation.weight (file (16, 128, 3, 3), model (32, 128, 3, 3))" in message
    with pytest.raises(WeightsError, match="does not exist; set model.clip_dinoiser.heads"):
        tiny_model("model.clip_dinoiser.heads", str(tmp_path / "missing.safetensors"))


# --------------------------------------------------------------------------- FOUND


def test_found_decoder_file_in_the_reference_layout_loads_strictly(tmp_path):
    g = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(1, 64, 1, 1, generator=g), torch.randn(1, generator=g)
    path = tmp_path / "decoder_weights.pt"
    torch.save({"decoder": {"weight": weight, "bias": bias}}, path)
    decoder = load_found_decoder(path, in_dim=64)
    assert isinstance(decoder, FoundDecoder) and not decoder.training
    keys = torch.randn(2, 56 * 56, 64, generator=g)  # DINO ViT-S/8 at 448: a 56 x 56 grid
    logits = decoder(keys)
    grid_keys = keys.transpose(1, 2).reshape(2, 64, 56, 56)
    assert logits.shape == (2, 1, 56, 56)
    assert torch.allclose(logits, F.conv2d(grid_keys, weight, bias), atol=1e-5)
    assert torch.allclose(decoder(grid_keys), logits, atol=0)
    assert tuple(FoundDecoder().decoder.weight.shape) == (1, 384, 1, 1)
    # strict: another key layout is one line with the keys
    torch.save({"decoder": {"weight": weight}, "epoch": 3}, tmp_path / "partial.pt")
    with pytest.raises(WeightsError, match="missing keys: bias") as error:
        load_found_decoder(tmp_path / "partial.pt", in_dim=64)
    assert "model.clip_dinoiser.found_weights" in str(error.value)
    with pytest.raises(WeightsError, match=r"shape mismatches: weight \(file \(1, 64, 1, 1\)"):
        load_found_decoder(path, in_dim=384)


def test_a_missing_found_decoder_is_one_line_naming_file_and_key(tmp_path):
    missing = tmp_path / "decoder_weights.pt"
    with pytest.raises(WeightsError) as error:
        load_found_decoder(missing)
    message = str(error.value)
    assert "\n" not in message and str(missing) in message
    assert "model.clip_dinoiser.found_weights" in message
    with pytest.raises(WeightsError, match="set model.clip_dinoiser.found_weights"):
        load_found_decoder("")


# --------------------------------------------------------------------------- background rule


def test_background_rule_on_a_hand_made_example():
    # four patches of one window; class 0 is the background
    probs = torch.tensor([[0.01, 0.01, 0.01, 0.30],
                          [0.98, 0.99, 0.98, 0.40],
                          [0.01, 0.00, 0.01, 0.30]]).view(1, 3, 1, 4)
    saliency = torch.tensor([0.5, 0.5, 0.51, 0.2]).view(1, 1, 1, 4)
    out = apply_background_rule(probs, saliency, 0.99, 0.5)
    # 0.98 & 0.5 -> background; 0.99 -> unchanged; saliency 0.51 -> unchanged; 0.4 & 0.2 -> bg
    assert out[0, 0, 0].tolist() == pytest.approx([1.0, 0.01, 0.01, 1.0])
    assert torch.equal(out[:, 1:], probs[:, 1:])
    assert torch.equal(probs[0, 0, 0], torch.tensor([0.01, 0.01, 0.01, 0.30]))  # input kept
    # batch-correct: four windows at once equal one at a time
    g = torch.Generator().manual_seed(6)
    many = torch.rand(4, 5, 3, 3, generator=g).softmax(1)
    sal = torch.rand(4, 1, 3, 3, generator=g)
    together = apply_background_rule(many, sal, 0.99, 0.5)
    alone = torch.cat([apply_background_rule(many[i:i + 1], sal[i:i + 1], 0.99, 0.5)
                       for i in range(4)])
    assert torch.equal(together, alone)
    assert (together[:, 0] == 1).any() and not torch.equal(together, many)


def test_background_rule_runs_only_when_the_config_enables_it(model):
    g = torch.Generator().manual_seed(7)
    features = F.normalize(torch.randn(2, 64, 3, 3, generator=g), dim=1)
    saliency = torch.rand(2, 1, 3, 3, generator=g)
    outputs = DinoiserWindows(features, saliency)
    vocabulary = as_vocabulary(["background", "cat", "dog"])
    text = F.normalize(torch.randn(3, 64, generator=g), dim=1)
    off = model.window_probabilities(outputs, text, vocabulary)
    on = tiny_model("model.clip_dinoiser.background_rule", "true")
    ruled = on.window_probabilities(outputs, text, vocabulary)
    assert torch.equal(ruled, apply_background_rule(off, saliency, 0.99, 0.5))
    assert not torch.equal(ruled, off)
    assert torch.allclose(off.sum(1), torch.ones(2, 3, 3), atol=1e-5)


def test_window_batches_of_one_and_four_give_identical_outputs(image):
    model = tiny_model("model.clip_dinoiser.background_rule", "true")
    states = {}
    for window_batch in (1, 4):
        model.inference = replace(model.inference, window_batch=window_batch)
        states[window_batch] = model.encode(image)
    assert len(states[1].windows) == 6 and len(states[4].windows) == 2
    a, b = model.predict(states[1], VOCABULARY), model.predict(states[4], VOCABULARY)
    assert np.array_equal(a.labels, b.labels)
    assert torch.allclose(a.scores, b.scores, atol=1e-6)
    # the rule fired somewhere: some class-0 probability was set to 1 before stitching
    model.settings = replace(model.settings, background_rule=False)
    plain = model.predict(states[4], VOCABULARY)
    assert not torch.allclose(plain.scores, b.scores)


# --------------------------------------------------------------------------- end to end


def test_predict_end_to_end_on_the_tiny_model(model, image):
    result = model.predict(image, VOCABULARY)
    assert result.classes == VOCABULARY
    assert result.labels.shape == (70, 90) and result.labels.dtype == np.uint8  # 4 classes
    # short side 96: the scores are the stitched probabilities of the 96 x 123 resized image
    assert result.scores.shape == (4, 96, 123)
    probabilities = result.probabilities()
    assert probabilities.shape == (4, 70, 90)
    assert torch.allclose(probabilities.sum(0), torch.ones(70, 90), atol=1e-5)
    assert np.array_equal(result.labels, probabilities.argmax(0).numpy())
    # encode once, ask two vocabularies
    state = model.encode(image)
    again = model.predict(state, VOCABULARY)
    assert np.array_equal(again.labels, result.labels)
    assert model.predict(state, "car, road").labels.max() <= 1
    whole = tiny_model("model.inference.crop", "0").predict(image, VOCABULARY)
    assert whole.labels.shape == (70, 90)


def test_inference_builds_no_teacher(image):
    # a DINO that cannot be built does not matter: inference uses CLIP and the heads only
    model = tiny_model("model.dino.arch", "no-such-dino",
                       "model.clip_dinoiser.found_dino_arch", "no-such-dino",
                       "model.clip_dinoiser.found_weights", "/no/such/decoder_weights.pt")
    names = {type(m).__name__ for m in model.modules()}
    assert "DinoEncoder" not in names and "FoundDecoder" not in names
    assert model.predict(image, VOCABULARY).labels.shape == (70, 90)
    assert [p.shape for p in model.trainable_parameters()] == [
        (TINY_PROJ, TINY_WIDTH, 3, 3), (TINY_PROJ,), (1, TINY_WIDTH, 1, 1), (1,)]


# --------------------------------------------------------------------------- configs


def test_configs_follow_the_spec():
    base = ovseg.get_config(str(CONFIGS / "base_vitb16.yaml"))
    clip, settings, inference = base.model.clip, base.model.clip_dinoiser, base.model.inference
    assert (clip.arch, clip.weights, clip.pos_embed_resize) == (
        "ViT-B-16", "laion2b_s34b_b88k", "size")
    assert (settings.head_block, settings.proj_dim, settings.corr_threshold) == (9, 256, 0.2)
    assert (settings.pool_eps, settings.logit_scale) == (1e-6, 100)
    assert (settings.background_prob_threshold, settings.background_saliency_threshold) == (
        0.99, 0.5)
    assert (settings.subset_size, settings.with_replacement) == (1000, False)
    assert (inference.short_side, inference.max_long_side, inference.crop, inference.stride) == (
        448, 2048, 448, 224)
    assert base.text.templates == "openai_imagenet"
    assert base.model.dino.arch == "vit_base_patch16_224.dino"
    assert settings.found_dino_arch == "vit_small_patch8_224.dino"
    for bench in BENCHMARKS:
        cfg = ovseg.get_config(str(CONFIGS / f"{bench}.yaml"))
        assert list(cfg.datasets.test) == [bench]
        assert cfg.model.clip_dinoiser.background_rule == (bench in ("voc_21", "coco_object_81"))
        assert cfg.model.inference == inference
        vocabulary = class_vocabulary(bench, cfg.text.prompt_names)
        if bench in ("voc_21", "coco_object_81", "pcontext_60"):
            assert vocabulary.classes[0] == ("background",)  # the literal prompt
        assert all(len(names) == 1 for names in vocabulary.classes)

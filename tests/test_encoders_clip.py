"""CLIP encoder: last-block intermediates, the class token, weights loading, text side.

The last-block variants built on these intermediates are tested in test_layers_attention.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ovseg.config.schema import ClipConfig
from ovseg.encoders.clip import TINY_CLIP, ClipIntermediates, build_clip, interpolate_pos_embed
from ovseg.encoders.weights import save_state_dict_file
from ovseg.errors import WeightsError


def tiny_clip(weights: str = "random", arch: str = TINY_CLIP):
    return build_clip(ClipConfig(arch=arch, weights=weights))


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def image():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 96, 128, generator=generator)  # a 6 x 8 patch grid


def test_default_output_holds_the_intermediates_and_no_mode_features(clip, image):
    out = clip(image)
    assert isinstance(out, ClipIntermediates)
    names = {f.name for f in dataclasses.fields(out)}
    assert names == {"last_block_input", "q", "k", "v", "cls_token", "grid", "ln2"}
    assert out.grid == (6, 8) and out.ln2 == {}
    assert out.last_block_input.shape == (2, 1 + 48, clip.width)
    head_dim = clip.width // clip.num_heads
    for t in (out.q, out.k, out.v):
        assert t.shape == (2, clip.num_heads, 1 + 48, head_dim)
    assert out.cls_token.shape == (2, clip.embed_dim)
    with pytest.raises(TypeError):
        clip(image, "maskclip")  # modes are the methods' business (ovseg.layers.attention)


def test_class_token_equals_open_clip_encode_image(clip):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    out = clip(x)
    expected = clip.encode_image(x)
    assert torch.allclose(out.cls_token, expected, rtol=1e-5, atol=1e-6)


def test_qkv_are_the_last_blocks_own(clip, image):
    out = clip(image)
    block = clip.model.visual.transformer.resblocks[-1]
    # open_clip's own attention of the last block from these q/k/v and the block's pieces
    attended = block.attention(block.ln_1(out.last_block_input))
    weights = torch.softmax(out.q @ out.k.transpose(-1, -2) / out.q.shape[-1] ** 0.5, dim=-1)
    ours = clip.attention_output(weights @ out.v, layer_scale=False)
    assert torch.allclose(ours, attended, atol=1e-5)
    assert torch.allclose(clip.feed_forward(out.last_block_input + ours),
                          block(out.last_block_input), atol=1e-5)


def test_last_block_input_equals_open_clip_blocks(clip, image):
    out = clip(image, ln2_blocks=(0, 2))
    tokens, _ = clip.embed_patches(image)
    for block in clip.model.visual.transformer.resblocks[:-1]:
        tokens = block(tokens)
    assert torch.allclose(out.last_block_input, tokens, atol=1e-6)
    assert set(out.ln2) == {0, 2}
    first = clip.model.visual.transformer.resblocks[0]
    start, _ = clip.embed_patches(image)
    attended = start + first.attention(first.ln_1(start))
    assert torch.allclose(out.ln2[0], first.ln_2(attended), atol=1e-6)
    last = clip.model.visual.transformer.resblocks[2]
    attended = tokens + last.attention(last.ln_1(tokens))
    assert torch.allclose(out.ln2[2], last.ln_2(attended), atol=1e-5)


def test_positional_embedding_unchanged_at_training_grid(clip):
    pos = clip.model.visual.positional_embedding
    for how in ("offset", "size"):
        assert torch.equal(interpolate_pos_embed(pos, (14, 14), how), pos)
    resized = interpolate_pos_embed(pos, (6, 8), "size")
    assert resized.shape == (1 + 48, pos.shape[1])
    assert torch.equal(resized[0], pos[0])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_round_trip(tmp_path, suffix):
    source = tiny_clip()
    state = {k: torch.randn_like(v) for k, v in source.model.state_dict().items()}
    path = tmp_path / f"clip{suffix}"
    save_state_dict_file(state, path)
    loaded = tiny_clip(str(path))
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_wrong_architecture_names_file_and_keys(tmp_path):
    state = tiny_clip().model.state_dict()
    state["visual.proj"] = torch.zeros(3, 3)
    del state["ln_final.bias"]
    path = tmp_path / "broken.pt"
    save_state_dict_file(state, path)
    with pytest.raises(WeightsError) as error:
        tiny_clip(str(path))
    message = str(error.value)
    assert str(path) in message and "ln_final.bias" in message and "visual.proj" in message


def test_missing_file_and_unfetchable_tag_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="does not exist"):
        tiny_clip(str(tmp_path / "absent.pt"))
    with pytest.raises(WeightsError, match="no pretrained tag"):
        tiny_clip("no_such_tag", arch="ViT-B-16")
    # the real download path, told it is offline (a blocked network only retries for longer)
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match="model.clip.weights"):
        tiny_clip("laion2b_s34b_b88k", arch="ViT-B-16")


def test_random_weights_are_reproducible():
    first = tiny_clip().model.state_dict()
    second = tiny_clip().model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_encode_text_gives_one_embedding_per_prompt(clip):
    embeddings = clip.encode_text(["a photo of a cat.", "a photo of a dog."])
    assert embeddings.shape == (2, clip.embed_dim) and embeddings.dtype == torch.float32
    assert not torch.allclose(embeddings[0], embeddings[1])
    again = clip.encode_text(["a photo of a dog."])
    assert torch.allclose(again[0], embeddings[1], atol=1e-5)

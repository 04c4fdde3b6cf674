"""The MaskFormer proposal network of Mask-adapted CLIP (mask_adapted.md, "Stage 1").

Numbers pinned against direct computations: the sine positional encoding, the GroupNorm FPN on
a constant input, the 100 x cosine class head with the no-object column, the per-layer heads of
deep supervision, the R101c stem / multi-grid and the Swin-B sizes read from the built modules,
the authors' key names (enumerated here independently of the key map) converting and loading
strictly with an identical forward; and a tiny network that overfits synthetic shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ovseg.errors import WeightsError
from ovseg.modeling.mask_criterion import MaskCriterion
from ovseg.modeling.mask_proposal import (
    PIXEL_MEAN,
    PIXEL_STD,
    MaskProposalNetwork,
    build_r101c_proposal_network,
    build_swin_b_proposal_network,
    build_tiny_proposal_network,
    normalize_images,
    proposal_text_embeddings,
)
from ovseg.modeling.mask_proposal.blocks import FrozenBatchNorm2d
from ovseg.modeling.mask_proposal.checkpoint import (
    authors_key,
    load_authors_checkpoint,
    main,
    split_authors_state_dict,
)
from ovseg.modeling.mask_proposal.resnet import DeepLabResNet
from ovseg.modeling.mask_proposal.swin import SwinBackbone, build_swin_b_backbone
from ovseg.modeling.mask_proposal.transformer_decoder import sine_position_encoding
from ovseg.modeling.matcher import MaskTargets
from ovseg.text import get_templates


@pytest.fixture
def one_thread():
    # the tiny network trains in ~5 s on one thread; two threads on a busy 2-core machine spin
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_network(seed: int = 0, **kwargs) -> MaskProposalNetwork:
    torch.manual_seed(seed)
    return build_tiny_proposal_network(**kwargs)


# --------------------------------------------------------------------------- pieces


def test_sine_position_encoding_is_the_direct_formula():
    height, width, feats = 3, 5, 8
    pos = sine_position_encoding(2, height, width, num_feats=feats)
    assert pos.shape == (2, 2 * feats, height, width)
    expected = torch.empty(2 * feats, height, width)
    for i in range(height):
        for j in range(width):
            y = (i + 1) / (height + 1e-6) * 2 * math.pi
            x = (j + 1) / (width + 1e-6) * 2 * math.pi
            for k in range(feats):
                w = 10000 ** (2 * (k // 2) / feats)
                trig = math.sin if k % 2 == 0 else math.cos
                expected[k, i, j] = trig(y / w)
                expected[feats + k, i, j] = trig(x / w)
    torch.testing.assert_close(pos[0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(pos[1], pos[0])
    # the last row and column sit at (almost) 2 pi: sin ~ 0, cos ~ 1 on the first pair
    assert abs(pos[0, 0, -1, 0].item()) < 1e-4 and abs(pos[0, 1, -1, 0].item() - 1) < 1e-4


def test_pixel_decoder_on_a_constant_input_is_groupnorm_bias_then_mask_conv():
    net = build_r101c_proposal_network()
    decoder = net.pixel_decoder
    norms = [m for m in decoder.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 7 and all(n.num_groups == 32 and n.num_channels == 256 for n in norms)
    assert decoder.mask_features.out_channels == 256
    convs = [m for name, m in decoder.named_children() if name.startswith(("adapter", "layer"))]
    assert all(c.bias is None for c in convs)  # GN: no conv bias, as detectron2's use_bias
    torch.manual_seed(0)
    with torch.no_grad():
        # every conv a "centre tap" with one row per channel group: a constant map stays constant
        # and all channels of a group agree, so GroupNorm returns exactly its bias
        for conv in [*convs, decoder.mask_features]:
            conv.weight.zero_()
            centre = conv.weight.shape[-1] // 2
            # small weights keep the rounding of a group's mean (which GN divides by
            # sqrt(1e-5)) far below the tolerance
            rows = torch.randn(32, conv.weight.shape[1]) * 0.01
            if conv is decoder.mask_features:
                rows = torch.randn(256, conv.weight.shape[1])
            conv.weight[:, :, centre, centre] = rows.repeat_interleave(
                conv.weight.shape[0] // rows.shape[0], dim=0)
        for norm in norms:
            norm.weight.normal_()
            norm.bias.normal_()
    features = {name: torch.full((1, c, 64 // stride, 64 // stride), 0.7)
                for name, c in net.backbone.out_channels.items()
                for stride in [net.backbone.strides[name]]}
    out = decoder(features)
    assert out.shape == (1, 256, 16, 16)
    layer_1 = F.relu(decoder.layer_1.norm.bias)
    centre = decoder.mask_features.weight[:, :, 1, 1]
    expected = centre @ layer_1 + decoder.mask_features.bias
    torch.testing.assert_close(out[0].permute(1, 2, 0), expected.expand(16, 16, 256),
                               atol=1e-4, rtol=1e-4)


def test_class_head_is_100_cosines_with_the_no_object_embedding_last():
    net = tiny_network(embed_dim=6)
    embeddings = torch.randn(2, 3, 6)
    text = torch.randn(4, 6) * 3
    logits = net.classify(embeddings, text)
    assert logits.shape == (2, 3, 5)
    no_object = net.no_object_embedding[0]
    for b in range(2):
        for q in range(3):
            e = embeddings[b, q]
            for k in range(4):
                cos = torch.dot(e, text[k]) / (e.norm() * text[k].norm())
                assert logits[b, q, k].item() == pytest.approx(100 * cos.item(), abs=1e-4)
            cos = torch.dot(e, no_object) / (e.norm() * no_object.norm())
            assert logits[b, q, 4].item() == pytest.approx(100 * cos.item(), abs=1e-4)
    with pytest.raises(ValueError, match="text embeddings"):
        net.classify(embeddings, torch.randn(4, 5))


def test_no_object_init_std_is_text_width_to_minus_half():
    torch.manual_seed(0)
    net = MaskProposalNetwork(DeepLabResNet((1, 1, 1, 1), 32, 32, 16, (1,), norm="GN",
                                            gn_groups=8), 4096, conv_dim=32, mask_dim=32,
                              gn_groups=8, hidden_dim=32, nheads=2, dim_feedforward=32,
                              dec_layers=1, embed_hidden_dim=32, num_queries=2, text_width=256)
    assert net.no_object_embedding.shape == (1, 4096)
    assert net.no_object_embedding.std().item() == pytest.approx(256 ** -0.5, rel=0.05)


def test_deep_supervision_outputs_are_the_heads_on_each_layer():
    net = tiny_network().eval()
    images, text = torch.randn(2, 3, 64, 64), torch.randn(5, 32)
    out = net(images, text)
    assert len(out.aux) == 2  # 3 decoder layers -> 2 intermediate
    features = net.backbone(images)
    mask_features = net.pixel_decoder(features)
    predictor = net.predictor
    # the decoder by hand: zeros in, queries' positions, each layer's output through decoder.norm
    pos = sine_position_encoding(2, 2, 2, 32).flatten(2).transpose(1, 2)
    memory = predictor.input_proj(features["res5"]).flatten(2).transpose(1, 2)
    query_pos = predictor.query_embed.weight[None].expand(2, -1, -1)
    tgt = torch.zeros_like(query_pos)
    layers = [*out.aux, out.final]
    for index, layer in enumerate(predictor.decoder.layers):
        tgt = layer(tgt, memory, pos, query_pos)
        normed = predictor.decoder.norm(tgt)
        masks = torch.einsum("bqc,bchw->bqhw", predictor.mask_embed(normed), mask_features)
        logits = net.classify(predictor.class_embed(normed), text)
        torch.testing.assert_close(layers[index].mask_logits, masks, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layers[index].class_logits, logits, atol=1e-4, rtol=1e-5)
    assert out.class_logits.shape == (2, 10, 6) and out.mask_logits.shape == (2, 10, 16, 16)
    assert net(images, text, aux=False).aux == []


def test_default_sizes_are_the_specs():
    net = build_r101c_proposal_network()
    predictor = net.predictor
    layers = predictor.decoder.layers
    assert len(layers) == 6 and net.num_queries == 100
    layer = layers[0]
    assert layer.self_attn.num_heads == 8 and layer.self_attn.embed_dim == 256
    assert layer.linear1.out_features == 2048 and layer.dropout.p == 0.1
    assert layer.self_attn.dropout == 0.1 and not layer.pre_norm
    assert [(m.in_features, m.out_features) for m in predictor.class_embed.layers] == [
        (256, 1024), (1024, 512)]
    assert [(m.in_features, m.out_features) for m in predictor.mask_embed.layers] == [
        (256, 256), (256, 256), (256, 256)]
    assert predictor.input_proj.in_channels == 2048
    assert net.logit_scale == 100 and net.size_divisibility == 32
    assert all("scale" not in name for name, _ in net.named_parameters())
    assert PIXEL_MEAN == (123.675, 116.280, 103.530) and PIXEL_STD == (58.395, 57.120, 57.375)
    image = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1) + torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize_images(image), torch.ones(1, 3, 1, 1))


def test_r101c_stem_multi_grid_and_frozen_parts_are_the_authors():
    backbone = build_r101c_proposal_network().backbone
    stem = [backbone.stem.conv1, backbone.stem.conv2, backbone.stem.conv3]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in stem] == [
        (3, 64, (3, 3), (2, 2)), (64, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1))]
    assert [len(getattr(backbone, f"res{k}")) for k in (2, 3, 4, 5)] == [3, 4, 23, 3]
    res5 = backbone.res5
    assert [b.conv2.dilation for b in res5] == [(1, 1), (2, 2), (4, 4)]
    assert [b.conv2.padding for b in res5] == [(1, 1), (2, 2), (4, 4)]
    assert [b.conv2.stride for b in res5] == [(2, 2), (1, 1), (1, 1)]  # stride in the 3x3
    assert all(b.conv1.stride == (1, 1) for k in (2, 3, 4, 5) for b in getattr(backbone, f"res{k}"))
    assert all(b.conv2.dilation == (1, 1) for k in (2, 3, 4) for b in getattr(backbone, f"res{k}"))
    assert backbone.out_channels == {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d
                                                           | nn.GroupNorm)]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert not any(p.requires_grad for p in backbone.res2.parameters())
    assert all(p.requires_grad for p in backbone.res3.parameters())
    features = tiny_network().backbone(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {
        "res2": (16, 24), "res3": (8, 12), "res4": (4, 6), "res5": (2, 3)}


def test_frozen_batch_norm_is_the_affine_formula():
    norm = FrozenBatchNorm2d(3)
    norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    norm.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    norm.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    norm.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    x = torch.randn(2, 3, 4, 4)
    mean, var = norm.running_mean.view(1, 3, 1, 1), norm.running_var.view(1, 3, 1, 1)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight.view(1, 3, 1, 1) \
        + norm.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    assert list(dict(norm.named_parameters())) == []  # all buffers: frozen


def test_swin_b_sizes_are_the_authors():
    with torch.device("meta"):
        backbone = build_swin_b_backbone()
    assert backbone.patch_embed.proj.out_channels == 128
    assert backbone.patch_embed.proj.kernel_size == (4, 4)
    assert [len(stage.blocks) for stage in backbone.layers] == [2, 2, 18, 2]
    assert [stage.blocks[0].attn.num_heads for stage in backbone.layers] == [4, 8, 16, 32]
    assert {b.window for s in backbone.layers for b in s.blocks} == {12}
    assert [b.shift for b in backbone.layers[2].blocks[:4]] == [0, 6, 0, 6]
    assert backbone.out_channels == {"res2": 128, "res3": 256, "res4": 512, "res5": 1024}
    assert backbone.layers[3].blocks[1].drop_path.p == pytest.approx(0.3)
    assert backbone.layers[0].blocks[0].drop_path.p == 0.0
    table = backbone.layers[0].blocks[0].attn.relative_position_bias_table
    assert tuple(table.shape) == (23 * 23, 4)
    assert backbone.layers[0].blocks[1].mlp.fc1.out_features == 512
    with torch.device("meta"):
        net = build_swin_b_proposal_network()
    assert net.embed_dim == 768 and net.predictor.input_proj.in_channels == 1024


def test_swin_pads_any_size_and_masks_shifted_windows():
    torch.manual_seed(0)
    backbone = SwinBackbone(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window=4,
                            drop_path_rate=0.0).eval()
    features = backbone(torch.randn(1, 3, 50, 38))
    assert {k: tuple(v.shape[1:]) for k, v in features.items()} == {
        "res2": (8, 13, 10), "res3": (16, 7, 5), "res4": (32, 4, 3), "res5": (64, 2, 2)}
    mask = backbone.layers[0].shift_mask(8, 8, torch.device("cpu"))
    assert mask.shape == (4, 16, 16)
    # the top-left window of the shifted map is one region; the last one holds four
    assert mask[0].abs().sum() == 0
    assert set(mask[3].unique().tolist()) == {-100.0, 0.0}
    # a window-sized input: every block sees exactly one unpadded window, no shift regions
    out = SwinBackbone(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window=4,
                       drop_path_rate=0.0)(torch.randn(2, 3, 16, 16))
    assert out["res2"].shape == (2, 8, 4, 4)


def test_swin_window_attention_is_attention_with_the_relative_position_bias():
    # one 3x3 window, no shift: the block is pre-norm attention whose logits get
    # table[(dy + 2) * 5 + (dx + 2)] for a key (dy, dx) away from the query, then the MLP
    from ovseg.modeling.mask_proposal.swin import SwinBlock

    torch.manual_seed(0)
    block = SwinBlock(dim=4, num_heads=2, window=3, shift=0, mlp_ratio=2.0, drop_path=0.0)
    x = torch.randn(1, 9, 4)
    attn = block.attn
    q, k, v = attn.qkv(block.norm1(x)).view(9, 3, 2, 2).permute(1, 2, 0, 3)
    coords = [(i, j) for i in range(3) for j in range(3)]
    bias = torch.empty(2, 9, 9)
    for a, (ya, xa) in enumerate(coords):
        for b, (yb, xb) in enumerate(coords):
            bias[:, a, b] = attn.relative_position_bias_table[(ya - yb + 2) * 5 + (xa - xb + 2)]
    weights = ((q @ k.transpose(-2, -1)) / math.sqrt(2) + bias).softmax(-1)
    y = x + attn.proj((weights @ v).transpose(0, 1).reshape(1, 9, 4))
    expected = y + block.mlp(block.norm2(y))
    torch.testing.assert_close(block(x, 3, 3, torch.zeros(1, 9, 9)), expected)


def test_inference_pads_upsamples_crops_then_sigmoid():
    net = tiny_network().eval()
    images, text = torch.randn(1, 3, 50, 70), torch.randn(4, 32)
    proposals = net.inference(images, text)
    assert proposals.mask_probs.shape == (1, 10, 50, 70)
    torch.testing.assert_close(proposals.class_probs.sum(-1), torch.ones(1, 10))
    padded = F.pad(images, (0, 26, 0, 14))
    out = net(padded, text, aux=False)
    masks = F.interpolate(out.mask_logits, size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(proposals.mask_probs, masks[..., :50, :70].sigmoid())
    torch.testing.assert_close(proposals.class_probs, out.class_logits.softmax(-1))


def test_text_embeddings_average_the_14_vild_prompts():
    seen = []
    table = {}

    def encode_text(prompts):
        seen.extend(prompts)
        return torch.stack([table.setdefault(p, torch.randn(8)) for p in prompts])

    torch.manual_seed(0)
    embeddings = proposal_text_embeddings(encode_text, ["cat", "sky"], model_id="fake",
                                          use_cache=False)
    templates = get_templates("vild")
    assert len(templates) == 14 and len(seen) == 28
    for row, name in enumerate(["cat", "sky"]):
        prompts = [t.replace("{}", name) for t in templates]
        mean = torch.stack([F.normalize(table[p], dim=0) for p in prompts]).mean(0)
        torch.testing.assert_close(embeddings[row], F.normalize(mean, dim=0))


# --------------------------------------------------------------------------- checkpoints


def fake_r101c_like(seed: int) -> MaskProposalNetwork:
    """R101c's structure at tiny width: frozen BN, shortcuts, (1, 2, 4) multi-grid."""
    torch.manual_seed(seed)
    backbone = DeepLabResNet((1, 1, 2, 3), stem_channels=16, res2_channels=32,
                             bottleneck_channels=8, res5_multi_grid=(1, 2, 4))
    net = MaskProposalNetwork(backbone, 12, conv_dim=16, mask_dim=16, gn_groups=4,
                              hidden_dim=16, nheads=2, dim_feedforward=24, dec_layers=2,
                              embed_hidden_dim=20, num_queries=5)
    with torch.no_grad():  # non-trivial frozen statistics
        for module in net.modules():
            if isinstance(module, FrozenBatchNorm2d):
                for buffer in (module.weight, module.bias, module.running_mean):
                    buffer.normal_(0, 0.3).add_(1 if buffer is module.weight else 0)
                module.running_var.uniform_(0.5, 2.0)
    return net.eval()


def authors_r101c_keys(blocks=(1, 1, 2, 3), dec_layers=2) -> set[str]:
    """The authors' key names of an R101c OVSeg model, spelt out from detectron2's and
    MaskFormer's module structure (not from our key map)."""
    bn = ("weight", "bias", "running_mean", "running_var")
    keys = {f"backbone.stem.conv{i}.{p}" for i in (1, 2, 3) for p in ("weight",)}
    keys |= {f"backbone.stem.conv{i}.norm.{p}" for i in (1, 2, 3) for p in bn}
    for stage, count in zip((2, 3, 4, 5), blocks, strict=True):
        for block in range(count):
            convs = ["conv1", "conv2", "conv3"] + (["shortcut"] if block == 0 else [])
            for conv in convs:
                prefix = f"backbone.res{stage}.{block}.{conv}"
                keys |= {f"{prefix}.weight"} | {f"{prefix}.norm.{p}" for p in bn}
    head = "sem_seg_head.pixel_decoder"
    for k in (1, 2, 3):
        keys |= {f"{head}.adapter_{k}.weight", f"{head}.adapter_{k}.norm.weight",
                 f"{head}.adapter_{k}.norm.bias"}
    for k in (1, 2, 3, 4):
        keys |= {f"{head}.layer_{k}.weight", f"{head}.layer_{k}.norm.weight",
                 f"{head}.layer_{k}.norm.bias"}
    keys |= {f"{head}.mask_features.weight", f"{head}.mask_features.bias"}
    pred = "sem_seg_head.predictor"
    for layer in range(dec_layers):
        prefix = f"{pred}.transformer.decoder.layers.{layer}"
        for attn in ("self_attn", "multihead_attn"):
            keys |= {f"{prefix}.{attn}.in_proj_weight", f"{prefix}.{attn}.in_proj_bias",
                     f"{prefix}.{attn}.out_proj.weight", f"{prefix}.{attn}.out_proj.bias"}
        for part in ("linear1", "linear2", "norm1", "norm2", "norm3"):
            keys |= {f"{prefix}.{part}.weight", f"{prefix}.{part}.bias"}
    keys |= {f"{pred}.transformer.decoder.norm.weight", f"{pred}.transformer.decoder.norm.bias",
             f"{pred}.query_embed.weight", f"{pred}.input_proj.weight", f"{pred}.input_proj.bias"}
    keys |= {f"{pred}.mask_embed.layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    keys |= {f"{pred}.class_embed.layers.{i}.{p}" for i in range(2) for p in ("weight", "bias")}
    return keys | {"clip_adapter.non_object_embedding"}


def authors_file(net: MaskProposalNetwork) -> dict[str, torch.Tensor]:
    """A fake released state dict: the network under the authors' names, plus CLIP tensors and
    the constants their file carries."""
    state = {authors_key(k): v.clone() for k, v in net.state_dict().items()}
    state["clip_adapter.clip_model.visual.conv1.weight"] = torch.randn(8, 3, 16, 16)
    state["clip_adapter.clip_model.visual.mask_embedding"] = torch.randn(3, 4, 8)
    state["clip_adapter.clip_model.text_projection"] = torch.randn(8, 12)
    state["clip_adapter.pixel_mean"] = torch.tensor([122.7709, 116.7460, 104.0937]).view(
        1, 3, 1, 1)
    state["clip_adapter.pixel_std"] = torch.tensor([68.5005, 66.6322, 70.3232]).view(1, 3, 1, 1)
    state["criterion.empty_weight"] = torch.tensor([1.0] * 171 + [0.1])
    return state


def test_authors_r101c_file_converts_loads_strictly_and_forwards_identically(tmp_path):
    reference = fake_r101c_like(seed=1)
    state = authors_file(reference)
    names = {k for k in state if not k.startswith(("clip_adapter.clip_model.", "criterion.",
                                                     "clip_adapter.pixel"))}
    assert names == authors_r101c_keys()
    path = tmp_path / "ovseg_R101c_vitB16_ft_mpt.pth"
    torch.save({"model": state, "iteration": 119999}, path)
    model = fake_r101c_like(seed=2)
    images, text = torch.randn(2, 3, 64, 64), torch.randn(7, 12)
    assert not torch.equal(model(images, text).mask_logits, reference(images, text).mask_logits)
    split = load_authors_checkpoint(model, path)
    assert set(split.clip) == {"visual.conv1.weight", "visual.mask_embedding", "text_projection"}
    assert set(split.constants) == {"criterion.empty_weight", "clip_adapter.pixel_mean",
                                    "clip_adapter.pixel_std"}
    torch.testing.assert_close(model.no_object_embedding,
                               state["clip_adapter.non_object_embedding"])
    expected, got = reference(images, text), model(images, text)
    torch.testing.assert_close(got.class_logits, expected.class_logits, atol=0, rtol=0)
    torch.testing.assert_close(got.mask_logits, expected.mask_logits, atol=0, rtol=0)


def test_authors_swin_file_keeps_the_relative_position_index(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        backbone = SwinBackbone(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                window=4, drop_path_rate=0.1)
        return MaskProposalNetwork(backbone, 12, conv_dim=16, mask_dim=16, gn_groups=4,
                                   hidden_dim=16, nheads=2, dim_feedforward=24, dec_layers=2,
                                   embed_hidden_dim=20, num_queries=5).eval()

    reference = build(1)
    state = authors_file(reference)
    for key in ("backbone.patch_embed.proj.weight", "backbone.patch_embed.norm.bias",
                "backbone.layers.2.blocks.1.attn.relative_position_bias_table",
                "backbone.layers.2.blocks.1.attn.relative_position_index",
                "backbone.layers.0.blocks.0.attn.qkv.weight",
                "backbone.layers.3.blocks.1.mlp.fc2.bias",
                "backbone.layers.0.downsample.reduction.weight",
                "backbone.layers.2.downsample.norm.weight", "backbone.norm3.weight"):
        assert key in state, key
    assert not any(k.startswith("backbone.layers.3.downsample") for k in state)
    model = build(2)
    load_authors_checkpoint(model, state, source="swin fake")
    images, text = torch.randn(1, 3, 40, 56), torch.randn(3, 12)
    torch.testing.assert_close(model(images, text).mask_logits,
                               reference(images, text).mask_logits, atol=0, rtol=0)


def test_a_wrong_file_fails_in_one_line_listing_the_keys(tmp_path):
    state = authors_file(fake_r101c_like(seed=1))
    stray = dict(state, **{"roi_heads.box_predictor.weight": torch.zeros(2)})
    path = tmp_path / "other_model.pth"
    torch.save({"model": stray}, path)
    with pytest.raises(WeightsError) as error:
        load_authors_checkpoint(fake_r101c_like(seed=2), path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "roi_heads.box_predictor.weight" in message and "1 keys" in message

    missing = {k: v for k, v in state.items() if "res5.2.conv2" not in k}
    with pytest.raises(WeightsError, match=r"missing keys: backbone\.res5\.2\.conv2\.norm\.bias"):
        load_authors_checkpoint(fake_r101c_like(seed=2), missing, source="cut.pth")

    # the same file into a network for the other CLIP width: the shapes are named
    wrong_width = dict(state)
    wrong_width["clip_adapter.non_object_embedding"] = torch.zeros(1, 768)
    with pytest.raises(WeightsError, match=r"no_object_embedding \(file \(1, 768\), model "):
        load_authors_checkpoint(fake_r101c_like(seed=2), wrong_width, source="vitl.pth")

    with pytest.raises(WeightsError, match="no proposal-network key"):
        split_authors_state_dict({"clip_adapter.clip_model.visual.proj": torch.zeros(1)},
                                 source="clip_only.pth")


def test_converter_command_line_writes_both_parts(tmp_path, capsys):
    reference = fake_r101c_like(seed=1)
    path = tmp_path / "ovseg.pth"
    torch.save({"model": authors_file(reference)}, path)
    out, clip = tmp_path / "proposals.safetensors", tmp_path / "clip.safetensors"
    assert main([str(path), str(out), "--clip-out", str(clip)]) == 0
    from ovseg.io import load_state_dict_file
    from ovseg.modeling.mask_proposal.checkpoint import load_proposal_state

    model = fake_r101c_like(seed=2)
    load_proposal_state(model, load_state_dict_file(out), source=str(out))
    torch.testing.assert_close(model.no_object_embedding, reference.no_object_embedding)
    assert "visual.mask_embedding" in load_state_dict_file(clip)
    assert main([str(tmp_path / "missing.pth"), str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- training


def shape_images(size: int = 64):
    """Three images with 2-3 coloured shapes (classes 1 square, 2 disc, 3 triangle) on plain
    backgrounds (class 0); targets hold every class present, background included."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")

    def square(cy, cx, r):
        return ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)

    def disc(cy, cx, r):
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r

    def triangle(cy, cx, r):
        return (yy >= cy - r) & (yy <= cy + r) & ((xx - cx).abs() <= (yy - (cy - r)) // 2)

    colours = {1: (220, 40, 40), 2: (40, 200, 60), 3: (50, 60, 230)}
    scenes = [((200, 200, 200), [(1, square(18, 18, 10)), (2, disc(44, 42, 12))]),
              ((30, 30, 30), [(2, disc(20, 40, 11)), (3, triangle(42, 20, 14))]),
              ((120, 110, 90), [(1, square(46, 46, 9)), (3, triangle(20, 22, 12)),
                                (2, disc(16, 50, 8))])]
    images, targets = [], []
    for background, shapes in scenes:
        image = torch.tensor(background, dtype=torch.float32).view(3, 1, 1).repeat(1, size, size)
        labels, masks = [0], [torch.ones(size, size, dtype=torch.bool)]
        for label, mask in shapes:
            image[:, mask] = torch.tensor(colours[label], dtype=torch.float32)[:, None]
            labels.append(label)
            masks.append(mask)
            masks[0] = masks[0] & ~mask
        images.append(image)
        targets.append(MaskTargets(torch.tensor(labels), torch.stack(masks)))
    return torch.stack(images), targets


def train_tiny(steps: int):
    images, targets = shape_images()
    inputs = normalize_images(images)
    torch.manual_seed(0)
    text = F.normalize(torch.randn(4, 32), dim=-1)
    # dropout off: the network is to memorise three images in a hundred steps
    net = build_tiny_proposal_network(embed_dim=32, dropout=0.0)
    criterion = MaskCriterion()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3,
                                  weight_decay=1e-4)
    losses = []
    for _ in range(steps):
        out = net(inputs, text)
        loss = sum(criterion(out.final, targets, out.aux).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return net.eval(), inputs, text, targets, criterion, losses


def test_tiny_network_overfits_synthetic_shapes(one_thread):
    net, inputs, text, targets, criterion, losses = train_tiny(100)
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5
    with torch.no_grad():
        out = net(inputs, text, aux=False)
        matches = criterion.matcher(out.class_logits, out.mask_logits, targets)
        proposals = net.inference(inputs, text)
    ious = []
    for b, (queries, matched) in enumerate(matches):
        predicted = proposals.mask_probs[b, queries] > 0.5
        truth = targets[b].masks[matched]
        inter = (predicted & truth).flatten(1).sum(1).float()
        union = (predicted | truth).flatten(1).sum(1).float()
        ious += (inter / union).tolist()
        # the matched queries also name their classes
        predicted_classes = proposals.class_probs[b, queries].argmax(-1)
        assert (predicted_classes == targets[b].labels[matched]).float().mean() >= 0.75
    assert len(ious) == 10 and min(ious) > 0.5, ious

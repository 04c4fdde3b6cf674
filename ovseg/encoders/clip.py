"""Frozen open_clip CLIP: the image side's last-block intermediates at any input size, text side.

``ClipEncoder.forward`` runs every block but the last as open_clip wrote it and returns what the
dense methods need of the last one (its input, its q/k/v) plus the image embedding, timm-style:
asked for, not computed and dropped. The last-block variants of MaskCLIP, SCLIP, NACLIP and
ProxyCLIP live in :mod:`ovseg.layers.attention` and reuse the block's pieces through
:meth:`ClipEncoder.attention_output` and :meth:`ClipEncoder.feed_forward`. The positional
embedding is interpolated to the patch grid. The text side turns prompts into embeddings.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ovseg.encoders.weights import (
    WeightsError,
    load_into,
    load_state_dict_file,
    offline_hint,
    parse_weights_spec,
    seeded_init,
)
from ovseg.errors import ConfigError
from ovseg.layers.attention import scaled_softmax

# OpenAI checkpoints carry these scalars beside the weights; open_clip's models have no such keys
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_OPENAI_METADATA_KEYS = OPENAI_METADATA_KEYS
TINY_CLIP = "ovseg-tiny-ViT-16"  # 3 layers, width 128, patch 16: the fixture's architecture
_MODEL_CONFIGS = Path(__file__).parent / "model_configs"
# OpenAI CLIP's normalisation on the 0-255 scale, as mmseg-style pipelines apply it
CLIP_MEAN_255 = (122.771, 116.746, 104.094)
CLIP_STD_255 = (68.501, 66.632, 70.323)
# the same statistics on the 0-1 scale, unrounded: ProxyCLIP and Trident un-normalise CLIP crops
# with these before re-normalising them for DINO (DinoEncoder.from_clip_normalized)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet's statistics, as MaskCLIP's own configs normalise CLIP's input (mmseg's img_norm_cfg,
# 0-255 scale) and on the 0-1 scale
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ``model.clip.normalize`` -> (0-255 mean, 0-255 std, 0-1 mean, 0-1 std)
NORMALIZATIONS = {
    "openai": (CLIP_MEAN_255, CLIP_STD_255, OPENAI_MEAN, OPENAI_STD),
    "imagenet": (IMAGENET_MEAN_255, IMAGENET_STD_255, IMAGENET_MEAN, IMAGENET_STD),
}


@dataclass
class ClipIntermediates:
    """What one CLIP image forward returns. N = h * w patch tokens in row-major order, after the
    class token; W = transformer width, D = joint embedding dim. Tensors have the model's dtype.

    Fields:
        last_block_input: (B, 1 + N, W) tokens entering the last block, class token first.
        q, k, v: (B, heads, 1 + N, head_dim) of the last block, from its ln_1 output and
            in_proj; q unscaled.
        cls_token: (B, D) the image embedding: the class token after the unmodified last
            block, ln_post and proj (open_clip's ``encode_image`` at the training size).
        grid: (h, w) patch grid, (H // p, W // p): the patch conv drops the remainder pixels.
        ln2: {block index: (B, 1 + N, W)} ln_2 outputs of the blocks asked for in
            ``ln2_blocks`` (the unmodified forward); empty unless asked.
    """

    last_block_input: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cls_token: torch.Tensor
    grid: tuple[int, int]
    ln2: dict[int, torch.Tensor] = field(default_factory=dict)


def interpolate_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], how: str = "offset"
) -> torch.Tensor:
    """Resize a (1 + N0, W) positional embedding to a (h, w) patch grid; class position kept.

    ``offset``: bicubic with scale factor (g + 0.1) / sqrt(N0) per axis (SCLIP/NACLIP/DINO).
    ``size``: bicubic to the target size (MaskCLIP as ported in CLIP-DINOiser).
    At the training grid the embedding is returned unchanged.
    """
    cls_pos, patch_pos = pos_embed[:1], pos_embed[1:]
    side = math.isqrt(patch_pos.shape[0])
    h, w = grid
    if (h, w) == (side, side):
        return pos_embed
    # bicubic in float32: half-precision bicubic is missing on some devices (a no-op in fp32)
    patch_pos = patch_pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if how == "offset":
        patch_pos = F.interpolate(
            patch_pos, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic",
            align_corners=False,
        )
    elif how == "size":
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)
    else:
        raise ValueError(f"pos_embed_resize must be 'offset' or 'size', got {how!r}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(h * w, -1).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


class ClipEncoder(nn.Module):
    """A frozen open_clip CLIP with last-block intermediates and a text encoder.

    ``forward(x)`` takes (B, 3, H, W) CLIP-normalised images of any size (sides are
    floor-truncated to multiples of the patch size by the patch conv) and returns
    :class:`ClipIntermediates`. The last block's pieces (:meth:`attention_output`,
    :meth:`feed_forward`) and :meth:`project` let attention variants rebuild the block without
    reaching into open_clip.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str, pos_embed_resize: str = "offset",
                 normalization: str = "openai"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.pos_embed_resize = pos_embed_resize
        visual = model.visual
        self.patch_size = visual.conv1.kernel_size[0]
        self.width = visual.conv1.out_channels
        self.num_heads = visual.transformer.resblocks[-1].attn.num_heads
        self.embed_dim = visual.proj.shape[1]
        _check_normalization(normalization)
        mean_255, std_255, mean, std = NORMALIZATIONS[normalization]
        self.normalization = normalization
        # the same statistics on the 0-1 scale: a proxy model un-normalises CLIP's input with
        # them before normalising it its own way (DinoEncoder.renormalize)
        self.input_stats = (mean, std)
        self.register_buffer("mean", torch.tensor(mean_255).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std_255).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ClipEncoder:  # frozen: always in eval mode
        return super().train(False)

    def set_precision(self, dtype: torch.dtype) -> ClipEncoder:
        """Run the image tower in ``dtype`` (``model.precision``): its weights are cast, inputs
        are cast to them in :meth:`embed_patches`. The text tower and ``mean``/``std`` stay
        float32, so text classifiers (and their on-disk cache) do not depend on the precision.
        Returns self."""
        self.model.visual.to(dtype)
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB on the 0-255 scale -> CLIP-normalised float (``normalization``'s
        mean/std: OpenAI's, or ImageNet's for MaskCLIP's own protocol)."""
        return (images.float() - self.mean) / self.std

    # ---- image side --------------------------------------------------------------------------
    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch + class + positional embedding and ln_pre: (B, 1 + N, W) and the grid."""
        visual = self.model.visual
        patches = visual.conv1(x.to(visual.conv1.weight.dtype))
        grid = (patches.shape[2], patches.shape[3])
        patches = patches.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        tokens = torch.cat([cls, patches], dim=1)
        pos = interpolate_pos_embed(visual.positional_embedding, grid, self.pos_embed_resize)
        return visual.ln_pre(tokens + pos.to(tokens.dtype)), grid

    def last_block_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of the last block, each (B, heads, L, head_dim), for its input (B, L, W)."""
        block = self.model.visual.transformer.resblocks[-1]
        y = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
        batch, length, _ = y.shape
        y = y.view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return y[0], y[1], y[2]

    def attention_output(self, heads_out: torch.Tensor, layer_scale: bool) -> torch.Tensor:
        """The last block's attention output from per-head results: merge the heads, out_proj,
        then its layer scale ls_1 when ``layer_scale`` (identity in OpenAI-style CLIPs).

        Args:
            heads_out: (B, heads, L, head_dim), e.g. softmax(q kᵀ/√d) v.

        Returns:
            (B, L, W).
        """
        block = self.model.visual.transformer.resblocks[-1]
        out = block.attn.out_proj(heads_out.transpose(1, 2).flatten(2))
        return block.ls_1(out) if layer_scale else out

    def feed_forward(self, z: torch.Tensor) -> torch.Tensor:
        """The last block's FFN with its residual: (B, L, W) -> z + ls_2(mlp(ln_2(z)))."""
        block = self.model.visual.transformer.resblocks[-1]
        return z + block.ls_2(block.mlp(block.ln_2(z)))

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post then proj: (..., W) last-block tokens -> (..., D) joint-space features."""
        visual = self.model.visual
        return visual.ln_post(tokens.to(visual.proj.dtype)) @ visual.proj

    def forward(
        self, x: torch.Tensor, *, ln2_blocks: tuple[int, ...] = ()
    ) -> ClipIntermediates:
        """Run the image tower up to the last block; see :class:`ClipIntermediates`.

        Args:
            x: (B, 3, H, W) CLIP-normalised images (see :meth:`normalize`).
            ln2_blocks: indices of blocks whose ln_2 output (unmodified forward) to return.

        Returns:
            :class:`ClipIntermediates` on the grid (H // p, W // p).
        """
        blocks = self.model.visual.transformer.resblocks
        tokens, grid = self.embed_patches(x)
        ln2: dict[int, torch.Tensor] = {}
        for index, block in enumerate(blocks[:-1]):
            if index in ln2_blocks:
                attended = tokens + block.ls_1(block.attention(block.ln_1(tokens)))
                ln2[index] = block.ln_2(attended)
            tokens = block(tokens)
        q, k, v = self.last_block_qkv(tokens)
        if len(blocks) - 1 in ln2_blocks:
            heads_out = scaled_softmax(q, k) @ v
            attended = tokens + self.attention_output(heads_out, layer_scale=True)
            ln2[len(blocks) - 1] = blocks[-1].ln_2(attended)
        cls_token = self._class_embedding(tokens, q, k, v)
        return ClipIntermediates(
            last_block_input=tokens, q=q, k=k, v=v, cls_token=cls_token, grid=grid, ln2=ln2
        )

    def _class_embedding(self, tokens, q, k, v) -> torch.Tensor:
        """(B, D) class token after the unmodified last block, ln_post and proj; only the class
        query's row of the attention is computed (the block mixes tokens only there)."""
        heads_out = scaled_softmax(q[:, :, :1], k) @ v
        z = tokens[:, :1] + self.attention_output(heads_out, layer_scale=True)
        return self.project(self.feed_forward(z))[:, 0]

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Global image embedding (B, D) from open_clip's own forward (training-size input), in
        the image tower's dtype."""
        return self.model.encode_image(x.to(self.model.visual.conv1.weight.dtype))

    # ---- text side ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Raw text embeddings (B, D), float32, for a list of prompts."""
        device = self.model.visual.proj.device
        tokens = self.tokenizer(list(prompts)).to(device)
        return self.model.encode_text(tokens).float()


def _check_normalization(name: str) -> None:
    if name not in NORMALIZATIONS:
        raise ConfigError(f"model.clip.normalize: unknown normalisation {name!r}; one of "
                          f"{', '.join(NORMALIZATIONS)}")


@contextmanager
def _quiet_root_logger():
    """open_clip logs 'no pretrained weights loaded' on the root logger for every random build."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def register_tiny_configs() -> None:
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(_MODEL_CONFIGS)


def clip_state_template(arch: str) -> dict[str, torch.Tensor]:
    """The state dict of the open_clip model ``arch`` (or ``ovseg-tiny-ViT-16``) on the meta
    device: the keys and shapes a CLIP weights file must have (OpenAI's names for OpenAI-style
    ViTs), without allocating or initialising the model.

    Raises:
        WeightsError: ``arch`` is not an open_clip model name.
    """
    import open_clip

    register_tiny_configs()
    if arch not in open_clip.list_models():
        raise WeightsError(f"unknown CLIP architecture {arch!r}; use an open_clip model name "
                           f"(e.g. ViT-B-16, ViT-L-14) or {TINY_CLIP!r}")
    with torch.device("meta"), _quiet_root_logger():
        model = open_clip.create_model(arch, pretrained=None, device="meta")
    return model.state_dict()


def build_clip(section, device: str | torch.device = "cpu") -> ClipEncoder:
    """Build a frozen CLIP encoder from its config section.

    Args:
        section: ``model.clip``: a ``ClipConfig`` or an OmegaConf node of it, with
            ``arch``: an open_clip model name (ViT-B-16, ViT-L-14, ViT-H-14, ...),
            ``ovseg-tiny-ViT-16``, or ``hf-hub:org/name`` (then the weights come from the hub
            and ``weights`` is ignored);
            ``weights``: see :mod:`ovseg.encoders.weights`; ``random`` is seeded, so it is
            reproducible;
            ``pos_embed_resize``: ``offset`` | ``size`` (:func:`interpolate_pos_embed`);
            ``quick_gelu``: QuickGELU activations; None = as the pretrained tag says;
            ``normalize``: the input mean/std, ``openai`` | ``imagenet``.
        device: where the encoder goes.

    Raises:
        WeightsError: unknown arch or tag, a missing or mismatching file, a failed download.
    """
    arch, weights = str(section.arch), str(section.weights)
    pos_embed_resize, quick_gelu = str(section.pos_embed_resize), section.quick_gelu
    normalization = str(getattr(section, "normalize", "openai"))
    _check_normalization(normalization)
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ImportError("ovseg needs open_clip_torch: pip install open_clip_torch") from exc
    register_tiny_configs()
    spec = parse_weights_spec(weights)
    if arch.startswith("hf-hub:"):
        spec = parse_weights_spec(arch)
    elif arch not in open_clip.list_models():
        raise WeightsError(
            f"unknown CLIP architecture {arch!r}; use an open_clip model name "
            f"(e.g. ViT-B-16, ViT-L-14, ViT-H-14) or {TINY_CLIP!r}"
        )
    if quick_gelu is None and spec.kind == "tag":
        quick_gelu = bool(open_clip.get_pretrained_cfg(arch, spec.value).get("quick_gelu", False))
    kwargs = {"force_quick_gelu": bool(quick_gelu)}
    if spec.kind in ("tag", "hf_hub"):
        pretrained = spec.value if spec.kind == "tag" else None
        if spec.kind == "tag" and not open_clip.get_pretrained_cfg(arch, spec.value):
            tags = [t for a, t in open_clip.list_pretrained() if a == arch]
            raise WeightsError(
                f"open_clip has no pretrained tag {spec.value!r} for {arch}; known tags: "
                f"{', '.join(tags) or 'none'}; or give a local weights file"
            )
        try:
            model = open_clip.create_model(arch, pretrained=pretrained, **kwargs)
        except Exception as exc:
            what = f"CLIP weights {arch!r}/{spec.value!r}"
            raise WeightsError(f"{offline_hint(what, 'model.clip.weights')} ({exc})") from exc
    else:
        with seeded_init(), _quiet_root_logger():
            model = open_clip.create_model(arch, pretrained=None, **kwargs)
        if spec.is_file:
            state = load_state_dict_file(spec.value)
            for key in _OPENAI_METADATA_KEYS:
                state.pop(key, None)
            load_into(model, state, source=spec.value,
                      expected=f"an open_clip {arch} CLIP state dict", strip_prefix="module.")
    tokenizer = open_clip.get_tokenizer(arch)
    encoder = ClipEncoder(
        model, tokenizer, name=f"{arch}|{weights}", pos_embed_resize=pos_embed_resize,
        normalization=normalization,
    )
    return encoder.to(device)

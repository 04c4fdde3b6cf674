"""Frozen open_clip ViT with the dense last-block modes of MaskCLIP, SCLIP, NACLIP and ProxyCLIP.

Only the last residual block changes between modes (see ``specs/dense_clip.md``); every earlier
block runs as open_clip wrote it. The image side accepts any input size: the positional
embedding is interpolated to the patch grid. The text side turns prompts into embeddings.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
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

# OpenAI checkpoints carry these scalars beside the weights; open_clip's models have no such keys
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
CLIP_MODES = ("vanilla", "maskclip", "sclip", "naclip", "proxy")
TINY_CLIP = "ovseg-tiny-ViT-16"  # 3 layers, width 128, patch 16: the fixture's architecture
_MODEL_CONFIGS = Path(__file__).parent / "model_configs"
# OpenAI CLIP's normalisation on the 0-255 scale, as mmseg-style pipelines apply it
CLIP_MEAN_255 = (122.771, 116.746, 104.094)
CLIP_STD_255 = (68.501, 66.632, 70.323)
# the same statistics on the 0-1 scale, unrounded: ProxyCLIP and Trident un-normalise CLIP crops
# with these before re-normalising them for DINO (DinoEncoder.renormalize)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipDenseOutput:
    """Dense CLIP features of a batch of images.

    features: (B, N, D) patch features after ln_post and proj (not normalised); N = h * w, on
        ``grid`` (the proxy grid in ``proxy`` mode).
    cls_token: (B, D) class token after ln_post and proj (None in ``proxy`` mode).
    grid: (h, w) of ``features``.
    last_block_input: (B, 1 + N0, W) tokens entering the last block, class token first.
    last_block_output: (B, 1 + N, W), or (B, N, W) in ``proxy`` mode, before ln_post.
    q, k, v: (B, heads, 1 + N0, head_dim) of the last block, from its ln_1 output.
    ln2: {block index: (B, 1 + N0, W)} ln_2 outputs of the requested blocks (original forward).
    """

    features: torch.Tensor
    cls_token: torch.Tensor | None
    grid: tuple[int, int]
    last_block_input: torch.Tensor
    last_block_output: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    ln2: dict[int, torch.Tensor]


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
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if how == "offset":
        patch_pos = F.interpolate(
            patch_pos, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic",
            align_corners=False,
        )
    elif how == "size":
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)
    else:
        raise ValueError(f"pos_embed_resize must be 'offset' or 'size', got {how!r}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(h * w, -1)
    return torch.cat([cls_pos, patch_pos], dim=0)


def gaussian_window_bias(grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """NACLIP's neighbourhood bias G: (1 + N, 1 + N), exp(-|p_i - p_j|^2 / (2 sigma^2)).

    Peak 1 on the diagonal (not a normalised density); class row and column are 0.
    """
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    positions = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()
    squared = torch.cdist(positions, positions).pow(2)
    gauss = torch.exp(-squared / (2 * sigma**2))
    return F.pad(gauss, (1, 0, 1, 0))


def proxy_attention(
    proxy_tokens: torch.Tensor,
    gamma: float,
    beta: float,
    mean: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """ProxyCLIP's attention from proxy features (B, N', C) -> (B, N', N').

    S = cosine similarity; S' = gamma * (S - beta * m) with m one scalar mean of S per image;
    entries with S' < 0 are masked out, then a row softmax.

    mean: m given from outside, a float or a tensor broadcastable to (B, 1, 1) (Trident takes
        the mean of S over all windows of an image); None = the mean of each image's own S.
    """
    normed = F.normalize(proxy_tokens, dim=-1)
    similarity = normed @ normed.transpose(1, 2)
    if mean is None:
        mean = similarity.mean(dim=(1, 2), keepdim=True)
    elif isinstance(mean, torch.Tensor):
        mean = mean.to(similarity.device, similarity.dtype)
    logits = gamma * (similarity - beta * mean)
    logits = logits.masked_fill(logits < 0, float("-inf"))
    return logits.softmax(dim=-1)


class ClipEncoder(nn.Module):
    """A frozen open_clip CLIP with dense image features and a text encoder.

    ``forward(x, mode)`` takes (B, 3, H, W) CLIP-normalised images of any size (sides are
    floor-truncated to multiples of the patch size by the patch conv).
    """

    def __init__(self, model: nn.Module, tokenizer, name: str, pos_embed_resize: str = "offset"):
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
        self.register_buffer("mean", torch.tensor(CLIP_MEAN_255).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD_255).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ClipEncoder:  # frozen: always in eval mode
        return super().train(False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB on the 0-255 scale -> CLIP-normalised float."""
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
        """q, k, v of the last block, each (B, heads, L, head_dim), from its ln_1 output."""
        block = self.model.visual.transformer.resblocks[-1]
        y = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
        batch, length, _ = y.shape
        y = y.view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return y[0], y[1], y[2]

    def _merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """(B, heads, L, head_dim) -> out_proj applied: (B, L, W)."""
        block = self.model.visual.transformer.resblocks[-1]
        out = out.transpose(1, 2).flatten(2)
        return block.attn.out_proj(out)

    def _feed_forward(self, z: torch.Tensor) -> torch.Tensor:
        block = self.model.visual.transformer.resblocks[-1]
        return z + block.ls_2(block.mlp(block.ln_2(z)))

    def forward(
        self,
        x: torch.Tensor,
        mode: str = "vanilla",
        *,
        proxy_tokens: torch.Tensor | None = None,
        proxy_grid: tuple[int, int] | None = None,
        naclip_sigma: float = 5.0,
        proxy_gamma: float = 3.0,
        proxy_beta: float = 1.2,
        proxy_mean: torch.Tensor | float | None = None,
        ln2_blocks: tuple[int, ...] = (),
    ) -> ClipDenseOutput:
        """Dense features of (B, 3, H, W) CLIP-normalised images with the last block in ``mode``.

        ``proxy`` needs ``proxy_tokens`` (B, N', C) on ``proxy_grid`` (from a DINO encoder);
        ``proxy_mean`` optionally gives the mean of S from outside (see :func:`proxy_attention`).
        ``ln2_blocks``: indices of blocks whose ln_2 output to return (the unmodified forward).
        """
        if mode not in CLIP_MODES:
            raise ValueError(f"unknown CLIP attention mode {mode!r}; one of {CLIP_MODES}")
        visual = self.model.visual
        blocks = visual.transformer.resblocks
        tokens, grid = self.embed_patches(x)
        ln2: dict[int, torch.Tensor] = {}
        for index, block in enumerate(blocks[:-1]):
            if index in ln2_blocks:
                attended = tokens + block.ls_1(block.attention(block.ln_1(tokens)))
                ln2[index] = block.ln_2(attended)
            tokens = block(tokens)
        last_input = tokens
        q, k, v = self.last_block_qkv(last_input)
        if len(blocks) - 1 in ln2_blocks:
            attended = last_input + self._vanilla_attention(q, k, v)
            ln2[len(blocks) - 1] = blocks[-1].ln_2(attended)
        scale = q.shape[-1] ** -0.5
        block = blocks[-1]
        out_grid = grid
        if mode == "vanilla":
            last_output = self._feed_forward(last_input + self._vanilla_attention(q, k, v))
        elif mode == "maskclip":
            last_output = self._feed_forward(last_input + block.ls_1(self._merge_heads(v)))
        elif mode == "sclip":
            attn = ((q @ q.transpose(-1, -2)) * scale).softmax(-1)
            attn = attn + ((k @ k.transpose(-1, -2)) * scale).softmax(-1)
            attended = last_input + block.ls_1(self._merge_heads(attn @ v))
            last_output = self._feed_forward(attended)
        elif mode == "naclip":
            bias = gaussian_window_bias(grid, naclip_sigma).to(k.dtype).to(k.device)
            attn = ((k @ k.transpose(-1, -2)) * scale + bias).softmax(-1)
            last_output = self._merge_heads(attn @ v)
        else:
            if proxy_tokens is None or proxy_grid is None:
                raise ValueError("proxy mode needs proxy_tokens and proxy_grid from a DINO encoder")
            attn = proxy_attention(proxy_tokens.to(v.dtype), proxy_gamma, proxy_beta, proxy_mean)
            batch, heads, _, head_dim = v.shape
            patch_v = v[:, :, 1:].transpose(2, 3).reshape(batch * heads, head_dim, *grid)
            patch_v = F.interpolate(patch_v, size=proxy_grid, mode="bilinear", align_corners=False)
            patch_v = patch_v.reshape(batch, heads, head_dim, -1).transpose(2, 3)
            last_output = self._merge_heads(attn.unsqueeze(1) @ patch_v)
            out_grid = tuple(proxy_grid)
        projected = self.project(last_output)
        if mode == "proxy":
            features, cls_token = projected, None
        else:
            features, cls_token = projected[:, 1:], projected[:, 0]
        return ClipDenseOutput(
            features=features, cls_token=cls_token, grid=out_grid, last_block_input=last_input,
            last_block_output=last_output, q=q, k=k, v=v, ln2=ln2,
        )

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post then proj: (..., W) last-block tokens -> (..., D) joint-space features."""
        visual = self.model.visual
        return visual.ln_post(tokens.to(visual.proj.dtype)) @ visual.proj

    def _vanilla_attention(self, q, k, v) -> torch.Tensor:
        block = self.model.visual.transformer.resblocks[-1]
        attn = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
        return block.ls_1(self._merge_heads(attn @ v))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Global image embedding (B, D) from open_clip's own forward (training-size input)."""
        return self.model.encode_image(x)

    # ---- text side ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Raw text embeddings (B, D), float32, for a list of prompts."""
        device = self.model.visual.proj.device
        tokens = self.tokenizer(list(prompts)).to(device)
        return self.model.encode_text(tokens).float()


@contextmanager
def _quiet_root_logger():
    """open_clip logs 'no pretrained weights loaded' on the root logger for every random build."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _register_tiny_configs() -> None:
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(_MODEL_CONFIGS)


def build_clip(
    arch: str,
    weights: str,
    *,
    pos_embed_resize: str = "offset",
    quick_gelu: bool | None = None,
    device: str | torch.device = "cpu",
) -> ClipEncoder:
    """Build a frozen CLIP encoder.

    arch: an open_clip model name (ViT-B-16, ViT-L-14, ViT-H-14, ...), ``ovseg-tiny-ViT-16``, or
        ``hf-hub:org/name`` (then the weights come from the hub and ``weights`` is ignored).
    weights: see :mod:`ovseg.encoders.weights`; ``random`` is seeded, so it is reproducible.
    """
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ImportError("ovseg needs open_clip_torch: pip install open_clip_torch") from exc
    _register_tiny_configs()
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
        model, tokenizer, name=f"{arch}|{weights}", pos_embed_resize=pos_embed_resize
    )
    return encoder.to(device)

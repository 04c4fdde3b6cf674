"""DINO / DINOv2 ViT encoders (timm): dense patch tokens and last-block q/k/v at any input size.

The encoder is frozen. One forward returns a :class:`DinoFeatures` with the final-norm patch
tokens (ProxyCLIP's and Trident's proxy feature) and the class token; asked for with
``last_qkv=True``, also the last block's q/k/v, from the same forward: that block then runs from
its own submodules, so no hook is ever registered and nothing is computed twice.

Architectures are timm model names (``vit_base_patch8_224.dino``, ``vit_base_patch16_224.dino``,
``vit_base_patch14_dinov2.lvd142m``, ``vit_small_patch14_reg4_dinov2.lvd142m``...) or the tiny
test models ``tiny-p8`` / ``tiny-p16`` (embed 64, depth 2, 4 heads), built by the same
``timm.create_model`` call with smaller sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn

from ovseg.encoders.clip import OPENAI_MEAN, OPENAI_STD
from ovseg.encoders.weights import (
    load_into,
    load_state_dict_file,
    offline_hint,
    parse_weights_spec,
    seeded_init,
)
from ovseg.errors import ConfigError, WeightsError

WEIGHTS_CONFIG_KEY = "model.dino.weights"
POS_EMBED_RESIZE_MODES = ("offset", "size")

# The tiny test models: the timm architecture they shrink and the sizes of the fixture DINO
# (shared/fixtures/dense_clip/config.json "dino").
TINY_ARCHS = {"tiny-p8": "vit_base_patch8_224", "tiny-p16": "vit_base_patch16_224"}
TINY_KWARGS = dict(
    img_size=224,
    embed_dim=64,
    depth=2,
    num_heads=4,
    mlp_ratio=4.0,
    qkv_bias=True,
    norm_layer=partial(nn.LayerNorm, eps=1e-6),
    act_layer=nn.GELU,  # exact (erf) GELU, as DINO
)


@dataclass
class DinoFeatures:
    """What one DINO forward returns. T = P + N tokens: P prefix tokens (class token first, then
    any register tokens), N = h * w patch tokens in row-major order. All float tensors have the
    encoder's dtype.

    Fields:
        tokens: (B, N, C) patch tokens of the last block's output after the final norm (prefix
            tokens dropped) -- ProxyCLIP's / Trident's proxy feature.
        cls_token: (B, C) class token of the same normed output.
        grid: (h, w) patch grid, (H // p, W // p): the patch conv drops the remainder pixels.
        num_prefix_tokens: P (1 for DINO, 1 + registers for DINOv2-reg).
        q, k, v: (B, heads, T, head_dim) of the last block, from its norm1 output and qkv Linear
            (after q_norm/k_norm where the model has them); no 1/sqrt(d) scaling applied.
            None unless the forward was asked for them (``last_qkv=True``).
        last_block_input: (B, T, C) input tokens of the last block; None unless ``last_qkv``.
    """

    tokens: Tensor
    cls_token: Tensor
    grid: tuple[int, int]
    num_prefix_tokens: int = 1
    q: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None
    last_block_input: Tensor | None = None

    def dense(self) -> Tensor:
        """``tokens`` as a feature map (B, C, h, w)."""
        b, _, c = self.tokens.shape
        return self.tokens.transpose(1, 2).reshape(b, c, *self.grid)


def _check_resize_mode(mode: str) -> None:
    if mode not in POS_EMBED_RESIZE_MODES:
        raise ConfigError(f"pos_embed_resize must be one of {POS_EMBED_RESIZE_MODES}, got {mode!r}")


def interpolate_patch_pos_embed(
    patch_pos: Tensor, train_grid: tuple[int, int], grid: tuple[int, int], mode: str
) -> Tensor:
    """Resize the patch part of a positional embedding to a new grid (bicubic).

    Args:
        patch_pos: (1, gh * gw, C) positional embedding of the training grid ``train_grid``.
        grid: (h, w) target grid.
        mode: ``"offset"`` = DINO's rule, ``scale_factor = ((h + 0.1) / gh, (w + 0.1) / gw)``
            (the output size is floor(scale * g) = (h, w), but the sampling positions follow
            the scale factor, not the size ratio); ``"size"`` = resize to (h, w) directly.

    Returns:
        (1, h * w, C), same dtype; the input itself when ``grid == train_grid``.
    """
    if tuple(grid) == tuple(train_grid):
        return patch_pos
    _check_resize_mode(mode)
    gh, gw = train_grid
    h, w = grid
    dim = patch_pos.shape[-1]
    # bicubic is computed in float32: half-precision bicubic is missing on some devices
    grid_pos = patch_pos.float().reshape(1, gh, gw, dim).permute(0, 3, 1, 2)
    if mode == "offset":
        resized = F.interpolate(
            grid_pos,
            scale_factor=((h + 0.1) / gh, (w + 0.1) / gw),
            mode="bicubic",
            align_corners=False,
        )
    else:
        resized = F.interpolate(grid_pos, size=(h, w), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(patch_pos.dtype)


class DinoEncoder(nn.Module):
    """A frozen timm ViT (DINO family) returning :class:`DinoFeatures`.

    Attributes:
        model: the timm ``VisionTransformer`` (eval mode, no gradients).
        patch_size: p; embed_dim: C; num_heads; num_prefix_tokens: P.
        mean, std: (3,) float32 buffers, the normalisation on the 0-1 scale (ImageNet for DINO).
        pos_embed_resize: ``offset`` (DINO) or ``size``.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        model: nn.Module,
        pos_embed_resize: str = "offset",
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__()
        _check_resize_mode(pos_embed_resize)
        if getattr(model, "cls_token", None) is None or getattr(model, "pos_embed", None) is None:
            raise ConfigError("DinoEncoder needs a ViT with a class token and a learned pos_embed")
        last_attn = model.blocks[-1].attn
        if not isinstance(getattr(last_attn, "qkv", None), nn.Linear):
            raise ConfigError(
                f"DinoEncoder needs a fused qkv Linear in the last block; got {type(last_attn)}"
            )
        self.model = model
        self.pos_embed_resize = pos_embed_resize
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.embed_dim = int(model.embed_dim)
        self.num_heads = int(last_attn.num_heads)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.train_grid: tuple[int, int] = tuple(int(g) for g in model.patch_embed.grid_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DinoEncoder:
        """Stay in eval mode: the encoder is frozen (no dropout, no drop-path)."""
        return super().train(False)

    def set_precision(self, dtype: torch.dtype) -> DinoEncoder:
        """Run the ViT in ``dtype`` (``model.precision``): its weights are cast, inputs are cast
        to them in :meth:`embed`; ``mean``/``std`` stay float32. Returns self."""
        self.model.to(dtype)
        return self

    def normalize(self, images: Tensor) -> Tensor:
        """Map RGB images on the 0-255 scale to the model's input.

        Args:
            images: (B, 3, H, W) or (3, H, W), uint8 or float in [0, 255].

        Returns:
            (B, 3, H, W) float32 on the encoder's device: (images / 255 - mean) / std.
        """
        if images.dim() == 3:
            images = images.unsqueeze(0)
        x = images.to(self.mean.device, torch.float32) / 255.0
        return (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)

    def renormalize(
        self,
        x: Tensor,
        from_mean: tuple[float, float, float],
        from_std: tuple[float, float, float],
    ) -> Tensor:
        """Re-normalise images normalised for another model (e.g. a CLIP crop) for this one:
        un-normalise with ``from_mean``/``from_std`` (0-1 scale), then normalise with ours.

        This is ProxyCLIP's arithmetic for its DINO input (:meth:`from_clip_normalized`). On a
        crop normalised with mmseg's 0-255 CLIP constants it differs from :meth:`normalize` of
        the uint8 image by ~1e-5, because the 0-255 constants are rounded versions of 255 x the
        0-1 ones.

        Args:
            x: (B, 3, H, W) float.

        Returns:
            (B, 3, H, W) in x's dtype and device.
        """
        src_mean = torch.tensor(from_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        src_std = torch.tensor(from_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        mean = self.mean.to(x.device, x.dtype).view(1, 3, 1, 1)
        std = self.std.to(x.device, x.dtype).view(1, 3, 1, 1)
        return (x * src_std + src_mean - mean) / std

    def from_clip_normalized(self, x: Tensor) -> Tensor:
        """Images normalised for CLIP (OpenAI mean/std) -> this encoder's input, ProxyCLIP's way:
        :meth:`renormalize` from OpenAI CLIP's unrounded 0-1 statistics.

        Args:
            x: (B, 3, H, W) float, CLIP-normalised (e.g. ``ClipEncoder.normalize``).

        Returns:
            (B, 3, H, W) in x's dtype and device.
        """
        return self.renormalize(x, OPENAI_MEAN, OPENAI_STD)

    def pos_embed_for(self, grid: tuple[int, int]) -> Tensor:
        """The positional embedding for a patch grid, in the model's own layout.

        Returns:
            (1, P + h * w, C) when the class (and register) tokens have positions, else
            (1, h * w, C) (timm's ``no_embed_class`` models, e.g. DINOv2 with registers).
        """
        pos = self.model.pos_embed
        n_prefix = 0 if self.model.no_embed_class else self.num_prefix_tokens
        patch_pos = interpolate_patch_pos_embed(
            pos[:, n_prefix:], self.train_grid, grid, self.pos_embed_resize
        )
        return torch.cat([pos[:, :n_prefix], patch_pos], dim=1)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch embedding + prefix tokens + positions: the input of the first block.

        Args:
            x: (B, 3, H, W) normalised images.

        Returns:
            tokens (B, P + h * w, C) and the grid (h, w).
        """
        m = self.model
        proj = m.patch_embed.proj
        patches = proj(x.to(proj.weight.dtype))  # (B, C, h, w); bypasses timm's size check
        grid = (int(patches.shape[-2]), int(patches.shape[-1]))
        patches = m.patch_embed.norm(patches.flatten(2).transpose(1, 2))
        pos = self.pos_embed_for(grid).to(patches.dtype)
        batch = patches.shape[0]
        prefix = [m.cls_token.expand(batch, -1, -1)]
        if getattr(m, "reg_token", None) is not None:
            prefix.append(m.reg_token.expand(batch, -1, -1))
        if m.no_embed_class:
            tokens = torch.cat([*prefix, patches + pos], dim=1)
        else:
            tokens = torch.cat([*prefix, patches], dim=1) + pos
        tokens = m.pos_drop(tokens)
        return m.norm_pre(tokens), grid

    def _last_block_with_qkv(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The last block on its input (B, T, C), run from its submodules as timm's ``Block`` and
        ``Attention`` run them, keeping q, k, v (each (B, heads, T, head_dim)).

        Returns:
            the block's output (B, T, C) and (q, k, v).
        """
        block = self.model.blocks[-1]
        attn = block.attn
        if not isinstance(block, Block) or not isinstance(attn, Attention):
            raise ConfigError(
                f"last_qkv needs timm's Block and Attention in the last block; this model has "
                f"{type(block).__name__} / {type(attn).__name__}"
            )
        b, t, _ = x.shape
        y = block.norm1(x)
        gate = attn.gate(y).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(y).reshape(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if getattr(attn, "fused_attn", False):
            mixed = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            mixed = attn.attn_drop(weights) @ v
        mixed = mixed.transpose(1, 2).reshape(b, t, -1)
        if getattr(attn, "norm", None) is not None:  # timm's scale_norm (Identity by default)
            mixed = attn.norm(mixed)
        if gate is not None:
            mixed = mixed * gate
        mixed = attn.proj_drop(attn.proj(mixed))
        x = x + block.drop_path1(block.ls1(mixed))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x, (q, k, v)

    def forward(self, x: Tensor, *, last_qkv: bool = False) -> DinoFeatures:
        """Run the ViT on normalised images of any size.

        Args:
            x: (B, 3, H, W) float, normalised with ``mean``/``std`` (see :meth:`normalize`).
            last_qkv: also return the last block's q/k/v and input (computed once, by the
                block's own forward run from its submodules).

        Returns:
            :class:`DinoFeatures` on the grid (H // p, W // p).
        """
        tokens, grid = self.embed(x)
        blocks = self.model.blocks
        for block in blocks[:-1]:
            tokens = block(tokens)
        qkv: tuple[Tensor, Tensor, Tensor] | tuple[None, None, None] = (None, None, None)
        if last_qkv:
            out, qkv = self._last_block_with_qkv(tokens)
        else:
            out = blocks[-1](tokens)
        out = self.model.norm(out)
        q, k, v = qkv
        return DinoFeatures(
            tokens=out[:, self.num_prefix_tokens:],
            cls_token=out[:, 0],
            grid=grid,
            num_prefix_tokens=self.num_prefix_tokens,
            q=q,
            k=k,
            v=v,
            last_block_input=tokens if last_qkv else None,
        )


def _create_timm_vit(arch: str, pretrained: bool) -> nn.Module:
    """``timm.create_model`` for a timm name or a tiny test arch; timm's own dynamic-size
    features are off because :class:`DinoEncoder` resizes the positional embedding itself."""
    kwargs: dict = dict(num_classes=0, dynamic_img_size=False, dynamic_img_pad=False)
    name = arch
    if arch in TINY_ARCHS:
        name = TINY_ARCHS[arch]
        kwargs.update(TINY_KWARGS)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def dino_vit_template(arch: str) -> nn.Module:
    """The timm ViT of ``arch`` (a timm name or ``tiny-p8`` / ``tiny-p16``) on the meta device:
    its state dict has the keys and shapes a weights file must have, without allocating or
    initialising the model (for checking and converting files)."""
    with torch.device("meta"):
        return _create_timm_vit(arch, pretrained=False)


def adapt_checkpoint(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map a facebookresearch DINO / DINOv2 checkpoint onto timm's VisionTransformer keys.

    DINO already uses timm's names (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
    ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``). Dropped: a
    classifier ``head.*`` (our models have none) and DINOv2's ``mask_token`` (used only in
    its training). DINOv2-with-registers keeps register tokens as ``register_tokens`` and a
    class position in ``pos_embed``; timm folds that position into ``cls_token`` instead.
    SwiGLU ``w12``/``w3`` become timm's ``fc1``/``fc2``.
    """
    for prefix in ("module.", "backbone."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    own = model.state_dict()
    out = {
        key: value
        for key, value in state.items()
        if not (key.startswith("head.") and key not in own) and key != "mask_token"
    }
    if "register_tokens" in out and "reg_token" in own:
        out["reg_token"] = out.pop("register_tokens")
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    for key in list(out):
        if ".mlp.w12." in key:
            out[key.replace(".mlp.w12.", ".mlp.fc1.")] = out.pop(key)
        elif ".mlp.w3." in key:
            out[key.replace(".mlp.w3.", ".mlp.fc2.")] = out.pop(key)
    return out


_adapt_checkpoint = adapt_checkpoint  # the name the loader below and older callers use


def _timm_pretrained_name(arch: str, tag: str) -> str:
    """The timm name to download: ``timm`` = the arch's default weights; another tag is
    appended to an untagged arch (``vit_base_patch8_224`` + ``dino``)."""
    if tag == "timm":
        return arch
    base, _, arch_tag = arch.partition(".")
    if arch_tag and arch_tag != tag:
        raise WeightsError(
            f"arch {arch!r} already names the pretrained tag {arch_tag!r}, but the weights spec "
            f"asks for {tag!r}; set `{WEIGHTS_CONFIG_KEY}` to `timm` or a local file"
        )
    return f"{base}.{tag}"


def build_dino(section, device: str | torch.device = "cpu") -> DinoEncoder:
    """Build a frozen DINO-family encoder from its config section.

    Args:
        section: ``model.dino``: a ``DinoConfig`` or an OmegaConf node of it, with
            ``arch``: a timm model name (``vit_base_patch8_224.dino``...) or ``tiny-p8`` /
            ``tiny-p16``;
            ``weights``: ``random``; a local ``.pt/.pth/.bin/.safetensors`` file in the timm or
            facebookresearch DINO/DINOv2 key layout; ``timm`` (the arch's timm pretrained
            weights) or another timm tag; ``hf-hub:org/name``. Downloads need the network;
            ``pos_embed_resize``: ``offset`` (DINO's +0.1 rule) or ``size``.
        device: where the encoder goes.

    Raises:
        WeightsError: the file is missing or does not fit, or a download failed.
        ConfigError: the arch is not a timm model name.
    """
    arch, weights = str(section.arch), str(section.weights)
    pos_embed_resize = str(section.pos_embed_resize)
    if arch not in TINY_ARCHS and not timm.is_model(arch):
        raise ConfigError(
            f"unknown DINO arch {arch!r}: expected a timm model name such as "
            f"'vit_base_patch8_224.dino' or one of {sorted(TINY_ARCHS)}"
        )
    spec = parse_weights_spec(weights)
    if spec.kind in ("tag", "hf_hub"):
        if arch in TINY_ARCHS:
            raise WeightsError(
                f"{arch} is a test model without pretrained weights; set `{WEIGHTS_CONFIG_KEY}` "
                "to `random` or a local file"
            )
        model = _download_timm(arch, spec.kind, spec.value)
    else:
        with seeded_init():
            model = _create_timm_vit(arch, pretrained=False)
        if spec.is_file:
            state = load_state_dict_file(spec.value)
            expected = f"a timm {arch} state dict"
            if arch in TINY_ARCHS:
                expected += f" ({TINY_ARCHS[arch]} with embed 64, depth 2, 4 heads)"
            load_into(
                model, _adapt_checkpoint(state, model), source=str(Path(spec.value)),
                expected=expected,
            )
    # DINO and DINOv2 train with ImageNet mean/std; timm's default config of an untagged name
    # (e.g. vit_base_patch8_224 = augreg) would give another normalisation
    return DinoEncoder(model, pos_embed_resize=pos_embed_resize).to(device)


def _download_timm(arch: str, kind: str, value: str) -> nn.Module:
    """Create a timm model with its pretrained weights; a failed fetch is a WeightsError."""
    kwargs: dict = dict(num_classes=0, dynamic_img_size=False, dynamic_img_pad=False)
    if kind == "hf_hub":
        name = arch
        kwargs["pretrained_cfg_overlay"] = dict(hf_hub_id=value)
        what = f"timm weights hf-hub:{value} for {arch}"
    else:
        name = _timm_pretrained_name(arch, value)
        what = f"timm pretrained weights of {name}"
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # network, hub-cache and missing-tag errors alike
        raise WeightsError(f"{offline_hint(what, WEIGHTS_CONFIG_KEY)} [{exc}]") from exc


"""SAM encoder (segment_anything): image embedding, last global attention in row chunks, prompts.

The encoder is frozen. One forward returns a :class:`SamFeatures`: the neck's image embedding
and the q/k/v plus decomposed relative-position terms of the image encoder's last
global-attention block. That block runs from its own submodules (segment_anything's arithmetic,
attention a chunk of query rows at a time), so its q/k/v are those of the one forward: no hooks,
no second pass. Trident turns them into SAM's attention map with :func:`attention_in_chunks`, so
a 64x64 grid never holds every head's 4096x4096 map at once. :meth:`SamEncoder.predict_masks`
runs SAM's prompt encoder and mask decoder on a cached embedding (many prompts cost one encoder
forward).

Sizes (:class:`SamSize`): ``vit_b`` / ``vit_l`` / ``vit_h`` (segment_anything's builders),
``tiny`` (a small SAM for tests) and ``custom`` (any sizes given in the config), all built from
segment_anything's own classes by one recipe.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.modeling.image_encoder import get_rel_pos
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor, nn

from ovseg.encoders.weights import (
    load_into,
    load_state_dict_file,
    parse_weights_spec,
    seeded_init,
)
from ovseg.errors import ConfigError, WeightsError

WEIGHTS_CONFIG_KEY = "model.sam.weights"
CUSTOM_ARCH = "custom"
CHECKPOINT_NAMES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}


@dataclass(frozen=True)
class SamSize:
    """The sizes of a SAM built from segment_anything's classes by its ``_build_sam`` recipe.

    The defaults are those every released SAM shares (input 1024, patch 16, window 14, prompt
    dim 256, its mask decoder); the image encoder's width, depth, heads and global blocks set
    the size.
    """

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_hidden_dim: int = 256


SAM_SIZES = {
    "vit_b": SamSize(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SamSize(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamSize(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    # the test SAM: small but every part present (windowed and global blocks, rel-pos,
    # multimask decoder)
    "tiny": SamSize(
        embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=256,
        window_size=4, prompt_embed_dim=32, mask_in_chans=8, decoder_depth=1,
        decoder_mlp_dim=64, decoder_heads=2, iou_head_hidden_dim=32,
    ),
}
SAM_ARCHS = (*SAM_SIZES, CUSTOM_ARCH)
SIZE_FIELDS = tuple(f.name for f in fields(SamSize))
DEFAULT_ATTENTION_CHUNK_ROWS = 1024  # query rows of the last global block's attention at a time


@dataclass
class SamFeatures:
    """What one SAM image-encoder forward returns. N = h * w tokens of the encoder grid in
    row-major order; float tensors have the encoder's dtype.

    Fields:
        embedding: (B, out_chans, h, w) image embedding from the neck (input of the decoder).
        grid: (h, w) = (S / p, S / p), the encoder grid of the padded S x S input.
        last_global_index: index of the last global-attention block in the image encoder.
        last_global_input: (B, h, w, C) input of that block.
        last_global_q, last_global_k, last_global_v: (B, heads, N, head_dim) of that block,
            from its norm1 output and qkv Linear; q unscaled.
        rel_h: (B, heads, N, h) decomposed relative-position term of the rows, q . R_h, added to
            the attention logits of key row kh; None when the block has no relative positions.
        rel_w: (B, heads, N, w) the same for key columns.
        attn_scale: head_dim ** -0.5, the logit scale SAM applies to q k^T.
        input_size: (h, w) in pixels of the resized image inside the padded input, when known.
    """

    embedding: Tensor
    grid: tuple[int, int]
    last_global_index: int
    last_global_input: Tensor
    last_global_q: Tensor
    last_global_k: Tensor
    last_global_v: Tensor
    rel_h: Tensor | None
    rel_w: Tensor | None
    attn_scale: float
    input_size: tuple[int, int] | None = None


def attention_rows(features: SamFeatures, rows: slice) -> Tensor:
    """Softmax attention of some query rows of the last global block, as SAM computes it:
    softmax(scale * q k^T + rel_h + rel_w) (segment_anything's ``add_decomposed_rel_pos``).

    Args:
        rows: a slice of query indices in [0, N) with step 1.

    Returns:
        (B, heads, R, N), R = the number of rows; each row sums to 1.
    """
    return _global_attention_rows(
        features.last_global_q, features.last_global_k, features.rel_h, features.rel_w,
        features.attn_scale, features.grid, rows,
    )


def _global_attention_rows(
    q: Tensor,
    k: Tensor,
    rel_h: Tensor | None,
    rel_w: Tensor | None,
    scale: float,
    grid: tuple[int, int],
    rows: slice,
) -> Tensor:
    """:func:`attention_rows` on the tensors themselves: q, k (B, heads, N, d), rel_h
    (B, heads, N, h), rel_w (B, heads, N, w) or None, on ``grid`` (h, w) -> (B, heads, R, N)."""
    logits = (q[:, :, rows] * scale) @ k.transpose(-2, -1)
    if rel_h is not None and rel_w is not None:
        b, heads, n_rows, _ = logits.shape
        h, w = grid
        grid_logits = logits.view(b, heads, n_rows, h, w)
        grid_logits.add_(rel_h[:, :, rows, :, None])
        grid_logits.add_(rel_w[:, :, rows, None, :])
    # softmax in place: the chunk is the largest tensor of this step, so no second copy of it
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=-1, keepdim=True))


def attention_in_chunks(
    features: SamFeatures, chunk_rows: int = 1024
) -> Iterator[tuple[slice, Tensor]]:
    """Yield the last global block's softmax attention in chunks of query rows.

    Memory per step is B * heads * chunk_rows * N floats instead of B * heads * N * N.

    Yields:
        (rows, attn): ``rows`` the slice of query indices, ``attn`` (B, heads, len(rows), N).
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    n = features.last_global_q.shape[2]
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        yield rows, attention_rows(features, rows)


class SamEncoder(nn.Module):
    """A frozen SAM: image encoder with exposed last global attention, prompt decoder.

    Attributes:
        sam: the segment_anything ``Sam`` (eval mode, no gradients).
        img_size: S, the square input side; patch_size: p; out_chans: embedding channels.
        pixel_mean, pixel_std: (3, 1, 1) float32 on the 0-255 scale (SAM's own buffers).
        last_global_index: the image-encoder block whose attention is exposed.
        attention_chunk_rows: query rows of that block's attention computed at a time in the
            forward: memory B * heads * rows * N instead of B * heads * N * N.
    """

    def __init__(self, sam: Sam, attention_chunk_rows: int = DEFAULT_ATTENTION_CHUNK_ROWS) -> None:
        super().__init__()
        encoder = sam.image_encoder
        global_blocks = [i for i, block in enumerate(encoder.blocks) if block.window_size == 0]
        if not global_blocks:
            raise ConfigError("SAM image encoder has no global-attention block")
        self.sam = sam
        self.img_size = int(encoder.img_size)
        self.patch_size = int(encoder.patch_embed.proj.kernel_size[0])
        self.out_chans = int(encoder.neck[0].out_channels)
        self.last_global_index = global_blocks[-1]
        self.num_heads = int(encoder.blocks[self.last_global_index].attn.num_heads)
        if attention_chunk_rows < 1:
            raise ValueError(f"attention_chunk_rows must be >= 1, got {attention_chunk_rows}")
        self.attention_chunk_rows = attention_chunk_rows
        self._resize = ResizeLongestSide(self.img_size)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SamEncoder:
        """Stay in eval mode: the encoder is frozen."""
        return super().train(False)

    def set_precision(self, dtype: torch.dtype) -> SamEncoder:
        """Run the image encoder in ``dtype`` (``model.precision``): its weights are cast,
        inputs are cast to them in :meth:`forward`. The prompt encoder, the mask decoder and
        ``pixel_mean``/``pixel_std`` stay float32, as in the references. Returns self."""
        self.sam.image_encoder.to(dtype)
        return self

    @property
    def pixel_mean(self) -> Tensor:
        return self.sam.pixel_mean

    @property
    def pixel_std(self) -> Tensor:
        return self.sam.pixel_std

    @property
    def grid(self) -> tuple[int, int]:
        """(S / p, S / p), the encoder grid."""
        side = self.img_size // self.patch_size
        return (side, side)

    def preprocess(self, image: np.ndarray | Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Prepare one RGB image as SAM does: longest side to S (ratio kept, PIL bilinear as
        segment_anything's ``ResizeLongestSide.apply_image``), normalise, pad bottom/right.

        Args:
            image: (H, W, 3) uint8 RGB, numpy or tensor.

        Returns:
            x: (1, 3, S, S) float32 on the encoder's device.
            input_size: (h, w) of the resized image inside the padded square.
        """
        if isinstance(image, Tensor):
            image = image.detach().cpu().numpy()
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"SAM preprocess expects an (H, W, 3) uint8 RGB image, got {image.shape} "
                f"{image.dtype}"
            )
        resized = self._resize.apply_image(image)
        input_size = (int(resized.shape[0]), int(resized.shape[1]))
        x = torch.as_tensor(resized, device=self.pixel_mean.device).permute(2, 0, 1)
        x = self.sam.preprocess(x[None].float())
        return x, input_size

    def forward(self, x: Tensor, input_size: tuple[int, int] | None = None) -> SamFeatures:
        """Run the image encoder.

        Args:
            x: (B, 3, S, S) preprocessed images (see :meth:`preprocess`).
            input_size: (h, w) of the resized image inside the padding, kept in the result.

        Returns:
            :class:`SamFeatures`.
        """
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"SAM input must be (B, 3, {self.img_size}, {self.img_size}), got "
                f"{tuple(x.shape)}; use SamEncoder.preprocess"
            )
        encoder = self.sam.image_encoder
        tokens = encoder.patch_embed(x.to(encoder.patch_embed.proj.weight.dtype))  # (B, h, w, C)
        if encoder.pos_embed is not None:
            tokens = tokens + encoder.pos_embed
        for index, block in enumerate(encoder.blocks):
            if index == self.last_global_index:
                block_input = tokens
                tokens, (q, k, v, rel_h, rel_w) = self._global_block(block, tokens)
            else:
                tokens = block(tokens)
        embedding = encoder.neck(tokens.permute(0, 3, 1, 2))
        return SamFeatures(
            embedding=embedding,
            grid=(int(block_input.shape[1]), int(block_input.shape[2])),
            last_global_index=self.last_global_index,
            last_global_input=block_input,
            last_global_q=q,
            last_global_k=k,
            last_global_v=v,
            rel_h=rel_h,
            rel_w=rel_w,
            attn_scale=float(encoder.blocks[self.last_global_index].attn.scale),
            input_size=input_size,
        )

    def _global_block(
        self, block: nn.Module, tokens: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]]:
        """A global-attention block run from its submodules, as segment_anything's ``Block``
        and ``Attention`` run it (no window partition): norm1 -> qkv -> softmax(scale q k^T +
        decomposed rel-pos) v -> proj -> residual -> norm2, mlp -> residual. The attention is
        built ``attention_chunk_rows`` query rows at a time.

        Args:
            tokens: (B, h, w, C) the block's input.

        Returns:
            the block's output (B, h, w, C), and q, k, v (B, heads, N, d) with the rel-pos terms
            rel_h (B, heads, N, h), rel_w (B, heads, N, w) (None without relative positions).
        """
        attn = block.attn
        b, h, w, _ = tokens.shape
        qkv = attn.qkv(block.norm1(tokens)).reshape(b, h * w, 3, attn.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        rel_h = rel_w = None
        if attn.use_rel_pos:
            rel_pos_h = get_rel_pos(h, h, attn.rel_pos_h)  # (h, h, d): [query row, key row]
            rel_pos_w = get_rel_pos(w, w, attn.rel_pos_w)  # (w, w, d): [query col, key col]
            grid_q = q.reshape(b, attn.num_heads, h, w, -1)
            rel_h = torch.einsum("bnyxc,ykc->bnyxk", grid_q, rel_pos_h).reshape(b, -1, h * w, h)
            rel_w = torch.einsum("bnyxc,xkc->bnyxk", grid_q, rel_pos_w).reshape(b, -1, h * w, w)
        mixed = torch.empty_like(v)  # (B, heads, N, d)
        for start in range(0, h * w, self.attention_chunk_rows):
            rows = slice(start, min(start + self.attention_chunk_rows, h * w))
            weights = _global_attention_rows(q, k, rel_h, rel_w, attn.scale, (h, w), rows)
            mixed[:, :, rows] = weights @ v
        mixed = mixed.view(b, attn.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        out = tokens + attn.proj(mixed)
        out = out + block.mlp(block.norm2(out))
        return out, (q, k, v, rel_h, rel_w)

    def predict_masks(
        self,
        features: SamFeatures,
        points: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_inputs: Tensor | None = None,
        multimask_output: bool = False,
        image_index: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Decode B prompt sets on one image of ``features`` (SAM's prompt encoder + mask
        decoder). Coordinates are pixels (x, y) in the preprocessed input frame (the resized
        image, before padding).

        Args:
            points: (B, P, 2) float point coordinates; point_labels: (B, P) int, 1 foreground,
                0 background, -1 padding.
            boxes: (B, 4) float (x0, y0, x1, y1).
            mask_inputs: (B, 1, 4h, 4w) low-resolution mask logits (256 x 256 for S = 1024).
            multimask_output: three masks per prompt set instead of one.
            image_index: which image of a batched ``features`` to decode on.

        Returns:
            masks_logits: (B, M, 4h, 4w) float, M = 3 or 1 (S / 4 square);
            iou_predictions: (B, M) float.
        """
        if (points is None) != (point_labels is None):
            raise ValueError("points and point_labels go together")
        prompt_encoder = self.sam.prompt_encoder
        device = self.pixel_mean.device
        dtype = next(self.sam.mask_decoder.parameters()).dtype
        point_prompt = None
        if points is not None and point_labels is not None:
            point_prompt = (points.to(device, dtype), point_labels.to(device, torch.int64))
        sparse, dense = prompt_encoder(
            points=point_prompt,
            boxes=None if boxes is None else boxes.to(device, dtype),
            masks=None if mask_inputs is None else mask_inputs.to(device, dtype),
        )
        embedding = features.embedding[image_index:image_index + 1].to(dtype)
        return self.sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def postprocess_masks(
        self, masks: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> Tensor:
        """Mask logits (B, M, 4h, 4w) -> (B, M, H, W) at the original image size: upsample to
        S, drop the padding beyond ``input_size``, resize bilinear (segment_anything's own)."""
        return self.sam.postprocess_masks(masks, input_size, original_size)


def sam_size_from_config(section) -> SamSize:
    """The :class:`SamSize` of a ``model.sam`` section: a named size, or ``custom``.

    ``custom`` takes the size fields the section sets (``embed_dim``, ``depth``, ``num_heads``,
    ``global_attn_indexes``, ``img_size``, ...) over vit_b's; a named size takes none of them.

    Raises:
        ConfigError: unknown arch, size fields beside a named arch, or sizes that do not fit.
    """
    arch = str(section.arch)
    if arch not in SAM_ARCHS:
        raise ConfigError(f"unknown SAM arch {arch!r}; expected one of {SAM_ARCHS}")
    given = {name: getattr(section, name, None) for name in SIZE_FIELDS}
    given = {name: value for name, value in given.items() if value is not None}
    if arch != CUSTOM_ARCH:
        if given:
            keys = ", ".join(f"model.sam.{name}" for name in given)
            raise ConfigError(
                f"{keys}: sizes are read only with `model.sam.arch {CUSTOM_ARCH}`; SAM {arch} "
                "has fixed sizes (leave them unset or set arch to custom)"
            )
        return SAM_SIZES[arch]
    if "global_attn_indexes" in given:
        given["global_attn_indexes"] = tuple(int(i) for i in given["global_attn_indexes"])
    size = replace(SAM_SIZES["vit_b"], **given)
    _check_size(size)
    return size


def _check_size(size: SamSize) -> None:
    if not size.global_attn_indexes or not all(
        0 <= i < size.depth for i in size.global_attn_indexes
    ):
        raise ConfigError(
            f"model.sam.global_attn_indexes {list(size.global_attn_indexes)}: need at least one "
            f"block index in [0, depth = {size.depth})"
        )
    if size.img_size % size.patch_size:
        raise ConfigError(
            f"model.sam.img_size {size.img_size} is not a multiple of patch_size "
            f"{size.patch_size}"
        )
    for name, heads in (("embed_dim", size.num_heads), ("prompt_embed_dim", size.decoder_heads)):
        if getattr(size, name) % heads:
            raise ConfigError(f"model.sam.{name} {getattr(size, name)} is not a multiple of "
                              f"its heads ({heads})")


def make_sam(size: SamSize) -> Sam:
    """A SAM of segment_anything's own classes with these sizes (its ``_build_sam`` recipe),
    randomly initialised by the modules' own init."""
    grid = size.img_size // size.patch_size
    prompt_dim = size.prompt_embed_dim
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=size.img_size,
            patch_size=size.patch_size,
            embed_dim=size.embed_dim,
            depth=size.depth,
            num_heads=size.num_heads,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=size.global_attn_indexes,
            window_size=size.window_size,
            out_chans=prompt_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(size.img_size, size.img_size),
            mask_in_chans=size.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=size.decoder_depth,
                embedding_dim=prompt_dim,
                mlp_dim=size.decoder_mlp_dim,
                num_heads=size.decoder_heads,
            ),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=size.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def build_sam(section, device: str | torch.device = "cpu") -> SamEncoder:
    """Build a frozen SAM from its config section.

    Args:
        section: ``model.sam``: a ``SamConfig`` or an OmegaConf node of it, with
            ``arch``: ``vit_b`` | ``vit_l`` | ``vit_h`` | ``tiny`` (test model, S = 256) |
            ``custom`` (the section's size fields, see :func:`sam_size_from_config`);
            ``weights``: a local SAM checkpoint (``sam_vit_b_01ec64.pth``...; ``.pth/.pt/.bin/
            .safetensors``) or ``random``. SAM has no pretrained tags. An empty spec is an
            error (random weights must be asked for), except for ``tiny`` where it is random.
        device: where the encoder goes.

    Raises:
        WeightsError: no checkpoint given, or the file is missing or does not fit.
        ConfigError: unknown arch, or sizes that do not fit.
    """
    arch, weights = str(section.arch), section.weights
    size = sam_size_from_config(section)
    raw = (weights or "").strip()
    spec = parse_weights_spec(raw)
    if arch != "tiny" and (not raw or spec.kind in ("tag", "hf_hub")):
        given = f"{weights!r} is not a file" if raw else "no weights were given"
        if arch == CUSTOM_ARCH:
            checkpoint, what = "checkpoint.pth", "a checkpoint of exactly the sizes in model.sam"
        else:
            checkpoint = CHECKPOINT_NAMES[arch]
            what = (f"{checkpoint}, listed under 'Model Checkpoints' in the "
                    "facebookresearch/segment-anything README")
        raise WeightsError(
            f"SAM {arch} needs a local checkpoint file ({what}); {given}. Set "
            f"`{WEIGHTS_CONFIG_KEY} /path/to/{checkpoint}` (or `random` for timing runs)"
        )
    if arch == "tiny" and spec.kind in ("tag", "hf_hub"):
        raise WeightsError(
            f"the tiny SAM has no pretrained weights; set `{WEIGHTS_CONFIG_KEY}` to `random` or "
            "a local file"
        )
    with seeded_init():
        sam = make_sam(size)
    if spec.is_file:
        state = load_state_dict_file(spec.value)
        expected = f"a SAM {arch} checkpoint"
        if arch in CHECKPOINT_NAMES:
            expected += f" ({CHECKPOINT_NAMES[arch]})"
        elif arch == CUSTOM_ARCH:
            expected += f" of sizes {size}"
        load_into(sam, state, source=str(Path(spec.value)), expected=expected)
    return SamEncoder(sam).to(device)

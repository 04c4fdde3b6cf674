"""Mask prompt tuning (MPT): learnable tokens that replace the blank patches of a masked crop.

Implements mask_adapted.md, "Stage 2: masked-region classification", the MPT paragraph: a
learnable tensor of shape depth x grid^2 x width (one token per patch position per depth, depth
3); a patch is blank only if none of its pixels lies inside the mask (the patch-average of the
mask, ceiled, is 0); blank patch tokens x become x * m + prompt * (1 - m) at three places:

- index 0: the patch embeddings, before the class token and positional embeddings are added;
- index 1, 2: the outputs of the first and second transformer blocks;

the class token is never replaced. Prompts are zeros unless a checkpoint provides them (MPT
training starts from normal noise, std 0.02).

The CLIP image tower runs from our own loop over the encoder's own submodules (no hooks, no
copy of the weights): conv1, class and positional embeddings, ln_pre, the blocks, ln_post and
proj (:meth:`ClipEncoder.project`). Inputs are the 224 x 224 crops of
:func:`ovseg.layers.masked_crops.masked_crop_batches`; any batch size works, 1 included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ovseg.encoders.clip import ClipEncoder, interpolate_pos_embed

MPT_DEPTH = 3
# the prompts' key in the authors' CLIP (their VisualTransformer's ``mask_embedding``), as in
# their released files under ``clip_adapter.clip_model.``; ours is MaskPrompts.mask_embedding
AUTHORS_PROMPTS_KEY = "visual.mask_embedding"


def patch_coverage(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Which patches a mask touches: ceil of the patch-average of the mask.

    Args:
        masks: (B, S, S) masks (0/1; bool or float), S a multiple of ``patch_size``.
        patch_size: the ViT's patch side.

    Returns:
        (B, N) float32, N = (S / patch)^2 in row-major order: 1 where at least one pixel of the
        patch is inside the mask, 0 for a blank patch.
    """
    average = F.avg_pool2d(masks.float()[:, None], kernel_size=patch_size, stride=patch_size)
    return torch.ceil(average).flatten(1)


def _replace_blank(tokens: torch.Tensor, coverage: torch.Tensor,
                   prompt: torch.Tensor) -> torch.Tensor:
    """(B, N, W) patch tokens -> tokens * m + prompt * (1 - m); coverage (B, N, 1), prompt
    (N, W)."""
    return tokens * coverage + prompt.to(tokens.dtype)[None] * (1 - coverage)


def mask_prompted_tokens(
    encoder: ClipEncoder, images: torch.Tensor, masks: torch.Tensor, prompts: torch.Tensor
) -> torch.Tensor:
    """The image tower's last-block output with mask prompts inserted.

    Args:
        encoder: a CLIP ViT; its weights are used as they are (frozen or not).
        images: (B, 3, S, S) CLIP-normalised crops at the training size (224).
        masks: (B, S, S) binary masks of the crops (nearest-resized with them).
        prompts: (depth, N, W) prompt tokens, N = grid^2 of the training size; depth >= 1 and
            at most the number of blocks + 1.

    Returns:
        (B, 1 + N, W) tokens after the last block, class token first, in the tower's dtype.
    """
    visual = encoder.model.visual
    blocks = visual.transformer.resblocks
    depth, num_prompts, _ = prompts.shape
    if not 1 <= depth <= len(blocks) + 1:
        raise ValueError(f"mask prompt depth {depth} must be in 1..{len(blocks) + 1}")
    patches = visual.conv1(images.to(visual.conv1.weight.dtype))
    grid = (patches.shape[2], patches.shape[3])
    if grid[0] * grid[1] != num_prompts:
        raise ValueError(
            f"mask prompts hold {num_prompts} patch positions but {tuple(images.shape[-2:])} "
            f"crops give a {grid[0]}x{grid[1]} grid; resize crops to the CLIP training size"
        )
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    patches = patches.flatten(2).transpose(1, 2)
    coverage = patch_coverage(masks, encoder.patch_size).to(patches.dtype)[..., None]
    patches = _replace_blank(patches, coverage, prompts[0])
    cls = visual.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
    tokens = torch.cat([cls, patches], dim=1)
    pos = interpolate_pos_embed(visual.positional_embedding, grid, encoder.pos_embed_resize)
    tokens = visual.ln_pre(tokens + pos.to(tokens.dtype))
    for index, block in enumerate(blocks):
        tokens = block(tokens)
        # "blocks 1 and 2" count from 1: prompt d follows block index d - 1 (0 and 1)
        if index + 1 < depth:
            replaced = _replace_blank(tokens[:, 1:], coverage, prompts[index + 1])
            tokens = torch.cat([tokens[:, :1], replaced], dim=1)
    return tokens


class MaskPrompts(nn.Module):
    """The MPT prompt tokens of one CLIP ViT, ``mask_embedding``: (depth, N, W).

    Args:
        depth: insertion points (3).
        num_patches: N = grid^2 at the CLIP training size (196 for B/16, 256 for L/14).
        width: the ViT width W.
        init_std: 0 -> zeros (inference without a checkpoint); MPT training uses 0.02.
    """

    def __init__(self, depth: int, num_patches: int, width: int, init_std: float = 0.0):
        super().__init__()
        self.mask_embedding = nn.Parameter(torch.zeros(depth, num_patches, width))
        if init_std > 0:
            nn.init.normal_(self.mask_embedding, std=init_std)

    @classmethod
    def for_encoder(cls, encoder: ClipEncoder, depth: int = MPT_DEPTH,
                    init_std: float = 0.0) -> MaskPrompts:
        """Prompts shaped for ``encoder``'s training grid and width."""
        num_patches = encoder.model.visual.positional_embedding.shape[0] - 1
        return cls(depth, num_patches, encoder.width, init_std)

    @property
    def depth(self) -> int:
        return int(self.mask_embedding.shape[0])

    def forward(self, encoder: ClipEncoder, images: torch.Tensor,
                masks: torch.Tensor) -> torch.Tensor:
        """(B, D) CLIP image embeddings of masked crops with the prompts inserted.

        Args:
            encoder: the CLIP ViT the prompts belong to.
            images: (B, 3, 224, 224) CLIP-normalised crops; masks: (B, 224, 224) 0/1.
        """
        tokens = mask_prompted_tokens(encoder, images, masks, self.mask_embedding)
        return encoder.project(tokens[:, 0])

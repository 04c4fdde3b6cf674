"""CLOC's Prompter (specs/cloc.md "Model"): box, point or text prompts + ViT tokens -> region
embeddings in CLIP space.

    prompt tokens (R, P, W)  ++  image tokens f_I' (N, W), shared by the R prompts
        -> one single-head transformer encoder layer, full self-attention, per prompt
        -> its own average pooler -> its own projection W -> D            = z (R, D)
    box head: a 2-layer GELU MLP, z(text prompt) (R, D) -> (R, 4) box

A box is two corner tokens (top-left, bottom-right), each a sinusoidal positional encoding of
its normalised (x, y) [paper] plus a learned corner embedding [ours]; a point is one token, the
same encoding plus a learned point-type embedding [ours]; a text prompt is its CLIP text
embedding through a linear map to the ViT width [ours: the map]. Coordinates are in [0, 1] of
the padded square model input (:func:`normalize_boxes`).

Each prompt runs as its own sequence [its tokens; the image tokens], so the prompts of one image
never see each other: R prompts cost one batched pass and the output is permutation-equivariant
over prompts, each row independent of the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ovseg.errors import OvsegError

PROMPT_KINDS = ("box", "point", "text")
POOLING_SCOPES = ("all", "prompt")


class PromptError(OvsegError, ValueError):
    """A box or point prompt the image cannot take (outside it, zero area, none at all)."""


@dataclass
class PrompterConfig:
    """The Prompter's sizes; :class:`ovseg.methods.cloc.ClocConfig` fills them from config."""

    width: int  # W, the ViT width (prompt tokens and the transformer layer)
    embed_dim: int  # D, the CLIP joint embedding dim (the projection's output)
    mlp_ratio: float = 4.0  # the transformer layer's FFN width, times W  # ours
    pooling: str = "all"  # ours (unverified in the paper): average "all" tokens or "prompt" only
    pe_temperature: float = 10000.0  # ours: the sinusoid frequencies' base
    box_head_hidden: int = 0  # ours: the box head's hidden width; 0 = D
    dropout: float = 0.0  # the paper trains with dropout 0


def sinusoidal_encoding(coords: Tensor, width: int, temperature: float = 10000.0) -> Tensor:
    """Sinusoidal positional encoding of normalised 2-D points.

    Args:
        coords: (..., 2) float (x, y) in [0, 1].
        width: W, a multiple of 4: W/2 channels for x, W/2 for y, each half sin then cos of
            2*pi*c / temperature^(2k/(W/2)), k = 0..W/4-1.

    Returns:
        (..., W) float32.
    """
    if width % 4:
        raise ValueError(f"the Prompter's width must be a multiple of 4, got {width}")
    quarter = width // 4
    k = torch.arange(quarter, dtype=torch.float32, device=coords.device)
    freqs = temperature ** (-2.0 * k / (width // 2))  # (W/4,)
    angles = coords.float().unsqueeze(-1) * (2.0 * math.pi) * freqs  # (..., 2, W/4)
    encoded = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., 2, W/2)
    return encoded.flatten(-2)


def normalize_boxes(boxes: Tensor, image_size: tuple[int, int], normalized: bool = False,
                    clip: bool = True) -> Tensor:
    """Boxes of an (H, W) image -> xyxy in [0, 1] of the padded square model input.

    The image is resized by its long side and padded at the bottom and right to a square, so a
    pixel coordinate c maps to c / max(H, W) (ours: spec "Box coordinate convention").

    Args:
        boxes: (R, 4) xyxy, in pixels of the image, or in [0, 1] of the image when
            ``normalized`` (x / W, y / H). Both give the same numbers (float64 inside).
        clip: clip the boxes to the image first (documented behaviour for partly-outside boxes).

    Returns:
        (R, 4) float32.

    Raises:
        PromptError: no box, a box of the wrong shape, not finite, outside the image, or of
            zero area (after clipping).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float64)
    height, width = int(image_size[0]), int(image_size[1])
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise PromptError(f"boxes must be (R, 4) x1,y1,x2,y2, got shape {tuple(boxes.shape)}")
    if boxes.shape[0] == 0:
        raise PromptError("no box prompt given: pass at least one box (x1,y1,x2,y2)")
    if not bool(torch.isfinite(boxes).all()):
        raise PromptError("a box prompt has a NaN or infinite coordinate")
    scale = torch.tensor([width, height, width, height], dtype=torch.float64)
    pixels = boxes * scale if normalized else boxes
    if clip:
        pixels = torch.minimum(pixels.clamp(min=0.0), scale)
    area = (pixels[:, 2] - pixels[:, 0]).clamp(min=0) * (pixels[:, 3] - pixels[:, 1]).clamp(min=0)
    bad = torch.nonzero(area <= 0).flatten().tolist()
    if bad:
        unit = "normalised" if normalized else "pixel"
        raise PromptError(
            f"box {bad[0]} ({', '.join(f'{v:g}' for v in boxes[bad[0]].tolist())}, {unit}) has "
            f"zero area inside the {width}x{height} image; give x1 < x2 and y1 < y2 inside it")
    return (pixels / max(height, width)).float()


def normalize_points(points: Tensor, image_size: tuple[int, int],
                     normalized: bool = False) -> Tensor:
    """Points of an (H, W) image -> (x, y) in [0, 1] of the padded square model input.

    Args:
        points: (R, 2) xy in pixels, or in [0, 1] of the image when ``normalized``.

    Returns:
        (R, 2) float32.

    Raises:
        PromptError: no point, the wrong shape, or a point outside the image.
    """
    points = torch.as_tensor(points, dtype=torch.float64)
    height, width = int(image_size[0]), int(image_size[1])
    if points.ndim != 2 or points.shape[-1] != 2:
        raise PromptError(f"points must be (R, 2) x,y, got shape {tuple(points.shape)}")
    if points.shape[0] == 0:
        raise PromptError("no point prompt given: pass at least one point (x,y)")
    scale = torch.tensor([width, height], dtype=torch.float64)
    pixels = points * scale if normalized else points
    inside = torch.isfinite(pixels).all(-1) & (pixels >= 0).all(-1) & (pixels <= scale).all(-1)
    if not bool(inside.all()):
        index = int(torch.nonzero(~inside)[0])
        raise PromptError(f"point {index} ({', '.join(f'{v:g}' for v in points[index].tolist())})"
                          f" is outside the {width}x{height} image")
    return (pixels / max(height, width)).float()


class Prompter(nn.Module):
    """CLOC's Prompter: prompt tokens + image tokens -> (R, D) region embeddings.

    Args:
        config: sizes (:class:`PrompterConfig`).
    """

    def __init__(self, config: PrompterConfig):
        super().__init__()
        if config.pooling not in POOLING_SCOPES:
            raise ValueError(f"Prompter pooling must be one of {POOLING_SCOPES}, got "
                             f"{config.pooling!r}")
        self.config = config
        width, dim = config.width, config.embed_dim
        # [paper] one layer, one head, full self-attention at the ViT width
        self.layer = nn.TransformerEncoderLayer(
            width, nhead=1, dim_feedforward=int(width * config.mlp_ratio),
            dropout=config.dropout, activation="gelu", batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(width)  # ours: pre-norm layers leave their output unnormalised
        self.proj = nn.Linear(width, dim, bias=False)  # [paper] its own projection, not CLIP's
        # ours: which corner a box token is, and that a token is a point
        self.corner_embed = nn.Parameter(torch.zeros(2, width))
        self.point_embed = nn.Parameter(torch.zeros(1, width))
        self.text_to_width = nn.Linear(dim, width)  # ours: text embedding -> ViT width
        hidden = config.box_head_hidden or dim
        # [paper] 2-layer MLP with GELU on the text-prompted region embedding
        self.box_head = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 4))
        nn.init.normal_(self.corner_embed, std=0.02)
        nn.init.normal_(self.point_embed, std=0.02)

    # ---- prompt tokens -----------------------------------------------------------------------
    def box_tokens(self, boxes: Tensor) -> Tensor:
        """(R, 4) normalised xyxy -> (R, 2, W): top-left and bottom-right corner tokens."""
        corners = boxes.float().view(-1, 2, 2)  # (R, 2 corners, xy)
        encoded = sinusoidal_encoding(corners, self.config.width, self.config.pe_temperature)
        return encoded + self.corner_embed

    def point_tokens(self, points: Tensor) -> Tensor:
        """(R, 2) normalised xy -> (R, 1, W)."""
        encoded = sinusoidal_encoding(points.float(), self.config.width,
                                      self.config.pe_temperature)
        return (encoded + self.point_embed)[:, None]

    def text_tokens(self, text: Tensor) -> Tensor:
        """(R, D) CLIP text embeddings of region captions -> (R, 1, W)."""
        return self.text_to_width(text.float())[:, None]

    # ---- the body ----------------------------------------------------------------------------
    def forward(self, prompt_tokens: Tensor, image_tokens: Tensor,
                image_index: Tensor | None = None) -> Tensor:
        """Region embeddings of R prompts.

        Args:
            prompt_tokens: (R, P, W) the prompts' tokens (one kind per call).
            image_tokens: (B, N, W) ViT tokens before pooling and projection (f_I').
            image_index: (R,) int64, the image of each prompt; None = all of image 0.

        Returns:
            (R, D) float32, not normalised.
        """
        if image_index is None:
            image_index = torch.zeros(prompt_tokens.shape[0], dtype=torch.long,
                                      device=prompt_tokens.device)
        image = image_tokens.float()[image_index]  # (R, N, W)
        sequence = torch.cat([prompt_tokens.float(), image], dim=1)
        out = self.norm(self.layer(sequence))
        count = prompt_tokens.shape[1]
        pooled = out[:, :count].mean(1) if self.config.pooling == "prompt" else out.mean(1)
        return self.proj(pooled)

    def predict_boxes(self, text_region_embeddings: Tensor) -> Tensor:
        """(R, D) text-prompted region embeddings -> (R, 4) boxes, normalised xyxy (sigmoid:
        ours, keeps them inside the model input)."""
        return self.box_head(text_region_embeddings).sigmoid()

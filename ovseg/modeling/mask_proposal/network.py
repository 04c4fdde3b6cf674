"""The mask proposal network: MaskFormer (v1) with an open-vocabulary cosine class head.

Implements mask_adapted.md, "Stage 1": backbone (R101c, Swin-B, or a tiny one for tests) ->
FPN pixel decoder (per-pixel embeddings at 1/4) and transformer decoder on res5 -> per query a
mask (dot product of its mask embedding with the pixel embeddings) and a class embedding
(MLP 256 -> 1024 -> D). Classification, as the authors' ``MaskFormerClipAdapter``:

    logits = 100 x normalize(class embedding) . [normalize(text_k) ..., normalize(no_object)]

against the frozen CLIP text embeddings of the K class names (ViLD's 14 templates, each prompt
L2-normalised, averaged, renormalised: :func:`proposal_text_embeddings`) and one learnable
"no object" embedding (normal init, std = CLIP text width ** -0.5), scale fixed at 100; the
no-object column is last. Every decoder layer gets the same heads (deep supervision).

Input: RGB images normalised with the proposal network's pixel mean / std
(:data:`PIXEL_MEAN`, :data:`PIXEL_STD`, on 0..255; :func:`normalize_images`). The authors pad a
batch with zeros (after normalising) to a multiple of 32, :attr:`size_divisibility`;
:meth:`MaskProposalNetwork.inference` does that and crops the upsampled masks back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ovseg.modeling.mask_criterion import MaskPredictions
from ovseg.modeling.mask_proposal.pixel_decoder import PixelDecoder
from ovseg.modeling.mask_proposal.resnet import build_r101c_backbone, build_tiny_backbone
from ovseg.modeling.mask_proposal.swin import build_swin_b_backbone
from ovseg.modeling.mask_proposal.transformer_decoder import QueryPredictor
from ovseg.text import build_text_classifier, get_templates

# the proposal network's normalisation (the authors' MODEL.PIXEL_MEAN / PIXEL_STD), RGB 0..255
PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)
# MODEL.MASK_FORMER.SIZE_DIVISIBILITY: the padded batch's sides are multiples of it
SIZE_DIVISIBILITY = 32
# fixed cosine scale of the class head (not learnable)
LOGIT_SCALE = 100.0
# the text templates of the class names
TEXT_TEMPLATES = "vild"


@dataclass
class ProposalOutputs:
    """One forward's predictions.

    class_logits: (B, Q, K + 1) float, 100 x cosines, no-object last.
    mask_logits: (B, Q, H / 4, W / 4) float mask logits (H, W: the input's padded size).
    aux: the first L - 1 decoder layers' predictions (deep supervision), earliest first;
        empty when the forward was asked for none.
    """

    class_logits: torch.Tensor
    mask_logits: torch.Tensor
    aux: list[MaskPredictions] = field(default_factory=list)

    @property
    def final(self) -> MaskPredictions:
        """The last layer's predictions, for :class:`ovseg.modeling.mask_criterion.MaskCriterion`
        (``criterion(outputs.final, targets, outputs.aux)``)."""
        return MaskPredictions(self.class_logits, self.mask_logits)


@dataclass
class Proposals:
    """Inference output at the input's size.

    mask_probs: (B, Q, H, W) float sigmoid mask probabilities.
    class_probs: (B, Q, K + 1) float softmax over the K classes and no-object (last).
    """

    mask_probs: torch.Tensor
    class_probs: torch.Tensor


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB on 0..255 (any dtype) -> float32 (x - PIXEL_MEAN) / PIXEL_STD."""
    mean = torch.tensor(PIXEL_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def pad_to_multiple(images: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom and right to sides that are multiples of ``divisor``."""
    height, width = images.shape[-2:]
    return F.pad(images, (0, (-width) % divisor, 0, (-height) % divisor))


def proposal_text_embeddings(
    encode_text: Callable[[list[str]], torch.Tensor], names: Sequence[str], *, model_id: str,
    cache_dir: str | None = None, use_cache: bool = True,
) -> torch.Tensor:
    """The (K, D) class-name embeddings of the class head: ViLD's 14 templates, each prompt's
    embedding L2-normalised, averaged over templates, renormalised (float32, CPU).

    Args:
        encode_text: the frozen CLIP text encoder (``ClipEncoder.encode_text``).
        names: the K class names; model_id: names the CLIP weights (the cache key).
    """
    return build_text_classifier(encode_text, names, get_templates(TEXT_TEMPLATES),
                                 model_id=model_id, cache_dir=cache_dir, use_cache=use_cache)


class MaskProposalNetwork(nn.Module):
    """MaskFormer v1 proposals with an open-vocabulary class head.

    Args:
        backbone: a module mapping (B, 3, H, W) to {"res2".."res5"} with ``out_channels``.
        embed_dim: D, the CLIP embedding width (512 for ViT-B/16, 768 for ViT-L/14).
        text_width: the CLIP text transformer's width, whose ** -0.5 is the std of the
            no-object embedding's init (default D: 512 for ViT-B/16, 768 for ViT-L/14).
        conv_dim, mask_dim, norm, gn_groups: the pixel decoder's (256, 256, "GN", 32).
        hidden_dim, num_queries, nheads, dim_feedforward, dropout, dec_layers, pre_norm,
        embed_hidden_dim, embed_layers: the transformer decoder's (256, 100, 8, 2048, 0.1, 6,
            False, 1024, 2).
        logit_scale: the fixed cosine scale (100).
        size_divisibility: pad multiple of :meth:`inference` (32).
    """

    def __init__(self, backbone: nn.Module, embed_dim: int, *, text_width: int | None = None,
                 conv_dim: int = 256, mask_dim: int = 256, norm: str = "GN", gn_groups: int = 32,
                 hidden_dim: int = 256, num_queries: int = 100, nheads: int = 8,
                 dim_feedforward: int = 2048, dropout: float = 0.1, dec_layers: int = 6,
                 pre_norm: bool = False, embed_hidden_dim: int = 1024, embed_layers: int = 2,
                 logit_scale: float = LOGIT_SCALE, size_divisibility: int = SIZE_DIVISIBILITY):
        super().__init__()
        self.backbone = backbone
        in_channels = dict(backbone.out_channels)
        self.pixel_decoder = PixelDecoder(in_channels, conv_dim, mask_dim, norm, gn_groups)
        self.predictor = QueryPredictor(
            in_channels["res5"], embed_dim, hidden_dim=hidden_dim, num_queries=num_queries,
            nheads=nheads, dim_feedforward=dim_feedforward, dropout=dropout,
            dec_layers=dec_layers, pre_norm=pre_norm, mask_dim=mask_dim,
            embed_hidden_dim=embed_hidden_dim, embed_layers=embed_layers,
        )
        self.no_object_embedding = nn.Parameter(torch.empty(1, embed_dim))
        nn.init.normal_(self.no_object_embedding, std=(text_width or embed_dim) ** -0.5)
        self.embed_dim = embed_dim
        self.logit_scale = logit_scale
        self.size_divisibility = size_divisibility

    @property
    def num_queries(self) -> int:
        return self.predictor.num_queries

    def classify(self, class_embeddings: torch.Tensor,
                 text_embeddings: torch.Tensor) -> torch.Tensor:
        """Class logits of query embeddings.

        Args:
            class_embeddings: (..., D) query class embeddings.
            text_embeddings: (K, D) class-name embeddings (normalised here again).

        Returns:
            (..., K + 1): logit_scale x cosine with each name, then with the no-object embedding.
        """
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"text embeddings must be (K, {self.embed_dim}), got "
                             f"{tuple(text_embeddings.shape)}")
        classifier = torch.cat([
            F.normalize(text_embeddings.to(class_embeddings), dim=-1),
            F.normalize(self.no_object_embedding.to(class_embeddings.dtype), dim=-1),
        ])
        return self.logit_scale * F.normalize(class_embeddings, dim=-1) @ classifier.T

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor,
                aux: bool = True) -> ProposalOutputs:
        """Predict masks and classes.

        Args:
            images: (B, 3, H, W) float, normalised (:func:`normalize_images`); any size, though
                the authors' sides are multiples of 32.
            text_embeddings: (K, D) frozen CLIP embeddings of the class names.
            aux: also return the intermediate layers' predictions (deep supervision).

        Returns:
            :class:`ProposalOutputs`; masks at the res2 resolution (H / 4, W / 4 rounded up).
        """
        features = self.backbone(images)
        mask_features = self.pixel_decoder(features)
        queries = self.predictor.decode(features["res5"])
        if not aux:
            queries = queries[-1:]
        class_embeddings, mask_logits = self.predictor.heads(queries, mask_features)
        class_logits = self.classify(class_embeddings, text_embeddings)
        intermediate = [MaskPredictions(class_logits[layer], mask_logits[layer])
                        for layer in range(class_logits.shape[0] - 1)]
        return ProposalOutputs(class_logits[-1], mask_logits[-1], intermediate)

    @torch.no_grad()
    def inference(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> Proposals:
        """Mask and class probabilities at the input's size.

        The batch is zero-padded to a multiple of :attr:`size_divisibility`, the mask logits are
        upsampled bilinearly to the padded size, cropped to (H, W) and passed through a sigmoid
        (the authors' ``sem_seg_postprocess`` order).

        Args:
            images: (B, 3, H, W) normalised (:func:`normalize_images`).
            text_embeddings: (K, D).

        Returns:
            :class:`Proposals`: mask_probs (B, Q, H, W), class_probs (B, Q, K + 1).
        """
        height, width = images.shape[-2:]
        padded = pad_to_multiple(images, self.size_divisibility)
        outputs = self.forward(padded, text_embeddings, aux=False)
        masks = F.interpolate(outputs.mask_logits, size=padded.shape[-2:], mode="bilinear",
                              align_corners=False)[..., :height, :width]
        return Proposals(masks.sigmoid(), outputs.class_logits.softmax(-1))


def build_r101c_proposal_network(embed_dim: int = 512, **kwargs) -> MaskProposalNetwork:
    """R101c proposals for ViT-B/16 (D 512); ``kwargs`` go to :class:`MaskProposalNetwork`."""
    return MaskProposalNetwork(build_r101c_backbone(), embed_dim, **kwargs)


def build_swin_b_proposal_network(embed_dim: int = 768, drop_path_rate: float = 0.3,
                                  **kwargs) -> MaskProposalNetwork:
    """Swin-B proposals for ViT-L/14 (D 768); ``kwargs`` go to :class:`MaskProposalNetwork`."""
    return MaskProposalNetwork(build_swin_b_backbone(drop_path_rate), embed_dim, **kwargs)


def build_tiny_proposal_network(embed_dim: int = 32, num_queries: int = 10,
                                **kwargs) -> MaskProposalNetwork:
    """A small network for tests: the tiny backbone, FPN width 64 (GN 8 groups), hidden 64,
    4 heads, FFN 128, 3 decoder layers, class MLP 64 -> 128 -> D; other ``kwargs`` override."""
    settings = dict(conv_dim=64, mask_dim=64, gn_groups=8, hidden_dim=64, nheads=4,
                    dim_feedforward=128, dec_layers=3, embed_hidden_dim=128)
    settings.update(kwargs)
    return MaskProposalNetwork(build_tiny_backbone(), embed_dim, num_queries=num_queries,
                               **settings)


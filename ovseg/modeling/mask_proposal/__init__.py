"""MaskFormer (v1) mask proposal network of Mask-adapted CLIP (mask_adapted.md, "Stage 1").

- :mod:`.network`: :class:`MaskProposalNetwork` (forward / inference), the builders, the
  preprocessing constants, the class-name embeddings;
- :mod:`.resnet`, :mod:`.swin`: the R101c and Swin-B backbones (and a tiny one for tests);
- :mod:`.pixel_decoder`, :mod:`.transformer_decoder`: the FPN and the query decoder;
- :mod:`.checkpoint`: the authors' released files -> our state dict, strictly.
"""

from ovseg.modeling.mask_proposal.network import (
    PIXEL_MEAN,
    PIXEL_STD,
    SIZE_DIVISIBILITY,
    MaskProposalNetwork,
    ProposalOutputs,
    Proposals,
    build_r101c_proposal_network,
    build_swin_b_proposal_network,
    build_tiny_proposal_network,
    normalize_images,
    proposal_text_embeddings,
)

__all__ = [
    "PIXEL_MEAN",
    "PIXEL_STD",
    "SIZE_DIVISIBILITY",
    "MaskProposalNetwork",
    "ProposalOutputs",
    "Proposals",
    "build_r101c_proposal_network",
    "build_swin_b_proposal_network",
    "build_tiny_proposal_network",
    "normalize_images",
    "proposal_text_embeddings",
]

"""CLOC (specs/cloc.md): promptable region embeddings from CLIP's ViT tokens.

``model``: the settings, the Prompter around CLIP, region embeddings, recognition, the dense
map and the RoIAlign baseline; ``data``: COCO-format region sets; ``training``: the losses;
``evaluation``: region recognition (mAcc) and retrieval (recall@k). Training and evaluation are
imported by the model's hooks only when used.
"""

from ovseg.methods.cloc.model import (
    Cloc,
    ClocConfig,
    ClocState,
    RegionSetConfig,
    build_cloc,
)

__all__ = ["Cloc", "ClocConfig", "ClocState", "RegionSetConfig", "build_cloc"]

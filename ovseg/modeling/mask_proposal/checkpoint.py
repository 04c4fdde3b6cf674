"""The authors' released OVSeg checkpoints -> our proposal network (and the CLIP they carry).

The released files (``ovseg_R101c_vitB16_ft_mpt.pth``, ``ovseg_swinbase_vitL14_ft_mpt.pth``)
are detectron2 checkpoints, ``{"model": state_dict, ...}``, of the authors' ``OVSeg`` module.
Every key finds exactly one home:

- ``backbone.*`` -> ``backbone.*`` (our R101c / Swin-B use the authors' module names);
- ``sem_seg_head.pixel_decoder.*`` -> ``pixel_decoder.*``;
- ``sem_seg_head.predictor.transformer.decoder.*`` -> ``predictor.decoder.*``;
- ``sem_seg_head.predictor.*`` (``query_embed``, ``input_proj``, ``mask_embed.layers.N``,
  ``class_embed.layers.N``) -> ``predictor.*``;
- ``clip_adapter.non_object_embedding`` (1, D) -> ``no_object_embedding``;
- ``clip_adapter.clip_model.*`` -> the CLIP part (OpenAI CLIP names, ``visual.mask_embedding``
  included), returned as it is for the CLIP side to load;
- ``criterion.empty_weight`` (the CE class weights) and ``clip_adapter.pixel_mean`` /
  ``pixel_std`` (CLIP's normalisation x 255): constants, returned apart, never loaded.

Any other key is an error that lists it; a converted state that does not fit the network
(a missing key, a shape) is an error that lists those. Every error is one line naming the file.
Convert once from the command line::

    python -m ovseg.modeling.mask_proposal.checkpoint ovseg_R101c_vitB16_ft_mpt.pth \
        proposals.safetensors --clip-out clip_ft_mpt.safetensors
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ovseg.encoders.weights import save_state_dict_file
from ovseg.errors import OvsegError, WeightsError
from ovseg.io import describe_mismatch, load_state_dict_file

# the authors' key prefixes -> ours, most specific first
AUTHORS_PREFIXES: tuple[tuple[str, str], ...] = (
    ("sem_seg_head.predictor.transformer.decoder.", "predictor.decoder."),
    ("sem_seg_head.predictor.", "predictor."),
    ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
    ("backbone.", "backbone."),
)
AUTHORS_NO_OBJECT = "clip_adapter.non_object_embedding"
NO_OBJECT = "no_object_embedding"
AUTHORS_CLIP_PREFIX = "clip_adapter.clip_model."
AUTHORS_CONSTANTS = ("criterion.empty_weight", "clip_adapter.pixel_mean",
                     "clip_adapter.pixel_std")
_EXPECTED = ("the authors' OVSeg checkpoint (facebookresearch/ov-seg, e.g. "
             "ovseg_R101c_vitB16_ft_mpt.pth or ovseg_swinbase_vitL14_ft_mpt.pth)")
_LISTED = 20


@dataclass
class OvsegCheckpoint:
    """One released file, split.

    proposal: our :class:`MaskProposalNetwork` state dict keys -> tensors.
    clip: the CLIP model's tensors under their own names (``visual.conv1.weight``, ...,
        ``visual.mask_embedding`` when the file has mask prompts).
    constants: ``criterion.empty_weight``, ``clip_adapter.pixel_mean`` / ``pixel_std`` when
        present (not weights).
    """

    proposal: dict[str, torch.Tensor] = field(default_factory=dict)
    clip: dict[str, torch.Tensor] = field(default_factory=dict)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)


def our_key(authors_key: str) -> str | None:
    """Our proposal-network key of one of the authors' keys, or None when it is not one."""
    if authors_key == AUTHORS_NO_OBJECT:
        return NO_OBJECT
    for theirs, ours in AUTHORS_PREFIXES:
        if authors_key.startswith(theirs):
            return ours + authors_key[len(theirs):]
    return None


def authors_key(key: str) -> str:
    """The authors' name of one of our proposal-network keys (the inverse of :func:`our_key`)."""
    if key == NO_OBJECT:
        return AUTHORS_NO_OBJECT
    for theirs, ours in AUTHORS_PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise KeyError(f"{key} is not a key of the proposal network")


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def split_authors_state_dict(state: Mapping[str, torch.Tensor], *,
                             source: str) -> OvsegCheckpoint:
    """Give every tensor of an authors' state dict its home (see the module docstring).

    Raises:
        WeightsError: keys that belong nowhere, listed, with ``source``.
    """
    checkpoint = OvsegCheckpoint()
    unmatched = []
    for key, value in state.items():
        ours = our_key(key)
        if ours is not None:
            checkpoint.proposal[ours] = value
        elif key.startswith(AUTHORS_CLIP_PREFIX):
            checkpoint.clip[key[len(AUTHORS_CLIP_PREFIX):]] = value
        elif key in AUTHORS_CONSTANTS:
            checkpoint.constants[key] = value
        else:
            unmatched.append(key)
    if unmatched:
        raise WeightsError(
            f"weights {source} are not {_EXPECTED}: {len(unmatched)} keys have no place in the "
            f"proposal network or its CLIP: {_names(sorted(unmatched))}"
        )
    if not checkpoint.proposal:
        raise WeightsError(f"weights {source} hold no proposal-network key (backbone.*, "
                           f"sem_seg_head.*); expected {_EXPECTED}")
    return checkpoint


def load_proposal_state(model: nn.Module, state: Mapping[str, torch.Tensor], *,
                        source: str) -> None:
    """Load our-named ``state`` into ``model`` strictly; a mismatch is one line listing keys."""
    own = model.state_dict()
    problems = describe_mismatch(own, own, state, listed=_LISTED)
    if problems:
        raise WeightsError(f"weights {source} do not fit this proposal network (check the "
                           f"backbone and the CLIP width): " + "; ".join(problems))
    model.load_state_dict(dict(state), strict=True)


def load_authors_checkpoint(model: nn.Module,
                            checkpoint: str | Path | Mapping[str, torch.Tensor],
                            source: str | None = None) -> OvsegCheckpoint:
    """Load a released OVSeg file into ``model`` (a :class:`MaskProposalNetwork`) strictly.

    Args:
        checkpoint: the file (``.pth`` read with ``weights_only=True``; the ``model`` wrapper
            is unwrapped) or an already read state dict.
        source: the name said in errors (default: the path, or "state dict").

    Returns:
        the split file; its ``clip`` part is for the CLIP side (fine-tuned weights and
        ``visual.mask_embedding``).
    """
    if isinstance(checkpoint, Mapping):
        state, source = checkpoint, source or "state dict"
    else:
        state, source = load_state_dict_file(checkpoint), source or str(checkpoint)
    split = split_authors_state_dict(state, source=source)
    load_proposal_state(model, split.proposal, source=source)
    return split


def main(argv: list[str] | None = None) -> int:
    """Split an authors' file into our proposal state dict (and optionally its CLIP)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="the authors' .pth file")
    parser.add_argument("output", help="our proposal-network state dict (.safetensors or .pth)")
    parser.add_argument("--clip-out", help="also write the CLIP part here")
    args = parser.parse_args(argv)
    try:
        split = split_authors_state_dict(load_state_dict_file(args.checkpoint),
                                         source=args.checkpoint)
        save_state_dict_file({k: v.contiguous() for k, v in split.proposal.items()}, args.output)
        if args.clip_out:
            save_state_dict_file({k: v.contiguous() for k, v in split.clip.items()},
                                 args.clip_out)
    except OvsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(split.proposal)} proposal tensors to {args.output}"
          + (f" and {len(split.clip)} CLIP tensors to {args.clip_out}" if args.clip_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

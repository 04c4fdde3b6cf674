"""FOUND's trained saliency decoder: CLIP-DINOiser's background teacher (clip_dinoiser.md).

FOUND (valeoai/FOUND) trains one 1x1 convolution, in_dim -> 1 with bias, on the last-block KEYS
of a frozen DINO ViT-S/8 (``dino_deitsmall8_300ep_pretrain``): the 6 heads' keys concatenated
per patch (384-d), not normalised. Its output is a logit; sigmoid gives foreground saliency.
CLIP-DINOiser uses it only to make training targets (sigmoid, resized to the CLIP grid,
> 0.5); it never runs at inference.

The released file ``data/weights/decoder_weights.pt`` holds ``{'decoder': {'weight':
(1, 384, 1, 1), 'bias': (1,)}}``; :func:`load_found_decoder` reads that layout (or the same two
keys without the wrapper) strictly, on the CPU.

API::

    decoder = load_found_decoder(path, in_dim=384)  # or FoundDecoder(in_dim=384)
    logits = decoder(keys)  # (B, N, 384) or (B, 384, h, w) keys -> (B, 1, h, w) logits
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ovseg.errors import WeightsError
from ovseg.io import describe_mismatch
from ovseg.modeling.files import read_tensor_file

FOUND_CONFIG_KEY = "model.clip_dinoiser.found_weights"
# the wrapper key of FOUND's decoder_weights.pt
FOUND_WRAPPER = "decoder"


class FoundDecoder(nn.Module):
    """FOUND's decoder: Conv2d(in_dim, 1, 1x1, bias) on DINO keys.

    Args:
        in_dim: the keys' width (384 = 6 heads x 64 for DINO ViT-S/8).
    """

    def __init__(self, in_dim: int = 384):
        super().__init__()
        self.in_dim = in_dim
        self.decoder = nn.Conv2d(in_dim, 1, kernel_size=1, bias=True)

    def forward(self, keys: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Saliency logits of DINO last-block keys.

        Args:
            keys: (B, N, in_dim) patch keys in row-major order (class token dropped; heads
                concatenated, as DINO's qkv linear lays them out), or (B, in_dim, h, w).
            grid: (h, w) of (B, N, in_dim) keys; None = a square grid.

        Returns:
            (B, 1, h, w) logits, in the decoder's dtype; sigmoid = foreground saliency.
        """
        if keys.dim() == 3:
            batch, tokens, dim = keys.shape
            if grid is None:
                side = math.isqrt(tokens)
                if side * side != tokens:
                    raise ValueError(f"FoundDecoder: {tokens} keys are not a square grid; "
                                     "pass grid=(h, w)")
                grid = (side, side)
            keys = keys.transpose(1, 2).reshape(batch, dim, *grid)
        if keys.dim() != 4 or keys.shape[1] != self.in_dim:
            raise ValueError(f"FoundDecoder expects (B, N, {self.in_dim}) or "
                             f"(B, {self.in_dim}, h, w) keys, got {tuple(keys.shape)}")
        return self.decoder(keys.to(self.decoder.weight.dtype))


def load_found_decoder(
    path: str | Path, in_dim: int = 384, config_key: str = FOUND_CONFIG_KEY
) -> FoundDecoder:
    """A :class:`FoundDecoder` with the weights of FOUND's ``decoder_weights.pt`` (CPU, eval).

    Strict: exactly ``weight`` (1, in_dim, 1, 1) and ``bias`` (1,), under ``decoder`` or not.

    Raises:
        WeightsError: one line naming the file, the keys and ``config_key``.
    """
    if not str(path).strip():
        raise WeightsError(f"no FOUND decoder file given; set {config_key} to FOUND's "
                           "data/weights/decoder_weights.pt (the valeoai/FOUND repository)")
    state = read_tensor_file(path, config_key=config_key, what="FOUND decoder",
                             wrappers=(FOUND_WRAPPER,))
    decoder = FoundDecoder(in_dim)
    own = decoder.decoder.state_dict()
    problems = describe_mismatch(own, own, state)
    if problems:
        raise WeightsError(
            f"FOUND decoder file {Path(path).expanduser()} does not fit a 1x1 conv "
            f"{in_dim} -> 1: " + "; ".join(problems) +
            f"; expected {{'{FOUND_WRAPPER}': {{'weight': (1, {in_dim}, 1, 1), 'bias': (1,)}}}} "
            f"as FOUND's data/weights/decoder_weights.pt; set {config_key}"
        )
    with torch.no_grad():
        decoder.decoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return decoder.eval().requires_grad_(False)

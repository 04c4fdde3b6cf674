"""Re-normalisation of CLIP-normalised crops for an ImageNet-normalised proxy (DINO) encoder."""

from __future__ import annotations

import torch

# ProxyCLIP and Trident re-normalise each CLIP crop for DINO: un-normalise with OpenAI's
# statistics on the 0-1 scale (not the rounded 0-255 ones the crop was made with), normalise
# with ImageNet's
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def clip_to_imagenet(windows: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised images -> ImageNet-normalised images, ProxyCLIP's arithmetic.

    Args:
        windows: (B, 3, H, W) float, normalised with CLIP's statistics.

    Returns:
        (B, 3, H, W) float32 on the same device: (x * OPENAI_STD + OPENAI_MEAN - IMAGENET_MEAN)
        / IMAGENET_STD per channel.
    """

    def stats(values):
        return torch.tensor(values, device=windows.device).view(1, 3, 1, 1)

    pixels = windows * stats(OPENAI_STD) + stats(OPENAI_MEAN)
    return (pixels - stats(IMAGENET_MEAN)) / stats(IMAGENET_STD)

"""Tests of PAMR (pixel-adaptive mask refinement)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg.layers import PAMR


def _neighbour(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x shifted by (dy, dx) with clamped indices (replicate border), by gathering."""
    height, width = x.shape[-2:]
    rows = (torch.arange(height) + dy).clamp(0, height - 1)
    cols = (torch.arange(width) + dx).clamp(0, width - 1)
    return x[:, :, rows][:, :, :, cols]


def _pamr_stacked(image, masks, num_iter, dilations):
    """PAMR written the direct way: stack all shifts, torch.std, softmax, weighted sum."""
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    window = torch.stack(
        [_neighbour(image, dy * d, dx * d) for d in dilations for dy, dx in offsets], dim=2
    )
    std = window.std(dim=2, keepdim=True)  # (B, 3, 1, H, W), 9 values per dilation
    ring = [(dy, dx) for dy, dx in offsets if (dy, dx) != (0, 0)]
    neighbours = torch.stack(
        [_neighbour(image, dy * d, dx * d) for d in dilations for dy, dx in ring], dim=2
    )
    affinity = (-(neighbours - image[:, :, None]).abs() / (1e-8 + 0.1 * std)).mean(1)
    affinity = affinity.softmax(dim=1)  # (B, K, H, W)
    for _ in range(num_iter):
        shifted = torch.stack(
            [_neighbour(masks, dy * d, dx * d) for d in dilations for dy, dx in ring], dim=2
        )
        masks = (shifted * affinity[:, None]).sum(dim=2)
    return masks


def _two_regions(height: int, width: int, boundary: int, seed: int = 0):
    """Image dark left of column ``boundary``, bright right of it, with mild noise; its labels."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.full((1, 3, height, width), -1.0)
    image[..., boundary:] = 1.0
    image = image + 0.05 * torch.randn(image.shape, generator=gen)
    labels = torch.zeros(height, width, dtype=torch.long)
    labels[:, boundary:] = 1
    return image, labels


def _error(masks: torch.Tensor, labels: torch.Tensor) -> float:
    return (masks[0].argmax(0) != labels).float().mean().item()


def test_zero_iterations_is_identity():
    masks = torch.randn(2, 4, 9, 11)
    out = PAMR(num_iter=0)(torch.randn(2, 3, 9, 11), masks)
    assert out is masks


def test_constant_mask_stays_constant():
    image = torch.randn(1, 3, 24, 30, generator=torch.Generator().manual_seed(1))
    masks = torch.full((1, 3, 24, 30), 0.3)
    masks[:, 1] = -2.0
    out = PAMR(num_iter=5, dilations=(1, 2))(image, masks)
    assert torch.allclose(out, masks, atol=1e-5, rtol=0)


def test_affinity_is_a_distribution():
    image = torch.randn(2, 3, 16, 20, generator=torch.Generator().manual_seed(2))
    weights = PAMR(dilations=(1, 3)).affinity(image)
    assert weights.shape == (2, 16, 16, 20)
    assert bool((weights >= 0).all())
    assert torch.allclose(weights.sum(1), torch.ones(2, 16, 20), atol=1e-6)


def test_one_hot_masks_stay_probabilities():
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(2, 3, 32, 40, generator=gen)
    labels = torch.randint(0, 5, (2, 32, 40), generator=gen)
    masks = F.one_hot(labels, 5).permute(0, 3, 1, 2).float()
    out = PAMR(num_iter=10, dilations=(1, 2))(image, masks)
    assert out.shape == masks.shape
    assert out.min().item() >= 0 and out.max().item() <= 1 + 1e-6
    assert torch.allclose(out.sum(1), torch.ones(2, 32, 40), atol=1e-5)


def test_matches_stacked_formulation():
    gen = torch.Generator().manual_seed(4)
    image = torch.randn(2, 3, 21, 27, generator=gen)
    masks = torch.randn(2, 6, 21, 27, generator=gen)
    out = PAMR(num_iter=3, dilations=(1, 4))(image, masks)
    expected = _pamr_stacked(image, masks, 3, (1, 4))
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)


def test_dilations_larger_than_image():
    image = torch.randn(1, 3, 10, 12, generator=torch.Generator().manual_seed(5))
    masks = torch.randn(1, 2, 10, 12, generator=torch.Generator().manual_seed(6))
    out = PAMR()(image, masks)  # default dilations (8, 16) > the image
    assert torch.allclose(out, _pamr_stacked(image, masks, 10, (8, 16)), atol=1e-5, rtol=0)


def test_noisy_mask_gets_closer_to_the_region_boundary():
    image, labels = _two_regions(64, 64, boundary=29)
    gen = torch.Generator().manual_seed(7)
    clean = F.one_hot(labels, 2).permute(2, 0, 1)[None].float()
    noisy = clean + 0.8 * torch.randn(clean.shape, generator=gen)
    before = _error(noisy, labels)
    after = _error(PAMR(num_iter=10, dilations=(1, 2))(image, noisy), labels)
    assert before > 0.1
    assert after < before / 4


def test_coarse_boundary_moves_to_the_image_edge():
    # Coarse logits as a patch grid gives them: the class boundary is blurred and misplaced
    # (a ramp centred 8 px left of the true edge); PAMR with NACLIP's dilations pulls it back.
    image, labels = _two_regions(64, 96, boundary=45)
    cols = torch.arange(96, dtype=torch.float32)
    right = ((cols - 37) / 16).clamp(-1, 1).expand(64, 96)
    coarse = torch.stack([-right, right])[None]
    before = _error(coarse, labels)
    after = _error(PAMR()(image, coarse), labels)
    assert before > 0.06
    assert after < before / 2


def test_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="resize the image"):
        PAMR()(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="dilations"):
        PAMR(dilations=())

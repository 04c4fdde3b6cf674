"""CLOC's training losses (specs/cloc.md "Losses"): L = L_CLIP + lambda (L_CLOC + L_grounding).

- L_CLIP: symmetric image-text InfoNCE over the images that carry a caption, learnable tau.
- L_CLOC: symmetric region-text InfoNCE; z = Prompter(box, f_I') of up to M = 4 regions per
  image against the captions of all regions of the global batch (gathered across processes)
  and vice versa; a pair whose two captions' text cosine is > 0.9 is dropped from the
  denominators (a boolean mask made without gradient).
- L_grounding: z(y) = Prompter(f_T(y), f_I'); the box head regresses the region's box, L2
  summed over coordinates and regions, divided by 4 x (the regions: M N when all are there).
- lambda = ``region_loss_weight`` x the fraction of the global batch's images with region text.

Every process computes the contrastive losses of the whole gathered batch (rows and columns),
its own rows in the graph with their gradient multiplied by the number of processes, so every
process logs the batch's loss and DDP's gradient average is the whole batch's gradient, also
when processes hold different numbers of regions. (A per-process "local loss" over its own rows
would lose the gradient its features get as other processes' negatives, and would weight the
processes' regions unequally.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ovseg.errors import ConfigError
from ovseg.methods.cloc import dist as comm
from ovseg.methods.cloc.data import RegionTrainSet, resolve_region_set
from ovseg.methods.cloc.data import collate as collate  # noqa: PLC0414 (the model's hook)


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """(K, D) rows of every process concatenated in rank order, this process's own rows kept
    in the graph (the others carry no gradient) with their gradient multiplied by the number
    of processes (DDP divides the sum over processes by it), and where this process's rows
    start. Processes may have different K. One process: ``x`` itself and 0."""
    world = comm.world_size()
    if world <= 1:
        return x, 0
    if x.requires_grad:
        x = x.clone()
        x.register_hook(lambda grad: grad * world)
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[:x.shape[0]] = x.detach()
    chunks = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded)
    rank = comm.rank()
    parts = [x if i == rank else chunk[:size] for i, (chunk, size) in
             enumerate(zip(chunks, sizes, strict=True))]
    return torch.cat(parts), sum(sizes[:rank])


@torch.no_grad()
def near_duplicate_negatives(texts: Tensor, all_texts: Tensor, offset: int,
                             threshold: float) -> Tensor:
    """(K, K_all) bool: True where caption i and caption j of another pair have text cosine >
    ``threshold`` (those negatives leave the denominators); the positives (i, offset + i) stay.
    Made without gradient: no gradient reaches the text tower through this test."""
    cosine = F.normalize(texts.detach().float(), dim=-1) @ F.normalize(
        all_texts.detach().float(), dim=-1).T
    drop = cosine > threshold
    rows = torch.arange(texts.shape[0], device=texts.device)
    drop[rows, offset + rows] = False
    return drop


def contrastive_loss(queries: Tensor, keys: Tensor, logit_scale: Tensor,
                     text_threshold: float | None = None, texts: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE of K matched (query_i, key_i) pairs against the global batch.

    Args:
        queries: (K, D) L2-normalised (image or region embeddings of this process).
        keys: (K, D) L2-normalised text embeddings of the same pairs.
        logit_scale: log(1 / tau), a scalar tensor.
        text_threshold: drop negatives whose captions' cosine is above it (None = keep all).
        texts: (K, D) the captions' embeddings for that test (default ``keys``).

    Returns:
        a scalar: (CE(query -> keys) + CE(key -> queries)) / 2, means over the pairs of all
        processes (the same value on every process).
    """
    all_queries, _ = gather_with_grad(queries)
    all_keys, _ = gather_with_grad(keys)
    logits = logit_scale.exp() * all_queries @ all_keys.T
    if text_threshold is not None:
        texts = keys if texts is None else texts
        all_texts = all_keys if texts is keys else gather_with_grad(texts.detach())[0]
        drop = near_duplicate_negatives(all_texts, all_texts, 0, text_threshold)
        logits = logits.masked_fill(drop, float("-inf"))
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def grounding_loss(predicted: Tensor, boxes: Tensor, squared: bool = True) -> Tensor:
    """L2 box regression normalised by 1 / (4 M N): summed over the 4 coordinates of the K
    regions, divided by 4 K (K = M N when every image has M regions).

    Args:
        predicted, boxes: (K, 4) normalised xyxy.
        squared: squared L2 (ours: unverified in the paper) or the plain Euclidean norm per box.
    """
    if squared:
        total = ((predicted - boxes) ** 2).sum()
    else:
        total = (predicted - boxes).norm(dim=-1).sum()
    # guess: the regions actually present stand for M N (the paper samples up to M per image)
    return total / (4 * max(boxes.shape[0], 1))


def embed_text(model, texts: list[str], grad: bool) -> Tensor:
    """(K, D) float32 raw CLIP text embeddings; through the text tower with gradient only when
    the encoders train (each distinct text encoded once)."""
    unique = sorted(set(texts))
    index = torch.tensor([unique.index(t) for t in texts], device=model.device)
    if grad:
        tokens = model.clip.tokenizer(unique).to(model.device)
        embedded = model.clip.model.encode_text(tokens).float()
    else:
        embedded = model.clip.encode_text(unique)
    return embedded[index]


def _zero(model) -> Tensor:
    """A zero that touches every trainable parameter (DDP waits for each one's gradient)."""
    return sum(p.sum() * 0.0 for p in model.trainable_parameters())


def cloc_loss(model, batch: dict[str, Any]) -> dict[str, Tensor]:
    """The losses of a batch (see the module docstring).

    Args:
        batch: :func:`ovseg.methods.cloc.data.collate` of :class:`RegionTrainSet` samples.

    Returns:
        ``loss_clip``, ``loss_cloc`` and ``loss_grounding`` (the last two times lambda); the
        engine sums them.
    """
    settings = model.settings
    device = model.device
    grad_encoders = bool(settings.train_encoders)
    images = batch["image"].to(device)
    x = model.clip.normalize(images)
    side = x.shape[-1]
    rows = torch.arange(side, device=device)
    resized = batch["resized"].to(device)
    inside = ((rows[None, :, None] < resized[:, 0, None, None])
              & (rows[None, None, :] < resized[:, 1, None, None]))
    x = x * inside[:, None]  # zero padding after normalisation, as at inference
    with torch.set_grad_enabled(grad_encoders and torch.is_grad_enabled()):
        tokens, image_embedding = model.image_tokens(x)
    tokens = tokens.float()
    zero = _zero(model)
    losses: dict[str, Tensor] = {}

    # L_CLIP: the images with a caption
    captioned = [i for i, c in enumerate(batch["caption"]) if c]
    if captioned:
        image_z = F.normalize(image_embedding.float()[captioned], dim=-1)
        caption_z = F.normalize(embed_text(model, [batch["caption"][i] for i in captioned],
                                           grad_encoders), dim=-1)
        losses["loss_clip"] = contrastive_loss(image_z, caption_z, model.logit_scale) + zero
    else:
        losses["loss_clip"] = zero.clone()

    # lambda: the fraction of the global batch's images with region text
    valid = batch["region_valid"].to(device)
    counts = torch.tensor([float(valid.any(1).sum()), float(valid.shape[0])], device=device)
    comm.all_reduce_sum(counts)
    weight = settings.region_loss_weight * float(counts[0] / counts[1].clamp(min=1))

    image_index, slot = torch.nonzero(valid, as_tuple=True)
    if image_index.numel() == 0:
        losses["loss_cloc"] = zero.clone()
        losses["loss_grounding"] = zero.clone()
        return losses
    boxes = batch["boxes"].to(device)[image_index, slot].float()
    texts = [batch["region_text"][int(i)][int(s)] for i, s in zip(image_index, slot,
                                                                   strict=True)]
    text_raw = embed_text(model, texts, grad_encoders)
    text_z = F.normalize(text_raw, dim=-1)
    prompter = model.prompter
    regions = F.normalize(prompter(prompter.box_tokens(boxes), tokens, image_index), dim=-1)
    scale = model.logit_scale if settings.share_temperature else model.region_logit_scale
    region_loss = contrastive_loss(regions, text_z, scale, settings.negative_text_threshold)
    grounded = prompter(prompter.text_tokens(text_z), tokens, image_index)
    ground = grounding_loss(prompter.predict_boxes(grounded), boxes,
                            settings.grounding_squared)
    losses["loss_cloc"] = weight * region_loss + zero
    losses["loss_grounding"] = weight * ground
    return losses


def build_train_dataset(model, cfg) -> RegionTrainSet:
    """The region sets of ``cfg.datasets.train`` (names: :mod:`ovseg.methods.cloc.data`)."""
    names = list(cfg.datasets.train)
    if not names:
        raise ConfigError("CLOC trains on region sets: set datasets.train, e.g. "
                          "'[coco_regions_train]' or a name of model.cloc.region_sets")
    settings = model.settings
    sets = [resolve_region_set(name, cfg.model.cloc, cfg.datasets.root or None)
            for name in names]
    return RegionTrainSet(sets, settings.image_size, settings.regions_per_image,
                          settings.region_text)

"""The proposal network's transformer decoder on res5 (MaskFormer v1 / DETR), with its heads.

Implements mask_adapted.md, "Stage 1", the decoder sentence, as MaskFormer's
``TransformerPredictor`` (with the authors' open-vocabulary class head) builds it:

- ``input_proj``: 1x1 conv res5 channels -> hidden (256), with bias, caffe2 Xavier fill (an
  identity when the widths agree);
- positional encoding: DETR's normalised sine encoding of the res5 grid (:func:`sine_position_
  encoding`, 128 frequencies per axis, temperature 10000, scale 2 pi, eps 1e-6; y then x);
- ``query_embed``: 100 learned query positions; the decoder input itself starts at zeros;
- ``decoder``: 6 post-norm layers (self-attention, cross-attention to res5, FFN 256 -> 2048 ->
  256 with ReLU), 8 heads, dropout 0.1 (attention weights and the three residual branches and
  the FFN's hidden layer), queries' positions added to queries and keys of both attentions, the
  memory's positions to the cross-attention keys; one LayerNorm ``decoder.norm`` applied to the
  output of every layer (the intermediate outputs for deep supervision, and the last);
  Transformer weights with more than one dimension get Xavier-uniform init;
- ``mask_embed``: MLP 256 -> 256 -> 256 -> mask dim (3 layers); a query's mask logits are the
  dot product of its mask embedding with the per-pixel embeddings;
- ``class_embed``: MLP 256 -> 1024 -> D (2 layers), D the CLIP embedding width: the query's
  embedding for the cosine classifier of :mod:`ovseg.modeling.mask_proposal.network`.

Module names are MaskFormer's, so ``sem_seg_head.predictor.*`` keys map by prefix
(``transformer.decoder`` -> ``decoder``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ovseg.modeling.mask_proposal.blocks import MLP, c2_xavier_fill


def sine_position_encoding(batch: int, height: int, width: int, num_feats: int = 128,
                           temperature: float = 10000.0, scale: float = 2 * math.pi,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """DETR's normalised sine positional encoding of an unpadded (height, width) grid.

    With y_i = i / (height + 1e-6) * scale for row i = 1..height (x likewise over columns) and
    w_j = temperature ** (2 * floor(j / 2) / num_feats), j = 0..num_feats-1, the first
    ``num_feats`` channels are sin(y / w_j) for even j and cos(y / w_j) for odd j; the next
    ``num_feats`` the same for x.

    Returns:
        (batch, 2 * num_feats, height, width) float32.
    """
    rows = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    cols = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    eps = 1e-6
    rows = rows / (rows[-1:] + eps) * scale
    cols = cols / (cols[-1:] + eps) * scale
    index = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)

    def encode(values: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, num_feats)
        angles = values[:, None] / dim_t
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(rows)[:, None, :].expand(height, width, num_feats)
    pos_x = encode(cols)[None, :, :].expand(height, width, num_feats)
    pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)
    return pos[None].expand(batch, -1, -1, -1).contiguous()


class DecoderLayer(nn.Module):
    """DETR decoder layer: self-attention, cross-attention, FFN; post-norm unless ``pre_norm``.

    Args:
        d_model: width (256); nhead: heads (8); dim_feedforward: FFN width (2048);
        dropout: 0.1; pre_norm: False (the authors').
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, dim_feedforward: int = 2048,
                 dropout: float = 0.1, pre_norm: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout,
                                                    batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        """tgt (B, Q, C), memory (B, HW, C), pos (B, HW, C), query_pos (B, Q, C) -> (B, Q, C)."""
        if self.pre_norm:
            x = self.norm1(tgt)
            q = x + query_pos
            tgt = tgt + self.dropout1(self.self_attn(q, q, value=x, need_weights=False)[0])
            x = self.norm2(tgt)
            tgt = tgt + self.dropout2(self.multihead_attn(
                x + query_pos, memory + pos, value=memory, need_weights=False)[0])
            return tgt + self.dropout3(self._feed_forward(self.norm3(tgt)))
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(
            self.self_attn(q, q, value=tgt, need_weights=False)[0]))
        tgt = self.norm2(tgt + self.dropout2(self.multihead_attn(
            tgt + query_pos, memory + pos, value=memory, need_weights=False)[0]))
        return self.norm3(tgt + self.dropout3(self._feed_forward(tgt)))


class TransformerDecoder(nn.Module):
    """``num_layers`` decoder layers; returns every layer's output after the shared ``norm``."""

    def __init__(self, num_layers: int = 6, d_model: int = 256, nhead: int = 8,
                 dim_feedforward: int = 2048, dropout: float = 0.1, pre_norm: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, nhead, dim_feedforward, dropout, pre_norm)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        """Arguments as :meth:`DecoderLayer.forward`; returns (num_layers, B, Q, C)."""
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class QueryPredictor(nn.Module):
    """Queries attending to res5 -> per-layer mask logits and class embeddings.

    Args:
        in_channels: res5's width (2048 for R101c, 1024 for Swin-B).
        embed_dim: D, the CLIP embedding width of the class embeddings (512 / 768).
        hidden_dim: 256; num_queries: 100; nheads: 8; dim_feedforward: 2048; dropout: 0.1;
        dec_layers: 6; pre_norm: False; mask_dim: 256 (the pixel decoder's);
        embed_hidden_dim: 1024 and embed_layers: 2 (the class-embedding MLP).
    """

    def __init__(self, in_channels: int, embed_dim: int, hidden_dim: int = 256,
                 num_queries: int = 100, nheads: int = 8, dim_feedforward: int = 2048,
                 dropout: float = 0.1, dec_layers: int = 6, pre_norm: bool = False,
                 mask_dim: int = 256, embed_hidden_dim: int = 1024, embed_layers: int = 2):
        super().__init__()
        self.num_feats = hidden_dim // 2
        self.decoder = TransformerDecoder(dec_layers, hidden_dim, nheads, dim_feedforward,
                                          dropout, pre_norm)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        # guess: ENFORCE_INPUT_PROJ is off in the authors' config (not verified); it only
        # matters when res5 is 256 wide, never for R101c (2048) or Swin-B (1024), whose files
        # always hold input_proj
        if in_channels != hidden_dim:
            self.input_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
            c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Identity()
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.class_embed = MLP(hidden_dim, embed_hidden_dim, embed_dim, embed_layers)

    @property
    def num_queries(self) -> int:
        return int(self.query_embed.weight.shape[0])

    def decode(self, res5: torch.Tensor) -> torch.Tensor:
        """(B, C5, h, w) -> (L, B, Q, hidden): every decoder layer's normed query features."""
        batch, _, height, width = res5.shape
        pos = sine_position_encoding(batch, height, width, self.num_feats, device=res5.device)
        memory = self.input_proj(res5).flatten(2).transpose(1, 2)
        pos = pos.to(memory.dtype).flatten(2).transpose(1, 2)
        query_pos = self.query_embed.weight[None].expand(batch, -1, -1)
        tgt = torch.zeros_like(query_pos)
        return self.decoder(tgt, memory, pos, query_pos)

    def heads(self, queries: torch.Tensor,
              mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-query heads on query features (..., B, Q, hidden) and pixel embeddings
        (B, mask_dim, H, W) -> (class embeddings (..., B, Q, D), mask logits (..., B, Q, H, W))."""
        masks = torch.einsum("...bqc,bchw->...bqhw", self.mask_embed(queries), mask_features)
        return self.class_embed(queries), masks

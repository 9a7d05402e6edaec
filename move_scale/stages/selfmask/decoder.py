"""SelfMask's transformer decoder: learned queries attend to the encoder's patch tokens.

DETR's decoder as MaskFormer and SelfMask use it (NoelShin/selfmask
`networks/maskformer/transformer_decoder.py`, built by `maskformer.py`): post-norm layers (self-
attention over the queries, cross-attention to the tokens, ReLU FFN, each followed by its
residual and a LayerNorm), dropout 0, the query embedding added to the queries' attention inputs
(`query_pos`) while the layer input starts at zero, no positional encoding on the tokens, one
LayerNorm shared by every layer's output, and every layer's output returned. The layers start
identical: one layer is built and copied, as `_get_clones` does.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class DecoderLayer(nn.Module):
    """One post-norm layer. `forward(target (B,Q,C), memory (B,N,C), query_pos (B,Q,C)) -> (B,Q,C)`."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, target: torch.Tensor, memory: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        positioned = target + query_pos
        target = self.norm1(target + self.self_attn(positioned, positioned, target, need_weights=False)[0])
        attended = self.cross_attn(target + query_pos, memory, memory, need_weights=False)[0]
        target = self.norm2(target + attended)
        return self.norm3(target + self.linear2(F.relu(self.linear1(target))))


class QueryDecoder(nn.Module):
    """`layers` copies of one DecoderLayer and a final LayerNorm.

    `forward(memory (B,N,C), queries (Q,C)) -> (B, L, Q, C)`: the normalised output of every layer
    (the last one is the decoder's output)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, layers: int):
        super().__init__()
        layer = DecoderLayer(dim, num_heads, ffn_dim)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, memory: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        query_pos = queries.unsqueeze(0).expand(memory.shape[0], -1, -1)  # (B, Q, C)
        target = torch.zeros_like(query_pos)
        outputs = []
        for layer in self.layers:
            target = layer(target, memory, query_pos)
            outputs.append(self.norm(target))
        return torch.stack(outputs, dim=1)  # (B, L, Q, C)

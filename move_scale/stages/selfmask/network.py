"""The SelfMask segmenter (Shin, Albanie & Xie 2022): ViT encoder, query decoder, masks, objectness.

NoelShin/selfmask `networks/maskformer/maskformer.py` with `use_binary_classifier: true` (the
published config): the encoder's last patch tokens (after DINO's final LayerNorm) feed the decoder
(decoder.py) with learned queries (`nn.Embedding(Q, C).weight`, N(0, 1)); the same tokens,
upsampled ×2 bilinearly (nothing learnable), make the pixel features at stride patch/2 (4 for
ViT-S/8); each layer's query q gives the mask sigmoid(q · feature) at every pixel, and its
objectness sigmoid(MLP(q)), a 3-layer MLP C → C → C → 1 with ReLUs between.

    net = build_network(cfg.model, cfg.data.image_size)
    masks, objectness = net(images)      # (B, L, Q, H/4, W/4) in [0, 1], (B, L, Q) in [0, 1]
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from move_scale.models.backbone import DinoViT
from move_scale.models.build import check_image_size, square_grid
from move_scale.models.weights import (
    RANDOM,
    load_strict,
    load_weights,
    read_state_dict,
    resolve_weights,
)
from move_scale.stages.selfmask.decoder import QueryDecoder

log = logging.getLogger(__name__)

TOKEN_UPSAMPLE = 2  # maskformer.py scale_factor: pixel features at stride patch / 2


class ObjectnessMLP(nn.Module):
    """C → C → C → 1, ReLU between the linear layers (maskformer.py MLP, num_layers 3)."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, 1)])

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            queries = F.relu(layer(queries))
        return self.layers[-1](queries)


class SelfMaskNet(nn.Module):
    """`forward(images (B,3,H,W), all_layers=True) -> (masks, objectness)`: masks (B, L, Q, h, w)
    and objectness (B, L, Q), both after the sigmoid, h, w = H, W · 2 / patch; with
    `all_layers=False` only the last layer's, (B, Q, h, w) and (B, Q). H and W must be
    multiples of the patch (the predictor pads them)."""

    def __init__(self, backbone: DinoViT, decoder: QueryDecoder, queries: int):
        super().__init__()
        self.backbone, self.decoder = backbone, decoder
        dim = backbone.embed_dim
        self.queries = nn.Parameter(torch.randn(queries, dim))  # as nn.Embedding(Q, C).weight
        self.objectness = ObjectnessMLP(dim)

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def pixel_features(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, C) tokens of an h×w grid → (B, C, 2h, 2w), bilinear (align_corners=False)."""
        batch, _, dim = tokens.shape
        features = tokens.transpose(1, 2).reshape(batch, dim, *grid)  # (B, C, h, w)
        return F.interpolate(features, scale_factor=TOKEN_UPSAMPLE, mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor, all_layers: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        tokens = self.backbone(images)  # (B, N, C), N = h·w
        queries = self.decoder(tokens, self.queries)  # (B, L, Q, C)
        if not all_layers:
            queries = queries[:, -1:]  # (B, 1, Q, C)
        features = self.pixel_features(tokens, grid)  # (B, C, 2h, 2w)
        logits = torch.einsum("blqc,bchw->blqhw", queries, features)  # (B, L, Q, 2h, 2w)
        objectness = torch.sigmoid(self.objectness(queries)).squeeze(-1)  # (B, L, Q)
        masks = torch.sigmoid(logits)
        return (masks, objectness) if all_layers else (masks[:, 0], objectness[:, 0])


def make_network(model_cfg, grid: int) -> SelfMaskNet:
    """The network of `model_cfg` (config.ModelConfig), freshly initialised, its positional table
    on a grid×grid token grid (seed the global generator first for a reproducible start)."""
    spec, dec = model_cfg.backbone, model_cfg.decoder
    backbone = DinoViT(spec.embed_dim, spec.depth, spec.num_heads, spec.patch_size,
                       img_size=grid * spec.patch_size, positions=spec.positions)
    decoder = QueryDecoder(spec.embed_dim, dec.num_heads, dec.ffn_dim, dec.layers)
    return SelfMaskNet(backbone, decoder, dec.queries)


def build_network(model_cfg, image_size: int) -> SelfMaskNet:
    """The network to train: `make_network`, then the backbone's weights (a name, a path or
    "random") loaded strictly. The positional table keeps the file's grid (28² for the official
    ViT-S/8); other sizes are served by resampling it at run time (`backbone.positions`)."""
    spec = model_cfg.backbone
    check_image_size(image_size, spec.patch_size, "SelfMask backbone")
    what = f"SelfMask backbone ({spec.weights})"
    if spec.weights == RANDOM:
        net = make_network(model_cfg, image_size // spec.patch_size)
        load_weights(net.backbone, RANDOM, model_cfg.weights_cache, what)
        return net
    state_dict = read_state_dict(resolve_weights(spec.weights, model_cfg.weights_cache))
    net = make_network(model_cfg, square_grid(state_dict.get("pos_embed"), image_size // spec.patch_size))
    load_strict(net.backbone, state_dict, what)
    log.info("loaded %s", what)
    return net

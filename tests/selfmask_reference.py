"""The published SelfMask procedure written out plainly, for the parity tests and the step benchmark
(our own code, after NoelShin/selfmask `networks/maskformer/maskformer.py`,
`networks/maskformer/transformer_decoder.py`, `criterion.py`, `evaluator.py`,
`utils/lr_scheduler.py`): loops over images and layers, attention by hand, sequence-first tensors
as DETR keeps them. It reads the weights of a `SelfMaskNet` but none of its code beyond the
backbone (the DINO ViT, tested on its own).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(query, key, value, module):
    """nn.MultiheadAttention's computation by hand, sequence first: query (Sq, B, C), key and value
    (Sk, B, C) (or (S, C) for one image), with `module`'s weights: packed in-projection, per-head
    softmax(q kᵀ / √d) v, out-projection."""
    single = query.ndim == 2
    if single:
        query, key, value = query[:, None], key[:, None], value[:, None]
    dim, heads = query.shape[-1], module.num_heads
    w_q, w_k, w_v = module.in_proj_weight.split(dim)
    b_q, b_k, b_v = module.in_proj_bias.split(dim)

    def split(x, w, b):  # (S, B, C) → (B, h, S, d)
        return (x @ w.T + b).reshape(x.shape[0], x.shape[1], heads, dim // heads).permute(1, 2, 0, 3)

    q, k, v = split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
    out = (weights @ v).permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], dim)  # (Sq, B, C)
    out = out @ module.out_proj.weight.T + module.out_proj.bias
    return out[:, 0] if single else out


def layer_norm(x, module):
    return F.layer_norm(x, (x.shape[-1],), module.weight, module.bias, module.eps)


def decoder_layer(tgt, memory, query_pos, layer):
    """TransformerDecoderLayer.forward_post for one image: tgt (Q, C), memory (N, C)."""
    q = k = tgt + query_pos
    tgt = layer_norm(tgt + attention(q, k, tgt, layer.self_attn), layer.norm1)
    tgt = layer_norm(tgt + attention(tgt + query_pos, memory, memory, layer.cross_attn), layer.norm2)
    ffn = F.relu(tgt @ layer.linear1.weight.T + layer.linear1.bias) @ layer.linear2.weight.T + layer.linear2.bias
    return layer_norm(tgt + ffn, layer.norm3)


def decoder(memory, queries, dec):
    """TransformerDecoder with return_intermediate for one image → (L, Q, C)."""
    tgt = torch.zeros_like(queries)
    outputs = []
    for layer in dec.layers:
        tgt = decoder_layer(tgt, memory, queries, layer)
        outputs.append(layer_norm(tgt, dec.norm))
    return torch.stack(outputs)


def mlp(x, module):
    """maskformer.py MLP: ReLU between the layers."""
    for i, linear in enumerate(module.layers):
        x = x @ linear.weight.T + linear.bias
        if i < len(module.layers) - 1:
            x = F.relu(x)
    return x


def forward(net, images):
    """MaskFormer.forward for a batch, image by image → masks (B, L, Q, 2h, 2w), objectness (B, L, Q)."""
    masks, scores = [], []
    patch = net.backbone.patch_size
    for image in images:
        h, w = image.shape[-2] // patch, image.shape[-1] // patch
        tokens = net.backbone(image[None])[0]  # (N, C)
        queries = decoder(tokens, net.queries, net.decoder)  # (L, Q, C)
        grid = tokens.T.reshape(1, -1, h, w)
        features = F.interpolate(grid, scale_factor=2, mode="bilinear", align_corners=False)[0]  # (C, 2h, 2w)
        masks.append(torch.sigmoid(torch.einsum("lqc,chw->lqhw", queries, features)))
        scores.append(torch.sigmoid(mlp(queries, net.objectness))[..., 0])
    return torch.stack(masks), torch.stack(scores)


def criterion(masks, objectness, targets, descending=True, rank_weight=1.0):
    """criterion.py Loss._forward with one pseudo-mask per image and binary objectness.
    `descending`: the published sort (True) or its reverse. → (loss, dice sum, rank sum)."""
    dice_total = masks.new_zeros(())
    rank_total = masks.new_zeros(())
    for pred, gt, obj in zip(masks, targets, objectness):
        gt = gt.float()
        if gt.sum() == 0:
            continue
        pred = F.interpolate(pred, size=gt.shape[-2:], mode="bilinear", align_corners=False).flatten(-2)
        gt = gt.flatten()[None]  # (1, HW)
        for layer_pred, layer_obj in zip(pred, obj):  # (Q, HW), (Q,)
            numerator = 2 * torch.einsum("nc,mc->nm", layer_pred, gt)
            denominator = layer_pred.sum(-1)[:, None] + gt.sum(-1)[None, :]
            dice = (1 - (numerator + 1) / (denominator + 1)).permute(1, 0)  # (1, Q)
            dice_total = dice_total + dice.sum()
            order = torch.argsort(dice[0], descending=descending)
            scores = layer_obj[order][:, None]
            upper = torch.triu(scores - scores.T, diagonal=1)
            rank_total = rank_total + upper[upper < 0].abs().sum()
    batch = len(masks)
    return (dice_total + rank_weight * rank_total) / batch, dice_total / batch, rank_total / batch


def forward_published(net, images):
    """MaskFormer.forward as published, batched: the encoder on the batch, the decoder on
    sequence-first tensors (tokens (N, B, C), queries (Q, B, C)), every layer's normalised output,
    the objectness MLP layer by layer → masks (B, L, Q, 2h, 2w), objectness (B, L, Q)."""
    batch, _, height, width = images.shape
    patch = net.backbone.patch_size
    h, w = height // patch, width // patch
    tokens = net.backbone(images)  # (B, N, C)
    memory = tokens.permute(1, 0, 2)  # (N, B, C)
    query_pos = net.queries[:, None].repeat(1, batch, 1)  # (Q, B, C)
    tgt = torch.zeros_like(query_pos)
    intermediate = []
    for layer in net.decoder.layers:
        tgt = decoder_layer(tgt, memory, query_pos, layer)
        intermediate.append(layer_norm(tgt, net.decoder.norm))
    queries = torch.stack(intermediate).permute(2, 0, 1, 3)  # (B, L, Q, C)
    features = F.interpolate(tokens.permute(0, 2, 1).reshape(batch, -1, h, w), scale_factor=2,
                             mode="bilinear", align_corners=False)  # (B, C, 2h, 2w)
    masks = torch.sigmoid(torch.einsum("bdqn,bnhw->bdqhw", queries, features))
    scores = torch.stack([mlp(per_layer, net.objectness) for per_layer in queries.permute(1, 0, 2, 3)])
    return masks, torch.sigmoid(scores).permute(1, 0, 2, 3)[..., 0]


def pad_to_patch(image, patch):
    """make_input_divisible: zeros on the right and bottom of the normalised image."""
    h, w = image.shape[-2:]
    return F.pad(image, (0, (patch - w % patch) % patch, 0, (patch - h % patch) % patch), value=0)


def evaluator_mask(net, image):
    """evaluator.py for one normalised image (3, H, W): pad, forward, last layer, query of highest
    objectness, ×4 bilinear, crop → (H, W)."""
    h, w = image.shape[-2:]
    masks, objectness = forward(net, pad_to_patch(image, net.backbone.patch_size)[None])
    masks, objectness = masks[:, -1], objectness[:, -1]
    masks = F.interpolate(masks, scale_factor=4, mode="bilinear", align_corners=False)[..., :h, :w]
    ranks = torch.argsort(objectness[0], descending=True)
    return masks[0, ranks[0]]


class PublishedPoly:
    """utils/lr_scheduler.py Poly as a counter: `factors(n)` → the factor of each of the first n
    optimizer steps (the first from the scheduler's construction, then one per step)."""

    def __init__(self, epochs: int, per_epoch: int, power: float = 0.9, warmup_iters: int = 0):
        self.per_epoch, self.total, self.power = per_epoch, epochs * per_epoch, power
        self.warmup = warmup_iters
        self.cur = 0

    def _next(self) -> float:
        t = self.cur
        if 0 < self.warmup and t < self.warmup:
            factor = 1.0 * t / self.warmup
        else:
            factor = (1 - t / self.total) ** self.power
        self.cur %= self.per_epoch
        self.cur += 1
        return factor

    def factors(self, steps: int) -> list[float]:
        return [self._next() for _ in range(steps)]

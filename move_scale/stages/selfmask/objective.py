"""SelfMask's objective: dice of every query at every decoder layer, plus the objectness ranking.

NoelShin/selfmask `criterion.py Loss` with one pseudo-mask per image and the binary objectness
head (`use_binary_classifier`), vectorised over images, layers and queries:

- dice: each layer's masks are resized (bilinear, align_corners=False) to the pseudo-mask; the dice
  loss of query q is 1 − (2Σ p·t + 1) / (Σ p + Σ t + 1) (MaskFormer's, with its +1 smoothing);
  every query of every layer counts, summed. The sums are taken at the masks' own size through
  the resize's adjoint (`dice_losses`): the same values, without the resized masks in memory;
- ranking: per image and layer, the queries are sorted by their dice loss (the sort carries no
  gradient) and every pair out of order in objectness costs the objectness gap (a pairwise hinge
  without margin), summed. `ranking="best_first"` sorts by dice loss ascending, so a query whose
  mask is worse pays when its objectness exceeds a better query's: the highest objectness, which
  inference picks, is pushed towards the best mask, as the paper means. `"published"` sorts
  descending as criterion.py does (`argsort(..., descending=True)` with the same upper-triangle
  penalty), which pays when the *better* mask has the higher objectness;
- total = (dice + rank_weight · ranking) / B: images whose pseudo-mask is empty (after
  augmentation a crop can leave none) add nothing but still count in B, as in criterion.py.

    terms = selfmask_loss(masks, objectness, targets, ranking="best_first", rank_weight=1.0)
    terms["loss"].backward()
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RANKINGS = ("best_first", "published")


def _resized_weights(targets: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """targets (B, H, W) → (B, 2, h·w): per pixel of an (h, w) mask, the weight its value gets in
    Σ up(p)·t and in Σ up(p), where up is the bilinear resize (align_corners=False) to (H, W).

    The resize is linear in p, so both sums are dot products of p with its adjoint applied to t
    and to ones: the dice loss of every query then needs no query's mask at (H, W) (at the
    paper's size 8 x 6 x 20 masks of 224² in fp32 are 1.9 GB, and as much again for their
    gradient). The adjoint is the resize's backward, taken on a probe."""
    batch = targets.shape[0]
    with torch.enable_grad():
        probe = torch.zeros(batch, 2, *size, dtype=targets.dtype, device=targets.device, requires_grad=True)
        up = F.interpolate(probe, size=targets.shape[-2:], mode="bilinear", align_corners=False)
        weights = torch.stack([targets, torch.ones_like(targets)], dim=1)  # (B, 2, H, W)
        (adjoint,) = torch.autograd.grad((up * weights).sum(), probe)
    return adjoint.flatten(2)  # (B, 2, h·w)


def dice_losses(masks: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """masks (B, L, Q, h, w) in [0, 1], targets (B, H, W) in {0, 1} → (B, L, Q) dice losses of
    the masks resized (bilinear) to (H, W), computed without making them (`_resized_weights`)."""
    batch, layers, queries = masks.shape[:3]
    truth = targets.to(masks.dtype)
    flat = masks.reshape(batch, layers * queries, -1)  # (B, L·Q, h·w)
    if tuple(masks.shape[-2:]) != tuple(targets.shape[-2:]):
        weights = _resized_weights(truth, tuple(masks.shape[-2:]))  # (B, 2, h·w)
        overlap, mask_sum = torch.einsum("bkn,bwn->wbk", flat, weights)  # each (B, L·Q)
    else:
        overlap = torch.einsum("bkn,bn->bk", flat, truth.flatten(1))
        mask_sum = flat.sum(-1)
    total = mask_sum + truth.flatten(1).sum(-1, keepdim=True)  # (B, L·Q)
    return (1 - (2 * overlap + 1) / (total + 1)).reshape(batch, layers, queries)


def ranking_losses(dice: torch.Tensor, objectness: torch.Tensor, ranking: str) -> torch.Tensor:
    """dice (B, L, Q) (order only, no gradient), objectness (B, L, Q) → (B, L) pairwise hinge:
    with the queries sorted by dice loss (ascending for "best_first", descending for
    "published"), Σ over pairs i < j of max(0, o_j − o_i)."""
    if ranking not in RANKINGS:
        raise ValueError(f"ranking {ranking!r}: use one of {list(RANKINGS)}")
    order = torch.argsort(dice.detach(), dim=-1, descending=ranking == "published")
    ranked = torch.gather(objectness, -1, order)  # (B, L, Q), rank 0 first
    gaps = ranked.unsqueeze(-1) - ranked.unsqueeze(-2)  # (B, L, Q, Q): o_i − o_j
    later = torch.ones(gaps.shape[-2:], dtype=torch.bool, device=gaps.device).triu(1)  # i < j
    return (-gaps).clamp(min=0).mul(later).sum((-2, -1))


def selfmask_loss(masks: torch.Tensor, objectness: torch.Tensor, targets: torch.Tensor, *,
                  ranking: str = "best_first", rank_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """masks (B, L, Q, h, w), objectness (B, L, Q), targets (B, H, W) or (B, 1, H, W) in {0, 1}
    → {"loss", "dice", "rank"} (each summed over images, layers, queries and divided by B) and
    {"dice_per_query" (B, L, Q), "valid" (B,) bool: the images with a non-empty target}."""
    if targets.ndim == 4:
        targets = targets[:, 0]
    if masks.shape[:3] != objectness.shape or targets.shape[0] != masks.shape[0]:
        raise ValueError(f"masks {tuple(masks.shape)}, objectness {tuple(objectness.shape)} and "
                         f"targets {tuple(targets.shape)} do not agree on (B, L, Q)")
    valid = targets.flatten(1).sum(-1) > 0  # (B,)
    weight = valid.to(masks.dtype).view(-1, 1)  # (B, 1): empty targets add nothing
    dice = dice_losses(masks, targets)  # (B, L, Q)
    dice_sum = (dice.sum(-1) * weight).sum()
    rank_sum = (ranking_losses(dice, objectness, ranking) * weight).sum()
    batch = masks.shape[0]
    return {"loss": (dice_sum + rank_weight * rank_sum) / batch, "dice": dice_sum / batch,
            "rank": rank_sum / batch, "dice_per_query": dice, "valid": valid}


def chosen_query(objectness: torch.Tensor) -> torch.Tensor:
    """(B, Q) objectness of one layer → (B,) index of the query inference keeps: the highest
    objectness (NoelShin/selfmask `evaluator.py`: argsort descending, first)."""
    return objectness.argmax(-1)

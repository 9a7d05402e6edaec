"""MOVE's config → networks: one `build_*` per family, each loading its weights through
`models/weights.py` (the MAE's own builder is models/build.py, shared with MAE pretraining).

Each takes the `ModelConfig` (its section plus `weights_cache`) and plain arguments, never the whole
Config. Weights are a registered name, a file path, or "random" (tests and demos). Variants are
chosen from explicit dicts keyed by the config's kinds (`config.FEATURE_KINDS`, `DISC_KINDS`); the
config has checked every choice as it loaded, so nothing here checks one again.
"""
from __future__ import annotations

import logging

from move_scale.models import build as shared
from move_scale.models.backbone import FrozenViT
from move_scale.models.build import check_image_size, square_grid
from move_scale.models.mae import MAE
from move_scale.models.weights import (
    RANDOM,
    load_strict,
    load_weights,
    read_state_dict,
    resolve_weights,
)
from move_scale.stages.move.config import ModelConfig
from move_scale.stages.move.conv_discriminator import ConvDiscriminator
from move_scale.stages.move.discriminator import ProjectedDiscriminator
from move_scale.stages.move.segmenter import Segmenter

log = logging.getLogger(__name__)


def build_features(model_cfg: ModelConfig, image_size: int) -> FrozenViT | None:
    """The frozen feature network by `features.kind`: a DINO ViT, or None for "mae" (the MAE
    encoder serves, `objective.MoveObjective` reads its tokens)."""
    return FEATURE_BUILDERS[model_cfg.features.kind](model_cfg, image_size)


def _dino_features(model_cfg: ModelConfig, image_size: int) -> FrozenViT:
    """The frozen DINO ViT (paper §3). The positional table keeps the checkpoint's grid (224 for
    DINO ViT-S/8); other image sizes are served by interpolation at run time."""
    cfg = model_cfg.features
    check_image_size(image_size, cfg.patch_size, "features ViT")
    what = f"features ViT ({cfg.weights})"
    if cfg.weights == RANDOM:
        vit = FrozenViT(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.layer, img_size=image_size)
        load_weights(vit, RANDOM, model_cfg.weights_cache, what)
        return vit
    state_dict = read_state_dict(resolve_weights(cfg.weights, model_cfg.weights_cache))
    grid = square_grid(state_dict.get("pos_embed"), image_size // cfg.patch_size)
    vit = FrozenViT(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.layer,
                    img_size=grid * cfg.patch_size)
    load_strict(vit, state_dict, what)
    log.info("loaded %s", what)
    return vit


FEATURE_BUILDERS = {"dino": _dino_features, "mae": lambda model_cfg, image_size: None}  # by features.kind


def segmenter_input_norm(model_cfg: ModelConfig) -> bool:
    """Whether the head starts with a new LayerNorm: `segmenter.input_norm`, where "auto" is the
    authors' rule (move-seg segmenter.py): yes on DINO's block tokens, no on the MAE encoder's
    tokens, which its own final norm has already normalised."""
    choice = model_cfg.segmenter.input_norm  # one of config.INPUT_NORMS
    if choice == "auto":
        return model_cfg.features.kind != "mae"
    return choice == "layernorm"


def build_segmenter(model_cfg: ModelConfig, in_dim: int) -> Segmenter:
    """The trainable head ([LayerNorm +] upsampling CNN, supplementary §D) on `in_dim` tokens."""
    cfg = model_cfg.segmenter
    return Segmenter(in_dim, cfg.widths, cfg.convs_per_block, input_norm=segmenter_input_norm(model_cfg))


def build_mae(model_cfg: ModelConfig, image_size: int, fused: bool = False) -> MAE:
    """The frozen MAE inpainter of MOVE's `model.mae` (models/build.py `build_mae`)."""
    return shared.build_mae(model_cfg.mae, model_cfg.weights_cache, image_size, fused=fused)


def build_discriminator(model_cfg: ModelConfig, seed: int, fused: bool = False
                        ) -> ProjectedDiscriminator | ConvDiscriminator:
    """The discriminator by `disc.kind`: the projected D (paper §2.3) or a small conv D.
    `fused` (train.fused): fused input map + colour, conv+BN-folded frozen features (kernels/)."""
    return DISCRIMINATOR_BUILDERS[model_cfg.disc.kind](model_cfg, seed, fused)


def _projected_discriminator(model_cfg: ModelConfig, seed: int, fused: bool) -> ProjectedDiscriminator:
    """Frozen EfficientNet-lite0 + random CCM/CSM, trainable heads; `disc.backbone_bn` decides
    the frozen BatchNorm statistics (config.DiscConfig)."""
    cfg = model_cfg.disc
    disc = ProjectedDiscriminator(cfg.resolution, cfg.diffaug, seed, fused=fused)
    what = f"discriminator backbone ({cfg.weights})"
    if cfg.weights == RANDOM:
        load_weights(disc, RANDOM, model_cfg.weights_cache, what)
    else:
        state_dict = read_state_dict(resolve_weights(cfg.weights, model_cfg.weights_cache))
        disc.features.load_backbone(state_dict, what)
        log.info("loaded %s", what)
    if cfg.backbone_bn == "zero_image":
        disc.features.zero_image_pass()  # once, here: checkpoints carry the moved statistics
    if fused:
        disc.fold_features()  # the folded copy must follow the loaded weights and statistics
    return disc


def _conv_discriminator(model_cfg: ModelConfig, seed: int, fused: bool) -> ConvDiscriminator:
    """A small trainable conv D that needs no pretrained weights (offline runs); no fused path."""
    return ConvDiscriminator(model_cfg.disc.conv_widths, model_cfg.disc.diffaug)


DISCRIMINATOR_BUILDERS = {"projected": _projected_discriminator, "conv": _conv_discriminator}  # by disc.kind

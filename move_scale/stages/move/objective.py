"""The MOVE objective (paper §2, eq. 1-8): forward pass, composites and the losses of both phases.

`MoveObjective(settings, features=..., segmenter=..., mae=..., discriminator=...)` holds the
networks and the `objective` config section (ObjectiveConfig: the switches of the Table 5
ablations, each with its rule); `build_objective(cfg)` also builds the networks from a full Config.

Cost discipline (see DESIGN.md): the frozen MAE encoder runs at most twice per forward, once on x
(serving AE(x), the inpainting, and the segmenter's tokens when features are the MAE encoder's)
and once on shift(x) (serving x̌_δ = AE(shift(x))). Frozen work runs under no_grad (inference_mode
with `fused`); only the inpainting decoder pass, which carries the gradient to the mask through the
tile mask, does not. `fused` (train.fused) routes the compose chain through compose_ops.py;
fused=False is the eager reference, compose.py itself.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from move_scale.config.tree import check_section
from move_scale.stages.move import compose
from move_scale.stages.move.build import (
    build_discriminator,
    build_features,
    build_mae,
    build_segmenter,
)
from move_scale.stages.move.compose_ops import ComposeOps
from move_scale.stages.move.config import ObjectiveConfig
from move_scale.stages.move.losses import (
    discriminator_hinge_loss,
    lambda_bin_at,
    mask_losses,
    segmenter_adversarial_loss,
    segmenter_total_loss,
)

AUTOENCODED_KINDS = compose.kinds_needing("autoencoded")  # need x̌
SHIFTED_KINDS = compose.kinds_needing("autoencoded_shifted")  # need x̌_δ
BACKGROUND_KINDS = compose.kinds_needing("inpainted_background")  # need b̂


@dataclass
class Composition:
    """Everything one forward produces; all images (B, 3, H, W), masks (B, 1, H, W)."""

    image: Tensor  # x
    shifts: Tensor  # (B, 2) int64, (dy, dx)
    mask: Tensor  # m
    mask_shifted: Tensor  # m_δ
    tile_mask: Tensor  # m̂ (B, N), as fed to the inpainter (hardened in that ablation)
    autoencoded: Tensor | None  # x̌ = AE(x), or x with the MSE inpainter
    autoencoded_shifted: Tensor | None  # x̌_δ = AE(shift(x)), or shift(x) with the MSE inpainter
    inpainted_background: Tensor | None  # b̂

    def input_for(self, kind: str) -> Tensor:
        """The D input of `kind` (compose.DISCRIMINATOR_INPUTS: the parts are this object's fields)."""
        return compose.discriminator_input(kind, vars(self))


class MoveObjective:
    """The networks of MOVE plus its settings; computes both phases' losses (as nanoGPT's
    `GPT(config)`, the settings object is taken whole).

    settings: the `objective` section (ObjectiveConfig), its rules checked here as at config load.
    features: frozen ViT (tokens (B, N, C)) or None to read the MAE encoder's tokens (ablation).
    segmenter, discriminator: trainable (may be DDP-wrapped by the caller); mae: frozen inpainter.
    """

    def __init__(self, settings: ObjectiveConfig = ObjectiveConfig(), *, features: nn.Module | None,
                 segmenter: nn.Module, mae: nn.Module, discriminator: nn.Module, fused: bool = False) -> None:
        check_section(settings, "objective")  # a hand-made dataclasses.replace(...) is checked too
        self.settings = settings
        self.features, self.segmenter, self.mae, self.discriminator = features, segmenter, mae, discriminator
        self.ops = ComposeOps(fused)  # fused=False: compose.py itself, the reference

    # ------------------------------------------------------------------ modes and devices

    def train_modes(self) -> None:
        """Trainable parts in train mode (segmenter BatchNorm, D heads); frozen parts in eval.

        As in the authors' code both stay in train mode in both phases: the D step's no-grad
        segmenter pass uses (and updates) batch statistics, the segmenter step's D pass too.
        """
        self.segmenter.train()
        self.discriminator.train()  # its frozen feature network keeps itself in eval
        self.mae.eval()
        if self.features is not None:
            self.features.eval()

    def to(self, device: torch.device | str) -> MoveObjective:
        for net in (self.features, self.segmenter, self.mae, self.discriminator):
            if net is not None:
                net.to(device)
        return self

    # ------------------------------------------------------------------ forward

    def compose(self, images: Tensor, generator: torch.Generator, kinds: Sequence[str],
                background: Tensor | None = None) -> Composition:
        """Mask, shift, tile mask, autoencodings and inpainted background for the D inputs `kinds`.

        images (B, 3, H, W) ImageNet-normalised; `background` (B, 3, H, W) only with
        true_background. Runs under the caller's grad mode except for the frozen passes.
        """
        batch, _, height, width = images.shape
        settings = self.settings
        needs_ae = any(k in AUTOENCODED_KINDS for k in kinds)
        needs_ae_shifted = any(k in SHIFTED_KINDS for k in kinds)
        needs_background = any(k in BACKGROUND_KINDS for k in kinds)
        # The diagnostic keeps the MAE's output outside the tiles with the GAN inpainter (see _background)
        decodes_background = needs_background and (settings.inpainter == "gan" or not settings.true_background)
        latent = None  # encoder pass 1, on x
        if self.features is None or decodes_background or (needs_ae and settings.inpainter == "gan"):
            latent = self.ops.frozen(self.mae.encode, images)  # (B, 1+N, D)
        mask = self._predict_mask(images, latent)  # (B, 1, H, W)
        shifts = compose.sample_shifts(batch, height, width, settings.shift_range, generator, images.device)
        mask_shifted, tiles = self.ops.mask_chain(mask, shifts, self.mae.patch_size)  # (B,1,H,W), (B,N)
        if settings.hard_tile_mask:
            tiles = compose.harden_tile_mask(tiles)
        autoencoded, autoencoded_shifted = self._autoencodings(
            images, latent, shifts, needs_ae, needs_ae_shifted
        )
        inpainted = None
        if needs_background:
            inpainted = self._background(images, latent, tiles, background)
        return Composition(
            images, shifts, mask, mask_shifted, tiles, autoencoded, autoencoded_shifted, inpainted
        )

    def _predict_mask(self, images: Tensor, latent: Tensor | None) -> Tensor:
        height, width = images.shape[-2:]
        if self.features is None:  # MAE-encoder features (ablation): reuse encoder pass 1
            patch = self.mae.patch_size
            tokens = latent[:, 1:]  # (B, N, D), CLS dropped
        else:
            patch = self.features.patch_size
            tokens = self.ops.frozen(self.features, images)  # (B, N, C)
        mask = self.segmenter(tokens, (height // patch, width // patch))  # (B, 1, H, W)
        if mask.shape[-2:] != images.shape[-2:]:
            raise ValueError(
                f"segmenter output {tuple(mask.shape[-2:])} differs from the image size {(height, width)}: "
                f"model.segmenter.widths needs log2(patch size {patch}) + 1 entries"
            )
        return mask

    def _autoencodings(self, images, latent, shifts, needs_ae, needs_ae_shifted):
        """x̌ = AE(x) from encoder pass 1 and x̌_δ = AE(shift(x)) from encoder pass 2 (no grad);
        with the MSE inpainter, x and shift(x) themselves (no encoder pass on shift(x))."""
        if self.settings.inpainter == "gan":
            return self.ops.frozen(self._mae_autoencodings, images, latent, shifts, needs_ae, needs_ae_shifted)
        with torch.no_grad():
            autoencoded = images if needs_ae else None
            autoencoded_shifted = compose.translate(images, shifts) if needs_ae_shifted else None
        return autoencoded, autoencoded_shifted

    def _mae_autoencodings(self, images, latent, shifts, needs_ae, needs_ae_shifted):
        autoencoded = autoencoded_shifted = None
        if needs_ae:
            autoencoded = self.mae.autoencode(images, latent)  # (B, 3, H, W), from encoder pass 1
        if needs_ae_shifted:
            autoencoded_shifted = self.mae.autoencode(compose.translate(images, shifts))  # pass 2
        return autoencoded, autoencoded_shifted

    def _background(self, images, latent, tiles, background):
        """b̂: the MAE inpainting from the soft tile mask (§2.2, with grad to the mask), pasted into x
        outside the tiles for the MSE inpainter.

        Diagnostic (true_background): a perfect inpainter. Inside the tiles the supplied true
        background replaces what the MAE paints; outside them b̂ keeps what the inpainter keeps
        there (x with the MSE inpainter, the MAE's decoding of the visible tokens with the GAN one),
        so that only the inpainting itself changes and a mask that leaves object parts outside its
        tiles is still caught by them.
        """
        if self.settings.true_background:
            if background is None or background.shape != images.shape:
                got = None if background is None else tuple(background.shape)
                raise ValueError(
                    f"objective.true_background needs a background batch of shape {tuple(images.shape)}, "
                    f"got {got}: load shards with bg.png and pass extra_keys=('background',) to the loader"
                )
            kept = images if self.settings.inpainter == "mse" else self.mae.inpaint(latent, tiles)
            return compose.paste_outside_tiles(kept, background.to(images.dtype), tiles, self.mae.patch_size)
        inpainted = self.mae.inpaint(latent, tiles)  # (B, 3, H, W)
        if self.settings.inpainter == "mse":
            inpainted = compose.paste_outside_tiles(images, inpainted, tiles, self.mae.patch_size)
        return inpainted

    # ------------------------------------------------------------------ the two phases

    def discriminator_loss(self, images: Tensor, generator: torch.Generator,
                           background: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """D phase (eq. 5, 8): the whole forward without grad, D on each fake and real kind.

        D sees each kind as its own batch (its BatchNorm statistics are per kind), fake kinds
        first, then real ones, as the authors' `engine.py train_one_epoch`: each train-mode call
        advances the spectral norms' power iteration once and draws its own DiffAugment factors,
        so the order decides which σ and which draw each kind gets. Returns (loss/disc/total, terms).
        """
        real, fake = self.settings.real_inputs, self.settings.fake_inputs
        kinds = fake + real
        with torch.no_grad():
            comp = self.compose(images, generator, kinds, background)
            inputs = self.ops.discriminator_inputs(comp, kinds)
        logits = {kind: self.discriminator(inputs[kind], augment=True, generator=generator) for kind in kinds}
        terms = discriminator_hinge_loss(
            {k: logits[k] for k in real}, {k: logits[k] for k in fake}
        )
        total = terms["loss/disc/total"]
        terms = {name: value.detach() for name, value in terms.items()}
        for kind, value in logits.items():
            terms[f"disc/logit/{kind}"] = value.detach().float().mean()
        terms["mask/area"] = comp.mask.detach().float().mean()
        return total, terms

    def segmenter_loss(self, images: Tensor, generator: torch.Generator, segmenter_step: int,
                       background: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Segmenter phase (eq. 6, 7): L_advS on x̂_δ + λ_min·L_min + λ_bin(step)·L_bin on m_δ.

        Gradient reaches the mask through the frozen D features and the MAE decoder.
        `segmenter_step` counts segmenter steps done before this one (drives the λ_bin ramp).
        """
        comp = self.compose(images, generator, ("composite_shifted",), background)
        composite_shifted = self.ops.discriminator_inputs(comp, ("composite_shifted",))["composite_shifted"]
        logits = self.discriminator(composite_shifted, augment=True, generator=generator)
        adversarial = segmenter_adversarial_loss(logits)
        settings = self.settings
        mask_terms = mask_losses(
            comp.mask_shifted, patch_size=self.mae.patch_size, theta_min=settings.theta_min,
            scales=settings.mask_loss_scales, min_loss=settings.min_loss, bin_loss=settings.bin_loss,
        )
        lambda_bin = lambda_bin_at(segmenter_step, settings.lambda_bin, settings.bin_ramp_steps)
        total = segmenter_total_loss(adversarial, mask_terms, settings.lambda_min, lambda_bin)
        terms = {"loss/seg/adv": adversarial.detach()}
        terms.update({name: value.detach() for name, value in mask_terms.items()})
        terms["loss/seg/total"] = total.detach()
        terms["mask/area"] = comp.mask.detach().float().mean()
        terms["mask/tile_area"] = comp.tile_mask.detach().float().mean()
        terms["lambda_bin"] = lambda_bin
        return total, terms


def build_objective(cfg) -> MoveObjective:
    """The networks (build.py, weights from model.weights_cache) and the objective, on the
    CPU, from a full Config: features | None, segmenter, MAE and D (seeded by cfg.seed)."""
    features = build_features(cfg.model, cfg.data.image_size)
    mae = build_mae(cfg.model, cfg.data.image_size, fused=cfg.train.fused)
    in_dim = features.embed_dim if features is not None else cfg.model.mae.embed_dim
    segmenter = build_segmenter(cfg.model, in_dim)
    discriminator = build_discriminator(cfg.model, cfg.seed, fused=cfg.train.fused)
    return MoveObjective(cfg.objective, features=features, segmenter=segmenter, mae=mae,
                         discriminator=discriminator, fused=cfg.train.fused)

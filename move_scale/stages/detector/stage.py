"""The class-agnostic detector on the harness: LOST's CAD training (valeoai/LOST
`tools/train_net_for_LOST_CAD.py` on detectron2 v0.5's DefaultTrainer) as one SGD step per batch.

The detector goes through `accelerator.prepare` (DDP on several processes; its BatchNorms gather
the statistics of every process's batch, norm.py). Each step sets the learning rate of its position
(solver.py: warm-up, steps, linear scaling with the total batch), so a resumed run continues the
schedule where it stopped; RoI and anchor sampling draw from each image's own generator (seeded by
the data stream), so a run replays exactly, whatever the number of processes. PreciseBN
(detectron2's hook, 200 iterations after the last step) is done over the last
`solver.precise_bn_steps` training batches instead: their batch statistics are averaged into the
BatchNorm running statistics (norm.py), with no extra pass over the data. A checkpoint holds the
detector and its SGD state; the run leaves `detector.pt` (export.py), which
`python -m move_scale.detect` evaluates and runs on any images.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from move_scale.harness.stage import Stage
from move_scale.harness.steps import (
    autocast_context,
    backward,
    check_finite,
    effective_precision,
    to_floats,
)
from move_scale.models.weights import RANDOM, REGISTRY, check_weight_file
from move_scale.stages.detector.config import DetectorConfig
from move_scale.stages.detector.export import save_detector
from move_scale.stages.detector.gallery import save_detection_gallery
from move_scale.stages.detector.model import Detector, build_detector
from move_scale.stages.detector.norm import batch_norms
from move_scale.stages.detector.solver import lr_at, make_sgd
from move_scale.stages.detector.transform import DetectionTransform

log = logging.getLogger("move_scale.train")

REMEDY = "a lower solver.lr, more solver.warmup_iters or train.precision=fp32"  # for NonFiniteLossError
LOSSES = {"loss_rpn_cls": "loss/rpn_cls", "loss_rpn_loc": "loss/rpn_loc", "loss_cls": "loss/cls",
          "loss_box_reg": "loss/box_reg"}  # detectron2's names -> the metrics
GALLERY_ROWS = 4


class DetectorStage(Stage):
    NAME, CONFIG, EXPORT = "detector", DetectorConfig, "detector.pt"
    PHASES = {"detector": "step"}
    LOG_KEYS = ("loss/total", "loss/rpn_cls", "loss/rpn_loc", "loss/cls", "loss/box_reg")
    STATE_KEYS = ("detector", "optim_detector")

    def __init__(self, cfg: DetectorConfig, net: Detector, optimizer: torch.optim.Optimizer, total_steps: int):
        self.cfg, self.net, self.optimizer, self.total_steps = cfg, net, optimizer, total_steps
        self.accelerator, self.precision = None, cfg.train.precision
        self.total_batch = cfg.data.batch_size  # times the processes, once prepared

    @classmethod
    def check(cls, cfg: DetectorConfig) -> None:
        check_weight_file("model.backbone.weights", cfg.model.backbone.weights,
                          f"a weight name ({', '.join(REGISTRY)}; LOST's is dino_resnet50), a weight file in "
                          f"torchvision's resnet layout, or {RANDOM!r}")

    @classmethod
    def sample_transform(cls, cfg: DetectorConfig) -> DetectionTransform:
        return DetectionTransform(cfg.input.boxes, tuple(cfg.input.min_size_train), cfg.input.max_size_train,
                                  cfg.data.hflip)

    @classmethod
    def build(cls, cfg: DetectorConfig, device: torch.device, rank: int, total_steps: int) -> DetectorStage:
        torch.manual_seed(cfg.seed)  # the heads' initialisation, the same on every rank
        net = build_detector(cfg.model).to(device).train()
        return cls(cfg, net, make_sgd(net, cfg.solver), total_steps)

    def prepare(self, accelerator) -> None:
        self.net, self.optimizer = accelerator.prepare(self.net, self.optimizer)
        self.accelerator = accelerator
        self.precision = effective_precision(accelerator.device, self.cfg.train.precision)
        self.total_batch = self.cfg.data.batch_size * accelerator.num_processes
        solver = self.cfg.solver
        per_step = solver.reference_batch / self.total_batch  # steps of this run per reference iteration
        log.info("detector: %d images a step; lr %.4g (solver.lr %.4g at %d images, scaled linearly), "
                 "warm-up %d steps, ×%g at steps %s; PreciseBN over the last %d steps", self.total_batch,
                 solver.lr * self.total_batch / solver.reference_batch, solver.lr, solver.reference_batch,
                 math.ceil(solver.warmup_iters * per_step), solver.gamma,
                 [math.ceil(s * per_step) for s in solver.steps], min(solver.precise_bn_steps, self.total_steps))

    def step(self, batch: dict, step: int) -> tuple[str, dict[str, float]]:
        lr = lr_at(step, self.total_batch, self.cfg.solver)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._precise_batch_norm(step)
        device = self.accelerator.device if self.accelerator is not None else torch.device("cpu")
        images = [image.to(device, non_blocking=True) for image in batch["image"]]  # (3, h, w) uint8 each
        targets = [{"boxes": boxes, "seed": seed} for boxes, seed in zip(batch["boxes"], batch["seed"])]
        with autocast_context(device, self.precision):
            losses = self.net(images, targets)
        total = sum(losses.values())
        metrics = to_floats({"loss/total": total, **{LOSSES[k]: v for k, v in losses.items()}})
        check_finite(metrics, "detector", step, REMEDY)
        self.optimizer.zero_grad(set_to_none=True)
        backward(total, self.accelerator)
        self.optimizer.step()
        return "detector", metrics

    def _precise_batch_norm(self, step: int) -> None:
        """From `precise_bn_steps` before the end, running statistics become the plain average of the
        batches' (momentum None); they restart at the first of those steps."""
        window = self.cfg.solver.precise_bn_steps
        start = max(0, self.total_steps - window)
        if not window or step < start:
            return
        for norm in batch_norms(self._model()):
            if step == start:
                norm.reset_running_stats()
            norm.momentum = None

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"detector": self.optimizer}

    def trainable(self) -> list[nn.Module]:
        return [self.net]

    def _model(self) -> Detector:
        return self.accelerator.unwrap_model(self.net) if self.accelerator is not None else self.net

    def state_dict(self) -> dict:
        return {"detector": self._model().state_dict(), "optim_detector": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict, cfg: DetectorConfig) -> None:
        self._model().load_state_dict(state["detector"])
        self.optimizer.load_state_dict(state["optim_detector"])
        solver = cfg.solver
        others, norms = self.optimizer.param_groups  # make_sgd's order
        others["weight_decay"], norms["weight_decay"] = solver.weight_decay, solver.weight_decay_norm
        for group in self.optimizer.param_groups:
            group["momentum"] = solver.momentum

    def draw_gallery(self, batch: dict, path: Path, step: int) -> Path:
        model = self._model()
        device = next(model.parameters()).device
        images, boxes = batch["image"][:GALLERY_ROWS], batch["boxes"][:GALLERY_ROWS]
        model.eval()
        try:
            with torch.no_grad():
                found = model([image.to(device) for image in images])
        finally:
            model.train()
        found = [{k: v.float().cpu() for k, v in d.items()} for d in found]
        return save_detection_gallery(path, images, boxes, found)

    def export(self, path: Path) -> Path:
        return save_detector(path, self._model(), self.cfg.model, self.cfg.input)

"""Export the segmenter of a training checkpoint for inference (`evaluate`, `predict`).

    python -m move_scale.export runs/duts                      # newest checkpoint → runs/duts/segmenter.pt
    python -m move_scale.export runs/duts/ckpt-00004000.pt     # → runs/duts/segmenter-00004000.pt
    move-export runs/duts --out /models/duts_seg.pt

Training writes run_dir/segmenter.pt when it finishes; this command makes the same file from any
training checkpoint: a stopped run, an earlier step, or when the end-of-run export could not be
written. The features network is rebuilt from the checkpoint's config first, so a weight file that
cannot be found or does not fit stops the export before anything is written, as it would stop
`evaluate` and `predict`; networks with random weights are rebuilt from the run's seed and embedded.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from move_scale.core.errors import UserError, report
from move_scale.core.paths import check_output_file, save_or_keep
from move_scale.harness.checkpoint import (
    CheckpointError,
    TrainingCheckpoint,
    load_checkpoint,
    load_latest_checkpoint,
    stored_config,
)
from move_scale.stages.move.config import Config
from move_scale.stages.move.segmenter_file import (
    EXPORT_FORMAT,
    export_segmenter,
    read_segmenter_export,
    segmenter_with_weights,
)
from move_scale.stages.move.stage import MoveStage

log = logging.getLogger("move_scale.export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m move_scale.export", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run_dir (its newest complete checkpoint) or a ckpt-*.pt file")
    parser.add_argument("--out", default=None,
                        help="where to write the export (default: RUN_DIR/segmenter.pt, or "
                             "segmenter-<step>.pt beside a checkpoint file)")
    parser.add_argument("--weights-cache", default=None,
                        help="where named feature weights live (default: the run's model.weights_cache)")
    return parser


def _read_source(source: str) -> tuple[Path, TrainingCheckpoint]:
    path = Path(source).expanduser()
    if path.is_dir():
        found = load_latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path} holds no training checkpoint (ckpt-*.pt); give a run_dir "
                                  f"of a run that saved one, or a checkpoint file")
        return found
    if not path.is_file():
        raise CheckpointError(f"{source}: no such run_dir or checkpoint file")
    try:
        return path, load_checkpoint(path)
    except CheckpointError:
        if _format_of(path) == EXPORT_FORMAT:
            raise CheckpointError(f"{path} is already a segmenter export ({EXPORT_FORMAT}); "
                                  f"evaluate and predict take it as it is") from None
        raise


def _format_of(path: Path) -> str | None:
    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file: load_checkpoint's error says so
        return None
    return found.get("format") if isinstance(found, dict) else None


def _default_out(source: str, path: Path, step: int) -> Path:
    if Path(source).expanduser().is_dir():
        return path.parent / "segmenter.pt"
    return path.parent / f"segmenter-{step:08d}.pt"


def _features_network(cfg: Config) -> torch.nn.Module:
    """The features network as training built it: the same seed and the same first builds as
    `objective.build_objective` (features, then the MAE), so random frozen weights come out
    identical; named weights are resolved and loaded strictly."""
    from move_scale.stages.move.build import build_features, build_mae

    torch.manual_seed(cfg.seed)
    features = build_features(cfg.model, cfg.data.image_size)
    return features if features is not None else build_mae(cfg.model, cfg.data.image_size, fused=cfg.train.fused)


def export_checkpoint(source: str, out: str | None = None, weights_cache: str | None = None) -> Path:
    """Write the segmenter export of `source` (run_dir or checkpoint); returns its path."""
    path, checkpoint = _read_source(source)
    target = check_output_file(out or _default_out(source, path, checkpoint.state.step), "--out",
                               example="segmenter.pt")
    checkpoint.expect_stage(MoveStage.NAME, MoveStage.STATE_KEYS, path)
    cfg = stored_config(path, checkpoint, Config, MoveStage.upgrade_config,
                        [f"model.weights_cache={weights_cache}"] if weights_cache is not None else [])
    features_net = _features_network(cfg)
    segmenter = segmenter_with_weights(cfg.model, checkpoint.stage_state["segmenter"], str(path))
    written = save_or_keep(
        lambda p: export_segmenter(p, segmenter, cfg.model.features, cfg.model.segmenter,
                                   cfg.data.image_size, mae_cfg=cfg.model.mae, features_net=features_net),
        target, "the segmenter export")
    read_segmenter_export(written)  # reads back as evaluate and predict will
    log.info("exported the segmenter of %s (step %d) to %s", path, checkpoint.state.step, written)
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        written = export_checkpoint(args.source, args.out, args.weights_cache)
    except UserError as err:
        return report(err)
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fingerprint of training and evaluation: one JSON that a refactor which changes no number leaves
identical (issue 18: "bit-identical weights before and after").

    python benchmarks/fingerprint.py --out /tmp/fp-new.json                     # this tree
    python benchmarks/fingerprint.py --tree /tmp/base --out /tmp/fp-old.json    # another checkout
    diff /tmp/fp-old.json /tmp/fp-new.json                                      # empty: unchanged

Only the commands are run (`python -m move_scale.*` with PYTHONPATH = the tree, cwd = the tree),
so this one file measures any version of the tree. One CPU process, one thread. Recorded:
- sha256 of each part of the final checkpoint (weights, optimizer states, counters, data position,
  RNG states) of five debug-config runs: default; eager kernels (train.fused=false); the ablation
  switches with a conv D and MAE features; the true-background diagnostic; and 4 + 4 steps with a
  resume, which must equal the default run (the exit status says whether it does);
- sha256 of the exports (the one training writes, and `move_scale.export` of the step-4 checkpoint)
  and of a 3-step MAE pretraining;
- every figure of eval.json for saliency and CorLoc from shards, an image folder, a VOC root,
  VOC XML, COCO JSON (paper and float protocols, bilateral, MAE features);
- the manifests (tar sha256s, member keys) of the shards `move-shard synth` and `make` write;
- sha256 of each file predict writes (masks, overlays, boxes.json, coco_*.json);
- with --pipelines also the shrunk demo and a shrunk benchmarks/synthetic.py (the table without
  times and paths).
The fixtures hold no VOC <part> boxes, duplicate stems, or .ppm/.pgm/.jfif files (cases issue 18
changes on purpose). Takes about 3 minutes on 2 CPU cores, 4 with --pipelines.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parents[1]
CONFIG = "configs/debug.yaml"  # a file before the configs move, a bundled name after it
VARIANTS = {
    "default": [],
    "eager": ["train.fused=false"],
    "ablations": ["train.fused=false", "model.disc.kind=conv", "model.features.kind=mae",
                  "model.segmenter.widths=[16,16,16,16,16]", "objective.inpainter=mse",
                  "objective.hard_tile_mask=true", "objective.real_inputs=[input,composite_noshift]",
                  "objective.mask_loss_scales=[full,max]"],
    "true_background": ["objective.true_background=true"],
}
CHECKPOINT_PARTS = ("step", "disc_steps", "seg_steps", "segmenter", "discriminator", "optim_seg", "optim_disc",
                    "data")
# The global python and numpy RNG states a checkpoint carries are left out: the library never seeds
# them (training draws from torch generators only), so they differ between any two processes.
RNG_PARTS = ("torch", "cuda", "generators")
# Keys of eval.json that name this run's temporary paths; every other key is recorded.
EVAL_PATH_KEYS = ("data", "gt", "checkpoint")
# stem -> (height, width) of the images of the folder fixtures (odd sizes, png and jpg)
SIZES = {"a": (48, 64), "b": (56, 80), "c": (72, 40), "d": (64, 64), "e": (48, 48), "f": (90, 50)}
# per image, the width share of a third ground-truth box, around CorLoc's IoU threshold of 0.5 (an
# untrained debug segmenter marks whole images, so these decide its hits)
WIDE_BOX = (0.35, 0.48, 0.5, 0.52, 0.7, 1.0)


def digest(node, h=None, prefix=""):
    """sha256 over a nest of dicts/lists/tensors/values, in a fixed order."""
    top = h is None
    h = h or hashlib.sha256()
    if isinstance(node, dict):
        for key in sorted(node, key=str):
            digest(node[key], h, f"{prefix}.{key}")
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            digest(value, h, f"{prefix}[{index}]")
    elif isinstance(node, torch.Tensor):
        t = node.detach().cpu().contiguous()
        h.update(f"{prefix}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(f"{prefix}={node!r}".encode())
    return h.hexdigest() if top else None


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_digests(path: Path) -> dict:
    ckpt = load(path)
    out = {part: digest(ckpt[part]) for part in CHECKPOINT_PARTS}
    out["rng"] = digest([{k: rank[k] for k in RNG_PARTS} for rank in ckpt["rng"]])
    return out


def file_digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Runner:
    """Runs `python ARGS` in the tree under test with one CPU thread; stops at the first failure."""

    def __init__(self, tree: Path):
        self.tree = tree
        self.env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                        ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0")
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.seconds: dict[str, float] = {}

    def __call__(self, *args: str) -> str:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, *args], cwd=self.tree, env=self.env,
                              capture_output=True, text=True, timeout=900)
        name = args[1] if args[0] == "-m" else Path(args[0]).name
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"failed ({done.returncode}): {' '.join(args)}\n{done.stderr[-3000:]}")
        return done.stdout


def write_folders(root: Path) -> None:
    """Images (png/jpg, odd sizes) with masks, a VOC root with XML of <object>s, COCO JSON with a
    crowd box and fractional boxes; a fixed numpy seed."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "voc/JPEGImages", "voc/Annotations", "voc/ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    obj = ("<object><name>x</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax>"
           "</bndbox></object>")
    for index, (stem, (h, w)) in enumerate(SIZES.items(), start=1):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        y1, x1 = y0 + h // 3, x0 + w // 3
        pixels[y0:y1, x0:x1] = (200, 40, 40)
        mask = np.zeros((h, w), np.uint8)
        mask[y0:y1, x0:x1] = 255
        suffix = ".jpg" if index % 2 == 0 else ".png"
        Image.fromarray(pixels).save(root / "images" / f"{stem}{suffix}", quality=95)
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
        Image.fromarray(pixels).save(root / "voc" / "JPEGImages" / f"{stem}.jpg", quality=95)
        wide = round(w * WIDE_BOX[index - 1])  # a full-height box: IoU with a whole-image box = WIDE_BOX
        boxes = [(x0 + 1, y0 + 1, x1, y1), (1, 1, w // 4, h // 4), (1, 1, wide, h)]
        (root / "voc" / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename>{''.join(obj.format(*b) for b in boxes)}</annotation>")
        coco["images"].append({"id": index, "file_name": f"{stem}{suffix}", "width": w, "height": h})
        coco["annotations"] += [
            {"id": 2 * index, "image_id": index, "bbox": [x0 + 0.4, y0 + 0.6, x1 - x0 - 0.3, y1 - y0],
             "iscrowd": 0, "category_id": 1},
            {"id": 10 + 2 * index, "image_id": index, "bbox": [0, 0, wide - 0.5, h], "iscrowd": 0, "category_id": 1},
            {"id": 2 * index + 1, "image_id": index, "bbox": [0, 0, w, h], "iscrowd": 1, "category_id": 1}]
    (root / "voc" / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(SIZES) + "\n")
    (root / "coco.json").write_text(json.dumps(coco))


def train(run, work: Path, train_shards: str) -> dict:
    out = {}
    for name, extra in [*VARIANTS.items(), ("resumed", None)]:
        run_dir = work / "runs" / name
        common = ["-m", "move_scale.train", "--threads", "1", "--config", CONFIG,
                  f"data.train={train_shards}", f"run_dir={run_dir}", "data.workers=0"]
        if extra is None:  # 4 steps, then the same command to 8: must equal "default"
            run(*common, "train.max_steps=4")
            extra = []
        run(*common, "train.max_steps=8", *extra)
        out[name] = {"checkpoint": checkpoint_digests(run_dir / "ckpt-00000008.pt"),
                     "export": {k: digest(v) for k, v in load(run_dir / "segmenter.pt").items()}}
    exported = work / "segmenter-4.pt"
    run("-m", "move_scale.export", str(work / "runs" / "default" / "ckpt-00000004.pt"), "--out", str(exported))
    out["export_command_step4"] = {k: digest(v) for k, v in load(exported).items()}
    return out


def eval_cases(work: Path, val_shards: str) -> dict[str, list[str]]:
    folders, shards = work / "folders", work / "shards"
    images, masks, voc = str(folders / "images"), str(folders / "masks"), folders / "voc"
    return {
        "saliency_shards": ["--data", val_shards, "--task", "saliency"],
        "saliency_shards_float": ["--data", val_shards, "--task", "saliency", "--mask-protocol", "float"],
        "saliency_folder": ["--data", images, "--gt", masks, "--task", "saliency", "--batch-size", "2"],
        "saliency_folder_float": ["--data", images, "--gt", masks, "--task", "saliency", "--mask-protocol", "float"],
        "saliency_folder_bilateral": ["--data", images, "--gt", masks, "--task", "saliency", "--bilateral"],
        "saliency_folder_shards": ["--data", str(shards / "folder" / "manifest.json"), "--task", "saliency"],
        "corloc_voc_root": ["--data", str(voc), "--task", "corloc"],
        "corloc_voc_xml": ["--data", str(voc / "JPEGImages"), "--gt", str(voc / "Annotations"), "--task", "corloc"],
        "corloc_coco": ["--data", images, "--gt", str(folders / "coco.json"), "--task", "corloc"],
        "corloc_voc_shards": ["--data", str(shards / "voc" / "manifest.json"), "--task", "corloc"],
        "saliency_mae_features": ["--data", val_shards, "--task", "saliency",
                                  "--checkpoint", str(work / "runs" / "ablations" / "segmenter.pt")],
    }


def evaluate(run, work: Path, val_shards: str) -> dict:
    folders, seg = work / "folders", str(work / "runs" / "default" / "segmenter.pt")
    run("-m", "move_scale.shard", "make", str(folders / "images"), str(work / "shards" / "folder"),
        "--masks", str(folders / "masks"), "--workers", "0", "--no-progress")
    run("-m", "move_scale.shard", "make", str(folders / "voc" / "JPEGImages"), str(work / "shards" / "voc"),
        "--boxes", str(folders / "voc" / "Annotations"), "--workers", "0", "--no-progress")
    out = {}
    for name, args in eval_cases(work, val_shards).items():
        result = work / "eval" / f"{name}.json"
        checkpoint = [] if "--checkpoint" in args else ["--checkpoint", seg]
        run("-m", "move_scale.evaluate", *checkpoint, *args, "--short-side", "64", "--device", "cpu",
            "--no-progress", "--out", str(result))
        report = json.loads(result.read_text())
        out[name] = {k: v for k, v in report.items() if k not in EVAL_PATH_KEYS}
    predicted = work / "predict"
    run("-m", "move_scale.predict", "--checkpoint", seg, str(folders / "images"), str(predicted),
        "--short-side", "64", "--device", "cpu", "--no-progress", "--overlay")
    out["predict"] = file_digests(predicted)
    return out


def manifests(work: Path) -> dict:
    """Each manifest the shard writer made (sha256 of every tar, sample counts, member keys), less
    its options (paths and a digest of them)."""
    shards = work / "shards"
    return {str(m.parent.relative_to(shards)): {k: v for k, v in json.loads(m.read_text()).items() if k != "options"}
            for m in sorted(shards.rglob("manifest.json"))}


def pretrain(run, work: Path, train_shards: str) -> dict:
    """3 steps of 4 images with the MAE of configs/debug.yaml and the default recipe (before issue 22:
    `--config configs/debug.yaml --out X --steps 3 --batch-size 4`; after it the MAE stage's own
    config, whose run leaves RUN_DIR/mae.pth)."""
    run_dir = work / "runs" / "mae"
    run("-m", "move_scale.pretrain_mae", "--config", "configs/mae_debug.yaml", "--threads", "1",
        f"data.train={train_shards}", f"run_dir={run_dir}", "train.max_steps=3", "train.log_every=1",
        "train.ckpt_every_steps=0", "train.gallery_every=0")
    return {k: digest(v) for k, v in load(run_dir / "mae.pth").items()}


def pipelines(run, work: Path) -> dict:
    small = ["data.batch_size=4", "data.shuffle_buffer=8", "train.max_steps=4", "train.log_every=2",
             "train.gallery_every=2", "train.ckpt_every_steps=4"]
    demo = work / "demo"
    run("-m", "move_scale.demo", "--out", str(demo), "--train", "24", "--val", "6", "--mae-steps", "3", *small)
    demo_eval = json.loads((demo / "eval.json").read_text())
    table = run(str(Path("benchmarks") / "synthetic.py"), "--config", "configs/demo.yaml", "--out",
                str(work / "bench"), "--train", "24", "--val", "6", "--mae-steps", "3", "--mae-batch-size", "4",
                "--threads", "1", *small)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "time:" not in line
            and "torch threads" not in line and "| config |" not in line]
    return {"demo_checkpoint": checkpoint_digests(demo / "move" / "ckpt-00000004.pt"),
            "demo_mae": {k: digest(v) for k, v in load(demo / "mae" / "mae.pth").items()},
            "demo_eval": {k: v for k, v in demo_eval.items() if k not in EVAL_PATH_KEYS},
            "benchmark_checkpoint": checkpoint_digests(work / "bench" / "move" / "ckpt-00000004.pt"),
            "benchmark_table": rows}


def fingerprint(tree: Path, work: Path, with_pipelines: bool) -> tuple[dict, dict]:
    run = Runner(tree)
    run("-m", "move_scale.shard", "synth", str(work / "shards" / "synthetic"), "--train", "48",
        "--val", "12", "--size", "64", "--seed", "3", "--samples-per-shard", "12")
    train_shards = str(work / "shards" / "synthetic" / "train" / "manifest.json")
    val_shards = str(work / "shards" / "synthetic" / "val" / "manifest.json")
    write_folders(work / "folders")
    result = {"train": train(run, work, train_shards), "mae": pretrain(run, work, train_shards),
              "eval": evaluate(run, work, val_shards), "shards": manifests(work)}
    if with_pipelines:
        result["pipelines"] = pipelines(run, work)
    return result, run.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default=str(HERE), help="the checkout to measure (default: this one)")
    parser.add_argument("--out", required=True, help="write the fingerprint JSON here")
    parser.add_argument("--pipelines", action="store_true", help="also the shrunk demo and synthetic benchmark")
    parser.add_argument("--keep", metavar="DIR", help="keep the runs, shards and outputs in DIR (new or empty)")
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    start = time.perf_counter()
    work = Path(args.keep or tempfile.mkdtemp(prefix="fingerprint-")).resolve()
    if work.exists() and any(work.iterdir()) and args.keep:
        raise SystemExit(f"--keep {work}: the folder is not empty; name a new or empty one")
    try:
        result, seconds = fingerprint(tree, work, args.pipelines)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=1, sort_keys=True).replace(str(work), "$WORK")  # no temporary paths
    Path(args.out).write_text(text + "\n")
    same = result["train"]["resumed"] == result["train"]["default"]
    print(f"wrote {args.out} ({tree}, {time.perf_counter() - start:.0f} s; per command: "
          + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()) + ")")
    print("resume equals the straight run:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""The detector's evaluation against the published procedures, on fixed detections: CorLoc as LOST
scores a detector (valeoai/LOST `main_corloc_evaluation.py --type_pred detectron`, written out here),
class-agnostic AP / AR as pycocotools gives them with useCats 0 (NVlabs/FreeSOLO
`tools/eval_cocoapi.py`), and the `detect` command end to end on a real export."""
import json
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from detectorutil import scenes, write_box_shards
from PIL import Image

from move_scale import detect
from move_scale.evaluation.coco_ap import class_agnostic_ap
from move_scale.evaluation.detection import DetectEvalRequest, detect_all, report
from move_scale.evaluation.detection_inference import Detections
from move_scale.evaluation.sources import open_eval_source
from move_scale.stages.detector.config import load_config
from move_scale.stages.detector.export import save_detector
from move_scale.stages.detector.model import build_detector

# image id: (stored (H, W), VOC objects (xmin, ymin, xmax, ymax, difficult), detections (x0, y0, x1, y1, score))
VOC = {
    "000001": ((100, 120), [(1, 1, 100, 100, 0)], [(0, 0, 100, 50, 0.9)]),  # IoU 0.5 only with the −1
    "000002": ((90, 110), [(11, 11, 60, 60, 0)], [(70, 70, 100, 90, 0.8), (10, 10, 60, 60, 0.7)]),  # best misses
    "000003": ((80, 100), [(5, 5, 50, 50, 0)], []),  # no detection: a miss
    "000004": ((70, 90), [(31, 21, 80, 60, 1)], [(30, 20, 80, 60, 0.6)]),  # a hard box is kept
    "000005": ((60, 80), [(1, 1, 20, 20, 0), (41, 21, 80, 60, 0)], [(40, 20, 79, 58, 0.95)]),  # the second box
}


class FixedPredictor:
    """Gives each image the detections VOC lists for its size (every size differs)."""

    min_size, max_size = 800, 1333

    def __init__(self, table: dict):
        self.by_size = {size: np.asarray(dets, np.float32).reshape(-1, 5) for size, _, dets in table.values()}

    def detect(self, images):
        found = [self.by_size[image.shape[:2]] for image in images]
        return [Detections(d[:, :4], d[:, 4]) for d in found]


def write_voc(root: Path) -> None:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    obj = ("<object><difficult>{4}</difficult><bndbox><xmin>{0}</xmin><ymin>{1}</ymin><xmax>{2}</xmax>"
           "<ymax>{3}</ymax></bndbox></object>")
    for stem, ((h, w), objects, _) in VOC.items():
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename>{''.join(obj.format(*o) for o in objects)}</annotation>")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(VOC) + "\n")


def lost_bbox_iou(box1, box2, eps=1e-7):
    """LOST datasets.bbox_iou (x1y1x2y2), one box against (K, 4), written out."""
    b1 = torch.as_tensor(box1)
    b2 = torch.as_tensor(box2).T
    inter = ((torch.min(b1[2], b2[2]) - torch.max(b1[0], b2[0])).clamp(0)
             * (torch.min(b1[3], b2[3]) - torch.max(b1[1], b2[1])).clamp(0))
    w1, h1 = b1[2] - b1[0], b1[3] - b1[1] + eps
    w2, h2 = b2[2] - b2[0], b2[3] - b2[1] + eps
    return inter / (w1 * h1 + w2 * h2 - inter + eps)


def lost_corloc(voc_root: Path, predictions: list[dict]) -> float:
    """main_corloc_evaluation.py --dataset VOC07 --type_pred detectron, hard boxes kept."""
    hits = []
    for stem in (voc_root / "ImageSets" / "Main" / "trainval.txt").read_text().split():
        annotation = ElementTree.parse(voc_root / "Annotations" / f"{stem}.xml").getroot()
        gt = np.asarray([[float(o.find("bndbox").findtext(k)) - (1 if k in ("xmin", "ymin") else 0)
                          for k in ("xmin", "ymin", "xmax", "ymax")] for o in annotation.iter("object")], np.float32)
        mine = [p for p in predictions if int(p["image_id"]) == int(stem)]
        if not mine:
            hits.append(0)
            continue
        best = mine[np.argsort(-np.asarray([p["score"] for p in mine]))[0]]["bbox"]
        pred = np.asarray([best[0], best[1], best[0] + best[2], best[1] + best[3]])
        hits.append(int(bool(torch.any(lost_bbox_iou(torch.from_numpy(pred), torch.from_numpy(gt)) >= 0.5))))
    return 100.0 * sum(hits) / len(hits)


def test_corloc_is_losts_on_fixed_detections_and_the_detections_file_feeds_losts_script(tmp_path):
    root = tmp_path / "VOC2007"
    write_voc(root)
    source = open_eval_source(str(root), None)  # the reader of evaluate: VOC corners − 1, hard boxes kept
    results, skipped = detect_all(FixedPredictor(VOC), source.samples, 1, False, None)
    request = DetectEvalRequest(checkpoint="fixed", data=str(root), detections_out=str(tmp_path / "dets.json"),
                                out=str(tmp_path / "eval.json"))
    metrics = report(request, source.name, results, skipped, FixedPredictor(VOC))["metrics"]
    detections = json.loads((tmp_path / "dets.json").read_text())  # COCO results, ids in trainval order
    assert metrics["images"] == 5 and metrics["corloc"] == pytest.approx(60.0)  # images 1, 4 and 5
    assert metrics["corloc"] == pytest.approx(lost_corloc(root, detections))
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == metrics


def _coco_truth() -> dict:
    return {"images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 80},
                       {"id": 9, "file_name": "b.jpg", "width": 120, "height": 90}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 18, "name": "dog"}],
            "annotations": [
                {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0},
                {"id": 2, "image_id": 7, "category_id": 18, "bbox": [55, 20, 40, 50], "area": 2000, "iscrowd": 0},
                {"id": 3, "image_id": 9, "category_id": 18, "bbox": [0, 0, 60, 60], "area": 3600, "iscrowd": 0},
                {"id": 4, "image_id": 9, "category_id": 3, "bbox": [70, 40, 40, 40], "area": 1600, "iscrowd": 1}]}


DETECTIONS = [  # as the detector gives them: one class, boxes [x, y, w, h]
    {"image_id": 7, "bbox": [12, 11, 38, 30], "score": 0.9},  # cat, IoU ~0.89
    {"image_id": 7, "bbox": [50, 25, 45, 40], "score": 0.4},  # dog, IoU ~0.64
    {"image_id": 7, "bbox": [0, 60, 20, 20], "score": 0.8},  # nothing
    {"image_id": 9, "bbox": [5, 0, 60, 55], "score": 0.7},  # dog, IoU ~0.77
    {"image_id": 9, "bbox": [72, 42, 38, 38], "score": 0.95},  # on the crowd region: ignored
]


def test_ap_and_ar_are_pycocotools_class_agnostic_figures(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth = _coco_truth()
    (tmp_path / "gt.json").write_text(json.dumps(truth))
    coco = COCO(str(tmp_path / "gt.json"))
    reference = COCOeval(coco, coco.loadRes([{**d, "category_id": 3} for d in DETECTIONS]), "bbox")
    reference.params.useCats = 0
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    names = ("ap", "ap50", "ap75", "ar1", "ar10", "ar100")
    expected = {name: 100 * reference.stats[i] for name, i in zip(names, (0, 1, 2, 6, 7, 8))}
    ours = class_agnostic_ap(truth, [{**d, "category_id": 1} for d in DETECTIONS], [7, 9])
    assert ours == pytest.approx(expected)
    # by hand: the three boxes are found at IoU 0.89, 0.73 and 0.78, i.e. at 8, 5 and 6 of the ten
    # thresholds 0.5:0.95; the box on the crowd region counts neither way
    assert ours["ar100"] == pytest.approx(100.0 * (8 + 5 + 6) / 30)
    assert 0 < ours["ap"] < ours["ap50"] <= 100 and ours["ar1"] < ours["ar10"]

    lost = COCOeval(coco, coco.loadRes([{**d, "category_id": 1} for d in DETECTIONS]), "bbox")
    lost.params.useCats = 0  # a category the ground truth lacks: pycocotools drops every detection
    lost.evaluate()
    lost.accumulate()
    lost.summarize()
    assert max(lost.stats) <= 0 and ours["ap50"] > 0
    perfect = class_agnostic_ap(truth, [{"image_id": 7, "bbox": [10, 10, 40, 30], "score": 1.0}], [7])
    assert perfect["ap"] == pytest.approx(100.0 * 51 / 101)  # precision 1 up to recall 0.5 of 101 points
    assert perfect["ar1"] == pytest.approx(50.0)


def test_coco_folder_evaluation_uses_the_files_ids_and_crowd_regions(tmp_path):
    truth = _coco_truth()
    (tmp_path / "images").mkdir()
    sizes = {}
    for image in truth["images"]:
        size = (image["height"], image["width"])
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(tmp_path / "images" / image["file_name"])
        sizes[image["id"]] = size
    gt = tmp_path / "instances.json"
    gt.write_text(json.dumps(truth))
    table = {str(i): (sizes[i], [], [(d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2],
                                      d["bbox"][1] + d["bbox"][3], d["score"]) for d in DETECTIONS
                                     if d["image_id"] == i]) for i in sizes}
    source = open_eval_source(str(tmp_path / "images"), str(gt))
    results, _ = detect_all(FixedPredictor(table), source.samples, 2, False, None)
    request = DetectEvalRequest(checkpoint="fixed", data=str(tmp_path / "images"), gt=str(gt),
                                detections_out=str(tmp_path / "dets.json"))
    metrics = report(request, "coco", results, 0, FixedPredictor(table))["metrics"]
    assert metrics == pytest.approx({"images": 2, "corloc": 50.0,  # image 9's best box is on the crowd: a miss
                                     **class_agnostic_ap(truth, DETECTIONS, [7, 9])})
    assert sorted({d["image_id"] for d in json.loads((tmp_path / "dets.json").read_text())}) == [7, 9]


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def export_and_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect")
    cfg = load_config("detector_debug")
    torch.manual_seed(0)
    export = save_detector(root / "detector.pt", build_detector(cfg.model).eval(), cfg.model, cfg.input)
    shards = write_box_shards(root / "val", scenes(6, 64, 2, "val"), per_shard=3)
    return root, export, shards


def test_detect_evaluate_and_predict_from_shards_and_folders(export_and_shards, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    _, export, shards = export_and_shards
    out, uri = tmp_path / "eval.json", "sqlite:///" + str(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("detect")).info.run_id
    assert detect.main(["evaluate", "--checkpoint", str(export), "--data", str(shards), "--out", str(out),
                        "--no-progress", "--device", "cpu", "--mlflow-run-id", run_id, "--tracking-uri", uri,
                        "--name", "synth"]) == 0
    results = json.loads(out.read_text())
    assert results["metrics"]["images"] == 6 and set(results["metrics"]) >= {"corloc", "ap", "ap50", "ar100"}
    assert results["min_size"] == 64 and "corloc" in capsys.readouterr().out
    logged = client.get_run(run_id).data.metrics
    assert logged["eval/synth/corloc"] == pytest.approx(results["metrics"]["corloc"]) and "eval/synth/ap50" in logged
    images = tmp_path / "photos"
    images.mkdir()
    for index in range(3):
        Image.fromarray(np.full((40 + 10 * index, 70, 3), 30 * index, np.uint8)).save(images / f"p{index}.jpg")
    assert detect.main(["predict", "--checkpoint", str(export), str(images), str(tmp_path / "out"),
                        "--no-progress", "--device", "cpu", "--batch-size", "2"]) == 0
    found = json.loads((tmp_path / "out" / "detections.json").read_text())["images"]
    assert [(r["key"], r["height"], r["id"]) for r in found] == [("p0", 40, 1), ("p1", 50, 2), ("p2", 60, 3)]
    coco = json.loads((tmp_path / "out" / "coco_results.json").read_text())
    assert len(coco) == sum(len(r["boxes"]) for r in found)
    assert all(0 <= r["boxes"][0][0] < r["boxes"][0][2] <= 70 for r in found if r["boxes"])
    assert detect.main(["predict", "--checkpoint", str(export), str(shards), str(tmp_path / "out2"),
                        "--no-progress", "--device", "cpu"]) == 0


@pytest.mark.parametrize("args, said", [
    (["evaluate", "--checkpoint", "{root}/missing.pt", "--data", "{shards}"], "checkpoint not found"),
    (["evaluate", "--checkpoint", "{shards}", "--data", "{shards}"], "is truncated or not a torch file"),
    (["evaluate", "--checkpoint", "{export}", "--data", "{root}/nowhere"], "no such folder or file"),
    (["predict", "--checkpoint", "{export}", "{root}/nowhere", "{root}/o"], "input not found"),
])
def test_detect_bad_inputs_end_in_one_line(export_and_shards, capsys, args, said):
    root, export, shards = export_and_shards
    argv = [a.format(root=root, shards=shards, export=export) for a in args] + ["--no-progress"]
    assert detect.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and said in err and "\n" not in err

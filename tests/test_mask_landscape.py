"""benchmarks/mask_landscape.py: candidate masks from the truth, D trained and scored through the objective."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from move_scale.stages.move.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def landscape():
    spec = importlib.util.spec_from_file_location("mask_landscape", ROOT / "benchmarks" / "mask_landscape.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_candidates_are_built_from_the_truth(landscape):
    val = landscape.scenes(12, 48, seed=2, split="val")
    g = torch.Generator().manual_seed(0)
    truth = val["mask"]
    masks = {name: landscape.candidate(name, val, 0.05, g) for name in landscape.CANDIDATES}
    assert all(m.shape == truth.shape for m in masks.values())
    assert torch.equal(masks["true"], truth)
    assert bool((masks["eroded 2px"] <= truth).all()) and masks["eroded 2px"].sum() < truth.sum()
    assert bool((masks["dilated 2px"] >= truth).all()) and bool((masks["dilated 4px"] >= masks["dilated 2px"]).all())
    assert bool((masks["boxes"] >= truth).all())  # every object pixel lies in its box
    assert masks["all ones"].mean() == 1 and torch.allclose(masks["haze θ_min"], torch.full_like(truth, 0.05))
    assert 0 < masks["ellipse"].mean() < 0.5


def test_a_short_landscape_scores_every_candidate_and_ranks_them(landscape):
    cfg = load_config("configs/synthetic.yaml",
                      ["model.mae.weights=random", "data.image_size=32", "data.batch_size=4"])
    train = landscape.scenes(16, 32, seed=0, split="train")
    val = landscape.scenes(8, 32, seed=0, split="val")
    scored = landscape.held_out_candidates(val, 0.05, seed=2)
    results = {"MAE": landscape.landscape(cfg, train, val, scored, steps=3, true_background=False, seed=0),
               "true": landscape.landscape(cfg, train, val, scored, steps=3, true_background=True, seed=0)}
    for scores in results.values():
        assert set(scores) == set(landscape.CANDIDATES) | {"(real x)"}
        assert all(math.isfinite(d) and math.isfinite(loss) for name, (d, loss) in scores.items() if name != "(real x)")
        # the segmenter loss is −D plus the (non-negative) mask terms; the uniform haze at θ_min
        # pays λ_bin·L_bin on every pixel, more than the true (binary) mask
        mask_terms = {name: loss + d for name, (d, loss) in scores.items() if name != "(real x)"}
        assert min(mask_terms.values()) > -1e-5
        assert mask_terms["haze θ_min"] > cfg.objective.lambda_bin * 0.04
        assert mask_terms["true"] < mask_terms["haze θ_min"]
    # the perfect inpainter changes what D sees, so its verdicts differ from the MAE's
    assert results["MAE"]["dilated 4px"] != results["true"]["dilated 4px"]
    table = landscape.format_table(val, scored, results).splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith(("| candidate", "| (real"))]
    assert [row.split(" | ")[0][2:] for row in rows] == list(landscape.CANDIDATES)
    for column in (5, 8):  # rank columns: a permutation of 1..8
        ranks = sorted(int(row.rstrip(" |").split(" | ")[column]) for row in rows)
        assert ranks == list(range(1, len(landscape.CANDIDATES) + 1))
    assert rows[0].split(" | ")[1] == "1.00"  # the true mask's IoU with the truth

"""SelfMask's network, objective, schedule and inference choice against the published procedure
written out independently (selfmask_reference.py), on tiny random networks."""
import copy

import numpy as np
import pytest
import torch
from selfmask_reference import (
    PublishedPoly,
    criterion,
    evaluator_mask,
    forward,
    forward_published,
)

from move_scale.models.backbone import DinoViT
from move_scale.models.positions import resize_positions
from move_scale.models.weights import WeightsError
from move_scale.stages.selfmask.config import BackboneConfig, DecoderConfig, ModelConfig
from move_scale.stages.selfmask.network import build_network
from move_scale.stages.selfmask.objective import ranking_losses, selfmask_loss
from move_scale.stages.selfmask.stage import poly_factor

TINY = ModelConfig(backbone=BackboneConfig(weights="random", embed_dim=32, depth=2, num_heads=2, patch_size=8),
                   decoder=DecoderConfig(layers=3, queries=5, num_heads=4, ffn_dim=48))


def tiny_net(seed: int = 0, model: ModelConfig = TINY):
    torch.manual_seed(seed)
    net = build_network(model, 32).eval()
    with torch.no_grad():  # move every weight off its initial value so no term hides behind a zero
        for param in net.decoder.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return net


def test_masks_objectness_and_every_layer_match_the_published_forward():
    net = tiny_net()
    images = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        masks, objectness = net(images)
        ref_masks, ref_objectness = forward(net, images)
        batched_masks, batched_objectness = forward_published(net, images)
        last_masks, last_objectness = net(images, all_layers=False)
    assert masks.shape == (2, 3, 5, 8, 10) and objectness.shape == (2, 3, 5)  # stride 4, every layer
    torch.testing.assert_close(masks, ref_masks, rtol=0, atol=2e-6)
    torch.testing.assert_close(objectness, ref_objectness, rtol=0, atol=2e-6)
    torch.testing.assert_close(batched_masks, ref_masks, rtol=0, atol=2e-6)
    torch.testing.assert_close(batched_objectness, ref_objectness, rtol=0, atol=2e-6)
    torch.testing.assert_close(last_masks, masks[:, -1]) and torch.testing.assert_close(last_objectness, objectness[:, -1])
    # the layers differ (each refines the last), and the queries are not interchangeable
    assert (masks[:, 0] - masks[:, -1]).abs().max() > 1e-3
    assert (masks[:, :, 0] - masks[:, :, 1]).abs().max() > 1e-3


def test_the_decoder_layers_start_identical_and_the_queries_are_standard_normal():
    torch.manual_seed(0)
    net = build_network(ModelConfig(backbone=TINY.backbone,
                                    decoder=DecoderConfig(layers=6, queries=400, num_heads=4, ffn_dim=48)), 32)
    first = net.decoder.layers[0].state_dict()
    for layer in net.decoder.layers[1:]:
        assert all(torch.equal(first[k], v) for k, v in layer.state_dict().items())
    assert abs(net.queries.std().item() - 1) < 0.05 and abs(net.queries.mean().item()) < 0.05
    assert [m.out_features for m in net.objectness.layers] == [32, 32, 1]


def test_paper_size_backbone_has_the_official_layout_and_loads_a_file_strictly(tmp_path):
    with torch.device("meta"):
        vit = DinoViT(384, 12, 6, 8)
    assert sum(p.numel() for p in vit.parameters()) == 21_670_272  # DINO ViT-S/8
    assert tuple(vit.state_dict()["pos_embed"].shape) == (1, 785, 384)
    torch.manual_seed(1)
    stand_in = DinoViT(32, 2, 2, 8, img_size=64)  # a small file in the official layout, 8×8 grid
    torch.save(stand_in.state_dict(), tmp_path / "dino.pth")
    model = ModelConfig(backbone=BackboneConfig(weights=str(tmp_path / "dino.pth"), embed_dim=32, depth=2,
                                                num_heads=2, patch_size=8), decoder=TINY.decoder)
    net = build_network(model, 32)  # trains at 32 px: the stored 8×8 table is kept and resampled
    assert all(torch.equal(net.backbone.state_dict()[k], v) for k, v in stand_in.state_dict().items())
    assert all(p.requires_grad for p in net.parameters()) and net.training  # fine-tuned, not frozen
    partial = {k: v for k, v in stand_in.state_dict().items() if k != "norm.weight"}
    torch.save(partial, tmp_path / "partial.pth")
    bad = ModelConfig(backbone=BackboneConfig(weights=str(tmp_path / "partial.pth"), embed_dim=32, depth=2,
                                              num_heads=2, patch_size=8), decoder=TINY.decoder)
    with pytest.raises(WeightsError, match="missing keys: norm.weight"):
        build_network(bad, 32)


def test_backbone_tokens_are_the_last_block_after_the_final_norm_with_selfmask_positions():
    torch.manual_seed(0)
    vit = DinoViT(32, 2, 2, 8, img_size=64).eval()
    image = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        tokens = vit(image)
        x = vit.patch_embed.proj(image).flatten(2).transpose(1, 2)  # (1, 15, C)
        x = torch.cat([vit.cls_token, x], 1)
        table = vit.pos_embed
        grid = torch.nn.functional.interpolate(table[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2), size=(5, 3),
                                               mode="bicubic", align_corners=False)
        x = x + torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 15, 32)], 1)
        for block in vit.blocks:
            x = block(x)
        expected = vit.norm(x)[:, 1:]
    torch.testing.assert_close(tokens, expected)
    torch.testing.assert_close(resize_positions(table, (8, 8)), table)


def _loss_inputs(seed=0, batch=3, layers=2, queries=4):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(batch, layers, queries, 6, 6, generator=gen).requires_grad_()
    objectness = torch.rand(batch, layers, queries, generator=gen).requires_grad_()
    targets = (torch.rand(batch, 24, 24, generator=gen) > 0.6).float()
    targets[1] = 0  # an empty pseudo-mask: skipped, still counted in the batch
    return masks, objectness, targets


@pytest.mark.parametrize("ranking,descending", [("published", True), ("best_first", False)])
def test_each_loss_term_and_its_gradient_match_criterion_py(ranking, descending):
    masks, objectness, targets = _loss_inputs()
    ours = selfmask_loss(masks, objectness, targets, ranking=ranking, rank_weight=0.7)
    grads = torch.autograd.grad(ours["loss"], (masks, objectness))
    reference = criterion(masks, objectness, targets, descending=descending, rank_weight=0.7)
    expected = torch.autograd.grad(reference[0], (masks, objectness))
    for name, value in zip(("loss", "dice", "rank"), reference):
        torch.testing.assert_close(ours[name], value, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert ours["rank"] > 0 and grads[1].abs().sum() > 0
    assert grads[0][1].abs().sum() == 0 and grads[1][1].abs().sum() == 0  # the empty mask adds nothing
    assert ours["valid"].tolist() == [True, False, True]
    # the dice term alone: 1 − (2Σpt + 1)/(Σp + Σt + 1) of each query, summed, over the batch
    up = torch.nn.functional.interpolate(masks[0].detach(), size=(24, 24), mode="bilinear", align_corners=False)
    p, t = up.flatten(-2), targets[0].flatten()
    by_hand = (1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum() + 1))
    torch.testing.assert_close(ours["dice_per_query"][0], by_hand, rtol=1e-6, atol=1e-6)


def test_the_published_ranking_rewards_worse_masks_and_best_first_does_the_opposite():
    dice = torch.tensor([[[0.02, 0.50, 0.97]]])  # query 0 has the best mask
    best_highest, best_lowest = torch.tensor([[[0.9, 0.5, 0.1]]]), torch.tensor([[[0.1, 0.5, 0.9]]])
    assert ranking_losses(dice, best_highest, "published").item() == pytest.approx(1.6)
    assert ranking_losses(dice, best_lowest, "published").item() == pytest.approx(0.0)
    assert ranking_losses(dice, best_highest, "best_first").item() == pytest.approx(0.0)
    assert ranking_losses(dice, best_lowest, "best_first").item() == pytest.approx(1.6)
    # out of its order, each pushes the best query's objectness: "published" down, "best_first" up
    for ranking, start, sign in (("published", [0.5, 0.4, 0.3], 1), ("best_first", [0.3, 0.4, 0.5], -1)):
        scores = torch.tensor([[start]], requires_grad=True)
        ranking_losses(dice, scores, ranking).backward()
        assert sign * scores.grad[0, 0, 0] > 0, ranking


def test_poly_restarting_each_epoch_follows_the_published_scheduler_and_never_decays_over_the_run():
    per_epoch, epochs = 5, 3
    published = PublishedPoly(epochs, per_epoch).factors(per_epoch * epochs)
    ours = [poly_factor(s, per_epoch * epochs, 0.9, per_epoch) for s in range(per_epoch * epochs)]
    assert ours == pytest.approx(published, rel=1e-12)
    assert min(ours) == pytest.approx((1 - 5 / 15) ** 0.9)  # never below: restarts every epoch
    warm = PublishedPoly(epochs, per_epoch, warmup_iters=3).factors(per_epoch * epochs)
    assert [poly_factor(s, 15, 0.9, per_epoch, 3) for s in range(15)] == pytest.approx(warm, rel=1e-12)
    assert warm[:3] == [0, 1 / 3, 2 / 3] and warm[5] == pytest.approx((1 - 5 / 15) ** 0.9)  # n, then 1, 2: warm again
    over_run = [poly_factor(s, 15, 0.9, None) for s in range(15)]
    assert over_run[0] == 1 and over_run[-1] == pytest.approx((1 / 15) ** 0.9)
    assert all(a > b for a, b in zip(over_run, over_run[1:]))


def test_inference_takes_the_last_layer_query_of_highest_objectness_padded_with_zeros():
    from move_scale.evaluation.selfmask_inference import SelfMaskPredictor

    net = tiny_net(seed=3)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (30, 45, 3), dtype=np.uint8)  # pads to 32×48
    predictor = SelfMaskPredictor(net, "cpu", short_side=448)
    item = predictor.prepare("x", image)
    assert item.padded_hw == (32, 48) and item.resized_hw == (30, 45)
    assert torch.all(item.tensor[:, 30:] == 0) and torch.all(item.tensor[:, :, 45:] == 0)
    [(_, mask)] = list(predictor.predict_stream([item], batch_size=1, resized=True))
    with torch.no_grad():
        expected = evaluator_mask(net, item.tensor[:, :30, :45])
    assert mask.shape == (30, 45)
    np.testing.assert_allclose(mask, expected.numpy(), rtol=0, atol=2e-6)
    # not some other query: each of the others gives a different mask
    with torch.no_grad():
        masks, objectness = net(item.tensor[None], all_layers=False)
    others = [q for q in range(5) if q != int(objectness[0].argmax())]
    upsampled = torch.nn.functional.interpolate(masks, size=(32, 48), mode="bilinear", align_corners=False)
    assert all(np.abs(upsampled[0, q, :30, :45].numpy() - mask).max() > 1e-3 for q in others)


def test_a_large_photo_is_capped_at_the_short_side_and_batched_masks_equal_single_ones():
    from move_scale.evaluation.selfmask_inference import SelfMaskPredictor

    net = tiny_net(seed=4)
    predictor = SelfMaskPredictor(net, "cpu", short_side=24)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    items = [predictor.prepare(str(i), image) for i, image in enumerate(images)]
    assert items[0].resized_hw == (24, 32) and items[0].original_hw == (48, 64)
    together = dict((item.key, mask) for item, mask in predictor.predict_stream(items, batch_size=3))
    alone = dict((item.key, mask) for item in items for _, mask in predictor.predict_stream([item], 1))
    for key, mask in together.items():
        assert mask.shape == (48, 64)
        np.testing.assert_allclose(mask, alone[key], atol=1e-5)


def test_copies_of_one_network_agree_and_the_loss_is_differentiable_end_to_end():
    net = tiny_net(seed=5).train()
    twin = copy.deepcopy(net)
    images, targets = torch.randn(2, 3, 32, 32), (torch.rand(2, 32, 32) > 0.5).float()
    masks, objectness = net(images)
    selfmask_loss(masks, objectness, targets)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    with torch.no_grad():
        torch.testing.assert_close(twin(images)[0], masks.detach())

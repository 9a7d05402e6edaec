"""compose.py on small hand-checkable tensors: shifts, zero-fill translation, union, tiles, D inputs."""
import pytest
import torch

from move_scale.stages.move import compose


def one_pixel(height=6, width=7, row=2, col=3):
    image = torch.zeros(1, 1, height, width)
    image[0, 0, row, col] = 1.0
    return image


@pytest.mark.parametrize("dy,dx", [(1, -2), (-2, 3), (0, 0), (3, 3), (-2, -3)])
def test_one_pixel_lands_exactly_delta_away(dy, dx):
    moved = compose.translate(one_pixel(), torch.tensor([[dy, dx]]))
    expected = torch.zeros(1, 1, 6, 7)
    expected[0, 0, 2 + dy, 3 + dx] = 1.0
    assert torch.equal(moved, expected)


def test_pixel_leaving_the_frame_is_lost_not_rolled():
    image = one_pixel()
    moved = compose.translate(image, torch.tensor([[0, 4]]))  # column 3 + 4 = 7: outside
    assert moved.abs().sum() == 0
    assert torch.roll(image, 4, dims=3).sum() == 1  # a roll would have kept it


def test_entering_pixels_are_zero_per_image():
    ones = torch.ones(2, 3, 5, 6)
    moved = compose.translate(ones, torch.tensor([[1, 2], [-2, -1]]))
    first = torch.ones(5, 6)
    first[:1, :] = 0  # one row entered at the top
    first[:, :2] = 0  # two columns entered on the left
    second = torch.ones(5, 6)
    second[-2:, :] = 0
    second[:, -1:] = 0
    assert torch.equal(moved[0], first.expand(3, 5, 6))
    assert torch.equal(moved[1], second.expand(3, 5, 6))


def test_translate_is_differentiable_only_through_pixels_that_stay():
    image = torch.ones(1, 1, 4, 4, requires_grad=True)
    compose.translate(image, torch.tensor([[0, 1]])).sum().backward()
    expected = torch.ones(1, 1, 4, 4)
    expected[..., -1] = 0  # the last column left the frame
    assert torch.equal(image.grad, expected)


def test_sample_shifts_formula_bounds_and_reproducibility():
    generator = torch.Generator().manual_seed(7)
    shifts = compose.sample_shifts(5, 32, 64, 0.125, generator)
    uniform = torch.rand(5, 2, generator=torch.Generator().manual_seed(7))
    by_hand = torch.round((2 * uniform - 1) * 0.125 * 32)  # min(H, W) = 32 → |δ| ≤ 4
    assert shifts.dtype == torch.int64 and shifts.shape == (5, 2)
    assert torch.equal(shifts, by_hand.long())
    many = compose.sample_shifts(4000, 32, 64, 0.125, torch.Generator().manual_seed(1))
    assert many.min() == -4 and many.max() == 4
    assert set(many.unique().tolist()) == set(range(-4, 5))


def test_zero_shift_range_gives_zero_shifts():
    shifts = compose.sample_shifts(8, 16, 16, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(shifts, torch.zeros(8, 2, dtype=torch.int64))


def test_union_on_known_masks():
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    mask_shifted = torch.tensor([[[[0.0, 0.0], [0.5, 1.0]]]])
    expected = torch.tensor([[[[1.0, 0.0], [0.75, 1.0]]]])  # 1 - (1-m)(1-m_δ)
    assert torch.allclose(compose.mask_union(mask, mask_shifted), expected)


def test_tile_mask_is_max_per_patch_in_row_major_order():
    union = torch.tensor(
        [[[[0.1, 0.2, 0.0, 0.0],
           [0.3, 0.0, 0.0, 0.6],
           [0.0, 0.0, 0.9, 1.0],
           [0.0, 0.0, 0.0, 0.0]]]]
    )
    tiles = compose.tile_mask(union, 2)
    assert torch.allclose(tiles, torch.tensor([[0.3, 0.6, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="multiple of the inpainter patch size 3"):
        compose.tile_mask(union, 3)


def test_hard_tile_mask_inpaints_ties_as_the_authors_without_gradient():
    # move-seg segmenter.py: visible weight v = 1 - maxpool(u); binarised (v > 0.5); the decoder
    # mixes v·token + (1 - v)·mask_token, so a tile is inpainted unless v > 0.5 in float32.
    # 0.5 - 2^-25: v = 0.5 + 2^-25 rounds to 0.5 in float32 (ties to even) → inpainted;
    # 0.5 - 2^-24: v = 0.5 + 2^-24 is exact → kept. (Before: kept ties and both of these.)
    tiles = torch.tensor([[0.2, 0.5, 0.51, 1.0, 0.5 - 2**-25, 0.5 - 2**-24]], requires_grad=True)
    hard = compose.harden_tile_mask(tiles)
    assert torch.equal(hard, torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]]))
    assert not hard.requires_grad
    assert torch.equal(compose.harden_tile_mask(tiles.double())[0, 4:], torch.tensor([0.0, 0.0]).double())


def test_paste_outside_tiles_keeps_the_input_where_tiles_are_zero():
    image = torch.full((1, 3, 4, 4), 2.0)
    inpainted = torch.full((1, 3, 4, 4), 10.0)
    tiles = torch.tensor([[1.0, 0.0, 0.0, 0.5]])
    pasted = compose.paste_outside_tiles(image, inpainted, tiles, 2)
    expected = torch.tensor(
        [[10.0, 10.0, 2.0, 2.0],
         [10.0, 10.0, 2.0, 2.0],
         [2.0, 2.0, 6.0, 6.0],  # 2·(1-0.5) + 10·0.5
         [2.0, 2.0, 6.0, 6.0]]
    )
    assert torch.equal(pasted, expected.expand(1, 3, 4, 4))


def test_the_discriminator_input_table_gives_the_formulas_of_eq_3():
    mask = torch.tensor([[[[1.0, 0.0], [0.25, 0.0]]]])
    mask_shifted = torch.tensor([[[[0.0, 1.0], [0.0, 0.5]]]])
    image = torch.full((1, 3, 2, 2), 1.0)
    parts = dict(
        image=image,
        mask=mask,
        mask_shifted=mask_shifted,
        autoencoded=torch.full((1, 3, 2, 2), 2.0),  # x̌
        autoencoded_shifted=torch.full((1, 3, 2, 2), 3.0),  # x̌_δ
        inpainted_background=torch.full((1, 3, 2, 2), 5.0),  # b̂
    )
    expected = {
        "input": [[1.0, 1.0], [1.0, 1.0]],
        "autoencoded": [[2.0, 2.0], [2.0, 2.0]],
        "composite_noshift": [[2.0, 5.0], [0.25 * 2 + 0.75 * 5, 5.0]],  # m·x̌ + (1-m)·b̂
        "composite_shifted": [[5.0, 3.0], [5.0, 0.5 * 3 + 0.5 * 5]],  # m_δ·x̌_δ + (1-m_δ)·b̂
        "copy_paste": [[2.0, 3.0], [2.0, 0.5 * 3 + 0.5 * 2]],  # m_δ·x̌_δ + (1-m_δ)·x̌
    }
    for kind, values in expected.items():
        got = compose.discriminator_input(kind, parts)
        assert torch.allclose(got, torch.tensor(values).expand(1, 3, 2, 2)), kind
    assert set(compose.DISCRIMINATOR_INPUTS) == set(expected) == {*compose.REAL_KINDS, *compose.FAKE_KINDS}
    assert compose.COMPOSITE_KINDS == ("composite_noshift", "composite_shifted", "copy_paste")
    assert compose.kinds_needing("autoencoded") == ("autoencoded", "composite_noshift", "copy_paste")
    assert compose.kinds_needing("autoencoded_shifted") == ("composite_shifted", "copy_paste")
    assert compose.kinds_needing("inpainted_background") == ("composite_noshift", "composite_shifted")
    with pytest.raises(ValueError, match="unknown discriminator input kind 'shifted'"):
        compose.discriminator_input("shifted", parts)

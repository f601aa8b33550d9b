"""The shared CLIP-family pixel losses (siad/methods/losses.py: segmentation_terms)."""

import torch

from siad.methods.losses import dice_loss, focal_loss, segmentation_terms


def _maps(n_layers=2, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(b, 2, 6, 6, generator=g), dim=1) for _ in range(n_layers)]


def test_segmentation_terms_sum_the_layers_over_the_images_with_pixel_truth():
    maps = _maps()
    masks = torch.zeros(3, 6, 6)
    masks[1, 1:4, 1:4] = 1
    focal, dice_a, dice_n = segmentation_terms(maps, masks)
    torch.testing.assert_close(focal, sum(focal_loss(m, masks) for m in maps))
    torch.testing.assert_close(dice_a, sum(dice_loss(m[:, 1], masks) for m in maps))
    torch.testing.assert_close(dice_n, sum(dice_loss(m[:, 0], 1 - masks) for m in maps))
    valid = torch.tensor([True, True, False])
    kept = segmentation_terms(maps, masks, valid)
    torch.testing.assert_close(kept[0], sum(focal_loss(m[:2], masks[:2]) for m in maps))
    assert segmentation_terms(maps, masks, torch.zeros(3, dtype=torch.bool)) is None


def test_per_row_dice_at_batch_one():
    maps = _maps(1, b=1)
    masks = torch.zeros(1, 6, 6)
    masks[0, 2:5, 1:3] = 1
    rows = segmentation_terms(maps, masks, per_image=False)[1]
    torch.testing.assert_close(rows, dice_loss(maps[0][:, 1], masks, per_image=False))
    assert not torch.allclose(rows, segmentation_terms(maps, masks)[1])

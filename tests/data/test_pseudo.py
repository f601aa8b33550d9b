"""Tests of the CutPaste + Poisson pseudo-anomaly generator (siad.data.pseudo)."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from siad.data.pseudo import (
    CutPastePoisson,
    PatchParams,
    anomalygpt_params,
    make_pseudo_batch,
    poisson_clone,
)
from siad.errors import ConfigError, UnknownNameError

SIDE = 96


def smooth_image(seed: int, side: int = SIDE) -> np.ndarray:
    """A smooth random colour image (Poisson blending has visible work to do on it)."""
    noise = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 4)


def bbox_sides(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


IMAGE, SOURCE = smooth_image(1), smooth_image(2)


def test_same_seed_gives_identical_bytes_and_other_seed_differs() -> None:
    generator = CutPastePoisson()
    out_a, mask_a = generator(IMAGE, SOURCE, np.random.default_rng(7))
    out_b, mask_b = generator(IMAGE, SOURCE, np.random.default_rng(7))
    out_c, mask_c = generator(IMAGE, SOURCE, np.random.default_rng(8))
    assert out_a.tobytes() == out_b.tobytes() and mask_a.tobytes() == mask_b.tobytes()
    assert out_a.tobytes() != out_c.tobytes() or mask_a.tobytes() != mask_c.tobytes()


@pytest.mark.parametrize(
    "params",
    [PatchParams(), anomalygpt_params("mvtec", "screw"), anomalygpt_params("mvtec", "hazelnut")],
    ids=["default", "screw", "hazelnut-background-model"],
)
def test_output_differs_from_input_only_inside_a_nonempty_binary_mask(params: PatchParams) -> None:
    generator = CutPastePoisson(params)
    image = smooth_image(3)
    image[:, : SIDE // 3] = 10  # dark background band so the hazelnut model sees background
    for seed in range(25):
        out, mask = generator(image, SOURCE, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert mask.sum() > 0
        changed = np.any(out != image, axis=-1)
        assert not np.any(changed & (mask == 0)), f"seed {seed}: pixels changed outside the mask"
        assert changed.any(), f"seed {seed}: nothing was pasted"


def test_generate_returns_the_pasted_patches_boxes_in_paste_order() -> None:
    """AnomalyGPT's answers count and place anomalies by pasted patch (NSA's label centres), so the generator
    returns each patch's rectangle in paste order; calling it gives the same image and mask."""
    generator = CutPastePoisson(PatchParams())  # 2 patches: the second with probability 0.5
    first_only = CutPastePoisson(dataclasses.replace(PatchParams(), num_patches=1))
    counts = set()
    for seed in range(20):
        result = generator.generate(IMAGE, SOURCE, np.random.default_rng(seed))
        out, mask = generator(IMAGE, SOURCE, np.random.default_rng(seed))
        assert np.array_equal(out, result.image) and np.array_equal(mask, result.mask)
        counts.add(len(result.boxes))
        # the first patch is pasted first: with the same generator state it is the single patch of a 1-patch run
        assert result.boxes[0] == first_only.generate(IMAGE, SOURCE, np.random.default_rng(seed)).boxes[0]
        covered = np.zeros(mask.shape, dtype=bool)
        for r0, r1, c0, c1 in result.boxes:
            covered[r0:r1, c0:c1] = True
            assert mask[r0 + 1 : r1 - 1, c0 + 1 : c1 - 1].all()  # no background model: the box inside its frame
        assert not np.any((mask > 0) & ~covered)
    assert counts == {1, 2}


def test_raw_seamless_clone_changes_only_the_rectangle_but_spills_outside_irregular_masks() -> None:
    """Pins what cv2.seamlessClone does: inside the box of its mask only; for a non-rectangular
    mask also outside the mask (hence the generator composites within the pasted region)."""
    dest, patch = smooth_image(4), smooth_image(5)
    rect = np.zeros((SIDE, SIDE), dtype=bool)
    rect[20:61, 30:71] = True
    canvas = dest.copy()
    canvas[rect] = patch[rect]
    clone_mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    clone_mask[21:60, 31:70] = 255  # one-pixel zero frame, as the generator uses
    changed = np.any(poisson_clone(canvas, dest, clone_mask) != dest, axis=-1)
    assert changed.any() and not np.any(changed & (clone_mask == 0))

    disk_mask = np.zeros_like(clone_mask)
    cv2.circle(disk_mask, (50, 40), 18, 255, -1)
    changed = np.any(poisson_clone(canvas, dest, disk_mask) != dest, axis=-1)
    assert np.any(changed & (disk_mask == 0))
    rows, cols = np.nonzero(disk_mask)
    inside_box = np.zeros_like(changed)
    inside_box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    assert not np.any(changed & ~inside_box)


def test_a_patch_too_thin_for_seamless_clone_is_a_failed_placement_not_a_crash(monkeypatch) -> None:
    """Regression: at 96 px (any side of ~68 to ~149 px: the smallest patch side round(0.03·side) is 3 or 4 px)
    seed 26 draws a 4 px thin patch whose Poisson mask is 2 px thick after the zero frame; cv2.seamlessClone raised
    ``(-215:Assertion failed) !fixedSize() in function 'release'`` (OpenCV 5.1, the CPU-scaled scale run). Such a
    placement now fails like a too small mask, and the raw clone refuses the thin mask by name."""
    sides = []
    blend = CutPastePoisson._blend

    def spy(dest, patch, origin, dest_obj, patch_obj):
        sides.append(patch.shape[:2])
        return blend(dest, patch, origin, dest_obj, patch_obj)

    monkeypatch.setattr(CutPastePoisson, "_blend", staticmethod(spy))
    result = CutPastePoisson(PatchParams()).generate(IMAGE, SOURCE, np.random.default_rng(26))
    assert min(sides[0]) <= 4  # the thin patch was drawn (and skipped)
    assert result.boxes == ((70, 90, 30, 68),) and result.mask.sum() == 18 * 36
    assert not np.any(np.any(result.image != IMAGE, axis=-1) & (result.mask == 0))

    thin = np.zeros((SIDE, SIDE), dtype=np.uint8)
    thin[86:88, 42:71] = 255  # the failing run's Poisson mask: 2 rows
    with pytest.raises(ValueError, match="thinner than 3 px"):
        poisson_clone(SOURCE, IMAGE, thin)
    thin[86:89, 42:71] = 255  # 3 rows: OpenCV blends it
    assert poisson_clone(SOURCE, IMAGE, thin).shape == IMAGE.shape


def test_single_patch_mask_is_a_rectangle_within_the_width_bounds() -> None:
    side = 224
    params = dataclasses.replace(anomalygpt_params("mvtec", "screw"), skip_background=None, num_patches=1)
    low, high = round(0.03 * side), round(0.12 * side)  # pasted sides: half-width bounds, as NSA
    generator = CutPastePoisson(params)
    image, source = smooth_image(6, side), smooth_image(7, side)
    heights = []
    for seed in range(30):
        _, mask = generator(image, source, np.random.default_rng(seed))
        height, width = bbox_sides(mask)
        assert mask.sum() == height * width  # filled rectangle
        # the zero frame removes one pixel on each side
        assert low - 2 <= height <= high - 2 and low - 2 <= width <= high - 2
        heights.append(height)
    assert len(set(heights)) > 3  # sizes are random


def test_default_bounds_allow_larger_patches_than_screw() -> None:
    side = 224
    image, source = smooth_image(6, side), smooth_image(7, side)
    single = dataclasses.replace(PatchParams(), num_patches=1)
    heights = [bbox_sides(CutPastePoisson(single)(image, source, np.random.default_rng(s))[1])[0] for s in range(30)]
    assert max(heights) > round(0.12 * side)
    assert max(heights) <= round(0.4 * side) - 2


def test_fallback_still_gives_a_nonempty_mask_when_no_object_is_found() -> None:
    params = dataclasses.replace(anomalygpt_params("mvtec", "bottle"), max_tries=5)
    blank = np.full((SIDE, SIDE, 3), 200, dtype=np.uint8)  # all background for the (200, 60) model
    for seed in range(5):
        out, mask = CutPastePoisson(params)(blank, SOURCE, np.random.default_rng(seed))
        assert mask.sum() >= 8 * 8  # fallback floors sides at 10 px (8 after the zero frame)
        assert not np.any(np.any(out != blank, axis=-1) & (mask == 0))


def test_poisson_blending_lowers_the_seam_gradient_compared_with_plain_paste() -> None:
    rows = np.linspace(40, 90, SIDE, dtype=np.float32)
    dest = np.repeat(np.repeat(rows[:, None, None], SIDE, axis=1), 3, axis=2).astype(np.uint8)
    patch = np.clip(smooth_image(8).astype(np.int16) + 100, 0, 255).astype(np.uint8)  # much brighter
    r0, r1, c0, c1 = 25, 70, 20, 75
    canvas = dest.copy()
    canvas[r0:r1, c0:c1] = patch[r0:r1, c0:c1]
    clone_mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    clone_mask[r0 + 1 : r1 - 1, c0 + 1 : c1 - 1] = 255
    blended = poisson_clone(canvas, dest, clone_mask)

    def seam_gradient(img: np.ndarray) -> float:
        img = img.astype(np.float32)
        steps = [
            img[r0, c0:c1] - img[r0 - 1, c0:c1], img[r1 - 1, c0:c1] - img[r1, c0:c1],
            img[r0:r1, c0] - img[r0:r1, c0 - 1], img[r0:r1, c1 - 1] - img[r0:r1, c1],
        ]
        return float(np.mean([np.abs(step).mean() for step in steps]))

    assert seam_gradient(canvas) > 50
    assert seam_gradient(blended) < seam_gradient(canvas) / 5


def test_logistic_label_is_soft_inside_the_pasted_region_and_follows_k_x0() -> None:
    base = anomalygpt_params("mvtec", "carpet")
    binary_mask = CutPastePoisson(base)(IMAGE, SOURCE, np.random.default_rng(3))[1]
    soft = CutPastePoisson(base, label="logistic")(IMAGE, SOURCE, np.random.default_rng(3))[1]
    assert soft.dtype == np.float32 and 0 <= soft.min() and soft.max() <= 1
    assert soft.max() > 0 and np.all(soft[binary_mask == 0] == 0)
    assert np.unique(soft).size > 2  # genuinely soft
    harder = dataclasses.replace(base, intensity_logistic=(1 / 3, 200))
    hard_soft = CutPastePoisson(harder, label="logistic")(IMAGE, SOURCE, np.random.default_rng(3))[1]
    assert hard_soft.sum() < soft.sum()


def test_grayscale_input_is_replicated_to_three_channels() -> None:
    gray, gray_source = IMAGE[..., 0], SOURCE[..., 0]
    out, mask = CutPastePoisson()(gray, gray_source[..., None], np.random.default_rng(0))
    assert out.shape == (SIDE, SIDE, 3) and mask.any()
    outside = mask == 0
    assert np.all(out[outside] == np.repeat(gray[..., None], 3, axis=2)[outside])


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        (np.zeros((12, 12, 3), dtype=np.uint8), "sides >= 16"),
        (np.zeros((SIDE, SIDE, 3), dtype=np.float32), "uint8"),
        (np.zeros((SIDE, SIDE, 4), dtype=np.uint8), "alpha"),
    ],
)
def test_bad_images_raise_value_errors_with_the_fix(image: np.ndarray, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        CutPastePoisson()(image, image, np.random.default_rng(0))


def test_image_and_source_sizes_must_match() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        CutPastePoisson()(IMAGE, smooth_image(2, 64), np.random.default_rng(0))


def test_make_pseudo_batch_layout_and_rolled_sources() -> None:
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    class Recording(CutPastePoisson):
        def __call__(self, image, source, rng):  # type: ignore[no-untyped-def]
            seen.append((image, source))
            return super().__call__(image, source, rng)

    images = np.stack([smooth_image(s) for s in (10, 11, 12)])
    batch, masks, labels = make_pseudo_batch(images, np.random.default_rng(0), Recording())
    assert batch.shape == (6, SIDE, SIDE, 3) and batch.dtype == np.uint8
    assert masks.shape == (6, SIDE, SIDE) and masks.dtype == np.float32
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(batch[:3], images) and not masks[:3].any()
    assert all(masks[i].any() for i in range(3, 6))
    for i, (image, source) in enumerate(seen):  # source = previous image of the batch
        assert np.array_equal(image, images[i]) and np.array_equal(source, images[i - 1])
    again = make_pseudo_batch(images, np.random.default_rng(0), CutPastePoisson())
    assert np.array_equal(again[0], batch) and np.array_equal(again[1], masks)


def test_make_pseudo_batch_explicit_sources_must_match_batch() -> None:
    images = np.stack([IMAGE, SOURCE])
    with pytest.raises(ValueError, match="one per image"):
        make_pseudo_batch(images, np.random.default_rng(0), CutPastePoisson(), sources=images[:1])


def test_anomalygpt_params_per_class_tables() -> None:
    screw = anomalygpt_params("mvtec", "screw")
    assert screw.width_bounds_pct == ((0.03, 0.12), (0.03, 0.12))
    assert screw.skip_background == (200, 60) and screw.intensity_logistic == (1, 3)
    assert screw.scale_bounds == (0.7, 1.3) and screw.min_overlap_pct == 0.25
    assert anomalygpt_params("MVTec", "capsule").width_bounds_pct == ((0.03, 0.15), (0.03, 0.4))
    assert anomalygpt_params("mvtec", "toothbrush").width_bounds_pct == ((0.03, 0.4), (0.03, 0.2))
    assert anomalygpt_params("mvtec", "pill").skip_background == (20, 20)
    carpet = anomalygpt_params("mvtec", "carpet")
    assert carpet.scale_bounds == (0.5, 2.0) and carpet.skip_background is None
    visa = anomalygpt_params("visa", "pcb1")
    assert visa.width_bounds_pct == ((0.03, 0.4), (0.03, 0.4)) and visa.skip_background is None
    assert visa.scale_bounds == (0.5, 2.0) and visa.intensity_logistic == (1 / 12, 24)
    assert anomalygpt_params("br35h", "brain") == PatchParams()
    with pytest.raises(UnknownNameError, match="screw"):
        anomalygpt_params("mvtec", "bolt")


def test_invalid_params_and_label_mode_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="width_bounds_pct"):
        PatchParams(width_bounds_pct=((0.03, 0.6), (0.03, 0.4)))
    with pytest.raises(ConfigError, match="label mode"):
        CutPastePoisson(label="soft")  # type: ignore[arg-type]

"""Tests of siad.metrics: agreement with sklearn and with slow reference implementations,
analytic AU-PRO cases, undefined metrics, bootstrap determinism and error handling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, f1_score, precision_recall_curve, roc_auc_score

from siad import metrics as M
from siad.errors import NumericalError, SiadError

EIGHT = np.ones((3, 3))
# Warnings are asserted with pytest.warns where they are the point; elsewhere they are expected noise.
pytestmark = pytest.mark.filterwarnings("ignore::siad.metrics.MetricWarning")


# ------------------------------------------------------------------------------------------
# helpers: random inputs and slow reference implementations written independently
# ------------------------------------------------------------------------------------------


def random_class(rng: np.random.Generator, n: int = 6, shape=(12, 14), signal: float = 1.0, quantize=None):
    """Masks with a few rectangular defects in half of the images and noisy maps."""
    masks = np.zeros((n,) + shape, dtype=np.uint8)
    for i in range(n // 2):
        for _ in range(rng.integers(1, 3)):
            r, c = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
            masks[i, r : r + rng.integers(1, 4), c : c + rng.integers(1, 4)] = 255
    maps = rng.normal(size=masks.shape) + signal * (masks > 0)
    if quantize:
        maps = np.round(maps * quantize) / quantize  # creates ties
    return masks, maps


def reference_pro_curve(masks, maps):
    """PRO curve by brute force: one operating point per distinct score, positive iff score >= t."""
    regions = []
    for mask in masks:
        labeled, n = ndimage.label(np.asarray(mask) != 0, structure=EIGHT)
        regions.append([labeled == k for k in range(1, n + 1)])
    ok = [np.asarray(m) == 0 for m in masks]
    n_ok = sum(o.sum() for o in ok)
    all_scores = np.concatenate([np.ravel(a) for a in maps])
    xs, ys = [0.0], [0.0]
    for t in np.unique(all_scores)[::-1]:
        pred = [np.asarray(a) >= t for a in maps]
        xs.append(sum((p & o).sum() for p, o in zip(pred, ok)) / n_ok)
        overlaps = [p[r].mean() for p, rs in zip(pred, regions) for r in rs]
        ys.append(np.mean(overlaps))
    return np.array(xs + [1.0]), np.array(ys + [1.0])


def reference_aupro(masks, maps, limit):
    """Trapezoid area of the brute-force curve up to FPR = limit (linear interpolation), / limit."""
    x, y = reference_pro_curve(masks, maps)
    area = 0.0
    for x0, x1, y0, y1 in zip(x[:-1], x[1:], y[:-1], y[1:]):
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        elif x0 < limit:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_lim) * (limit - x0)
    return area / limit


def reference_cflow(masks, maps, limit=0.3, n_thresholds=200):
    """The CFlow-style recipe, literally: loop over 200 thresholds, score > t, rescale FPRs, auc."""
    masks = [np.asarray(m) != 0 for m in masks]
    lo = min(np.min(a) for a in maps)
    hi = max(np.max(a) for a in maps)
    fprs, pros = [], []
    for k in range(n_thresholds):
        t = lo + (hi - lo) / n_thresholds * k
        pred = [np.asarray(a) > t for a in maps]
        overlaps = []
        for p, m in zip(pred, masks):
            labeled, n = ndimage.label(m, structure=EIGHT)
            overlaps += [p[labeled == j].sum() / (labeled == j).sum() for j in range(1, n + 1)]
        pros.append(np.mean(overlaps))
        fprs.append(sum((p & ~m).sum() for p, m in zip(pred, masks)) / sum((~m).sum() for m in masks))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < limit
    f = fprs[keep]
    return auc((f - f.min()) / (f.max() - f.min()), pros[keep])


def brute_force_f1_max(y, s):
    return max(f1_score(y, s >= t, zero_division=0) for t in np.unique(s))


# ------------------------------------------------------------------------------------------
# image and pixel AUROC / AP / F1-max
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 80)
    s = np.round(rng.normal(size=80) + y, 1)  # rounding creates ties
    assert M.image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.image_ap(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.image_f1_max(y, s) == pytest.approx(brute_force_f1_max(y, s), abs=1e-12)


def test_pixel_metrics_match_sklearn_for_array_and_list_of_varying_shapes():
    rng = np.random.default_rng(3)
    masks, maps = random_class(rng, n=6, quantize=4)
    y, s = (masks > 0).ravel(), maps.ravel()
    assert M.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.pixel_f1_max(masks, maps) == pytest.approx(brute_force_f1_max(y, s), abs=1e-12)
    # varying shapes: crop each image differently, compare with sklearn on the pooled pixels
    ml = [m[: 12 - i, : 14 - 2 * i] for i, m in enumerate(masks)]
    al = [a[: 12 - i, : 14 - 2 * i] for i, a in enumerate(maps)]
    yl = np.concatenate([m.ravel() > 0 for m in ml])
    sl = np.concatenate([a.ravel() for a in al])
    assert M.pixel_auroc(ml, al) == pytest.approx(roc_auc_score(yl, sl), abs=1e-12)
    assert M.pixel_ap(ml, al) == pytest.approx(average_precision_score(yl, sl), abs=1e-12)


def test_single_class_inputs_are_undefined_not_zero():
    assert M.image_auroc([0, 0, 0], [0.1, 0.5, 0.2]) is None
    assert M.image_ap([1, 1], [0.1, 0.5]) is None
    assert M.image_f1_max([0, 0], [0.1, 0.5]) is None
    assert M.pixel_auroc(np.zeros((2, 3, 3)), np.ones((2, 3, 3))) is None
    assert M.aupro(np.zeros((2, 3, 3)), np.ones((2, 3, 3))) is None


# ------------------------------------------------------------------------------------------
# AU-PRO (official)
# ------------------------------------------------------------------------------------------


def test_aupro_perfect_map_is_one():
    masks, _ = random_class(np.random.default_rng(4))
    assert M.aupro(masks, (masks > 0).astype(float)) == pytest.approx(1.0, abs=1e-12)


def test_aupro_inverted_map_is_exactly_zero():
    # Map = 1 on normal pixels, 0 on anomalous ones. Descending thresholds: first all normal
    # pixels enter (one tie run) -> point (FPR=1, PRO=0), then all region pixels -> (1, 1).
    # Curve (0,0), (1,0), (1,1), (1,1); 0.3 lies between x=0 and x=1 where y is 0 on both sides,
    # so the interpolated point is (0.3, 0) and the area is exactly 0.
    masks, _ = random_class(np.random.default_rng(5))
    assert M.aupro(masks, (masks == 0).astype(float)) == 0.0


def test_aupro_hand_computed_single_image_two_regions():
    # One 1x10 image: region A = pixel 0 (size 1), region B = pixels 2..4 (size 3), 6 OK pixels.
    mask = np.array([[1, 0, 1, 1, 1, 0, 0, 0, 0, 0]])
    amap = np.array([[0.8, 0.9, 0.95, 0.6, 0.05, 0.5, 0.4, 0.3, 0.2, 0.1]])
    # Descending: 0.95(B) 0.9(ok) 0.8(A) 0.6(B) 0.5 0.4 0.3 0.2 0.1 (ok) 0.05(B)
    # FPR: 0, 1/6, 1/6, 1/6, 2/6 ... 1, 1        PRO: 1/6, 1/6, 4/6, 5/6, 5/6 ... 5/6, 1
    # Area to 0.3: (0,1/6)->(1/6,1/6) gives 1/36; then PRO = 5/6 from FPR 1/6 up to 0.3 gives
    # 5/6 * (0.3 - 1/6) = 1/9; total 5/36, divided by 0.3 -> 25/54.
    assert M.aupro(mask[None], amap[None]) == pytest.approx(25 / 54, abs=1e-6)
    # Full area (limit 1): 1/36 + 5/6 * (1 - 1/6) = 26/36 = 13/18.
    assert M.aupro(mask[None], amap[None], limit=1.0) == pytest.approx(13 / 18, abs=1e-6)


def test_aupro_regions_are_eight_connected():
    # Regions {(0,0),(1,1)} (diagonal neighbours: ONE region of size 2) and {(3,3)}; the map
    # scores (0,0) and (3,3) high and every other pixel 0.
    mask = np.zeros((4, 4))
    mask[0, 0] = mask[1, 1] = mask[3, 3] = 1
    amap = np.zeros((4, 4))
    amap[0, 0] = amap[3, 3] = 1.0
    # 8-conn: PRO at FPR 0 = (1/2 + 1)/2 = 3/4; then every other pixel ties at 0 -> (1, 1).
    # Area to 0.3 = 0.3 * (3/4 + (3/4 + 0.3 * 1/4)) / 2 -> / 0.3 = 3/4 + 0.0375 = 0.7875.
    # With 4-connectivity it would be (1 + 0 + 1)/3 = 2/3 at FPR 0, i.e. a different value.
    assert M.aupro(mask[None], amap[None]) == pytest.approx(0.7875, abs=1e-6)


@pytest.mark.parametrize("seed,limit,quantize", [(6, 0.3, None), (7, 0.3, 3), (8, 0.05, None), (9, 1.0, 2)])
def test_aupro_matches_slow_reference(seed, limit, quantize):
    masks, maps = random_class(np.random.default_rng(seed), n=5, quantize=quantize)
    assert M.aupro(masks, maps, limit=limit) == pytest.approx(reference_aupro(masks, maps, limit), abs=1e-6)


def test_aupro_limit_one_is_full_area_under_the_curve():
    masks, maps = random_class(np.random.default_rng(10), n=5)
    x, y = reference_pro_curve(masks, maps)
    assert M.aupro(masks, maps, limit=1.0) == pytest.approx(np.trapezoid(y, x), abs=1e-6)


def test_aupro_invariant_to_strictly_monotone_rescaling_and_image_order():
    masks, maps = random_class(np.random.default_rng(11), n=6, quantize=10)
    base = M.aupro(masks, maps)
    assert M.aupro(masks, np.exp(maps)) == pytest.approx(base, abs=1e-12)
    assert M.aupro(masks, 3.0 * maps - 7.0) == pytest.approx(base, abs=1e-12)
    perm = np.random.default_rng(0).permutation(len(masks))
    assert M.aupro(masks[perm], maps[perm]) == pytest.approx(base, abs=1e-12)
    assert M.aupro(list(masks[perm]), list(maps[perm])) == pytest.approx(base, abs=1e-12)


def test_aupro_in_unit_interval():
    for seed in range(12, 20):
        rng = np.random.default_rng(seed)
        masks, maps = random_class(rng, n=4, signal=rng.normal())
        value = M.aupro(masks, maps, limit=float(rng.uniform(0.01, 1.0)))
        assert 0.0 <= value <= 1.0


def test_good_only_images_change_only_the_fpr():
    rng = np.random.default_rng(21)
    masks, maps = random_class(rng, n=4)
    anomalous = masks[:2], maps[:2]  # random_class puts defects in the first half
    ok_scores = maps[:2][masks[:2] == 0]

    # (a) a good image holding exactly the OK-pixel scores again: FPR(t) and PRO(t) unchanged.
    good = ok_scores.reshape(1, -1)
    with_copy = (list(anomalous[0]) + [np.zeros_like(good)], list(anomalous[1]) + [good])
    assert M.aupro(*with_copy) == pytest.approx(M.aupro(*anomalous), abs=1e-12)

    # (b) a good image scoring below everything: at the old thresholds PRO is unchanged and
    # FPR is scaled by n_ok_old / n_ok_new (the new image only adds normal pixels).
    low = np.full((3, 5), maps.min() - 1.0)
    old = M._pro_curve(M._pixels(*anomalous))
    new = M._pro_curve(M._pixels(list(anomalous[0]) + [np.zeros((3, 5))], list(anomalous[1]) + [low]))
    k = len(old[0]) - 1  # old curve points without the appended (1, 1)
    np.testing.assert_allclose(new[1][:k], old[1][:k], rtol=0, atol=1e-12)
    np.testing.assert_allclose(new[0][:k], old[0][:k] * ok_scores.size / (ok_scores.size + 15), atol=2e-7)

    # (c) a good image scoring above everything raises the FPR early: AU-PRO must drop.
    high = np.full((8, 8), maps.max() + 1.0)
    with_high = (list(anomalous[0]) + [np.zeros((8, 8))], list(anomalous[1]) + [high])
    assert M.aupro(*with_high) < M.aupro(*anomalous) - 0.05


def test_pro_curve_follows_the_official_construction():
    masks, maps = random_class(np.random.default_rng(23), n=5)
    fprs, pros = M._pro_curve(M._pixels(masks, maps))
    assert (fprs[0], pros[0], fprs[-1], pros[-1]) == (0.0, 0.0, 1.0, 1.0)  # prepended / appended
    np.testing.assert_array_equal(fprs, fprs.astype(np.float32))  # FPRs computed in float32
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(pros) >= -1e-12)
    assert fprs.max() <= 1.0 and pros.max() <= 1.0  # clipped
    assert len(fprs) == np.unique(maps).size + 2  # one point per distinct score


def test_aupro_rejects_bad_limit_and_mismatched_shapes():
    masks, maps = random_class(np.random.default_rng(22), n=2)
    with pytest.raises(ValueError):
        M.aupro(masks, maps, limit=0.0)
    with pytest.raises(ValueError, match=r"\(12, 14\).*\(12, 13\)"):
        M.aupro(list(masks), [maps[0], maps[1][:, :13]])


# ------------------------------------------------------------------------------------------
# AU-PRO (CFlow-style legacy)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,limit,integer_maps", [(30, 0.3, False), (31, 0.5, False), (33, 0.3, True)])
def test_cflow_legacy_matches_literal_loop(seed, limit, integer_maps):
    masks, maps = random_class(np.random.default_rng(seed), n=4, quantize=None if integer_maps else 5)
    if integer_maps:  # scores on a 0.5 grid in [0, 200]: every threshold t_k = k is also a score,
        # so "score > t" and "score >= t" give different curves (a half-step score lies between)
        maps = np.clip(np.round(2 * (40 * maps + 100)) / 2, 0, 200)
        maps.flat[0], maps.flat[1] = 0, 200
    expected = reference_cflow(masks, maps, limit=limit)
    assert M.aupro_cflow_legacy(masks, maps, limit=limit) == pytest.approx(expected, abs=1e-9)


def test_cflow_legacy_is_not_invariant_to_monotone_rescaling_unlike_official():
    # The known flaw: its 200 thresholds are uniform in score units, so a monotone but
    # nonlinear rescaling moves them relative to the data and changes the value.
    masks, maps = random_class(np.random.default_rng(32), n=6, shape=(24, 24), signal=2.0)
    squashed = np.exp(3.0 * maps)
    assert M.aupro(masks, squashed) == pytest.approx(M.aupro(masks, maps), abs=1e-12)
    # (here about 0.74 on the raw maps vs 0.40 after exp(3x))
    assert abs(M.aupro_cflow_legacy(masks, squashed) - M.aupro_cflow_legacy(masks, maps)) > 0.1


# ------------------------------------------------------------------------------------------
# evaluate_class / evaluate_dataset / summarize
# ------------------------------------------------------------------------------------------


def class_inputs(rng, n=8, signal=1.5, anomalies=True):
    masks, maps = random_class(rng, n=n, signal=signal)
    if not anomalies:
        masks[:] = 0
    labels = (masks.reshape(n, -1) > 0).any(axis=1).astype(int)
    scores = maps.reshape(n, -1).max(axis=1)
    return M.ClassInputs(labels, scores, masks, maps)


def test_evaluate_class_keys_and_values():
    inp = class_inputs(np.random.default_rng(40))
    result = M.evaluate_class(inp.labels, inp.scores, inp.masks, inp.maps, with_pixel=True)
    assert set(result) == set(M.IMAGE_METRICS + M.PIXEL_METRICS + M.COUNT_KEYS)
    assert set(M.METRIC_LABELS) == set(M.IMAGE_METRICS + M.PIXEL_METRICS)
    assert result["n_normal"] == 4 and result["n_anomalous"] == 4
    assert result["aupro"] == pytest.approx(M.aupro(inp.masks, inp.maps), abs=1e-12)
    assert result["pixel_auroc"] == pytest.approx(M.pixel_auroc(inp.masks, inp.maps), abs=1e-12)
    image_only = M.evaluate_class(inp.labels, inp.scores, with_pixel=False)
    assert set(image_only) == set(M.IMAGE_METRICS + M.COUNT_KEYS)


def test_class_without_anomalies_is_none_with_warning_and_excluded_from_mean():
    rng = np.random.default_rng(41)
    inputs = {"good": class_inputs(rng), "bad": class_inputs(rng, anomalies=False)}
    with pytest.warns(M.MetricWarning, match="bad"):
        out = M.evaluate_dataset(inputs, with_pixel=True, n_bootstrap=20, seed=0)
    bad = out["classes"]["bad"]
    for metric in M.IMAGE_METRICS + M.PIXEL_METRICS:
        assert bad[metric] is None
        assert out["mean"][metric] == pytest.approx(out["classes"]["good"][metric])
        assert out["n_classes"][metric] == 1
    assert bad["ci"]["image_auroc"] is None
    assert any("'bad'" in w and "image_auroc" in w and "mean" in w for w in out["warnings"])


def test_missing_masks_make_pixel_metrics_undefined():
    inp = class_inputs(np.random.default_rng(42))
    with pytest.warns(M.MetricWarning, match="no masks"):
        result = M.evaluate_class(inp.labels, inp.scores, None, None, with_pixel=True, class_name="c")
    assert all(result[m] is None for m in M.PIXEL_METRICS)
    assert result["image_auroc"] is not None


def test_summarize_means_and_replicate_means():
    per_class = {"a": {"image_auroc": 0.8, "n_normal": 3}, "b": {"image_auroc": 0.6}, "c": {"image_auroc": None}}
    reps = {
        "a": {"image_auroc": np.array([0.7, 0.9, np.nan])},
        "b": {"image_auroc": np.array([0.5, 0.7, 0.6])},
        "c": {"image_auroc": np.full(3, np.nan)},
    }
    with pytest.warns(M.MetricWarning, match="'c'"):
        out = M.summarize(per_class, reps, confidence=0.9)
    assert out["mean"]["image_auroc"] == pytest.approx(0.7)
    assert out["n_classes"]["image_auroc"] == 2
    # class c is excluded; replicate 3 of a is NaN so replicate 3 of the mean is b's alone
    np.testing.assert_allclose(out["mean_replicates"]["image_auroc"], [0.6, 0.8, 0.6])
    assert out["ci"]["image_auroc"] == pytest.approx(list(np.percentile([0.6, 0.8, 0.6], [5, 95])))


def test_percentile_ci_is_nan_aware():
    values = np.array([np.nan, 0.1, 0.2, 0.3, 0.4, np.nan])
    assert M.percentile_ci(values, 0.5) == pytest.approx((0.175, 0.325))
    assert M.percentile_ci(np.full(4, np.nan)) is None
    with pytest.raises(ValueError):
        M.percentile_ci(values, 1.5)


# ------------------------------------------------------------------------------------------
# bootstrap
# ------------------------------------------------------------------------------------------


def test_evaluate_dataset_is_deterministic_given_seed():
    rng = np.random.default_rng(50)
    inputs = {"x": class_inputs(rng), "y": class_inputs(rng)}
    first = M.evaluate_dataset(inputs, with_pixel=True, n_bootstrap=30, seed=7)
    again = M.evaluate_dataset(dict(reversed(inputs.items())), with_pixel=True, n_bootstrap=30, seed=7)
    other = M.evaluate_dataset(inputs, with_pixel=True, n_bootstrap=30, seed=8)
    assert first == again
    assert first["mean_replicates"] != other["mean_replicates"]
    assert {k: first["bootstrap"][k] for k in ("n", "seed", "confidence")} == {"n": 30, "seed": 7, "confidence": 0.95}
    json.loads(json.dumps(first))  # plain Python types only (metrics.json)


def test_bootstrap_ci_contains_point_estimate():
    inp = class_inputs(np.random.default_rng(51), n=30, signal=1.0)
    point = M.evaluate_class(inp.labels, inp.scores, inp.masks, inp.maps, with_pixel=True)
    reps = M.bootstrap_class(
        inp.labels, inp.scores, inp.masks, inp.maps, n=300, rng=np.random.default_rng(0), with_pixel=True
    )
    assert reps["image_auroc"].shape == reps["pixel_auroc"].shape == (300,)
    for metric in ("image_auroc", "pixel_auroc"):
        lo, hi = M.percentile_ci(reps[metric])
        assert lo <= point[metric] <= hi
        assert hi - lo > 1e-3  # a real interval, not a degenerate one


def test_bootstrap_marks_undefined_resamples_as_nan():
    labels = np.array([1] + [0] * 9)  # one anomaly: ~35% of resamples miss it
    scores = np.linspace(0.0, 1.0, 10)
    reps = M.bootstrap_class(labels, scores, n=200, rng=np.random.default_rng(1), with_pixel=False)
    n_nan = int(np.isnan(reps["image_auroc"]).sum())
    assert 30 < n_nan < 120
    assert np.all(reps["image_auroc"][~np.isnan(reps["image_auroc"])] == 0.0)  # anomaly has lowest score


def test_undefined_replicates_are_counted_not_warned():
    inputs = {"rare": M.ClassInputs(np.array([1] + [0] * 9), np.linspace(0.0, 1.0, 10))}
    out = M.evaluate_dataset(inputs, with_pixel=False, n_bootstrap=200, seed=1)
    again = M.bootstrap_class(inputs["rare"].labels, inputs["rare"].scores, n=200,
                              rng=np.random.default_rng(1), with_pixel=False)
    n_undefined = int(np.isnan(again["image_auroc"]).sum())
    assert out["bootstrap"]["undefined_replicates"] == {"image_auroc": {"rare": n_undefined}}
    assert not any("replicates" in w for w in out["warnings"])


def test_binned_auroc_without_resampling_matches_exact():
    inp = class_inputs(np.random.default_rng(52), n=20, signal=1.0)
    masks, maps = inp.masks, inp.maps
    px = M._pixels(masks, maps)
    ones = np.ones((1, len(masks)))
    binned = M._replicates(ones, M._pixel_histograms(px, 1024))[0]
    assert binned == pytest.approx(M.pixel_auroc(masks, maps), abs=1e-3)
    # image histograms bin on the distinct scores themselves, so they are exact (ties count half)
    tied_scores = np.round(np.asarray(inp.scores), 0)
    images = M._Images(inp.labels, tied_scores, None)
    exact = M._replicates(ones, M._image_histograms(images))[0]
    assert exact == pytest.approx(roc_auc_score(inp.labels, tied_scores), abs=1e-12)


# ------------------------------------------------------------------------------------------
# the path that writes metrics.json against the public functions and scikit-learn
# ------------------------------------------------------------------------------------------


def sklearn_f1_max(y, s):
    precision, recall, _ = precision_recall_curve(y, s)
    denom = precision + recall
    return float(np.max(np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)))


SKLEARN = {"auroc": roc_auc_score, "ap": average_precision_score, "f1_max": sklearn_f1_max}
TOLERANCE = {"aupro": 1e-6}  # the official AU-PRO computes FPRs in float32; every other metric is exact

def signal_class(rng, n=12, shape=(16, 16), image_signal=1.2, pixel_signal=2.0):
    """A class with a real but imperfect signal at both levels: image scores = label * image_signal + noise
    (image AUROC far from 0.5 but below 1), maps with per-image offsets plus pixel_signal on the defects."""
    masks, _ = random_class(rng, n=n, shape=shape)
    labels = (masks.reshape(n, -1) > 0).any(axis=1).astype(int)
    scores = labels * image_signal + rng.normal(size=n)
    maps = 0.5 * rng.normal(size=(n, 1, 1)) + rng.normal(size=masks.shape) + pixel_signal * (masks > 0)
    return M.ClassInputs(labels, scores, masks, maps)


def sklearn_metrics(inp):
    """Every metric scikit-learn has, computed by scikit-learn (F1-max from its PR curve), plus AU-PRO by the
    slow reference implementations of this file."""
    y_img, s_img = np.asarray(inp.labels), np.asarray(inp.scores)
    y_px, s_px = (np.asarray(inp.masks) > 0).ravel(), np.asarray(inp.maps).ravel()
    out = {f"image_{k}": f(y_img, s_img) for k, f in SKLEARN.items()}
    out |= {f"pixel_{k}": f(y_px, s_px) for k, f in SKLEARN.items()}
    out["aupro"] = reference_aupro(inp.masks, inp.maps, 0.3)
    out["aupro_cflow_legacy"] = reference_cflow(inp.masks, inp.maps, 0.3)
    return out


def public_metrics(inp, limit=0.3):
    return {
        "image_auroc": M.image_auroc(inp.labels, inp.scores), "image_ap": M.image_ap(inp.labels, inp.scores),
        "image_f1_max": M.image_f1_max(inp.labels, inp.scores), "pixel_auroc": M.pixel_auroc(inp.masks, inp.maps),
        "pixel_ap": M.pixel_ap(inp.masks, inp.maps), "pixel_f1_max": M.pixel_f1_max(inp.masks, inp.maps),
        "aupro": M.aupro(inp.masks, inp.maps, limit=limit),
        "aupro_cflow_legacy": M.aupro_cflow_legacy(inp.masks, inp.maps, limit=limit),
    }


def test_signal_fixture_has_a_real_signal():
    # a fixture without signal (AUROC ~ 0.5) cannot tell a metric from its inversion
    for seed in (70, 71):
        expected = sklearn_metrics(signal_class(np.random.default_rng(seed)))
        assert 0.75 < expected["image_auroc"] < 0.99 and 0.75 < expected["pixel_auroc"] < 0.99
        assert expected["image_ap"] < 0.99 and expected["pixel_f1_max"] < 0.9


def test_evaluate_class_equals_public_functions_and_sklearn_on_data_with_signal():
    inp = signal_class(np.random.default_rng(70))
    result = M.evaluate_class(inp.labels, inp.scores, inp.masks, inp.maps, with_pixel=True)
    expected, public = sklearn_metrics(inp), public_metrics(inp)
    for metric in M.IMAGE_METRICS + M.PIXEL_METRICS:
        assert result[metric] == pytest.approx(expected[metric], abs=TOLERANCE.get(metric, 1e-9)), metric
        assert result[metric] == pytest.approx(public[metric], abs=1e-12), metric


def test_evaluate_dataset_equals_public_functions_and_sklearn_per_class_and_in_the_mean():
    inputs = {"a": signal_class(np.random.default_rng(70)), "b": signal_class(np.random.default_rng(71), n=10)}
    out = M.evaluate_dataset(inputs, with_pixel=True, n_bootstrap=0, seed=0)
    expected = {c: sklearn_metrics(inp) for c, inp in inputs.items()}
    for metric in M.IMAGE_METRICS + M.PIXEL_METRICS:
        for cls, inp in inputs.items():
            tol = TOLERANCE.get(metric, 1e-9)
            assert out["classes"][cls][metric] == pytest.approx(expected[cls][metric], abs=tol), (cls, metric)
            assert out["classes"][cls][metric] == pytest.approx(public_metrics(inp)[metric], abs=1e-12)
        mean = (expected["a"][metric] + expected["b"][metric]) / 2
        assert out["mean"][metric] == pytest.approx(mean, abs=tol), metric


def test_evaluate_dataset_uses_the_aupro_limit_it_is_given():
    inp = signal_class(np.random.default_rng(72))
    out = M.evaluate_dataset({"a": inp}, with_pixel=True, n_bootstrap=0, seed=0, aupro_limit=0.05)
    for metric in ("aupro", "aupro_cflow_legacy"):
        at_005, at_03 = public_metrics(inp, 0.05)[metric], public_metrics(inp, 0.3)[metric]
        assert abs(at_005 - at_03) > 0.01  # the data tell the two limits apart
        assert out["classes"]["a"][metric] == pytest.approx(at_005, abs=1e-12)
    assert out["classes"]["a"]["aupro"] == pytest.approx(reference_aupro(inp.masks, inp.maps, 0.05), abs=1e-6)


# ------------------------------------------------------------------------------------------
# bootstrap replicates recomputed from the images they drew
# ------------------------------------------------------------------------------------------


def per_image_effect_class(rng, n=10, shape=(16, 16)):
    """Integer-valued maps (few distinct values, so the 1024 quantile bins of the bootstrap hold one value each)
    with a strong per-image offset: resampling pixels instead of images gives far narrower CIs here."""
    masks, _ = random_class(rng, n=n, shape=shape)
    labels = (masks.reshape(n, -1) > 0).any(axis=1).astype(int)
    maps = np.round(3 * rng.normal(size=(n, 1, 1)) + 2 * rng.normal(size=masks.shape) + 3 * (masks > 0))
    scores = labels + rng.normal(size=n)
    return M.ClassInputs(labels, scores, masks, maps)


def auroc_or_nan(y, s):
    return roc_auc_score(y, s) if 0 < np.sum(y) < np.size(y) else np.nan


def redrawn_replicates(inp, draws):
    """Image and pixel AUROC (scikit-learn) of the images of each resample, NaN where undefined."""
    labels, scores = np.asarray(inp.labels), np.asarray(inp.scores)
    masks, maps = np.asarray(inp.masks), np.asarray(inp.maps)
    image = [auroc_or_nan(labels[idx], scores[idx]) for idx in draws]
    pixel = [auroc_or_nan((masks[idx] > 0).ravel(), maps[idx].ravel()) for idx in draws]
    return np.array(image), np.array(pixel)


def test_bootstrap_replicates_are_the_metrics_of_the_redrawn_images():
    inp = per_image_effect_class(np.random.default_rng(80))
    n_pixels = np.asarray(inp.maps).size
    # n_bins >= pixels: every distinct score gets its own bin, so binned replicates are exact
    reps = M.bootstrap_class(inp.labels, inp.scores, inp.masks, inp.maps, n=60, rng=np.random.default_rng(5),
                             with_pixel=True, n_bins=n_pixels)
    draws = M.bootstrap_indices(len(inp.labels), 60, np.random.default_rng(5))
    assert draws.shape == (60, len(inp.labels))
    image, pixel = redrawn_replicates(inp, draws)
    assert np.isfinite(pixel).sum() > 40
    np.testing.assert_allclose(reps["image_auroc"], image, rtol=0, atol=1e-12)
    np.testing.assert_allclose(reps["pixel_auroc"], pixel, rtol=0, atol=1e-12)


def test_evaluate_dataset_bootstrap_resamples_whole_images():
    # the path that writes metrics.json: with one class, the mean replicates are that class's replicates
    inp = per_image_effect_class(np.random.default_rng(81), n=12)
    out = M.evaluate_dataset({"only": inp}, with_pixel=True, n_bootstrap=80, seed=11)
    draws = M.bootstrap_indices(12, 80, np.random.default_rng(11))  # the first (only) class's draws
    image, pixel = redrawn_replicates(inp, draws)
    np.testing.assert_allclose(out["mean_replicates"]["image_auroc"], image, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["mean_replicates"]["pixel_auroc"], pixel, rtol=0, atol=1e-9)
    assert out["classes"]["only"]["ci"]["pixel_auroc"] == pytest.approx(list(M.percentile_ci(pixel)), abs=1e-9)
    lo, hi = out["ci"]["pixel_auroc"]
    assert hi - lo > 0.1  # per-image effects make the image-level interval wide


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def test_nan_and_inf_raise_numerical_error_naming_the_class():
    inp = class_inputs(np.random.default_rng(60))
    scores = np.array(inp.scores, dtype=float)
    scores[2] = np.nan
    with pytest.raises(NumericalError, match="'screw'"):
        M.evaluate_class(inp.labels, scores, with_pixel=False, class_name="screw")
    maps = np.array(inp.maps)
    maps[1, 2, 3] = np.inf
    with pytest.raises(NumericalError, match="'screw'"):
        M.evaluate_dataset(
            {"screw": M.ClassInputs(inp.labels, inp.scores, inp.masks, maps)},
            with_pixel=True,
            n_bootstrap=0,
            seed=0,
        )
    with pytest.raises(NumericalError):
        M.image_auroc([0, 1], [np.nan, 1.0])


def test_malformed_inputs_raise_siad_errors():
    with pytest.raises(SiadError, match="0 .normal. or 1"):
        M.image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(SiadError, match=r"shape \(3,\)"):
        M.image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"2 maps but 3 labels"):
        M.evaluate_class([0, 1, 1], [0.1, 0.2, 0.3], np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), with_pixel=True)


def test_label_mask_disagreement_warns_and_nan_masks_raise():
    inp = class_inputs(np.random.default_rng(61))
    labels = np.array(inp.labels)
    labels[0] = 0  # image 0 has a defect in its mask but is labelled normal
    with pytest.warns(M.MetricWarning, match="1 normal images have anomalous mask pixels"):
        M.evaluate_class(labels, inp.scores, inp.masks, inp.maps, with_pixel=True, class_name="c")
    masks = np.array(inp.masks, dtype=float)
    masks[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="mask 0 contains NaN"):
        M.pixel_auroc(masks, inp.maps)


# --------------------------------------------------------------------------------------------
# LLM judgement
# --------------------------------------------------------------------------------------------

YES = "Yes, there is an anomaly in the image, at the top left of the image."
NO = "No, there are no anomalies in the image."


def test_llm_judgement_hand_counted():
    labels = [1, 1, 0, 0, 1]
    answers = [YES, NO, NO, YES, "I cannot tell from this picture."]
    p_yes = [0.9, 0.2, 0.1, 0.3, 0.8]
    result = M.llm_judgement(labels, answers, p_yes)
    assert result["accuracy"] == pytest.approx(2 / 5)  # right: images 0 (yes/anomalous) and 2 (no/normal)
    assert result["unparsed_rate"] == pytest.approx(1 / 5)
    assert result["p_yes_auroc"] == pytest.approx(5 / 6)  # 0.9 and 0.8 beat both normals, 0.2 beats 0.1 only
    assert (result["n_normal"], result["n_anomalous"]) == (2, 3)


def test_llm_judgement_reads_the_verdict_not_a_substring():
    # "no" inside a "yes" answer and "Yes" as a later word must not flip the verdict
    answers = ["Yes, there is an anomaly; no other defects.", "No. Yes-like texture, but there is no anomaly."]
    assert M.llm_judgement([1, 0], answers)["accuracy"] == 1.0
    assert M.llm_judgement([0, 1], answers)["accuracy"] == 0.0


def test_llm_judgement_one_label_only_leaves_p_yes_auroc_undefined():
    with pytest.warns(M.MetricWarning, match="p_yes_auroc not defined"):
        result = M.llm_judgement([0, 0, 0], [NO, NO, YES], [0.1, 0.2, 0.9], class_name="good_only")
    assert result["p_yes_auroc"] is None and result["accuracy"] == pytest.approx(2 / 3)
    assert M.llm_judgement([1, 0], [YES, NO])["p_yes_auroc"] is None  # no P(Yes) given: nothing to rank


@pytest.mark.parametrize(("labels", "answers", "p_yes", "error"), [
    ([1, 0], [YES], None, M.MetricInputError),
    ([1, 0], [YES, NO], [0.5], M.MetricInputError),
    ([1, 0], [YES, NO], [0.5, float("nan")], NumericalError),
    ([], [], None, M.MetricInputError),
])
def test_llm_judgement_rejects_malformed_inputs(labels, answers, p_yes, error):
    with pytest.raises(error):
        M.llm_judgement(labels, answers, p_yes)


def test_llm_judgement_mean_is_over_classes_as_anomalygpt():
    per_class = {
        "a": M.LlmInputs([1], [YES], [0.9]),  # accuracy 1, AUROC undefined (anomalous only)
        "b": M.LlmInputs([1, 0, 0, 1], [NO, NO, YES, NO], [0.4, 0.1, 0.5, 0.6]),  # accuracy 1/4, AUROC 3/4
    }
    with pytest.warns(M.MetricWarning):
        out = M.evaluate_llm_judgement(per_class)
    assert out["mean"]["accuracy"] == pytest.approx((1 + 0.25) / 2)  # per image it would be 2/5
    assert out["mean"]["p_yes_auroc"] == pytest.approx(0.75) and out["n_classes"]["p_yes_auroc"] == 1
    assert any("'a'" in w and "p_yes_auroc" in w for w in out["warnings"])
    assert "n_normal" not in out["mean"]


def test_metrics_module_stays_torch_free_at_import():
    import subprocess
    import sys

    code = "import sys, siad.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0

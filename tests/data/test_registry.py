"""Dataset registry: names, specs, options and the published-count check."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from siad.data.records import build_meta, make_record
from siad.data.registry import DATASETS, TOTAL, get_dataset
from siad.data.sources import KaggleSource, ManualSource, UrlSource
from siad.errors import ConfigError, DataError, UnknownNameError

NAMES = ["mvtec", "visa", "mpdd", "dtd", "sdd", "btad", "brainmri", "headct", "br35h"]
REFERENCE = Path(__file__).resolve().parents[2] / "config" / "reference" / "siad_table1_uzad.csv"
# Dataset totals (normal, anomalous) of the ZSAD test sets, spec section B / AdaCLIP suppl. Table 1.
PUBLISHED_TOTALS = {"mvtec": (467, 1258), "visa": (962, 1200), "mpdd": (176, 282), "dtd": (357, 947),
                    "btad": (451, 290), "brainmri": (98, 155), "headct": (100, 100), "br35h": (1500, 1500)}


def _meta_with_counts(counts: dict[str, tuple[int, int]]):
    """A synthetic index whose test split has the given per-class counts."""
    test = [make_record(f"{c}/{i}.png", c, "good", False) for c, (n, _) in counts.items() for i in range(n)]
    test += [make_record(f"{c}/a{i}.png", c, "bad", True, f"{c}/a{i}_mask.png")
             for c, (_, a) in counts.items() for i in range(a)]
    return build_meta([], test)


def test_names_and_display_names() -> None:
    assert DATASETS.names() == NAMES
    assert [get_dataset(n).display_name for n in NAMES] == [
        "MVTecAD", "VisA", "MPDD", "DTD", "SDD", "BTAD", "BrainMRI", "HeadCT", "Br35H"]
    assert [get_dataset(n).domain for n in NAMES] == ["industrial"] * 6 + ["medical"] * 3
    assert [get_dataset(n).has_masks for n in NAMES] == [True] * 6 + [False] * 3


def test_display_names_are_the_reference_table_columns() -> None:
    rows = [r for r in csv.reader(REFERENCE.read_text().splitlines()) if r and not r[0].startswith("#")]
    header = rows[0]
    assert header[2:-1] == [get_dataset(n).display_name for n in NAMES]


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(UnknownNameError, match="mvtecc.*known: .*br35h"):
        get_dataset("mvtecc")


@pytest.mark.parametrize("name", NAMES)
def test_expected_counts_cover_the_classes_and_match_published_totals(name: str) -> None:
    spec = get_dataset(name)
    for protocol, per_class in spec.expected_test_counts.items():
        if TOTAL not in per_class:
            assert set(per_class) == set(spec.classes), protocol
    default = spec.expected_test_counts[spec.protocols[0]]
    totals = tuple(sum(v[i] for v in default.values()) for i in (0, 1))
    if name == "sdd":
        assert totals == (286, 54) and spec.expected_test_counts["anomalyclip_drive"] == {spec.classes[0]: (181, 74)}
    else:
        assert totals == PUBLISHED_TOTALS[name]


def test_class_lists() -> None:
    sizes = {n: len(get_dataset(n).classes) for n in NAMES}
    assert sizes == {"mvtec": 15, "visa": 12, "mpdd": 6, "dtd": 12, "sdd": 1, "btad": 3,
                     "brainmri": 1, "headct": 1, "br35h": 1}
    assert get_dataset("btad").classes == ("01", "02", "03")
    assert [get_dataset(n).classes for n in ("brainmri", "headct", "br35h")] == [("brain",), ("head",), ("brain",)]


def test_sources_match_the_acquisition_table() -> None:
    kinds = {n: type(get_dataset(n).sources[0]) for n in NAMES}
    assert kinds == {"mvtec": UrlSource, "visa": UrlSource, "mpdd": ManualSource, "dtd": ManualSource,
                     "sdd": UrlSource, "btad": UrlSource, "brainmri": KaggleSource, "headct": KaggleSource,
                     "br35h": KaggleSource}
    for name in ("mvtec", "visa", "sdd", "btad"):
        source = get_dataset(name).sources[0]
        assert re.fullmatch(r"[0-9a-f]{64}", source.sha256) and all(u.startswith("https://") for u in source.urls)
    assert get_dataset("headct").sources[0].slug == "felipekitamura/head-ct-hemorrhage"
    assert get_dataset("visa").licence == "CC BY 4.0" and get_dataset("btad").licence == "CC BY-SA 4.0"


def test_options_defaults_and_validation() -> None:
    assert get_dataset("sdd").options_with_defaults(None) == {"sdd_protocol": "adaclip_thirds"}
    assert get_dataset("headct").options_with_defaults({"sdd_protocol": "anomalyclip_drive"}) == {
        "medical_protocol": "all_test"}  # another dataset's option is dropped
    assert get_dataset("mvtec").options_with_defaults({"medical_protocol": "dra_75_25"}) == {}
    assert get_dataset("brainmri").protocol({"medical_protocol": "dra_75_25"}) == "dra_75_25"
    with pytest.raises(ConfigError, match="sdd_protcol"):
        get_dataset("sdd").options_with_defaults({"sdd_protcol": "adaclip_thirds"})
    with pytest.raises(ConfigError, match="medical_protocol='dra'"):
        get_dataset("br35h").options_with_defaults({"medical_protocol": "dra"})


def test_check_counts_accepts_the_published_counts() -> None:
    spec = get_dataset("mpdd")
    spec.check_counts(_meta_with_counts(dict(spec.expected_test_counts["default"])))


def test_check_counts_lists_every_mismatching_class() -> None:
    spec = get_dataset("mpdd")
    counts = dict(spec.expected_test_counts["default"])
    counts["tubes"] = (32, 68)
    counts["connector"] = (29, 14)
    del counts["metal_plate"]
    with pytest.raises(DataError) as err:
        spec.check_counts(_meta_with_counts(counts))
    message = str(err.value)
    assert "tubes: expected (32, 69), found (32, 68)" in message
    assert "connector: expected (30, 14), found (29, 14)" in message
    assert "metal_plate missing" in message and "bracket_black" not in message


def test_check_counts_uses_the_selected_protocol() -> None:
    spec = get_dataset("headct")
    meta = _meta_with_counts({"head": (25, 100)})
    spec.check_counts(meta, {"medical_protocol": "dra_75_25"})
    with pytest.raises(DataError, match=r"all_test.*head: expected \(100, 100\), found \(25, 100\)"):
        spec.check_counts(meta)


def test_check_counts_dtd_total_and_class_set() -> None:
    spec = get_dataset("dtd")
    per_class = {c: (30, 79) for c in spec.classes}  # 12 x 30 = 360, 12 x 79 = 948
    with pytest.raises(DataError, match=r"total: expected \(357, 947\), found \(360, 948\)"):
        spec.check_counts(_meta_with_counts(per_class))
    exact = {c: (29 + (i < 9), 78 + (i < 11)) for i, c in enumerate(spec.classes)}
    spec.check_counts(_meta_with_counts(exact))
    exact.pop("Woven_127")
    with pytest.raises(DataError, match="Woven_127 missing"):
        spec.check_counts(_meta_with_counts(exact))

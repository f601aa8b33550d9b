from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from siad.errors import DataError
from siad.report.reference import average_outside, load_reference, reference_claims


def test_comments_kept_and_body_parsed(reference: pd.DataFrame, reference_path: Path) -> None:
    assert reference.attrs["comments"] == [
        "Toy reference: Table 1 shape, AUROC in percent.",
        "Pixel level not reported for medical sets.",
    ]
    assert reference.attrs["source"] == reference_path.name  # outside the repository: no path of this machine
    assert list(reference.columns) == ["level", "method", "MVTecAD", "VisA", "BTAD", "HeadCT", "Average"]
    assert len(reference) == 4
    assert reference.loc[0, "MVTecAD"] == pytest.approx(60.9)


def test_empty_cells_are_nan_and_claims_none(reference: pd.DataFrame) -> None:
    assert math.isnan(reference.loc[1, "VisA"])
    claims = reference_claims(reference, {"level": "image", "method": "SIAD-LLM"}, ["MVTecAD", "VisA", "Nope"])
    assert claims == {"MVTecAD": 72.8, "VisA": None, "Nope": None}
    industrial = ["MVTecAD", "VisA", "MPDD", "DTD", "SDD", "BTAD"]
    pixel = reference_claims(reference, {"level": "pixel", "method": "CLIP"}, [*industrial, "HeadCT", "Average"])
    assert pixel["HeadCT"] is None and pixel["Average"] == 50.7


def test_an_average_over_datasets_the_table_does_not_show_is_not_claimed(reference: pd.DataFrame) -> None:
    subset = reference_claims(reference, {"level": "pixel", "method": "CLIP"}, ["VisA", "SDD", "Average"])
    assert subset["VisA"] is not None and subset["Average"] is None
    outside = average_outside(reference, {"level": None, "method": None}, ["VisA", "SDD", "Average"])
    assert "MVTecAD" in outside and not {"VisA", "SDD", "Average", "level", "method"} & set(outside)


def test_unknown_row_gives_none(reference: pd.DataFrame) -> None:
    assert reference_claims(reference, {"level": "image", "method": "NewBaseline"}, ["MVTecAD"]) is None


def test_duplicate_rows_and_unknown_key_column_fail(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("level,method,A\nimage,X,1.0\nimage,X,2.0\n", encoding="utf-8")
    ref = load_reference(path)
    with pytest.raises(DataError, match="dup.csv: 2 rows match"):
        reference_claims(ref, {"level": "image", "method": "X"}, ["A"])
    with pytest.raises(DataError, match="no column"):
        reference_claims(ref, {"setting": "x"}, ["A"])


def test_non_numeric_claim_fails(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("level,method,A\nimage,X,high\n", encoding="utf-8")
    with pytest.raises(DataError, match="'high' is not a number"):
        reference_claims(load_reference(path), {"level": "image", "method": "X"}, ["A"])


def test_header_only_file_is_an_empty_table(tmp_path: Path) -> None:
    path = tmp_path / "lambda.csv"
    path.write_text("# body missing from the source\nlambda,image,pixel\n", encoding="utf-8")
    ref = load_reference(path)
    assert ref.empty and list(ref.columns) == ["lambda", "image", "pixel"]
    assert ref.attrs["comments"] == ["body missing from the source"]


def test_missing_file_and_comment_only_file_fail(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent.csv.*config/reference"):
        load_reference(tmp_path / "absent.csv")
    only = tmp_path / "only.csv"
    only.write_text("# nothing else\n", encoding="utf-8")
    with pytest.raises(DataError, match="only.csv: no CSV header"):
        load_reference(only)


def test_shipped_table1_reference_parses() -> None:
    path = Path(__file__).resolve().parents[2] / "config" / "reference" / "siad_table1_uzad.csv"
    ref = load_reference(path)
    columns = ["MVTecAD", "VisA", "MPDD", "DTD", "SDD", "BTAD", "BrainMRI", "Average"]
    claims = reference_claims(ref, {"level": "pixel", "method": "SIAD-LLM"}, columns)
    assert (claims["MVTecAD"], claims["BrainMRI"], claims["Average"]) == (86.0, None, 90.0)
    assert reference_claims(ref, {"level": "pixel", "method": "SIAD-LLM"}, ["MVTecAD", "Average"])["Average"] is None


def test_a_repository_reference_is_named_relative_to_the_repository() -> None:
    root = Path(__file__).resolve().parents[2]
    shown = load_reference(root / "config" / "reference" / "filo_table1.csv").attrs["source"]
    assert shown == "config/reference/filo_table1.csv"  # table notes read the same on every machine

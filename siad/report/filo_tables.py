"""FiLo's own tables (seed paper 004), reproduced beside its claims.

**Table 1** (``filo_table1_zad``, claims ``filo_table1.csv``): the classic ZAD protocol, trained on the test split of
MVTecAD or VisA (real anomalies and masks) and tested on the other, image and pixel AUROC. Its rows are FiLo's, in
its order; the methods of ``report.filo_tables.table1_methods`` (CLIP, AnomalyCLIP, FiLo) are reproduced, the others
(CLIP-AC, WinCLIP, APRIL-GAN, AnomalyCLIP-) keep their claims and read "not run".

**Table 4** (``filo_table4_hqloc``, claims ``filo_hqloc_ablation.csv``): the HQ-Loc ablation, each component switched
on in the paper's order (grounding, position enhancement, multi-shape, multi-scale MMCI kernels), under ZAD on
MVTecAD and VisA. Each row is a variant of ``filo`` (:data:`HQLOC_VARIANTS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from siad.engine.protocol import RunKey
from siad.errors import ConfigError
from siad.report.paper import (
    PAPER_TABLES,
    Config,
    PaperTable,
    check_listed,
    display,
    protocol_targets,
    run_keys,
    run_setting,
    variant_row,
)
from siad.report.tables import ClaimTable, ColumnSpec, RowSpec, build_claim_table

__all__ = ["FILO", "FILO_DATASETS", "HQLOC_VARIANTS", "filo_columns"]

FILO = "filo"
SECTION = "filo_tables"
#: FiLo's datasets in its column order: config name → display name (the reference CSV's column prefix).
FILO_DATASETS: dict[str, str] = {"visa": "VisA", "mvtec": "MVTecAD"}
LEVELS: dict[str, str] = {"image": "image_auroc", "pixel": "pixel_auroc"}
#: Table 4's rows: (grounding, position enhancement, multi-shape, multi-scale) → the variant of ``filo`` that runs it.
HQLOC_VARIANTS: dict[tuple[int, int, int, int], str] = {
    (0, 0, 0, 0): "hq_none", (1, 0, 0, 0): "hq_grounding", (1, 1, 0, 0): "hq_position",
    (1, 1, 1, 0): "hq_shape", (1, 1, 0, 1): "hq_scale", (1, 1, 1, 1): "default",
}
HQLOC_FLAGS = ("grounding", "position_enhancement", "multi_shape", "multi_scale")


def _targets(config: Config) -> dict[str, str]:
    """FiLo's datasets that are protocol targets of this config (the demo and the paper profile have both)."""
    targets = protocol_targets(config)
    found = {name: label for name, label in FILO_DATASETS.items() if name in targets}
    if not found:
        raise ConfigError("report: FiLo's tables need MVTecAD or VisA among the protocol targets; add them to "
                          "`protocol` or leave filo_table1_zad / filo_table4_hqloc out of report/tables")
    return found


def filo_columns(datasets: Mapping[str, str]) -> list[ColumnSpec]:
    """``"<Dataset> image"`` / ``"<Dataset> pixel"`` AUROC columns, dataset-major (FiLo's layout)."""
    return [ColumnSpec(f"{label} {level}", {"target": name}, metric)
            for name, label in datasets.items() for level, metric in LEVELS.items()]


def _claims(row: pd.Series, datasets: Mapping[str, str]) -> dict[str, float | None]:
    return {f"{label} {level}": (None if pd.isna(row.get(f"{label}_{level}")) else float(row[f"{label}_{level}"]))
            for label in datasets.values() for level in LEVELS}


# --- Table 1 ------------------------------------------------------------------------------------------------------


def _table1_methods(config: Config) -> list[str]:
    section = config["report"].get(SECTION) or {}
    methods = list(section.get("table1_methods", [FILO]))
    check_listed(config, f"{SECTION}/table1_methods", methods)
    return methods


def _table1_runs(config: Config) -> list[RunKey]:
    return [k for m in _table1_methods(config) for t in _targets(config)
            for k in run_keys(config, "zad", m, "default", t)]


def _table1(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> ClaimTable:
    datasets = _targets(config)
    by_display = {display(config, m): m for m in _table1_methods(config)}
    rows: list[RowSpec] = []
    for _, ref in reference.iterrows():
        method = by_display.pop(ref["method"], None)
        claims = _claims(ref, datasets)
        if method is None:
            rows.append(RowSpec((ref["method"], ref["backbone"]), {"method": ref["method"]}, None, claims,
                                not_run=True))
        else:
            select = {"setting": run_setting(method, "zad"), "method": method, "variant": "default"}
            rows.append(RowSpec((ref["method"], ref["backbone"]), select, None, claims))
    for label, method in by_display.items():  # configured methods FiLo's table does not list: no claims
        rows.append(RowSpec((label, ""), {"setting": run_setting(method, "zad"), "method": method,
                                          "variant": "default"}, None, None))
    notes = ["Claimed numbers: FiLo's Table 1 (filo_table1.csv), the classic ZAD protocol: trained on the test split "
             "of MVTecAD (real anomalies, masks) and tested on VisA, and the reverse.",
             "Reproduced: the suite's `zad` runs (VisA from MVTecAD-trained weights, MVTecAD from VisA-trained) of the "
             "configured methods; CLIP is training-free (one run serves every setting). FiLo's claimed numbers come "
             "from its released code, with the Grounding DINO its authors fine-tuned on the auxiliary set, which the "
             "paper profile loads (the demo's detector is a tiny random one)."]
    return build_claim_table(runs, rows, filo_columns(datasets), name="filo_table1",
                             title="FiLo Table 1: zero-shot anomaly detection (ZAD), AUROC (%)",
                             row_header=("method", "backbone"), column_header="column", notes=notes)


# --- Table 4 ------------------------------------------------------------------------------------------------------


def _table4_runs(config: Config) -> list[RunKey]:
    return [k for v in HQLOC_VARIANTS.values() for t in _targets(config) for k in run_keys(config, "zad", FILO, v, t)]


MULTI_SHAPE, MULTI_SCALE = {"1x5", "5x1"}, {"3x3", "5x5", "7x7"}


def _check_hqloc_variant(config: Config, variant: str, flags: Mapping[str, int]) -> None:
    """Refuse a variant whose resolved parameters do not switch the HQ-Loc components its Table 4 row names."""
    from siad.config import method_params
    from siad.methods import get_method_class

    params = get_method_class(FILO).resolve_params(method_params(config, FILO, variant))
    kernels = set(params["kernels"])
    found = {"grounding": int(params["grounding"]), "position_enhancement": int(params["position_enhancement"]),
             "multi_shape": int(MULTI_SHAPE <= kernels), "multi_scale": int(MULTI_SCALE <= kernels)}
    partial = bool(kernels & MULTI_SHAPE) and not MULTI_SHAPE <= kernels or (
        bool(kernels & MULTI_SCALE) and not MULTI_SCALE <= kernels)
    if found != dict(flags) or partial:
        raise ConfigError(f"methods/filo/variants/{variant}: FiLo Table 4's row {dict(flags)} needs grounding, "
                          f"position_enhancement and kernels that switch exactly those components; the variant "
                          f"resolves to {found} (kernels {sorted(kernels)})")


def _mark(flag: int) -> str:
    return "✓" if flag else "✗"


def _table4(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> ClaimTable:
    if FILO not in config["methods"]:
        raise ConfigError("report: filo_table4_hqloc needs methods/filo with its hq_* variants; add it")
    datasets = _targets(config)
    rows = []
    for flags, variant in HQLOC_VARIANTS.items():
        match = reference
        for name, flag in zip(HQLOC_FLAGS, flags, strict=True):
            match = match[match[name] == flag]
        claims = _claims(match.iloc[0], datasets) if not match.empty else None
        label = ", ".join(f"{n}={f}" for n, f in zip(HQLOC_FLAGS, flags, strict=True))
        row = variant_row(config, f"FiLo Table 4 ({label})", FILO, variant, claims, setting="zad")
        _check_hqloc_variant(config, variant, dict(zip(HQLOC_FLAGS, flags, strict=True)))
        rows.append(RowSpec(tuple(_mark(f) for f in flags), row.select, None, claims))
    notes = ["Rows: variants of FiLo under ZAD (methods/filo/variants): hq_none, hq_grounding, hq_position, hq_shape, "
             "hq_scale and the default. Without grounding the map is not suppressed outside Grounding DINO's boxes; "
             "without position enhancement the abnormal prompts of all 9 positions are averaged (as in training); "
             "multi-shape = MMCI's 1x5 and 5x1 kernels, multi-scale = its 3x3, 5x5 and 7x7 kernels, and with both off "
             "MMCI keeps its 1x1 kernel (the paper does not say what replaces it: the suite's reading)."]
    return build_claim_table(runs, rows, filo_columns(datasets), name="filo_table4",
                             title="FiLo Table 4: HQ-Loc ablation under ZAD, AUROC (%)",
                             row_header=("grounding", "position enhancement", "multi-shape", "multi-scale"),
                             column_header="column", notes=notes)


for _stem, _reference, _runs, _build in (
    ("filo_table1_zad", "filo_table1.csv", _table1_runs, _table1),
    ("filo_table4_hqloc", "filo_hqloc_ablation.csv", _table4_runs, _table4),
):
    PAPER_TABLES.add(_stem, PaperTable(_stem, _reference, _runs, _build))

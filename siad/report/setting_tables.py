"""The tables of the other two settings: SIAD-LLM Table 2 (``pseudo``) and the classic ZAD table (``zad``).

**Table 2** (``table2_pseudo``, claims ``siad_table2_pseudo.csv``): the trained baselines of ``report.table2.methods``
trained on the auxiliary normal images plus pseudo-anomalies (setting ``pseudo``), and the rows of
``report.table2.repeat_uzad`` (SIAD-LLM) repeated from their Table 1 UZAD runs, as the paper does. The paper's other
rows (methods not implemented or not configured) keep their claims and read "not run".

**ZAD table** (``table_zad``, claims ``filo_table1.csv``): the methods of ``report.zad.methods`` under the classic
zero-shot protocol (trained on the auxiliary *test* split with its real anomalies), image and pixel AUROC on the
protocol targets. The SIAD-LLM paper prints no ZAD numbers (its Fig. 2(a) plots them), so the claims are those the
methods' own papers report, as FiLo's Table 1 collects them: CLIP, AnomalyCLIP and FiLo on MVTecAD and VisA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from siad.engine.protocol import RunKey
from siad.errors import ConfigError
from siad.report.paper import (
    PAPER_TABLES,
    Config,
    PaperTable,
    check_listed,
    display,
    medical_targets,
    protocol_targets,
    setting_overrides,
    target_runs,
    training_free,
)
from siad.report.reference import AVERAGE
from siad.report.tables import LEVEL_METRICS, ClaimTable, build_dataset_table, reference_methods

TABLE2, ZAD = "table2", "zad"

#: The methods the SIAD-LLM paper compares, in its Table 1 row order (display names): the order of the ZAD table's
#: rows, and which rows of another paper's table (FiLo's) are methods of this benchmark.
PAPER_METHODS = ("CLIP", "AdaCLIP", "AnomalyCLIP", "AnomalyGPT", "FiLo", "AA-CLIP", "SIAD-LLM")


def report_section(config: Config, name: str, example: str) -> Mapping[str, Any]:
    """``report.<name>``, its methods checked; a clear error when its table is listed without it."""
    section = config["report"].get(name)
    if not section:
        raise ConfigError(f"report/{name} is missing, but its table is listed in report/tables; add "
                          f"report/{name}/methods (e.g. {example})")
    for key in ("methods", "repeat_uzad"):
        check_listed(config, f"{name}/{key}", section.get(key, []))
    return section


# --- Table 2 (pseudo-anomalies) ---------------------------------------------------------------------------------


def table2_settings(config: Config) -> dict[str, str]:
    """Row method -> the setting of its runs: ``pseudo`` for ``methods``, ``uzad`` for ``repeat_uzad``.

    Raises:
        ConfigError: a method listed twice, or a training-free method under ``methods`` (Table 2 compares methods
            trained with pseudo-anomalies; a training-free method has no pseudo run).
    """
    section = report_section(config, TABLE2, "[anomalyclip]")
    pseudo, repeated = list(section["methods"]), list(section.get("repeat_uzad", []))
    both = sorted(set(pseudo) & set(repeated))
    if both:
        raise ConfigError(f"report/{TABLE2}: {both} listed under both `methods` and `repeat_uzad`; keep one")
    if not pseudo and not repeated:
        raise ConfigError(f"report/{TABLE2}: no method under `methods` or `repeat_uzad`; list the trained baselines "
                          "(e.g. methods: [anomalyclip]) or leave table2_pseudo out of report/tables")
    free = [m for m in pseudo + repeated if training_free(m)]
    if free:
        raise ConfigError(f"report/{TABLE2}: {free} need no training, so they have no pseudo-anomaly run and no row "
                          "in the paper's Table 2; Table 2 lists trained methods (remove them)")
    _check_repeated_rows(config, repeated)
    return {**dict.fromkeys(pseudo, "pseudo"), **dict.fromkeys(repeated, "uzad")}


def _check_repeated_rows(config: Config, repeated: Sequence[str]) -> None:
    """A ``repeat_uzad`` method must be a Table 1 row whose Table 2 row the paper prints as a repeat of it (SIAD-LLM):
    otherwise its UZAD runs would be checked against claims made under another setting."""
    from siad.report.reference import load_reference

    outside = [m for m in repeated if m not in config["report"]["table1"]["methods"]]
    if outside:
        raise ConfigError(f"report/{TABLE2}/repeat_uzad: {outside} are not Table 1 rows (report/table1/methods), "
                          "so there is no Table 1 run to repeat; add them there or remove them here")
    if not repeated:
        return
    folder = Path(__file__).resolve().parents[2] / "config" / "reference"
    table1, table2 = load_reference(folder / "siad_table1_uzad.csv"), load_reference(folder / "siad_table2_pseudo.csv")
    for method in repeated:
        name = display(config, method)
        rows = [frame[frame["method"] == name].drop(columns="method").reset_index(drop=True)
                for frame in (table1, table2)]
        if rows[1].empty or not rows[0].equals(rows[1]):
            raise ConfigError(f"report/{TABLE2}/repeat_uzad: the paper's Table 2 does not repeat {name}'s Table 1 "
                              "row (only SIAD-LLM's is a repeat); list it under report/table2/methods (its pseudo "
                              "runs) instead")


def _table2_runs(config: Config) -> list[RunKey]:
    settings = table2_settings(config)
    return [key for method, setting in settings.items() for key in target_runs(config, setting, [method])]


def _table2(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> ClaimTable:
    settings = table2_settings(config)
    datasets = protocol_targets(config)
    repeated = [display(config, m) for m, s in settings.items() if s == "uzad"]
    notes = ["Trained rows: the auxiliary normal images plus pseudo-anomalies made from them (CutPaste + Poisson "
             "blending, siad.data.pseudo), the paper's pseudo-anomaly setting."]
    if repeated:
        notes.append(f"{', '.join(repeated)}: repeated from the Table 1 runs (UZAD, normal images only), as the "
                     "paper does; its claims are the paper's Table 1 numbers, printed again in Table 2.")
    return build_dataset_table(
        runs, reference, name="table2", title="Table 2: baselines trained with pseudo-anomalies, AUROC (%)",
        methods={m: display(config, m) for m in settings}, datasets=datasets, medical=medical_targets(datasets),
        setting="pseudo", setting_overrides=settings, order=reference_methods(reference), notes=notes)


# --- ZAD (the classic protocol) ---------------------------------------------------------------------------------


def zad_reference(filo: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """FiLo's Table 1 (``method, backbone, <Dataset>_image, <Dataset>_pixel``) as a (level, method) x ``columns``
    reference like Table 1's, keeping the rows of :data:`PAPER_METHODS`; datasets FiLo lacks and the Average are
    empty (no claim)."""
    kept = filo[filo["method"].isin(PAPER_METHODS)]
    rows = [{"level": level, "method": row["method"], AVERAGE: np.nan,
             **{c: row.get(f"{c}_{level}", np.nan) for c in columns}}
            for level in LEVEL_METRICS for _, row in kept.iterrows()]
    frame = pd.DataFrame(rows, columns=["level", "method", *columns, AVERAGE])
    frame.attrs.update(filo.attrs)
    return frame


def zad_order(methods: Sequence[str], claimed: Sequence[str]) -> list[str]:
    """The ZAD rows of the paper's methods (display names): the configured ``methods`` and the methods with a claim,
    in the paper's order (:data:`PAPER_METHODS`). Configured methods the paper does not compare are not here: the
    table builder (``method_rows``) appends them."""
    wanted = set(methods) | set(claimed)
    return [m for m in PAPER_METHODS if m in wanted]


def _zad_methods(config: Config) -> list[str]:
    return list(report_section(config, ZAD, "[clip, anomalyclip, anomalygpt, siad_llm]")["methods"])


def _zad_runs(config: Config) -> list[RunKey]:
    return target_runs(config, "zad", _zad_methods(config))


def _zad_notes(config: Config, filo: pd.DataFrame, methods: Sequence[str]) -> list[str]:
    source = filo.attrs.get("source", "filo_table1.csv")
    kept = filo[filo["method"].isin(PAPER_METHODS)]
    backbones = ", ".join(f"{r['method']} {r['backbone']}" for _, r in kept.iterrows())
    notes = [f"Claimed numbers: FiLo's Table 1 ({source}), which quotes each method's own paper under the classic "
             f"ZAD protocol (trained on the test split of MVTecAD or VisA with its real anomalies, tested on the "
             f"other; {backbones}). The SIAD-LLM paper prints no ZAD numbers (its Fig. 2(a) plots them only). "
             "Other datasets and methods have no ZAD claim (n/a); there is no claimed Average.",
             "Reproduced: trained on the test split (real anomalies and masks) of the protocol's source of each "
             "target (MVTecAD from VisA, the other industrial sets from MVTecAD, the medical sets from Br35H / "
             "BrainMRI)."]
    free = [display(config, m) for m in methods if training_free(m)]
    if free:
        notes.append(f"{', '.join(free)}: training-free, so the row is the same run as Table 1's (one run serves "
                     "every setting).")
    return notes


def _zad(config: Config, runs: Sequence[Mapping[str, Any]], filo: pd.DataFrame) -> ClaimTable:
    methods = _zad_methods(config)
    datasets = protocol_targets(config)
    reference = zad_reference(filo, list(datasets.values()))
    displays = {m: display(config, m) for m in methods}
    return build_dataset_table(
        runs, reference, name="table_zad",
        title="ZAD setting (classic zero-shot protocol, auxiliary anomalies), AUROC (%)", methods=displays,
        datasets=datasets, medical=medical_targets(datasets), setting="zad",
        setting_overrides=setting_overrides(config, methods, "zad"),
        order=zad_order(list(displays.values()), reference_methods(reference)), notes=_zad_notes(config, filo, methods))


for _stem, _reference, _runs, _build in (
    ("table2_pseudo", "siad_table2_pseudo.csv", _table2_runs, _table2),
    ("table_zad", "filo_table1.csv", _zad_runs, _zad),
):
    PAPER_TABLES.add(_stem, PaperTable(_stem, _reference, _runs, _build))

"""The paper tables the workflow renders, as a registry: each table says which runs it needs and
how to build itself from their metrics.json files and the claimed numbers.

Adding a table = one :class:`PaperTable` entry; the workflow's ``report`` rule asks every configured
table for its runs (so Snakemake schedules exactly those evaluations) and renders them all, plus the
claims check that lists every claimed number of every table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from siad.config import training_seeds
from siad.data.registry import DATASETS, get_dataset
from siad.engine.protocol import NO_SOURCE, RunKey, protocol_pairs
from siad.errors import ConfigError, DataError
from siad.registry import Registry
from siad.report.claims import claims_check
from siad.report.reference import load_reference
from siad.report.render import write_table, write_text_atomic
from siad.report.runs import load_runs, refuse_stale_runs
from siad.report.tables import (
    ClaimTable,
    ColumnSpec,
    RowSpec,
    build_claim_table,
    build_table1,
    reference_methods,
)

Config = Mapping[str, Any]


@dataclass(frozen=True)
class PaperTable:
    """One rendered table: ``runs(config)`` lists what it needs, ``build`` makes the ClaimTable."""

    stem: str
    reference: str | None  # CSV file name of the claimed numbers under the reference folder (None: no claims)
    runs: Callable[[Config], list[RunKey]]
    build: Callable[[Config, Sequence[Mapping[str, Any]], pd.DataFrame], ClaimTable]


PAPER_TABLES: Registry[PaperTable] = Registry("paper table")


def training_free(method: str) -> bool:
    """Whether ``method`` needs no training (then its runs have source ``none``)."""
    from siad.methods import get_method_class

    return get_method_class(method).training_free


#: The setting under which training-free methods are run: they see no training data, so one run serves every
#: setting's table (a ZAD table's CLIP row is the same run as Table 1's).
TRAINING_FREE_SETTING = "uzad"


def run_setting(method: str, setting: str) -> str:
    """The setting of ``method``'s runs in a table of ``setting``: :data:`TRAINING_FREE_SETTING` for training-free
    methods, ``setting`` otherwise. Row selections use it so that every table finds the one training-free run."""
    return TRAINING_FREE_SETTING if training_free(method) else setting


def run_key(config: Config, setting: str, method: str, variant: str, target: str, seed: int) -> RunKey:
    """The run evaluating ``method``/``variant`` on ``target`` with ``seed``: source ``none`` if training-free,
    else the protocol's source of ``target``."""
    setting = run_setting(method, setting)
    if training_free(method):
        return RunKey(setting, method, variant, NO_SOURCE, target, seed)
    sources = [s for s, t in protocol_pairs(config["protocol"]) if t == target]
    if not sources:
        raise ConfigError(f"report: {target!r} is no protocol target, so {method!r} has no source for it")
    return RunKey(setting, method, variant, sources[0], target, seed)


def run_keys(config: Config, setting: str, method: str, variant: str, target: str) -> list[RunKey]:
    """Every run of ``method``/``variant`` on ``target`` under ``setting``: one per training seed of a trained method
    (``training.seeds``), one for a training-free method. Table cells average them (mean ± std over seeds)."""
    return [run_key(config, setting, method, variant, target, seed) for seed in training_seeds(config, method)]


def protocol_targets(config: Config) -> dict[str, str]:
    """Config name → column name of every protocol target, in the paper's dataset order."""
    targets = {target for _, target in protocol_pairs(config["protocol"])}
    return {name: get_dataset(name).display_name for name in DATASETS.names() if name in targets}


def check_listed(config: Config, key: str, names: Sequence[str], kind: str = "methods") -> None:
    """Refuse a name under ``report/<key>`` that the config does not list under ``<kind>`` (``methods`` or
    ``datasets``): the one check every report section's names go through."""
    for name in names:
        if name not in config[kind]:
            raise ConfigError(f"report/{key}: {name!r} is not listed under `{kind}`")


def display(config: Config, method: str) -> str:
    """The row label of ``method`` (its ``display_name``, matching the paper's)."""
    return config["methods"][method]["display_name"]


def target_runs(config: Config, setting: str, methods: Sequence[str], targets: Sequence[str] | None = None
                ) -> list[RunKey]:
    """Every run of ``methods`` (default variant, all their seeds) on ``targets`` (default: every protocol target)
    under ``setting``, method-major; training-free methods' one run (:func:`run_setting`)."""
    targets = list(protocol_targets(config)) if targets is None else targets
    return [key for m in methods for t in targets for key in run_keys(config, setting, m, "default", t)]


def setting_overrides(config: Config, methods: Sequence[str], setting: str) -> dict[str, str]:
    """Method -> the setting its runs carry in a table of ``setting`` (the training-free ones' one setting)."""
    return {m: run_setting(m, setting) for m in methods}


# --- SIAD-LLM Table 1 ---------------------------------------------------------------------------


def _table1_runs(config: Config) -> list[RunKey]:
    section = config["report"]["table1"]
    return target_runs(config, section.get("setting", "uzad"), section["methods"])


def medical_targets(datasets: Mapping[str, str]) -> set[str]:
    """The medical datasets among ``datasets`` (config names): no pixel level there."""
    return {d for d in datasets if get_dataset(d).domain == "medical"}


def _table1(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> ClaimTable:
    """Table 1 in the paper's row order: the reference's methods not in ``report.table1.methods`` are "not run"."""
    section = config["report"]["table1"]
    datasets = protocol_targets(config)
    setting = section.get("setting", "uzad")
    return build_table1(
        runs,
        reference,
        methods={m: display(config, m) for m in section["methods"]},
        datasets=datasets,
        medical=medical_targets(datasets),
        setting=setting,
        setting_overrides=setting_overrides(config, section["methods"], setting),
        order=reference_methods(reference),
    )


PAPER_TABLES.add("table1_uzad", PaperTable("table1_uzad", "siad_table1_uzad.csv", _table1_runs, _table1))


# --- AnoVL's own tables (seed 002) and SIAD-LLM Table 7 ----------------------------------------
# AnoVL is training-free, so every row is one variant of the `anovl` method (see config/*.yaml):
# default = TFA + the paper's TTA adapter, tfa = no TTA, attn_* = Table 3, prompt_* = Table 4,
# linear_probe = Table 5. "PRO" is the CFlow-style AU-PRO of the zero-shot papers' code.

ANOVL = "anovl"
ANOVL_DATASETS = {"mvtec": "MVTecAD", "visa": "VisA"}
LOCALIZATION = {"AUROC": "pixel_auroc", "F1Max": "pixel_f1_max", "PRO": "aupro_cflow_legacy"}
DETECTION = {"AUROC": "image_auroc", "F1Max": "image_f1_max", "AUPR": "image_ap"}
PRO_NOTE = "PRO = AU-PRO computed as in the zero-shot papers' code (CFlow-style, FPR < 0.3, rescaled)."


def _anovl_runs(variants: Sequence[str], targets: Sequence[str]) -> Callable[[Config], list[RunKey]]:
    def runs(config: Config) -> list[RunKey]:
        return [k for v in variants for t in targets for k in run_keys(config, "uzad", ANOVL, v, t)]

    return runs


def _claims(frame: pd.DataFrame, columns: Mapping[str, str]) -> dict[str, float | None] | None:
    """One reference row's claims: table column name → reference column (None if the row is absent)."""
    if frame.empty:
        return None
    row = frame.iloc[0]
    return {col: (None if pd.isna(row[ref]) else float(row[ref])) for col, ref in columns.items()}


def _anovl_results_claims(reference: pd.DataFrame, table: int, method: str, third: str) -> dict[str, float | None]:
    claimed: dict[str, float | None] = {}
    for display_name in ANOVL_DATASETS.values():
        rows = reference[(reference["table"] == table) & (reference["method"] == method)
                         & (reference["dataset"] == display_name)]
        row_claims = _claims(rows, {f"{display_name} AUROC": "AUROC", f"{display_name} F1Max": "F1max",
                                    f"{display_name} {third}": "third_value"})
        claimed.update(row_claims or {})
    return claimed


def _anovl_localization(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> ClaimTable:
    # The paper's TTA numbers were produced by the released code, so the code variant is held to them too.
    rows = [variant_row(config, f"{display(config, ANOVL)}-{label}", ANOVL, variant,
                        _anovl_results_claims(reference, 1, f"AnoVL-{claim}", "PRO"))
            for label, variant, claim in LOCALIZATION_ROWS]
    return build_claim_table(runs, rows, table_columns(ANOVL_DATASETS, LOCALIZATION), name="anovl_table1",
                             title="AnoVL Table 1: zero-shot anomaly localization (%)", row_header=("method",),
                             column_header="column", notes=[PRO_NOTE])


def _anovl_detection(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> ClaimTable:
    rows = [variant_row(config, display(config, ANOVL), ANOVL, "default",
                        _anovl_results_claims(reference, 2, "AnoVL", "AUPR"))]
    return build_claim_table(runs, rows, table_columns(ANOVL_DATASETS, DETECTION), name="anovl_table2",
                             title="AnoVL Table 2: zero-shot anomaly detection (%)", row_header=("method",),
                             column_header="column")


def _ablation_rows(config: Config, reference: pd.DataFrame, table: str,
                   rows: Sequence[tuple[str, str]]) -> list[RowSpec]:
    columns = {"MVTecAD AUROC": "AUROC", "MVTecAD F1Max": "F1Max", "MVTecAD PRO": "PRO_or_AUPR"}
    return [variant_row(config, label, ANOVL, variant,
                        _claims(reference[(reference["table"] == table) & (reference["variant"] == ref_label)],
                                columns))
            for label, variant, ref_label in ((r[0], r[1], r[0]) for r in rows)]


MVTEC_ONLY = {"mvtec": "MVTecAD"}
LOCALIZATION_ROWS = (("TFA", "tfa", "TFA"), ("TTA", "default", "TTA"), ("TTA (released code)", "tta_code", "TTA"))
ATTENTION_ROWS = (("with QKV attention", "attn_qkv"), ("with V (last layer)", "attn_v_last"),
                  ("with V-V attention (last layer)", "attn_vv_last"), ("with V-V attention (multi-layer)", "tfa"))
ADAPTER_ROWS = (("Linear Probe", "linear_probe"), ("AnoVL TTA adapter", "default"))
PROMPT_ROWS = (("Base", "prompt_base"), ("+CS Prompt", "prompt_cs"), ("+DA Prompt", "tfa"))


def _anovl_attention(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> ClaimTable:
    rows = _ablation_rows(config, reference, "3-attention", ATTENTION_ROWS)
    return build_claim_table(runs, rows, table_columns(MVTEC_ONLY, LOCALIZATION), name="anovl_table3",
                             title="AnoVL Table 3: attention adaptation of CLIP, MVTecAD localization (%)",
                             row_header=("variant",), column_header="column", notes=[PRO_NOTE])


def _anovl_adapter(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> ClaimTable:
    rows = _ablation_rows(config, reference, "5-adapter", ADAPTER_ROWS)
    return build_claim_table(runs, rows, table_columns(MVTEC_ONLY, LOCALIZATION), name="anovl_table5",
                             title="AnoVL Table 5: adapter optimisation, MVTecAD localization (%)",
                             row_header=("variant",), column_header="column", notes=[PRO_NOTE])


def _anovl_prompts(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> ClaimTable:
    metrics = {"AD AUROC": "image_auroc", "AD F1Max": "image_f1_max", "AD AUPR": "image_ap",
               "AL AUROC": "pixel_auroc", "AL F1Max": "pixel_f1_max", "AL PRO": "aupro_cflow_legacy"}
    reference_columns = {f"MVTecAD {k}": k.replace(" ", "_") for k in metrics}
    rows = [variant_row(config, label, ANOVL, variant,
                        _claims(reference[reference["prompts"] == label], reference_columns))
            for label, variant in PROMPT_ROWS]
    return build_claim_table(runs, rows, table_columns(MVTEC_ONLY, metrics), name="anovl_table4",
                             title="AnoVL Table 4: prompt engineering on MVTecAD (%)", row_header=("prompts",),
                             column_header="column", notes=[PRO_NOTE])


def industrial_targets(config: Config) -> dict[str, str]:
    """Config name → column name of the industrial protocol targets (SIAD Tables 3, 4 and 7)."""
    return {n: d for n, d in protocol_targets(config).items() if get_dataset(n).domain == "industrial"}


def _table7_runs(config: Config) -> list[RunKey]:
    """Each row's default variant on the industrial targets: training-free methods (AnoVL) once per target, trained
    ones (SIAD-LLM) with the protocol's weights (MVTecAD from VisA-trained, the others from MVTecAD-trained): the
    runs Table 1 evaluates, so a SIAD-LLM row costs no extra job."""
    methods = config["report"].get("table7", {}).get("methods", [ANOVL])
    return [k for m in methods for t in industrial_targets(config) for k in run_keys(config, "uzad", m, "default", t)]


def _table7(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> ClaimTable:
    methods = config["report"].get("table7", {}).get("methods", [ANOVL])
    datasets = industrial_targets(config)
    rows = [RowSpec((display(config, m),), {"setting": "uzad", "method": m, "variant": "default"},
                    "pixel_auroc", None) for m in methods]
    columns = [ColumnSpec(d, {"target": n}) for n, d in datasets.items()]
    notes = ["SIAD-LLM Table 7's numbers are not recoverable from the paper text available to this project "
             "(only its caption survives; config/reference/ has no Table 7 file), so no claimed values are shown."]
    trained = [display(config, m) for m in methods if not training_free(m)]
    if trained:
        notes.append(f"{', '.join(trained)}: trained under UZAD and evaluated with the protocol's weights (MVTecAD "
                     "from VisA-trained, the other datasets from MVTecAD-trained), the same runs as Table 1, whose "
                     "claimed pixel AUROC for these models is checked there; the other rows are training-free.")
    return build_claim_table(runs, rows, columns, name="siad_table7", average=True, row_header=("method",),
                             title="SIAD-LLM Table 7: comparison with training-free methods, pixel AUROC (%)",
                             notes=notes)


for _stem, _reference, _runs, _build in (
    ("anovl_table1_localization", "anovl_tables.csv", _anovl_runs([v for _, v, _ in LOCALIZATION_ROWS],
                                                                   list(ANOVL_DATASETS)),
     _anovl_localization),
    ("anovl_table2_detection", "anovl_tables.csv", _anovl_runs(["default"], list(ANOVL_DATASETS)), _anovl_detection),
    ("anovl_table3_attention", "anovl_ablations.csv", _anovl_runs([v for _, v in ATTENTION_ROWS], ["mvtec"]),
     _anovl_attention),
    ("anovl_table4_prompts", "anovl_prompt_ablation.csv", _anovl_runs([v for _, v in PROMPT_ROWS], ["mvtec"]),
     _anovl_prompts),
    ("anovl_table5_adapter", "anovl_ablations.csv", _anovl_runs([v for _, v in ADAPTER_ROWS], ["mvtec"]),
     _anovl_adapter),
    ("siad_table7_training_free", None, _table7_runs, _table7),
):
    PAPER_TABLES.add(_stem, PaperTable(_stem, _reference, _runs, _build))


def configured_tables(config: Config) -> list[str]:
    """The tables ``all`` renders: ``report.tables`` (paper tables), then ``report.user_tables`` (declared ones)."""
    from siad.report.user_tables import user_tables

    return [*config["report"]["tables"], *user_tables(config)]


def table_stem(name: str) -> str:
    """The file stem of table ``name`` under ``tables/<profile>/`` (a user table's stem is its name)."""
    return PAPER_TABLES.get(name).stem if name in PAPER_TABLES else name


def table_runs(config: Config, name: str) -> list[RunKey]:
    """The runs table ``name`` (a paper table or a user table) reads."""
    from siad.report.user_tables import user_table_runs, user_tables

    if name in user_tables(config):
        return user_table_runs(config, name)
    return PAPER_TABLES.get(name).runs(config)


def build_table(config: Config, name: str, runs: Sequence[Mapping[str, Any]], reference_dir: Path) -> ClaimTable:
    """Table ``name`` (a paper table with its claims, or a user table) from the runs' metrics."""
    from siad.report.user_tables import build_user_table, user_tables

    if name in user_tables(config):
        return build_user_table(config, name, runs)
    table = PAPER_TABLES.get(name)
    reference = load_reference(Path(reference_dir) / table.reference) if table.reference else pd.DataFrame()
    return table.build(config, runs, reference)


def _checked_runs(config: Config, metrics_paths: Sequence[Path], needed: Sequence[RunKey],
                  require_current: bool) -> list[dict[str, Any]]:
    runs = load_runs([Path(p) for p in metrics_paths])
    if require_current:
        refuse_stale_runs(config, runs)
        refuse_missing_runs(runs, needed)
    return runs


def render_table(config: Config, name: str, metrics_paths: Sequence[Path], out_dir: Path, reference_dir: Path, *,
                 require_current: bool = True) -> list[Path]:
    """Write table ``name`` (md, tex, csv) into ``out_dir`` from the metrics files of its runs.

    ``require_current``: refuse metrics files whose stamp differs from the run specification of ``config``, the
    prepared indexes and the code (:func:`siad.report.runs.refuse_stale_runs`), and a table whose runs are not all
    given; False renders what it is given (tests with hand-made metrics).
    """
    runs = _checked_runs(config, metrics_paths, table_runs(config, name), require_current)
    return write_table(build_table(config, name, runs, reference_dir), out_dir, table_stem(name))


def render_claims_check(config: Config, metrics_paths: Sequence[Path], out_path: Path, reference_dir: Path, *,
                        require_current: bool = True) -> Path:
    """Write ``claims_check.md``: every claimed number of every configured paper table beside its reproduction."""
    runs = _checked_runs(config, metrics_paths, paper_table_runs(config), require_current)
    tables = [build_table(config, name, runs, reference_dir) for name in config["report"]["tables"]]
    return write_text_atomic(Path(out_path), claims_check(tables))


def render_report(
    config: Config, metrics_paths: Sequence[Path], out_dir: Path, reference_dir: Path, *,
    require_current: bool = True,
) -> list[Path]:
    """Write every configured table (md, tex, csv) and ``claims_check.md`` into ``out_dir`` (what the workflow's
    per-table rules and its claims rule write one by one, in one call: notebooks and tests).

    Every table is built before any file is written, so a failure (a stale or bad metrics file, a missing claim)
    leaves the previous tables as they were, not a mix.
    """
    runs = _checked_runs(config, metrics_paths, required_runs(config), require_current)
    built = [(name, build_table(config, name, runs, reference_dir)) for name in configured_tables(config)]
    check = claims_check([table for name, table in built if name in config["report"]["tables"]])
    written = [path for name, table in built for path in write_table(table, out_dir, table_stem(name))]
    written.append(write_text_atomic(out_dir / "claims_check.md", check))
    return written


def refuse_missing_runs(runs: Sequence[Mapping[str, Any]], needed: Sequence[RunKey]) -> None:
    """Raise DataError naming the runs of ``needed`` that ``runs`` lacks: a cell must never average a subset of its
    training seeds (or show "missing") because a file was left out."""
    present = {RunKey.from_run(run["run"]) for run in runs}
    missing = [key for key in needed if key not in present]
    if missing:
        shown = ", ".join(str(key.run_dir("")) for key in missing[:6]) + (" ..." if len(missing) > 6 else "")
        raise DataError(f"{len(missing)} run(s) the table(s) need have no metrics.json among the files "
                        f"given: {shown}; run the workflow (snakemake ... all), which computes them")


def paper_table_runs(config: Config) -> list[RunKey]:
    """Every run the configured paper tables (``report.tables``) need: what the claims check reads."""
    return list(dict.fromkeys(key for name in config["report"]["tables"] for key in table_runs(config, name)))


def required_runs(config: Config) -> list[RunKey]:
    """Every run the configured tables (paper and user tables) need, without duplicates, in table order."""
    return list(dict.fromkeys(key for name in configured_tables(config) for key in table_runs(config, name)))


def table_columns(
    datasets: Mapping[str, str], metrics: Mapping[str, str]
) -> list[ColumnSpec]:
    """Columns ``"<Dataset> <label>"`` for each dataset × (label → metric), dataset-major."""
    return [
        ColumnSpec(f"{display_name} {label}", {"target": name}, metric)
        for name, display_name in datasets.items()
        for label, metric in metrics.items()
    ]


def variant_row(config: Config, key: str, method: str, variant: str, claimed: Mapping[str, float | None] | None,
                setting: str = "uzad") -> RowSpec:
    """A row showing ``method``/``variant`` (default setting ``uzad``: training-free runs serve every setting)."""
    if variant != "default" and variant not in config["methods"][method].get("variants", {}):
        raise ConfigError(f"report: table row {key!r} needs variant {variant!r} of method {method!r}; add it")
    return RowSpec((key,), {"setting": setting, "method": method, "variant": variant}, None, claimed)


__all__ = [
    "PAPER_TABLES", "PaperTable", "build_claim_table", "build_table", "configured_tables", "industrial_targets",
    "paper_table_runs", "protocol_targets", "render_claims_check", "render_report", "render_table", "required_runs",
    "table_runs", "table_stem", "run_key", "run_keys", "run_setting", "table_columns", "target_runs", "variant_row",
]


# Tables defined in their own modules register themselves in PAPER_TABLES when imported.
from siad.report import filo_tables, llm_tables, setting_tables, siad_tables  # noqa: E402, F401

"""SIAD-LLM's ablation tables (paper Tables 3a, 3b, 4 and 5): every row is one variant of one method.

What each row shows comes from the config, not from this module (``report.siad_ablations``)::

    siad_ablations:
      method: siad_llm                # the method whose variants the rows are
      setting: uzad                   # optional (default uzad)
      table3a: {"w/o SI": wo_si, "w/o SP": wo_sp, Full: default}   # row label (as in the reference) -> variant
      table3b: {"w/o EM": wo_em, "w/o EM (strict)": wo_em_strict, ..., Full: default}
      table4: [default, lambda03, ...]    # optional, see below
      table5: [case1, case2, default]     # optional, see below

Tables 4 and 5 are sweeps over one parameter, read from the method's *resolved* parameters (class
defaults + config params + the variant's overrides): ``adapter_lambda`` (Table 4) and ``stage_case``
(Table 5). Without a list, the rows are ``default`` plus every variant that overrides the parameter
— except, for Table 4, a lambda of 0: that is "w/o Adapter" (the module removed), a Table 3b row and
not a point of the paper's sweep (0.1 ... 0.9). Rows are sorted by the parameter.

A Table 3 label "<paper row> (<detail>)" is a variant of that paper row (e.g. "w/o PEM (strict)": PEM removed with
nothing in its place, where "w/o PEM" substitutes AnomalyGPT's prompt learner; "Full (teacher-forced R)"): it
shows the paper row's claims, and a variant of the full model is not one of the ablations the full model must beat.
The table notes say, from each row's resolved parameters, what replaces PEM, how R is fed back in training and how
the pixel loss is weighted without self-improvement.

Datasets: Tables 3 and 4 use the industrial protocol targets (each with its protocol source: MVTecAD
with VisA-trained weights, the others with MVTecAD-trained ones), Table 5 MVTecAD only. Each table
also carries the paper's ordering claims (:mod:`siad.report.orderings`): the full model is best on
the Average (3a, 3b), AUROC falls as lambda grows (4; the paper's numbers are missing, so this is the
only check), case 3 is best (5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from siad.config import method_params
from siad.engine.protocol import RunKey
from siad.errors import ConfigError
from siad.report.orderings import best_row_check, non_increasing_check
from siad.report.paper import (
    MVTEC_ONLY,
    PAPER_TABLES,
    Config,
    PaperTable,
    check_listed,
    industrial_targets,
    run_keys,
    variant_row,
)
from siad.report.reference import reference_claims
from siad.report.render import DASH
from siad.report.tables import (
    AVERAGE,
    LEVEL_METRICS,
    ClaimTable,
    ColumnSpec,
    RowSpec,
    average_scope_notes,
    build_claim_table,
)

SECTION = "siad_ablations"
LAMBDA_PARAM = "adapter_lambda"
CASE_PARAM = "stage_case"
DEFAULT_CASE = 3  # the paper's default stage prompts (Table 6, case 3)
FULL_VARIANT = "default"  # the full model: every module on, lambda = 0.1, case 3
PEM_SUBSTITUTE_NOTES = {
    "conv": "PEM replaced by AnomalyGPT's convolutional prompt learner on the combined map (the spec's reading of "
            "the paper's ablation; 107.4 M parameters at paper size where PEM has 21.0 M)",
    "none": "PEM removed with nothing in its place (strict): only the 9 learnable base prompts reach the LLM, "
            "no map information",
}
WO_SI_NOTE = ("self-improvement removed: one pass, whose focal and dice terms carry the whole pixel-loss weight "
              "(alpha, beta as in the full model, where pass_weights split it between the two passes)")
TEACHER_NOTE = ("trained with the teacher-forced target answer as the response R fed back to the refined pass "
                "(the default, Algorithm 1, feeds back the LLM's own answer to the first pass, as at test)")


def ablation_section(config: Config) -> Mapping[str, Any]:
    """``report.siad_ablations``; a clear error when a SIAD ablation table is configured without it."""
    section = config["report"].get(SECTION)
    if not section:
        raise ConfigError(
            f"report/{SECTION} is missing, but a SIAD-LLM ablation table (3a, 3b, 4, 5) is listed in "
            f"report/tables; add report/{SECTION} with the method and the variant of each row (see config/README.md)"
        )
    return section


def _method(config: Config) -> str:
    method = ablation_section(config)["method"]
    check_listed(config, f"{SECTION}/method", [method])
    return method


def _setting(config: Config) -> str:
    return ablation_section(config).get("setting", "uzad")


def resolved_params(config: Config, method: str, variant: str) -> dict[str, Any]:
    """The parameters ``method``/``variant`` runs with: class defaults, config params, variant overrides."""
    from siad.methods import get_method_class

    return get_method_class(method).resolve_params(method_params(config, method, variant))


def labelled_variants(config: Config, table: str) -> list[tuple[str, str]]:
    """(row label, variant) of ``report.siad_ablations.<table>``, in config order."""
    rows = ablation_section(config).get(table)
    if not rows:
        raise ConfigError(
            f"report/{SECTION}/{table} is missing: map each row label of the paper's table (as in "
            f"siad_table3_ablations.csv, e.g. 'w/o SI') to a variant of the method"
        )
    return list(rows.items())


def sweep_rows(config: Config, table: str, param: str, keep: Callable[[Any], bool]) -> list[tuple[Any, str]]:
    """(parameter value, variant) of a sweep table, sorted by value (see the module docstring).

    Raises:
        ConfigError: a variant is unknown, lacks the parameter, or two rows share one value.
    """
    method = _method(config)
    listed = ablation_section(config).get(table)
    if listed is None:
        overrides = config["methods"][method].get("variants", {})
        listed = [FULL_VARIANT, *[v for v, o in overrides.items() if param in o and keep(o[param])]]
    rows = []
    for variant in listed:
        params = resolved_params(config, method, variant)
        if param not in params:
            raise ConfigError(f"report/{SECTION}/{table}: variant {variant!r} of {method!r} has no parameter "
                              f"{param!r}, so it cannot be a row of this sweep; remove it from the list")
        rows.append((params[param], variant))
    values = [value for value, _ in rows]
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise ConfigError(f"report/{SECTION}/{table}: several rows have {param} = {', '.join(twice)}; "
                          "keep one variant per value")
    return sorted(rows, key=lambda row: row[0])


def lambda_rows(config: Config) -> list[tuple[float, str]]:
    """Table 4's (lambda, variant) rows, lambda ascending (lambda = 0 = w/o Adapter is left out)."""
    return [(float(v), variant) for v, variant in sweep_rows(config, "table4", LAMBDA_PARAM, lambda v: v > 0)]


def case_rows(config: Config) -> list[tuple[int, str]]:
    """Table 5's (stage-prompt case, variant) rows, case ascending; one of them must be the default case.

    Raises:
        ConfigError: no row has case 3, so the paper's claim (case 3 is best) cannot be checked.
    """
    rows = [(int(v), variant) for v, variant in sweep_rows(config, "table5", CASE_PARAM, lambda v: True)]
    if DEFAULT_CASE not in dict(rows):
        raise ConfigError(f"report/{SECTION}/table5: no row has {CASE_PARAM} = {DEFAULT_CASE}; the paper's claim "
                          f"that case {DEFAULT_CASE} is best needs it (add the variant running it, e.g. default)")
    return rows


def _runs(variants: Callable[[Config], Sequence[str]], targets: Callable[[Config], Mapping[str, str]]
          ) -> Callable[[Config], list[RunKey]]:
    def runs(config: Config) -> list[RunKey]:
        method, setting = _method(config), _setting(config)
        return [k for v in variants(config) for t in targets(config) for k in run_keys(config, setting, method, v, t)]

    return runs


def _level_rows(config: Config, labelled: Sequence[tuple[str, str]],
                claims: Callable[[str, str], Mapping[str, float | None] | None]) -> list[RowSpec]:
    """Image then pixel level, one row per (label, variant), as in Table 1's layout."""
    method, setting = _method(config), _setting(config)
    return [
        dataclasses.replace(variant_row(config, label, method, variant, claims(level, label), setting),
                            key=(level, label), metric=metric)
        for level, metric in LEVEL_METRICS.items()
        for label, variant in labelled
    ]


def _dataset_columns(config: Config) -> list[ColumnSpec]:
    return [ColumnSpec(name, {"target": target}) for target, name in industrial_targets(config).items()]


def paper_row(label: str) -> str:
    """The paper's row a Table 3 label shows: "w/o PEM (strict)" → "w/o PEM" (a variant of that row)."""
    return label.split(" (", 1)[0]


def row_notes(config: Config, labelled: Sequence[tuple[str, str]]) -> list[str]:
    """One note per row that removes PEM, self-improvement, or feeds back the target answer in training, read from
    the row's resolved parameters (so the note says which variant of the ablation the row runs)."""
    method = _method(config)
    notes = []
    for label, variant in labelled:
        params = resolved_params(config, method, variant)
        said = []
        if params.get("pem") is False:
            said.append(PEM_SUBSTITUTE_NOTES[params.get("pem_substitute", "conv")])
        if params.get("self_improvement") is False:
            said.append(WO_SI_NOTE)
        elif params.get("train_response") == "teacher":
            said.append(TEACHER_NOTE)
        if said:
            notes.append(f"{label}: " + "; ".join(said) + ".")
    return notes


def _full_label(config: Config, table: str, labelled: Sequence[tuple[str, str]]) -> str:
    full = [label for label, variant in labelled if variant == FULL_VARIANT]
    if not full:
        raise ConfigError(f"report/{SECTION}/{table}: no row maps to variant {FULL_VARIANT!r} (the full model); "
                          "the paper's claim that the full model is best needs it")
    return full[0]


# --- Table 3a / 3b -----------------------------------------------------------------------------

TABLE3_TITLES = {
    "table3a": "SIAD-LLM Table 3a: self-improvement (SI) and stage prompt (SP) ablations",
    "table3b": "SIAD-LLM Table 3b: enhanced module (EM = SEM + PEM) and adapter ablations",
}


def _table3(table: str) -> Callable[[Config, Sequence[Mapping[str, Any]], pd.DataFrame], ClaimTable]:
    reference_table = table.removeprefix("table")  # "3a" / "3b", the reference's `table` column

    def build(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> ClaimTable:
        labelled = labelled_variants(config, table)
        columns = _dataset_columns(config)
        wanted = [c.name for c in columns] + [AVERAGE]
        notes = average_scope_notes(reference, wanted, ("table", "variant", "level"))

        def claims(level: str, label: str) -> Mapping[str, float | None] | None:
            found = reference_claims(reference, {"table": reference_table, "variant": paper_row(label),
                                                 "level": level}, wanted)
            if found is None:
                notes.append(f"{reference.attrs.get('source', 'reference')}: no {level}-level row "
                             f"{paper_row(label)!r} of Table {reference_table}; its claims show as n/a")
            return found

        rows = _level_rows(config, labelled, claims)
        built = build_claim_table(
            runs, rows, columns, name=f"siad_{table}", average=True, row_header=("level", "variant"),
            title=f"{TABLE3_TITLES[table]}, industrial datasets, {_setting(config).upper()}, AUROC (%)",
            notes=notes + row_notes(config, labelled))
        full = _full_label(config, table, labelled)
        ablations = [lb for lb, _ in labelled if paper_row(lb) != paper_row(full)]  # not variants of the full model
        built.checks = [
            best_row_check(built, (level, full), [(level, lb) for lb in ablations], AVERAGE,
                           f"{full} has the highest Average {level} AUROC")
            for level in LEVEL_METRICS
        ]
        return built

    return build


def _table3_variants(table: str) -> Callable[[Config], list[str]]:
    """The variants of a Table 3 (checking at start-up that one row is the full model)."""
    def variants(config: Config) -> list[str]:
        labelled = labelled_variants(config, table)
        _full_label(config, table, labelled)
        return [variant for _, variant in labelled]

    return variants


# --- Table 4: the lambda sweep -----------------------------------------------------------------


def _lambda_claims(reference: pd.DataFrame, value: float, level: str) -> dict[str, float | None] | None:
    """The Average claim for one lambda, if the reference has that row (its body is missing today)."""
    if reference.empty or "lambda" not in reference.columns:
        return None
    rows = reference[np.isclose(reference["lambda"].astype(float), value)]
    if rows.empty or level not in rows.columns or pd.isna(rows.iloc[0][level]):
        return None
    return {AVERAGE: float(rows.iloc[0][level])}


def _table4(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> ClaimTable:
    lambdas = lambda_rows(config)
    labelled = [(f"{value:g}", variant) for value, variant in lambdas]
    by_label = dict(zip((label for label, _ in labelled), (value for value, _ in lambdas)))
    rows = _level_rows(config, labelled, lambda level, label: _lambda_claims(reference, by_label[label], level))
    notes = []
    if all(r.claimed is None for r in rows):
        notes.append("The numbers of the paper's Table 4 are missing from its source text (– in place of the "
                     "claims). The text states that image- and pixel-level AUROC fall consistently as lambda "
                     "grows; that trend is checked on the Average column (ordering claims).")
    notes.append("lambda = 0 (w/o Adapter: the adapter removed) is a row of Table 3b, not of this sweep.")
    built = build_claim_table(
        runs, rows, columns=_dataset_columns(config), name="siad_table4", average=True,
        row_header=("level", "lambda"), notes=notes,
        title=f"SIAD-LLM Table 4: adapter coefficient lambda (Eq. 6), industrial datasets, "
              f"{_setting(config).upper()}, AUROC (%)")
    if all(r.claimed is None for r in rows):
        built.no_claim = DASH
    built.checks = [
        non_increasing_check(built, [(level, label) for label, _ in labelled], AVERAGE,
                             f"Average {level} AUROC does not rise as lambda grows")
        for level in LEVEL_METRICS
    ]
    return built


# --- Table 5: stage-prompt cases ---------------------------------------------------------------


def _case_label(case: int) -> str:
    return f"Case {case}"


CASE_CONFLICT_NOTE = (
    "Appendix C's text calls Case 1 a transition from low- to high-level semantics and Case 2 one from small to "
    "large spatial focus, the reverse of Table 6's words (Case 1: very small ... very large region of; Case 2: "
    "low ... high level feature of). The rows follow Table 6, whose caption says it lists the prompts behind "
    "Table 5's results (stage_case uses Table 6's numbering).")


def _stage_words_notes(reference: pd.DataFrame) -> list[str]:
    stages = [c for c in reference.columns if str(c).startswith("stage")]
    return [f"Case {row['case']} stage words (stages 1-4, paper Table 6): " + " / ".join(str(row[s]) for s in stages)
            for _, row in reference.iterrows()] + [CASE_CONFLICT_NOTE]


def _table5(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> ClaimTable:
    cases = case_rows(config)
    method, setting = _method(config), _setting(config)
    levels = list(LEVEL_METRICS)
    rows = [variant_row(config, _case_label(case), method, variant,
                        reference_claims(reference, {"case": case}, levels), setting)
            for case, variant in cases]
    (target, name), = MVTEC_ONLY.items()
    columns = [ColumnSpec(level, {"target": target}, metric) for level, metric in LEVEL_METRICS.items()]
    built = build_claim_table(
        runs, rows, columns, name="siad_table5", row_header=("case",), column_header="level",
        title=f"SIAD-LLM Table 5: stage prompt configurations on {name}, {setting.upper()}, AUROC (%)",
        notes=_stage_words_notes(reference))
    best = (_case_label(DEFAULT_CASE),)
    others = [(_case_label(c),) for c, _ in cases if c != DEFAULT_CASE]
    built.checks = [best_row_check(built, best, others, level, f"{best[0]} has the highest {level} AUROC on {name}")
                    for level in levels]
    return built


for _stem, _reference, _runs_of, _build in (
    ("siad_table3a_si_sp", "siad_table3_ablations.csv",
     _runs(_table3_variants("table3a"), industrial_targets), _table3("table3a")),
    ("siad_table3b_encoder", "siad_table3_ablations.csv",
     _runs(_table3_variants("table3b"), industrial_targets), _table3("table3b")),
    ("siad_table4_lambda", "siad_table4_lambda.csv",
     _runs(lambda c: [v for _, v in lambda_rows(c)], industrial_targets), _table4),
    ("siad_table5_stage_prompts", "siad_table5_stage_prompts.csv",
     _runs(lambda c: [v for _, v in case_rows(c)], lambda c: MVTEC_ONLY), _table5),
):
    PAPER_TABLES.add(_stem, PaperTable(_stem, _reference, _runs_of, _build))

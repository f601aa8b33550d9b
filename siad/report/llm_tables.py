"""The LLM-judgement side table of Table 1: how well the LLM's own yes/no answer detects anomalies.

For each LLM method of ``report.llm_judgement.methods`` and each Table-1 dataset: the accuracy of the
parsed yes/no verdict against the label (AnomalyGPT's accuracy), the rate of answers that parse as
neither yes nor no, and the image AUROC of P("Yes") at the answer's first token. The numbers come
from the ``"llm"`` block of the runs' metrics.json (``{"classes": ..., "mean": {"accuracy",
"unparsed_rate", "p_yes_auroc"}}``, means over classes); they carry no bootstrap replicates, so the
Average column has no CI.

No claimed numbers: the SIAD paper reports none, and AnomalyGPT's accuracies (its Tables 2 and 3)
come from other settings (same-dataset unsupervised, few-shot with normal reference images), so they
are quoted in a note as context, never compared cell by cell.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from siad.engine.protocol import RunKey
from siad.errors import ConfigError, DataError
from siad.report.paper import PAPER_TABLES, Config, PaperTable, check_listed, display, protocol_targets, run_keys
from siad.report.render import DASH
from siad.report.runs import matching_runs, run_label
from siad.report.tables import ClaimTable, ColumnSpec, RowSpec, build_claim_table

SECTION = "llm_judgement"
LLM_KEY = "llm"
#: Row label -> key of the "llm" block's ``mean``.
MEASURES: dict[str, str] = {"accuracy": "accuracy", "unparsed rate": "unparsed_rate", "P(Yes) AUROC": "p_yes_auroc"}
_METRIC_PREFIX = "llm_"
_REGENERATE = "re-run the evaluation of this run with the current code (delete the file and run snakemake again)"


def llm_section(config: Config) -> Mapping[str, Any]:
    """``report.llm_judgement``; a clear error when the table is configured without it."""
    section = config["report"].get(SECTION)
    if not section:
        raise ConfigError(f"report/{SECTION} is missing, but table {SECTION!r} is listed in report/tables; add "
                          f"report/{SECTION}/methods (the LLM methods, e.g. [anomalygpt, siad_llm])")
    check_listed(config, f"{SECTION}/methods", section["methods"])
    return section


def _setting(config: Config) -> str:
    return llm_section(config).get("setting", "uzad")


def _llm_runs(config: Config) -> list[RunKey]:
    return [key for method in llm_section(config)["methods"] for target in protocol_targets(config)
            for key in run_keys(config, _setting(config), method, "default", target)]


def llm_means(run: Mapping[str, Any]) -> dict[str, float | None]:
    """The ``llm.mean`` block of a run, checked (numbers or null).

    Raises:
        DataError: the run has no ``llm`` block (its method returned no answers) or a malformed one.
    """
    source = run_label(run)
    block = run.get(LLM_KEY)
    if not isinstance(block, dict) or not isinstance(block.get("mean"), dict):
        raise DataError(f"{source}: no '{LLM_KEY}.mean' block, so the method returned no LLM answers; list only LLM "
                        f"methods under report/{SECTION}/methods, or {_REGENERATE}")
    means = block["mean"]
    for key in MEASURES.values():
        value = means.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise DataError(f"{source}: {LLM_KEY}.mean.{key} must be a number or null, got {value!r}; {_REGENERATE}")
    return {key: None if means.get(key) is None or not math.isfinite(means[key]) else float(means[key])
            for key in MEASURES.values()}


def _as_metric_run(run: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``run`` whose ``mean`` holds the LLM measures (``llm_<key>``), without CIs or replicates."""
    means = {_METRIC_PREFIX + key: value for key, value in llm_means(run).items()}
    return {**run, "mean": means, "ci": {}, "mean_replicates": {}}


def _context_note(reference: pd.DataFrame) -> str:
    """AnomalyGPT's own accuracy claims, quoted with their settings (not comparable to this table)."""
    rows = reference[(reference["method"] == "AnomalyGPT") & reference["accuracy"].notna()]
    quoted = "; ".join(f"{r.setup} on {r.dataset} {float(r.accuracy):.1f}" for r in rows.itertuples())
    return ("Context, not comparable (other settings): AnomalyGPT's paper reports accuracy " + quoted +
            " (Table 3 unsupervised = trained on the same dataset; Table 2 n-shot = with normal reference images). "
            "This table is cross-dataset UZAD, so no claimed number is shown (–).")


def _llm_table(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> ClaimTable:
    section, setting = llm_section(config), _setting(config)
    methods = {m: display(config, m) for m in section["methods"]}
    mine = [r for m in methods for r in matching_runs(runs, {"setting": setting, "method": m, "variant": "default"})]
    llm_runs = [_as_metric_run(r) for r in mine]
    rows = [RowSpec((label, name), {"setting": setting, "method": method, "variant": "default"},
                    _METRIC_PREFIX + key, None)
            for label, key in MEASURES.items() for method, name in methods.items()]
    columns = [ColumnSpec(name, {"target": target}) for target, name in protocol_targets(config).items()]
    notes = [
        "accuracy: the parsed yes/no verdict of the generated answer against the label (AnomalyGPT's accuracy: "
        "'Yes' for an anomalous image, 'No' for a normal one), mean over classes.",
        "unparsed rate: answers that parse as neither yes nor no (counted as wrong in the accuracy).",
        "P(Yes) AUROC: image AUROC of the probability of 'Yes' at the answer's first token.",
        "No bootstrap replicates are recorded for these measures: no CIs.",
    ]
    if not reference.empty:
        notes.append(_context_note(reference))
    notes += [f"{run_label(r)}: {w}" for r in mine for w in r[LLM_KEY].get("warnings", []) or []]
    built = build_claim_table(llm_runs, rows, columns, name=SECTION, average=True, average_ci=False,
                              row_header=("measure", "method"), notes=notes,
                              title=f"LLM judgement of the {setting.upper()} runs (side table of Table 1), %")
    built.no_claim = DASH
    return built


PAPER_TABLES.add(SECTION, PaperTable(SECTION, "anomalygpt_tables.csv", _llm_runs, _llm_table))

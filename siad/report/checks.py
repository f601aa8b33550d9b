"""Start-up checks of the ``report`` section: the methods, variants and datasets the tables and the figure name.

Kept in the report package (the tables know which runs they need) and called by :mod:`siad.plan`, so the
config layer never imports the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from siad.config import method_variants
from siad.errors import ConfigError, SiadError
from siad.report.paper import PAPER_TABLES, check_listed, required_runs
from siad.report.paper_figures import figure_runs
from siad.report.setting_tables import table2_settings


def check_report_config(config: Mapping[str, Any]) -> None:
    """Refuse a report section that names an unconfigured method, variant or dataset (ConfigError naming the key)."""
    try:
        _check_report_methods(config)
        if "table2" in config["report"]:  # checked when present, listed in report/tables or not
            table2_settings(config)
        _check_user_table_names(config)
        _check_report_runs(config)
    except ConfigError:
        raise
    except SiadError as err:
        raise ConfigError(f"invalid configuration: {err}") from None


def _check_report_methods(config: Mapping[str, Any]) -> None:
    """The methods named by the report sections (tables, LLM side table, ablations, figures) must be configured."""
    report = config["report"]
    named = {"table1/methods": report["table1"]["methods"],
             "table7/methods": report.get("table7", {}).get("methods", []),
             "llm_judgement/methods": report.get("llm_judgement", {}).get("methods", []),
             "siad_ablations/method": [report["siad_ablations"]["method"]] if "siad_ablations" in report else [],
             **{f"{name}/{key}": report.get(name, {}).get(key, [])
                for name, key in (("table2", "methods"), ("table2", "repeat_uzad"), ("zad", "methods"),
                                  ("figure1", "methods"), ("figure2", "methods"), ("figure4", "methods"))}}
    for key, methods in named.items():
        check_listed(config, key, methods)
    for figure in ("figure2", "figure4"):
        check_listed(config, f"{figure}/datasets", report.get(figure, {}).get("datasets", []), "datasets")


def _check_report_runs(config: Mapping[str, Any]) -> None:
    """Every run a configured table or figure needs must name a configured method, variant and dataset."""
    for key in [*required_runs(config), *figure_runs(config)]:
        if key.method not in config["methods"]:
            raise ConfigError(f"report: a table needs method {key.method!r}, which is not listed under `methods`")
        if key.variant not in method_variants(config, key.method):
            raise ConfigError(f"report: a table needs variant {key.variant!r} of {key.method!r}; add it under "
                              f"methods/{key.method}/variants")
        if key.target not in config["datasets"]:
            raise ConfigError(f"report: a table needs dataset {key.target!r}, which is not listed under `datasets`")


#: File stems under tables/<profile>/ that are not paper tables: a user table may not take them.
RESERVED_STEMS = ("claims_check", "speed", "cost")


def _check_user_table_names(config: Mapping[str, Any]) -> None:
    """A user table's name is its file stem: it must not be a paper table's name or stem, or another output's."""
    from siad.report.figures import FIGURE_STEM
    from siad.report.paper_figures import STEMS as FIGURE_STEMS
    from siad.report.user_tables import user_tables

    taken = {*PAPER_TABLES.names(), *(PAPER_TABLES.get(n).stem for n in PAPER_TABLES.names()), *RESERVED_STEMS,
             FIGURE_STEM, *FIGURE_STEMS.values()}
    for name in user_tables(config):
        if name in taken:
            raise ConfigError(f"report/user_tables/{name}: the name is taken by a paper table or another output "
                              "(tables/<profile>/<name>.md would be written twice); rename the user table")

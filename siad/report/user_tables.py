"""Tables a user declares in the config, without library code: ``report.user_tables``.

A user table is methods × variants (rows) × datasets (columns) for one setting, at one or more levels (image AUROC,
pixel AUROC, ...), with an Average column. It has no claimed numbers, so its cells show the reproduced number only and
its legend does not speak of claims. Its name is its file stem: ``tables/<profile>/<name>.{md,tex,csv}``. Example::

    report:
      user_tables:
        edge_vs_clip:
          title: A training-free baseline beside CLIP (UZAD)
          setting: uzad
          rows: {CLIP: clip, Edge contrast: edge_contrast, AnoVL TFA: anovl/tfa}   # label: method or method/variant
          datasets: [mvtec, visa]            # default: every protocol target
          levels: {image: image_auroc}       # default: image AUROC and pixel AUROC

Any configured variant may be a row, including one no paper table uses (otherwise such a variant is never run).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from siad.config import method_variants
from siad.data.registry import get_dataset
from siad.engine.protocol import RunKey
from siad.errors import ConfigError
from siad.metrics import METRIC_LABELS
from siad.report.tables import ClaimTable, ColumnSpec, RowSpec, build_claim_table

Config = Mapping[str, Any]

#: The levels a user table shows when it names none: level -> metric key of metrics.json.
DEFAULT_LEVELS: dict[str, str] = {"image": "image_auroc", "pixel": "pixel_auroc"}


@dataclass(frozen=True)
class UserRow:
    """One row of a user table: its label, method and variant."""

    label: str
    method: str
    variant: str


def user_tables(config: Config) -> dict[str, Mapping[str, Any]]:
    """The declared user tables (name -> section), in config order."""
    return dict(config["report"].get("user_tables") or {})


def user_rows(config: Config, name: str) -> list[UserRow]:
    """The rows of user table ``name``, each checked against ``methods`` (ConfigError naming the key and the fix)."""
    rows = []
    for label, ref in user_tables(config)[name]["rows"].items():
        method, _, variant = str(ref).partition("/")
        variant = variant or "default"
        where = f"report/user_tables/{name}/rows/{label}"
        if method not in config["methods"]:
            raise ConfigError(f"{where}: method {method!r} is not listed under `methods`; add it there or fix the row")
        if variant not in method_variants(config, method):
            raise ConfigError(f"{where}: {method!r} has no variant {variant!r} (methods/{method}/variants); known: "
                              f"{method_variants(config, method)}")
        rows.append(UserRow(str(label), method, variant))
    return rows


def user_datasets(config: Config, name: str) -> dict[str, str]:
    """Config name -> column name of the datasets of user table ``name`` (default: every protocol target)."""
    from siad.report.paper import protocol_targets

    targets = protocol_targets(config)
    chosen = user_tables(config)[name].get("datasets")
    if chosen is None:
        return targets
    unknown = [d for d in chosen if d not in targets]
    if unknown:
        raise ConfigError(f"report/user_tables/{name}/datasets: {unknown} are not protocol targets (`protocol`); "
                          f"choose among {list(targets)}")
    return {d: targets[d] for d in chosen}


def user_levels(config: Config, name: str) -> dict[str, str]:
    """Level label -> metric key of user table ``name``, each a metric of metrics.json."""
    levels = dict(user_tables(config)[name].get("levels") or DEFAULT_LEVELS)
    unknown = sorted(set(levels.values()) - set(METRIC_LABELS))
    if unknown:
        raise ConfigError(f"report/user_tables/{name}/levels: unknown metric(s) {unknown}; known: "
                          f"{list(METRIC_LABELS)}")
    return levels


def user_table_runs(config: Config, name: str) -> list[RunKey]:
    """Every run user table ``name`` reads: each row's runs (all training seeds) on each of its datasets."""
    from siad.report.paper import run_keys

    setting = user_tables(config)[name].get("setting", "uzad")
    datasets = user_datasets(config, name)
    user_levels(config, name)
    return [key for row in user_rows(config, name) for target in datasets
            for key in run_keys(config, setting, row.method, row.variant, target)]


def build_user_table(config: Config, name: str, runs: Sequence[Mapping[str, Any]]) -> ClaimTable:
    """User table ``name`` from the runs' metrics: (level, row) x dataset cells and an Average column, no claims."""
    from siad.report.paper import run_setting

    section = user_tables(config)[name]
    setting = section.get("setting", "uzad")
    datasets = user_datasets(config, name)
    medical = frozenset(display for d, display in datasets.items() if get_dataset(d).domain == "medical")
    rows = [RowSpec((level, row.label), {"setting": run_setting(row.method, setting), "method": row.method,
                                         "variant": row.variant}, metric,
                    not_applicable=medical if metric.startswith("pixel") else frozenset())
            for level, metric in user_levels(config, name).items() for row in user_rows(config, name)]
    columns = [ColumnSpec(display, {"target": d}) for d, display in datasets.items()]
    table = build_claim_table(runs, rows, columns, name=name, title=section.get("title", name),
                              row_header=("level", "method"), average=True,
                              notes=[f"A table declared in the config (report/user_tables/{name}), setting "
                                     f"{setting}; no paper claims these numbers."])
    table.has_claims = False
    return table

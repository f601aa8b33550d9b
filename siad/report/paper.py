"""The paper's tables as the workflow renders them: config + metrics.json files → table files.

Each ``*_table`` function turns the config's report section and the runs into a :class:`ClaimTable`;
:func:`render_report` writes every table and the claims check that lists all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from siad.data.registry import DATASETS, get_dataset
from siad.engine.protocol import protocol_pairs
from siad.report.claims import claims_check
from siad.report.reference import load_reference
from siad.report.render import write_table, write_text_atomic
from siad.report.runs import load_runs
from siad.report.tables import ClaimTable, build_table1


def protocol_targets(config: Mapping[str, Any]) -> dict[str, str]:
    """Config name → column name of every protocol target, in the paper's dataset order."""
    targets = {target for _, target in protocol_pairs(config["protocol"])}
    return {name: get_dataset(name).display_name for name in DATASETS.names() if name in targets}


def table1(config: Mapping[str, Any], runs: Sequence[Mapping[str, Any]], reference: Path) -> ClaimTable:
    """SIAD-LLM Table 1 (image and pixel AUROC per dataset) for the configured methods."""
    section = config["report"]["table1"]
    datasets = protocol_targets(config)
    return build_table1(
        runs,
        load_reference(reference),
        methods={m: config["methods"][m]["display_name"] for m in section["methods"]},
        datasets=datasets,
        medical={d for d in datasets if get_dataset(d).domain == "medical"},
        setting=section.get("setting", "uzad"),
    )


def render_report(
    config: Mapping[str, Any], metrics_paths: Sequence[Path], out_dir: Path, references: Mapping[str, Path]
) -> list[Path]:
    """Write every configured table (md, tex, csv) and ``claims_check.md`` into ``out_dir``.

    ``references`` maps a table's report key (``table1``) to its claimed-numbers CSV.
    """
    runs = load_runs([Path(p) for p in metrics_paths])
    tables = {"table1_uzad": table1(config, runs, Path(references["table1"]))}
    written = [path for stem, table in tables.items() for path in write_table(table, out_dir, stem)]
    written.append(write_text_atomic(out_dir / "claims_check.md", claims_check(list(tables.values()))))
    return written

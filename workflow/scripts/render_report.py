"""Render the paper's tables and the claims check from the runs' metrics.json files."""

from pathlib import Path
from typing import TYPE_CHECKING

from siad.runtime import run_step

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake


def main(smk) -> None:
    from siad.report.paper import render_report

    out_dir = Path(smk.output[-1]).parent  # the last output is claims_check.md
    # refuses metrics files of another run specification: no table from numbers of another configuration
    render_report(smk.config, [Path(p) for p in smk.input.metrics], out_dir, Path(smk.params.reference_dir))


run_step(main, snakemake)  # noqa: F821 (injected by Snakemake)

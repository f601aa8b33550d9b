"""The paper-scale dry run: time the paper profile's jobs with random weights and write the cost table."""

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from siad.runtime import run_step

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake


def main(smk) -> None:
    from siad.files import write_text_atomic
    from siad.report.cost import render_cost
    from siad.scale import run_scale

    log = logging.getLogger("siad")
    run = run_scale(smk.config, base_dir=Path(smk.params.base), log=log.info)
    markdown, csv = render_cost(run)
    write_text_atomic(Path(smk.output.md), markdown)
    write_text_atomic(Path(smk.output.csv), csv)


run_step(main, snakemake)  # noqa: F821 (injected by Snakemake)

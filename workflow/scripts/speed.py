"""Time the configured methods per image against a bare backbone forward (the speed table)."""

from pathlib import Path
from typing import TYPE_CHECKING

from siad.runtime import run_step

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake


def main(smk) -> None:
    from siad.engine.speed import run_speed
    from siad.report.render import write_text_atomic

    markdown, csv = run_speed(smk.config, smk.input.claimed)
    write_text_atomic(Path(smk.output.md), markdown)
    write_text_atomic(Path(smk.output.csv), csv)


run_step(main, snakemake)  # noqa: F821 (injected by Snakemake)

"""Train one method on the auxiliary (source) dataset of a setting: model.json + weights."""

from pathlib import Path
from typing import TYPE_CHECKING

from siad.runtime import run_step

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake


def main(smk) -> None:
    from siad.engine.runs import fit_run

    w = smk.wildcards
    fit_run(smk.config, w.setting, w.method, w.variant, w.source,
            meta_path=Path(smk.input.meta), model_dir=Path(smk.output.info).parent)


run_step(main, snakemake)  # noqa: F821 (injected by Snakemake)

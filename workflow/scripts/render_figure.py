"""Draw the qualitative figure (SIAD-LLM Fig. 4 style) from the runs' predictions.npz files."""

from pathlib import Path
from typing import TYPE_CHECKING

from siad.runtime import run_step

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake


def main(smk) -> None:
    from siad.methods.external import register_external_methods
    from siad.report.figures import render_figure4
    from siad.report.runs import load_runs, refuse_stale_runs

    register_external_methods(smk.config, check_names=False)  # their stand-in classes, in this process

    refuse_stale_runs(smk.config, load_runs([Path(p) for p in smk.input.metrics]))

    # the rule's outputs are <tables>/FIGURE_STEM.{png,pdf}, the names render_figure4 writes
    render_figure4(smk.config, list(smk.input.predictions), list(smk.input.metas), Path(smk.output.png).parent)


run_step(main, snakemake)  # noqa: F821 (injected by Snakemake)

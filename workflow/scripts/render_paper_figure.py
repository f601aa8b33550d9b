"""Draw SIAD-LLM Figure 1 (right) or Figure 2 from the runs' metrics.json / predictions.npz files."""

from pathlib import Path
from typing import TYPE_CHECKING

from siad.runtime import run_step

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake


def main(smk) -> None:
    from siad.methods.external import register_external_methods
    from siad.report.paper_figures import render_paper_figure

    register_external_methods(smk.config, check_names=False)  # their stand-in classes, in this process

    # refuses metrics files of another run specification (as the report does); the rule's outputs are
    # <tables>/<stem>.{png,pdf}, the names the figure writes
    render_paper_figure(smk.params.figure, smk.config, metrics=list(smk.input.metrics),
                        predictions=list(smk.input.predictions), metas=list(smk.input.metas),
                        reference_dir=Path(smk.params.reference_dir), out_dir=Path(smk.output.png).parent)


run_step(main, snakemake)  # noqa: F821 (injected by Snakemake)

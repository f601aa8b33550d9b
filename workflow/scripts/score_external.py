"""One job's external runs: check each run's external.npz (written by the user's rule) and score it like any run."""

from pathlib import Path
from typing import TYPE_CHECKING

from siad.runtime import run_step

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake


def main(smk) -> None:
    from siad.config import results_root
    from siad.engine.external import score_external_runs
    from siad.engine.runs import planned_runs
    from siad.methods.external import register_external_methods

    register_external_methods(smk.config, check_names=False)  # their stand-in classes, in this process

    p = smk.params
    planned = planned_runs(p.method, p.seed, p.runs, p.spec)
    keys = list(planned)
    score_external_runs(smk.config, keys, meta_paths=dict(zip(p.datasets, map(Path, smk.input.meta), strict=True)),
                        results_root=results_root(smk.config), expected_digests=planned)


run_step(main, snakemake)  # noqa: F821 (injected by Snakemake)

"""One job's runs (a method and training seed; one source or all): train each model if needed, evaluate the targets."""

from pathlib import Path
from typing import TYPE_CHECKING

from siad.runtime import run_step

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake


def main(smk) -> None:
    from siad.config import results_root
    from siad.engine.runs import planned_runs, run_group

    p = smk.params
    planned = planned_runs(p.method, p.seed, p.runs, p.spec)
    keys = list(planned)
    run_group(smk.config, keys, meta_paths=dict(zip(p.datasets, map(Path, smk.input.meta), strict=True)),
              results_root=results_root(smk.config), expected_digests=planned)


run_step(main, snakemake)  # noqa: F821 (injected by Snakemake)

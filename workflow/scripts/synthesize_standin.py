"""Write the synthetic stand-in of one dataset in its native on-disk layout (demo profile)."""

from pathlib import Path
from typing import TYPE_CHECKING

from siad.runtime import run_step

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake


def main(smk) -> None:
    from siad.data.folder_state import record_standin
    from siad.data.synthetic import write_standin

    name = smk.wildcards.dataset
    options = smk.config["data"].get("standin", {})
    classes = smk.config["datasets"][name].get("classes")
    write_standin(name, Path(smk.params.root), seed=int(smk.config["seed"]), classes=classes, **options)
    record_standin(smk.config, name, Path(smk.output.done), smk.params.state)  # a deleted folder is noticed


run_step(main, snakemake)  # noqa: F821 (injected by Snakemake)

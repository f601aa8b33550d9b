"""Fetch (if allowed) and convert one dataset to meta.json, checking real per-class counts."""

from pathlib import Path
from typing import TYPE_CHECKING

from siad.runtime import run_step

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake


def main(smk) -> None:
    from siad.data.folder_state import record_dataset_state
    from siad.data.prepare import prepare_dataset
    from siad.errors import DataError

    data = smk.config["data"]
    archive_dir = data.get("archive_dir")
    try:
        prepare_dataset(
            smk.wildcards.dataset,
            Path(smk.params.root),
            Path(smk.output.meta),
            options=data.get("options", {}),
            download=data["download"] and not data["synthetic"],
            archive_dir=Path(archive_dir) if archive_dir else None,
            verify_counts=data["verify_counts"],
            classes=smk.config["datasets"][smk.wildcards.dataset].get("classes"),
        )
    except DataError as err:
        if not data["synthetic"]:
            raise
        raise DataError(f"{err}\nThis folder is a synthetic stand-in: delete {smk.params.root} and run snakemake "
                        "again, which writes it anew.") from None
    # what this preparation saw, so the next start-up can tell whether the folder changed (data/folder_state.py)
    record_dataset_state(smk.config, smk.wildcards.dataset, Path(smk.output.info), smk.params.state)


run_step(main, snakemake)  # noqa: F821 (injected by Snakemake)

"""Evaluate one run of the protocol: predictions.npz and metrics.json."""

from pathlib import Path
from typing import TYPE_CHECKING

from siad.runtime import run_step

if TYPE_CHECKING:
    from snakemake.iocontainers import snakemake


def main(smk) -> None:
    from siad.engine.protocol import RunKey
    from siad.engine.runs import evaluate_run

    w = smk.wildcards
    key = RunKey(w.setting, w.method, w.variant, w.source, w.target)
    model = smk.input.get("model")
    evaluate_run(
        smk.config,
        key,
        meta_path=Path(smk.input.meta),
        metrics_path=Path(smk.output.metrics),
        predictions_path=Path(smk.output.predictions),
        model_dir=Path(model).parent if model else None,
    )


run_step(main, snakemake)  # noqa: F821 (injected by Snakemake)

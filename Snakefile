# SIAD-LLM benchmark suite. Paper profile: `snakemake --cores 1 all`;
# offline demo: `snakemake --cores 1 all --configfile config/demo.yaml`. See README.md.
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


# The paper profile is the default; a --configfile replaces it instead of being merged into it,
# so the two profiles never mix (--config key=value overrides still apply on top).
if not workflow.overwrite_configfiles:

    configfile: Path(workflow.basedir) / "config" / "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/benchmark.smk"


rule all:
    default_target: True
    input:
        all_outputs(),

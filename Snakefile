# SIAD-LLM benchmark suite. Paper profile: `snakemake --cores 1 all`;
# offline demo: `snakemake --cores 1 all --configfile config/demo.yaml`. See README.md.
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from siad.errors import ConfigError
from siad.yaml_check import load_yaml

min_version("9.0")


# Config files are read strictly first: Snakemake names no file, line or column for a YAML error and
# accepts duplicate keys and .nan silently (siad/yaml_check.py).
try:
    for _file in workflow.overwrite_configfiles or [Path(workflow.basedir) / "config" / "config.yaml"]:
        load_yaml(_file)
except ConfigError as err:
    raise WorkflowError(f"ConfigError: {err}") from None


# The paper profile is the default; a --configfile replaces it instead of being merged into it,
# so the two profiles never mix (--config key=value overrides still apply on top).
if not workflow.overwrite_configfiles:

    configfile: Path(workflow.basedir) / "config" / "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/benchmark.smk"
include: "workflow/rules/scale.smk"


# External methods' own rules (`methods.<m>.external.rules`; README: Adding a baseline), relative to the repository.
for _method, _external in EXTERNAL_METHODS.items():
    if not (Path(workflow.basedir) / _external["rules"]).is_file():
        raise WorkflowError(f"methods/{_method}/external/rules: {_external['rules']} does not exist (relative to "
                            f"{workflow.basedir}); give the path of the rule file that writes its external.npz")
for _rules in dict.fromkeys(e["rules"] for e in EXTERNAL_METHODS.values()):

    include: _rules


rule all:
    default_target: True
    input:
        all_outputs(),

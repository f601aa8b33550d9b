# Shared set-up: validate the config, name the output roots, list the runs of the protocol.
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from siad.config import dataset_root, results_root, tables_root
from siad.engine.spec import meta_path as spec_meta_path
from siad.engine.external import external_file
from siad.errors import SiadError
from siad.methods.external import external_methods
from siad.data.folder_state import dataset_state_param, standin_state_param
from siad.plan import build_plan, job_resources, prepare_params, standin_params, validate_workflow_config
from siad.report.paper_figures import figure_outputs
from siad.report.paper import (PAPER_TABLES, configured_tables, paper_table_runs, required_runs, table_runs,
                               table_stem)

# Validate the config and resolve every run's specification once; every `params:` digest below comes from it,
# so Snakemake's params trigger reruns exactly the jobs whose configuration, data options or code changed.
try:
    config.update(validate_workflow_config(config, workflow.source_path("../schemas/config.schema.yaml")))
    PLAN = build_plan(config)
except SiadError as err:
    raise WorkflowError(f"{type(err).__name__}: {err}") from None

RESULTS = str(results_root(config))
TABLES = str(tables_root(config))
DATASETS = list(config["datasets"])

# one job per (method, training seed, source) and part (the tables and figures its runs serve) of the runs the
# chosen tables and figures need (siad/plan.py: cut_runs)
RUN_GROUPS = PLAN.groups
TABLE_NAMES = configured_tables(config)
EXTERNAL_METHODS = external_methods(config)

for _variant in PLAN.unused_variants:
    logger.warning(f"{_variant}: no table, figure or speed row reads this variant, so it is not run; add it as a "
                   "row of a table under report/user_tables (README: Adding a baseline) to run it")


def resources_of(rule, method=None):
    """The job's resources from the config (`resources:`; siad.plan.job_resources), without `threads`."""
    return {k: v for k, v in job_resources(config, rule, method).items() if k != "threads"}


def threads_of(rule, method=None):
    """The job's threads from the config (`resources:`)."""
    return job_resources(config, rule, method)["threads"]


wildcard_constraints:
    dataset="|".join(DATASETS),


def meta_path(dataset):
    return str(spec_meta_path(config, dataset))


def repo_file(relative):
    """A file shipped in the repository (config/reference/...), whatever the working directory."""
    return str(Path(workflow.basedir) / relative)


def external_predictions(method):
    """The output pattern of an external method's rule: each run's external.npz, with the wildcards {setting},
    {variant}, {seed}, {source} and {target} (README: Adding a baseline)."""
    if method not in EXTERNAL_METHODS:
        raise WorkflowError(f"external_predictions({method!r}): methods/{method} has no `external` section; declare "
                            "the method as external in the config (README: Adding a baseline)")
    return f"{RESULTS}/{{setting}}/{method}/{{variant}}/seed{{seed}}/{{source}}/{{target}}/external.npz"


def external_params(method, variant):
    """The parameters an external method's rule receives for `variant` (methods.<m>.params + the variant's)."""
    from siad.config import method_params

    return method_params(config, method, variant)


def dataset_folder(dataset):
    """The folder holding `dataset` in its native layout (meta.json's img_path are relative to it)."""
    return str(dataset_root(config, dataset))


def run_file(key, name):
    """A per-run output (metrics.json, predictions.npz) of a RunKey."""
    return str(key.run_dir(RESULTS) / name)


def report_metrics():
    """metrics.json of every run the configured tables need."""
    return [str(key.run_dir(RESULTS) / "metrics.json") for key in required_runs(config)]


def claims_metrics():
    """metrics.json of every run the configured paper tables need (the user tables claim nothing)."""
    return [run_file(key, "metrics.json") for key in paper_table_runs(config)]


def table_metrics(name):
    """metrics.json of every run table `name` reads."""
    return [run_file(key, "metrics.json") for key in table_runs(config, name)]


def reference_files(names=None):
    """The claimed-number CSVs the tables `names` read (default: every configured paper table)."""
    names = config["report"]["tables"] if names is None else [n for n in names if n in PAPER_TABLES]
    found = {PAPER_TABLES.get(name).reference for name in names}
    return [repo_file(f"config/reference/{name}") for name in sorted(n for n in found if n)]


def report_outputs():
    """The files of every configured table (md, tex, csv) and the claims check."""
    return [f"{TABLES}/{table_stem(name)}.{ext}" for name in TABLE_NAMES for ext in ("md", "tex", "csv")] + [
        f"{TABLES}/claims_check.md"
    ]


def all_outputs():
    """Everything `snakemake all` builds: every table, the claims check, the speed table and the figures."""
    if "scale" in config:  # the scale profile (config/scale.yaml): its `all` is the cost table only
        return [f"{TABLES}/cost.md", f"{TABLES}/cost.csv"]
    speed = [f"{TABLES}/speed.md", f"{TABLES}/speed.csv"] if "speed" in config else []
    return report_outputs() + speed + figure_outputs(TABLES, config)

# Shared set-up: validate the config, name the output roots, list the runs of the protocol.
from pathlib import Path

from snakemake.exceptions import WorkflowError

from siad.config import dataset_root, results_root, tables_root
from siad.engine.spec import meta_path as spec_meta_path
from siad.errors import SiadError
from siad.data.folder_state import dataset_state_param, standin_state_param
from siad.plan import build_plan, prepare_params, standin_params, validate_workflow_config
from siad.report.paper_figures import figure_outputs
from siad.report.paper import PAPER_TABLES, required_runs

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

# one job per (method, training seed, source) of the runs the tables and the figures need (every setting)
RUN_GROUPS = PLAN.groups


wildcard_constraints:
    dataset="|".join(DATASETS),


def meta_path(dataset):
    return str(spec_meta_path(config, dataset))


def repo_file(relative):
    """A file shipped in the repository (config/reference/...), whatever the working directory."""
    return str(Path(workflow.basedir) / relative)


def run_file(key, name):
    """A per-run output (metrics.json, predictions.npz) of a RunKey."""
    return str(key.run_dir(RESULTS) / name)


def report_metrics():
    """metrics.json of every run the configured tables need."""
    return [str(key.run_dir(RESULTS) / "metrics.json") for key in required_runs(config)]


def reference_files():
    """The claimed-number CSVs the configured tables read (inputs of the report: an edited claim re-renders)."""
    names = {PAPER_TABLES.get(name).reference for name in config["report"]["tables"]}
    return [repo_file(f"config/reference/{name}") for name in sorted(n for n in names if n)]


def report_outputs():
    """The files of every configured table (md, tex, csv) and the claims check."""
    stems = [PAPER_TABLES.get(name).stem for name in config["report"]["tables"]]
    return [f"{TABLES}/{stem}.{ext}" for stem in stems for ext in ("md", "tex", "csv")] + [
        f"{TABLES}/claims_check.md"
    ]


def all_outputs():
    """Everything `snakemake all` builds: every table, the claims check, the speed table and the figures."""
    if "scale" in config:  # the scale profile (config/scale.yaml): its `all` is the cost table only
        return [f"{TABLES}/cost.md", f"{TABLES}/cost.csv"]
    speed = [f"{TABLES}/speed.md", f"{TABLES}/speed.csv"] if "speed" in config else []
    return report_outputs() + speed + figure_outputs(TABLES, config)

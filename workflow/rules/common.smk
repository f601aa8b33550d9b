# Shared set-up: validate the config, name the output roots, list the runs of the protocol.
from pathlib import Path

from snakemake.exceptions import WorkflowError

from siad.config import dataset_root, method_params, method_variants, results_root, tables_root, validate_config
from siad.engine.protocol import SETTINGS
from siad.errors import SiadError
from siad.report.paper import PAPER_TABLES, required_runs

try:
    validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))
except SiadError as err:
    raise WorkflowError(f"{type(err).__name__}: {err}") from None

RESULTS = str(results_root(config))
TABLES = str(tables_root(config))
DATASETS = list(config["datasets"])
METHODS = list(config["methods"])
VARIANTS = sorted({v for m in METHODS for v in method_variants(config, m)})


wildcard_constraints:
    dataset="|".join(DATASETS),
    target="|".join(DATASETS),
    source="|".join(["none", *DATASETS]),
    setting="|".join(SETTINGS),
    method="|".join(METHODS),
    variant="|".join(VARIANTS),


def meta_path(dataset):
    return f"{RESULTS}/datasets/{dataset}/meta.json"


def repo_file(relative):
    """A file shipped in the repository (config/reference/...), whatever the working directory."""
    return str(Path(workflow.basedir) / relative)


def trained_model(wc):
    """model.json of a run's source, or nothing for training-free methods."""
    if wc.source == "none":
        return []
    return f"{RESULTS}/{wc.setting}/{wc.method}/{wc.variant}/{wc.source}/model.json"


def report_metrics():
    """metrics.json of every run the configured tables need."""
    return [str(key.run_dir(RESULTS) / "metrics.json") for key in required_runs(config)]


def report_outputs():
    """The files of every configured table (md, tex, csv) and the claims check."""
    stems = [PAPER_TABLES.get(name).stem for name in config["report"]["tables"]]
    return [f"{TABLES}/{stem}.{ext}" for stem in stems for ext in ("md", "tex", "csv")] + [
        f"{TABLES}/claims_check.md"
    ]


def all_outputs():
    """Everything `snakemake all` builds: every table, the claims check and the speed table."""
    speed = [f"{TABLES}/speed.md", f"{TABLES}/speed.csv"] if "speed" in config else []
    return report_outputs() + speed

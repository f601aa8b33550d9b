# Shared set-up: validate the config, name the output roots, list the runs of the protocol.
from pathlib import Path

from snakemake.exceptions import WorkflowError

from siad.config import dataset_root, method_params, method_variants, results_root, tables_root, validate_config
from siad.engine.protocol import SETTINGS, protocol_runs
from siad.errors import SiadError
from siad.methods import get_method_class

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


def is_training_free(method):
    return get_method_class(method).training_free


def run_metrics(setting, method, variant="default"):
    """metrics.json of every run of the protocol for one (setting, method, variant)."""
    keys = protocol_runs(
        config["protocol"],
        setting=setting,
        method=method,
        variant=variant,
        training_free=is_training_free(method),
    )
    return [str(key.run_dir(RESULTS) / "metrics.json") for key in keys]


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


def table1_metrics():
    section = config["report"]["table1"]
    setting = section.get("setting", "uzad")
    return [path for method in section["methods"] for path in run_metrics(setting, method)]


def all_outputs():
    """Everything `snakemake all` builds: every table and the claims check."""
    return [*rules.report.output]

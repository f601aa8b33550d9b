"""The workflow plan, computed once at start-up: the validated config, every run the tables and the figures need,
their jobs, and the digests that decide what Snakemake reruns.

This module sits above the config, engine and report layers (it imports all three; none of them imports it),
so the config never has to know about tables. The Snakefile builds one :class:`WorkflowPlan` and reads every
``params:`` digest from it:

- a run job: the config digest of each of its runs' :class:`~siad.engine.spec.RunSpec` (the dataset content
  is tracked by the job's ``meta.json`` inputs, see :mod:`siad.engine.spec`);
- dataset preparation: the options that shape the index, the converter code, and the state of the dataset
  folder (:func:`siad.data.folder_state.dataset_state_param`), so an edited image or a changed option
  prepares it again;
- stand-ins: their options, seed and generator code;
- the report, the figures and the speed table: their config sections and code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import siad
from siad.code_hash import json_digest, module_closure, modules_hash
from siad.config import dataset_root, method_params, validate_config
from siad.engine.protocol import RunKey
from siad.engine.runs import RunGroup, group_runs, job_per
from siad.engine.spec import RunSpec, method_code_hash, resolve_run_spec
from siad.report.checks import check_report_config
from siad.report.paper import required_runs
from siad.report.paper_figures import figure_runs

#: The code every dataset's preparation runs (besides its own converter), hashed as it is.
PREPARATION_MODULES = ("siad.data.prepare", "siad.data.records", "siad.data.imageio", "siad.data.converters.common",
                       "siad.data.duplicates", "siad.data.registry", "siad.data.hashing", "siad.data.download")


def validate_workflow_config(config: Mapping[str, Any], schema_path: str | Path | None = None) -> dict[str, Any]:
    """The config layer's validation (:func:`siad.config.validate_config`) plus the report section's checks."""
    config = validate_config(config) if schema_path is None else validate_config(config, schema_path)
    check_report_config(config)
    return config


@dataclass(frozen=True)
class WorkflowPlan:
    """What one Snakemake invocation will build, resolved once."""

    config: Mapping[str, Any]
    runs: tuple[RunKey, ...]  # every run the configured tables and figures read
    groups: tuple[RunGroup, ...]  # one job each
    specs: Mapping[RunKey, RunSpec]

    def group_params(self, group: RunGroup) -> list[str]:
        """The run job's ``params`` entry: ``setting/variant/source/target=config digest`` of each of its runs."""
        return [f"{k.setting}/{k.variant}/{k.source}/{k.target}={self.specs[k].planned_digest}" for k in group.keys]

    def report_params(self) -> str:
        """Digest of what the tables and figures read besides the run files: the report config and the report code."""
        section = {"report": self.config["report"], "protocol": self.config["protocol"],
                   "names": {m: e.get("display_name") for m, e in self.config["methods"].items()},
                   "profile": self.config["profile"], "demo": self.config["demo"]}
        code = modules_hash(("siad.report.paper", "siad.report.figures", "siad.report.paper_figures"))
        return json_digest({"config": section, "version": siad.__version__, "code": code})

    def speed_params(self) -> str:
        """Digest of what the speed table depends on: its section, its rows' resolved method params (code defaults
        included), device, seed, code."""
        from siad.methods import get_method_class

        section = self.config.get("speed", {})
        rows = {**section.get("rows", {}), **section.get("llm", {}).get("rows", {}),
                **{f"{label}/{name}": row for label, group in section.get("groups", {}).items()
                   for name, row in group["rows"].items()}}
        methods = {name: get_method_class(row["method"]).resolve_params(
                       method_params(self.config, row["method"], row.get("variant", "default")))
                   for name, row in rows.items()}
        code = {"speed": modules_hash(("siad.engine.speed",), transitive=False),
                **{row["method"]: method_code_hash(get_method_class(row["method"])) for row in rows.values()}}
        return json_digest({"speed": section, "methods": methods, "seed": self.config["seed"],
                       "device": self.config["device"], "version": siad.__version__, "code": code})


def build_plan(config: Mapping[str, Any]) -> WorkflowPlan:
    """Validate ``config`` and resolve the run specification of every run its tables and figures need."""
    runs = tuple(dict.fromkeys([*required_runs(config), *figure_runs(config)]))
    specs = {key: resolve_run_spec(config, key) for key in runs}
    return WorkflowPlan(config=config, runs=runs, groups=tuple(group_runs(runs, job_per(config))), specs=specs)


# --- data jobs ----------------------------------------------------------------------------------------------


def standin_params(config: Mapping[str, Any], dataset: str) -> str:
    """Digest of what a synthetic stand-in is made from: its options, the seed, the classes and the generator."""
    return json_digest({"standin": config["data"].get("standin", {}), "seed": config["seed"],
                   "classes": sorted(config["datasets"][dataset].get("classes") or []) or None,
                   "version": siad.__version__,
                   "code": modules_hash(_package_modules("siad.data.synthetic"), transitive=False)})


def prepare_params(config: Mapping[str, Any], dataset: str) -> str:
    """Digest of what shapes dataset ``dataset``'s index: its options, its class selection, where it lives and
    the converter code (the folder's content is
    :func:`siad.data.folder_state.dataset_state_param`)."""
    from siad.data.registry import get_dataset

    spec = get_dataset(dataset)
    data = config["data"]
    return json_digest({"options": spec.options_with_defaults(data.get("options", {})),
                   "classes": sorted(config["datasets"][dataset].get("classes") or []) or None,
                   "root": str(dataset_root(config, dataset)), "synthetic": data["synthetic"],
                   "version": siad.__version__,
                   "code": modules_hash(PREPARATION_MODULES + (spec.converter.__module__,), transitive=False)})


def _package_modules(package: str) -> tuple[str, ...]:
    """The modules of ``package`` that it imports (its own code, not what it uses from elsewhere)."""
    return tuple(sorted(m for m in module_closure(package) if m == package or m.startswith(package + ".")))

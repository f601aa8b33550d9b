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

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import siad
from siad.code_hash import json_digest, module_closure, modules_hash
from siad.config import dataset_root, method_params, method_variants, validate_config
from siad.engine.protocol import NO_SOURCE, RunKey, protocol_pairs
from siad.engine.runs import RunGroup, group_runs, job_per
from siad.engine.spec import RunSpec, method_code_hash, resolve_run_spec
from siad.errors import ConfigError, SiadError
from siad.report.checks import check_report_config
from siad.report.figures import figure4_runs
from siad.report.paper import PAPER_TABLES, configured_tables, table_runs
from siad.report.paper_figures import FIGURE1, FIGURE2, figure1_runs, figure2_panel_runs, figure2_runs

#: The code every dataset's preparation runs (besides its own converter), hashed as it is.
PREPARATION_MODULES = ("siad.data.prepare", "siad.data.records", "siad.data.imageio", "siad.data.converters.common",
                       "siad.data.duplicates", "siad.data.registry", "siad.data.hashing", "siad.data.download")


def validate_workflow_config(config: Mapping[str, Any], schema_path: str | Path | None = None) -> dict[str, Any]:
    """The config layer's validation (:func:`siad.config.validate_config`) plus the report section's checks."""
    config = validate_config(config) if schema_path is None else validate_config(config, schema_path)
    check_report_config(config)
    check_resources(config)
    return config


@dataclass(frozen=True)
class WorkflowPlan:
    """What one Snakemake invocation will build, resolved once."""

    config: Mapping[str, Any]
    runs: tuple[RunKey, ...]  # every run the configured tables and figures read
    groups: tuple[RunGroup, ...]  # one job each
    specs: Mapping[RunKey, RunSpec]
    unused_variants: tuple[str, ...] = ()  # methods/<m>/variants/<v> that nothing reads: not run (said at start-up)

    def group_params(self, group: RunGroup) -> list[str]:
        """The run job's ``params`` entry: ``setting/variant/source/target=config digest`` of each of its runs."""
        return [f"{k.setting}/{k.variant}/{k.source}/{k.target}={self.specs[k].planned_digest}" for k in group.keys]

    def report_params(self) -> str:
        """Digest of what the figures read besides the run files: the report config without the choice of tables
        (choosing tables redraws no figure) and the report code."""
        return self._report_digest({k: v for k, v in self.config["report"].items()
                                    if k not in ("tables", "user_tables")})

    def claims_params(self) -> str:
        """Digest of what the claims check reads besides the run files: the report config without the user tables
        (they claim nothing) and the report code."""
        return self._report_digest({k: v for k, v in self.config["report"].items() if k != "user_tables"})

    def table_params(self, name: str) -> str:
        """Digest of what table ``name`` reads besides its run files and its claims CSV: the report config (without
        the list of chosen tables and the other user tables: choosing tables re-renders none) and the report code."""
        report = {k: v for k, v in self.config["report"].items() if k not in ("tables", "user_tables")}
        user = (self.config["report"].get("user_tables") or {}).get(name)
        return self._report_digest({**report, **({"user_table": user} if user is not None else {})})

    def _report_digest(self, report: Mapping[str, Any]) -> str:
        section = {"report": report, "protocol": self.config["protocol"],
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
    cut = cut_runs(config)
    specs = {key: resolve_run_spec(config, key) for key in cut.runs}
    groups = tuple(group_runs(cut.runs, job_per(config), cut.part_of))
    return WorkflowPlan(config=config, runs=cut.runs, groups=groups, specs=specs, unused_variants=cut.unused_variants)


# --- cutting the runs into jobs -------------------------------------------------------------------------------

#: The figures as readers of runs (beside the tables): name -> the runs it reads (none when not configured).
FIGURE_READERS: dict[str, Callable[[Mapping[str, Any]], list[RunKey]]] = {
    "figure4": figure4_runs,
    FIGURE1: figure1_runs,
    FIGURE2: lambda config: [*figure2_runs(config), *figure2_panel_runs(config)],
}


@dataclass(frozen=True)
class RunCut:
    """The runs a workflow invocation builds and the part of the jobs each belongs to (:func:`cut_runs`)."""

    runs: tuple[RunKey, ...]
    parts: Mapping[RunKey, str]
    unused_variants: tuple[str, ...]  # "methods/<m>/variants/<v>" no table, figure or speed row reads

    def part_of(self, key: RunKey) -> str:
        """The part (a name for the tables it serves) of run ``key``."""
        return self.parts[key]


def readers(config: Mapping[str, Any]) -> dict[str, list[RunKey]]:
    """Every table and figure the config describes -> the runs it reads, whether it is chosen or not.

    The chosen tables (``report.tables``, ``report.user_tables``) must resolve; a registered table the config does not
    choose and cannot describe (its section is absent) reads nothing. Cutting the jobs by all of them, not by the
    chosen ones only, is what keeps a job the same when other tables are chosen.
    """
    chosen = set(configured_tables(config))
    found: dict[str, list[RunKey]] = {}
    for name in [*PAPER_TABLES.names(), *(n for n in configured_tables(config) if n not in PAPER_TABLES)]:
        try:
            found[name] = table_runs(config, name)
        except (SiadError, KeyError):
            if name in chosen:
                raise
    for name, runs_of in FIGURE_READERS.items():
        found[name] = runs_of(config)
    return found


def chosen_readers(config: Mapping[str, Any]) -> list[str]:
    """The tables and figures ``all`` builds: ``report.tables``, the user tables and the configured figures."""
    figures = [name for name, runs_of in FIGURE_READERS.items() if runs_of(config)]
    return [*configured_tables(config), *figures]


def cut_runs(config: Mapping[str, Any]) -> RunCut:
    """The runs to build and their parts.

    A *unit* is one trained model: (setting, method, variant, source, seed). Each unit is read by a set of tables and
    figures; the jobs of a method are cut by the paper tables in that set (units read by exactly the same paper tables
    share a job: :func:`_signature`), so building one table runs only jobs whose every unit it reads. A unit is built
    when any chosen table or figure reads it, on every protocol target of its source: neither a job's units nor its
    runs depend on which tables are chosen.
    """
    found = readers(config)
    chosen = set(chosen_readers(config))
    unit_readers: dict[RunKey, list[str]] = {}
    unit_runs: dict[RunKey, list[RunKey]] = {}
    for name, keys in found.items():
        for key in keys:
            unit = replace(key, target="")
            if name not in unit_readers.setdefault(unit, []):
                unit_readers[unit].append(name)
            unit_runs.setdefault(unit, []).append(key)
    for unit in unit_runs:  # a unit's model is evaluated on every protocol target of its source, whichever tables
        # read which of them: the job of a unit never changes with the choice of tables
        unit_runs[unit] = list(dict.fromkeys([*(replace(unit, target=t) for t in _protocol_targets(config, unit)),
                                              *unit_runs[unit]]))
    built = [unit for unit, names in unit_readers.items() if chosen & set(names)]
    signature = {unit: _signature(names) for unit, names in unit_readers.items()}
    labels = part_labels(list(signature.values()))  # over every unit, built or not: a job's name never depends on
    # which tables are chosen
    runs = tuple(dict.fromkeys(key for unit in built for key in unit_runs[unit]))
    parts = {key: labels[signature[replace(key, target="")]] for key in runs}
    return RunCut(runs, parts, _unused_variants(config, unit_readers))


def _protocol_targets(config: Mapping[str, Any], unit: RunKey) -> list[str]:
    """The protocol targets of ``unit``'s source (every protocol target for a training-free unit, source ``none``)."""
    pairs = protocol_pairs(config["protocol"])
    targets = [t for s, t in pairs if unit.source in (s, NO_SOURCE)]
    return list(dict.fromkeys(targets))


def _signature(names: Sequence[str]) -> tuple[str, ...]:
    """What cuts the jobs: the paper tables reading a unit; the user tables and figures only for a unit no paper table
    reads. A figure or a user table builds the jobs of the paper tables whose units it shows, so declaring or removing
    one never changes a job of a unit a paper table reads (a user table alone may then build a few more runs of the
    same units' jobs than it shows). Editing what a table reads (its rows) can regroup units, and Snakemake reruns a
    regrouped job: the same numbers again, at the cost of time (README: One table at a time)."""
    tables = tuple(n for n in names if n in PAPER_TABLES)
    return tables or tuple(names)


def part_labels(reader_sets: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """A short, stable name for each set of readers: the reader's name, or "<first>_and<n>" for a set of n + 1
    readers (with a hash of the set where two sets would get the same name)."""
    names = {readers: readers[0] if len(readers) == 1 else f"{readers[0]}_and{len(readers) - 1}"
             for readers in dict.fromkeys(reader_sets)}
    taken: dict[str, int] = {}
    for name in names.values():
        taken[name] = taken.get(name, 0) + 1
    return {readers: name if taken[name] == 1 else f"{name}_{_short_hash(readers)}" for readers, name in names.items()}


def _short_hash(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:6]


def _unused_variants(config: Mapping[str, Any], unit_readers: Mapping[RunKey, Sequence[str]]) -> tuple[str, ...]:
    """``methods/<m>/variants/<v>`` of every variant no table or figure reads and no speed row times."""
    read = {(unit.method, unit.variant) for unit in unit_readers}
    speed = config.get("speed", {})
    rows = [*speed.get("rows", {}).values(), *speed.get("llm", {}).get("rows", {}).values(),
            *(row for group in speed.get("groups", {}).values() for row in group["rows"].values())]
    timed = {(row["method"], row.get("variant", "default")) for row in rows}
    return tuple(f"methods/{method}/variants/{variant}" for method in config["methods"]
                 for variant in method_variants(config, method)[1:]
                 if (method, variant) not in read | timed)


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


# --- resources per job ------------------------------------------------------------------------------------------

#: What a job asks of its scheduler when the config says nothing: one thread, 4 GB, one hour, no GPU.
DEFAULT_RESOURCES: dict[str, Any] = {"threads": 1, "mem_mb": 4000, "runtime": 60, "gpu": 0}
#: The rule kinds ``resources.rules`` may size (a run job is ``run``; its method's entry under
#: ``resources.methods`` comes on top).
RESOURCE_RULES = ("synthesize_standin", "prepare_dataset", "run", "score_external", "speed", "table", "claims_check",
                  "figure1", "figure2", "figure4", "scale_cost")


def job_resources(config: Mapping[str, Any], rule: str, method: str | None = None) -> dict[str, Any]:
    """``threads``, ``mem_mb``, ``runtime`` (minutes), ``gpu`` (count) and, when set, ``gpu_model`` of a job of kind
    ``rule`` (and of ``method``'s run jobs): :data:`DEFAULT_RESOURCES`, then ``resources.default``, then
    ``resources.rules.<rule>``, then ``resources.methods.<method>``. A profile whose ``device`` is ``cpu`` asks no GPU,
    and a job asking no GPU carries no ``gpu_model``.
    """
    section = config.get("resources") or {}
    if rule not in RESOURCE_RULES:
        raise ConfigError(f"resources: no rule kind {rule!r}; known: {list(RESOURCE_RULES)}")
    merged = {**DEFAULT_RESOURCES, **section.get("default", {}), **section.get("rules", {}).get(rule, {}),
              **(section.get("methods", {}).get(method, {}) if method else {})}
    if str(config["device"]) == "cpu":
        merged["gpu"] = 0
    if not merged["gpu"]:
        merged.pop("gpu_model", None)  # the SLURM plugin would still send --gpus=<model>:0
    return merged


def check_resources(config: Mapping[str, Any]) -> None:
    """Refuse ``resources.rules`` / ``resources.methods`` entries naming no rule kind or no configured method."""
    section = config.get("resources") or {}
    for rule in section.get("rules", {}):
        if rule not in RESOURCE_RULES:
            raise ConfigError(f"resources/rules/{rule}: no such rule kind; known: {list(RESOURCE_RULES)}")
    for method in section.get("methods", {}):
        if method not in config["methods"]:
            raise ConfigError(f"resources/methods/{method}: {method!r} is not listed under `methods`; remove the "
                              "entry or add the method")

"""Per-run ``metrics.json`` files as the report reads them: loading, a light schema check, selection.

The evaluation engine owns the schema; the report only checks what it relies on (the run identity,
the per-dataset means, their confidence intervals and bootstrap replicates) so that a stale or
hand-edited file fails here with its path named, instead of producing a wrong table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from siad.errors import DataError

#: Key added to every loaded run: the file it came from (used in error messages only).
SOURCE_KEY = "_source"

RUN_FIELDS = ("profile", "demo", "setting", "method", "variant", "source", "target", "seed")
REQUIRED_SECTIONS = ("run", "mean", "ci", "mean_replicates", "bootstrap")
_REGENERATE = ("rerun the job that writes it: `snakemake --cores 1 --force <this file>`, then `snakemake --cores 1 "
               "all` (plus your --configfile)")


def run_label(run: Mapping[str, Any]) -> str:
    """A human-readable name of a run: its file if known, else its identity fields."""
    if SOURCE_KEY in run:
        return str(run[SOURCE_KEY])
    ident = run.get("run", {})
    fields = ("setting", "method", "variant", "source", "target", "seed")
    return "run " + "/".join(str(ident.get(f, "?")) for f in fields)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(source: str, problem: str) -> DataError:
    return DataError(f"{source}: {problem}; {_refresh(source)}")


def _refresh(source: str | Path) -> str:
    """How to rewrite the metrics file ``source``: force the job that writes it (named by the file, whatever the
    job grouping) when the path follows the run layout (``.../<setting>/<method>/<variant>/seed<seed>/<source>/
    <target>/metrics.json``)."""
    parts = Path(source).parts
    if len(parts) >= 7 and parts[-1] == "metrics.json" and parts[-4].removeprefix("seed").isdigit():
        return (f"rerun the job that writes it, then the rest: `snakemake --cores 1 --force {Path(source)}` and "
                "`snakemake --cores 1 all` (plus your --configfile)")
    return _REGENERATE


def _check_run_section(ident: object, source: str) -> None:
    if not isinstance(ident, dict):
        raise _fail(source, "'run' must be an object")
    missing = [f for f in RUN_FIELDS if f not in ident]
    if missing:
        raise _fail(source, f"'run' lacks {', '.join(missing)}")
    if not isinstance(ident["demo"], bool):
        raise _fail(source, f"'run.demo' must be true or false, got {ident['demo']!r}")
    if not isinstance(ident["seed"], int) or isinstance(ident["seed"], bool):
        raise _fail(source, f"'run.seed' must be an integer, got {ident['seed']!r}")


def _check_mean_and_ci(obj: Mapping[str, Any], source: str) -> None:
    for metric, value in obj["mean"].items():
        if value is not None and not _is_number(value):
            raise _fail(source, f"mean.{metric} must be a number or null, got {value!r}")
    for metric, interval in obj["ci"].items():
        ok = interval is None or (
            isinstance(interval, list) and len(interval) == 2 and all(_is_number(v) for v in interval)
        )
        if not ok:
            raise _fail(source, f"ci.{metric} must be [low, high] or null, got {interval!r}")
    for metric, reps in obj["mean_replicates"].items():
        if not isinstance(reps, list) or not all(v is None or _is_number(v) for v in reps):
            raise _fail(source, f"mean_replicates.{metric} must be a list of numbers (NaN/null allowed)")


def _check_bootstrap(boot: object, source: str) -> None:
    conf = boot.get("confidence") if isinstance(boot, dict) else None
    if not _is_number(conf) or not 0.0 < float(conf) < 1.0:  # type: ignore[arg-type]
        raise _fail(source, f"bootstrap.confidence must be a number in (0, 1), got {conf!r}")


def validate_run(obj: object, source: str = "metrics.json") -> dict[str, Any]:
    """Check the parts of a metrics.json object the report uses; return it unchanged.

    Raises:
        DataError: naming ``source`` and the problem, if a section or field is missing or mistyped.
    """
    if not isinstance(obj, dict):
        raise _fail(source, "top level must be a JSON object")
    missing = [s for s in REQUIRED_SECTIONS if s not in obj]
    if missing:
        raise _fail(source, f"missing section(s) {', '.join(missing)}")
    _check_run_section(obj["run"], source)
    for section in ("mean", "ci", "mean_replicates"):
        if not isinstance(obj[section], dict):
            raise _fail(source, f"'{section}' must be an object")
    _check_mean_and_ci(obj, source)
    _check_bootstrap(obj["bootstrap"], source)
    return obj


def load_runs(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Read and check metrics.json files; each returned dict gets ``SOURCE_KEY`` = its path.

    Raises:
        DataError: a file is missing, is not valid JSON, or fails :func:`validate_run`.
    """
    runs = []
    for path in map(Path, paths):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise DataError(f"{path}: cannot read metrics file ({exc}); {_refresh(path)}") from exc
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc}); {_refresh(path)}") from exc
        run = validate_run(obj, str(path))
        run[SOURCE_KEY] = str(path)
        runs.append(run)
    return runs


def demo_flag(runs: Sequence[Mapping[str, Any]]) -> bool:
    """True if the runs come from the demo profile; mixing demo and real runs is refused.

    Raises:
        DataError: naming one demo and one non-demo run.
    """
    demo = [r for r in runs if r["run"]["demo"]]
    real = [r for r in runs if not r["run"]["demo"]]
    if demo and real:
        raise DataError(
            f"demo and non-demo runs mixed in one table: {run_label(demo[0])} is demo, "
            f"{run_label(real[0])} is not; build the table from one profile's results only "
            "(results/<profile>/...)"
        )
    return bool(demo)


def matching_runs(runs: Sequence[Mapping[str, Any]], select: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The runs whose ``run`` section has every field of ``select`` equal to the given value."""
    return [r for r in runs if all(r["run"].get(k) == v for k, v in select.items())]


def mean_value(run: Mapping[str, Any], metric: str) -> float | None:
    """The run's dataset mean of ``metric`` (fraction), or None where not defined."""
    value = run["mean"].get(metric)
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def ci_value(run: Mapping[str, Any], metric: str) -> tuple[float, float] | None:
    """The run's confidence interval of the dataset mean of ``metric`` (fractions), or None."""
    interval = run["ci"].get(metric)
    if interval is None or not all(math.isfinite(float(v)) for v in interval):
        return None
    return float(interval[0]), float(interval[1])


def confidence(run: Mapping[str, Any]) -> float:
    """The bootstrap confidence level of the run's intervals (e.g. 0.95)."""
    return float(run["bootstrap"]["confidence"])


def stale_runs(config: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """The runs of ``runs`` whose metrics.json was not computed under the current run specification, as
    {its metrics.json file (which `snakemake --force` recomputes): one line per stale file naming it and what changed}.

    The expected specification is resolved now from ``config``, the prepared dataset indexes and the code
    (:func:`siad.engine.spec.resolve_run_spec`).
    """
    from siad.config import results_root
    from siad.engine.protocol import RunKey
    from siad.engine.spec import resolve_run_spec, results_digest, spec_differences

    stale: dict[str, list[str]] = {}
    for run in runs:
        ident = run["run"]
        key = RunKey.from_run(ident)
        expected = resolve_run_spec(config, key)
        stamp = run.get("spec") if isinstance(run.get("spec"), Mapping) else {}
        rule = str(run.get(SOURCE_KEY) or key.run_dir(results_root(config)) / "metrics.json")
        if stamp.get("digest") == expected.digest:
            if stamp.get("results_digest") != results_digest(run):
                stale.setdefault(rule, []).append(
                    f"{run_label(run)} (its numbers differ from those the evaluation wrote: edited after the run?)")
            continue
        recorded = stamp.get("spec")
        changed = (spec_differences(expected.identity(), recorded) if isinstance(recorded, Mapping)
                   else ["(no specification stamp)"])
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        why = f"changed: {shown}" if shown else "its stamp does not match the specification it records (edited?)"
        stale.setdefault(rule, []).append(f"{run_label(run)} ({why})")
    return stale


def refuse_stale_runs(config: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> None:
    """Raise DataError listing every run of ``runs`` whose stamp differs from the current specification, and the
    one command that recomputes them all."""
    stale = stale_runs(config, runs)
    if stale:
        lines = [line for group in stale.values() for line in group]
        raise DataError(
            f"{len(lines)} run(s) were computed under another run specification, so no table is written from "
            "them:\n  " + "\n  ".join(lines) + "\nRefresh them with: snakemake --cores 1 --force "
            + " ".join(stale) + ", then snakemake --cores 1 all (plus your --configfile)")

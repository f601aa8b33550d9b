"""A generic table of reproduced numbers beside the paper's claimed ones, and the Table 1/2 builder.

The model is deliberately shape-agnostic so that every paper table reuses it:

* a :class:`RowSpec` says which runs feed a row (``select`` on the run identity), which metric it
  shows (or leaves that to the columns) and the claimed numbers per column;
* a :class:`ColumnSpec` adds its own run selection (typically ``target``) and optionally the metric
  (Tables 4 and 5 have ``image`` / ``pixel`` columns);
* :func:`build_claim_table` looks up exactly one run per cell and, optionally, appends an
  ``Average`` column: the unweighted mean of the row's dataset means, with a bootstrap CI whose
  replicate *b* is the mean of the datasets' replicate *b*.

All numbers in a :class:`ClaimTable` are percent (metrics.json holds fractions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from siad.errors import ConfigError, DataError
from siad.report.reference import AVERAGE, average_outside, reference_claims
from siad.report.runs import ci_value, confidence, demo_flag, matching_runs, mean_value, run_label

OK = "ok"
MISSING = "missing"
NOT_APPLICABLE = "not_applicable"
#: A row of a method the paper compares with but this suite did not run (not implemented yet, or not listed in the
#: table's ``methods``): the paper's claims are shown, the reproduced side reads "not run", never blank or zero.
NOT_RUN = "not_run"

RowKey = tuple[str, ...]

#: Paper tables 1 and 2: row level -> metrics.json metric.
LEVEL_METRICS: dict[str, str] = {"image": "image_auroc", "pixel": "pixel_auroc"}


@dataclass(frozen=True)
class Cell:
    """One table cell, in percent. ``status``: ``ok``, ``missing`` (no run), ``not_applicable`` or ``not_run`` (a
    method the suite does not run: the claim only).

    ``reproduced`` is the mean over the training seeds of the cell's runs (``seeds`` of them), ``std`` their sample
    standard deviation (None with one seed), ``ci`` the claims-check interval (:func:`seed_interval`)."""

    claimed: float | None = None
    reproduced: float | None = None
    ci: tuple[float, float] | None = None
    status: str = OK
    std: float | None = None
    seeds: int = 1


@dataclass(frozen=True)
class OrderCheck:
    """A claim about the *order* of numbers (e.g. "the full model has the highest Average"), checked on
    the reproduced point estimates. ``verdict`` is one of :data:`ORDER_VERDICTS`; ``detail`` shows the
    numbers and, when the claim fails, which rows or steps break it."""

    claim: str
    verdict: str
    detail: str


HOLDS, FAILS, NOT_CHECKED = "holds", "does not hold", "not checked"
ORDER_VERDICTS = (HOLDS, FAILS, NOT_CHECKED)


@dataclass
class ClaimTable:
    """Rows (keyed by tuples named by ``row_header``) x columns of :class:`Cell`.

    Consecutive rows sharing their first key element form a block (e.g. the image and the pixel
    level of Table 1); renderers separate blocks with a rule. ``checks`` are the paper's ordering
    claims about this table (listed by the claims check); ``no_claim`` is what a cell without a
    claimed number shows in place of the claim ("n/a", or "–" where the paper has no such number at all).
    """

    name: str
    title: str
    row_header: tuple[str, ...]
    row_keys: list[RowKey]
    columns: list[str]
    cells: dict[tuple[RowKey, str], Cell]
    notes: list[str] = field(default_factory=list)
    demo: bool = False
    confidence: float | None = None
    column_header: str = "dataset"
    checks: list[OrderCheck] = field(default_factory=list)
    no_claim: str = "n/a"
    has_claims: bool = True  # False: a table no paper claims (a user table): cells and legend show no claims

    def cell(self, row: RowKey, column: str) -> Cell:
        """The cell at (row, column)."""
        return self.cells[(row, column)]

    def blocks(self) -> list[list[RowKey]]:
        """Rows grouped into consecutive runs of equal first key element."""
        groups: list[list[RowKey]] = []
        for row in self.row_keys:
            if groups and groups[-1][0][0] == row[0]:
                groups[-1].append(row)
            else:
                groups.append([row])
        return groups


@dataclass(frozen=True)
class RowSpec:
    """How one row is filled: runs matching ``select``, ``metric`` (unless columns set it), claims.

    ``claimed`` maps column name -> claimed percent; ``None`` means the reference has no such row
    (shown as "n/a"). Columns in ``not_applicable`` are shown as "–" (e.g. pixel level of medical sets).
    ``not_run``: the row's method is not run by this suite; its cells keep the claims with status ``not_run``
    and no run is looked up.
    """

    key: RowKey
    select: Mapping[str, Any]
    metric: str | None = None
    claimed: Mapping[str, float | None] | None = None
    not_applicable: frozenset[str] = frozenset()
    not_run: bool = False


@dataclass(frozen=True)
class ColumnSpec:
    """A column: its display ``name``, extra run selection and, optionally, the metric it shows."""

    name: str
    select: Mapping[str, Any] = field(default_factory=dict)
    metric: str | None = None


def _cell_metric(row: RowSpec, col: ColumnSpec) -> str:
    if (row.metric is None) == (col.metric is None):
        raise ConfigError(
            f"table cell ({row.key}, {col.name}): exactly one of the row and the column must set the "
            "metric; fix the table definition"
        )
    return row.metric or col.metric  # type: ignore[return-value]


def _cell_select(row: RowSpec, col: ColumnSpec) -> dict[str, Any]:
    clash = {k for k in row.select.keys() & col.select.keys() if row.select[k] != col.select[k]}
    if clash:
        raise ConfigError(f"row {row.key} and column {col.name!r} select different {sorted(clash)}")
    return {**row.select, **col.select}


def _describe(select: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in select.items())


def _claim(row: RowSpec, column: str) -> float | None:
    return None if row.claimed is None else row.claimed.get(column)


def runs_by_seed(runs: Sequence[Mapping[str, Any]], select: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The runs of one table cell or figure value, one per training seed, in seed order (empty when none matches).

    Raises:
        DataError: two matching runs have the same seed (a stale copy, or a selection that misses a field).
    """
    found = matching_runs(runs, select)
    by_seed: dict[Any, list[Mapping[str, Any]]] = {}
    for run in found:
        by_seed.setdefault(run["run"]["seed"], []).append(run)
    clash = next((group for group in by_seed.values() if len(group) > 1), None)
    if clash:
        names = "; ".join(run_label(r) for r in clash)
        raise DataError(
            f"{len(clash)} runs of one seed match one table cell ({_describe(select)}): {names}; "
            "pass exactly one metrics.json per cell and seed (remove stale runs or add the field that tells them apart)"
        )
    return [by_seed[seed][0] for seed in sorted(by_seed)]


def seed_interval(replicates: Sequence[Sequence[float | None]], level: float) -> tuple[float, float] | None:
    """The claims-check interval of a number measured under several training seeds (fractions).

    ``replicates[s]``: the bootstrap replicates (image resampling) of seed ``s``'s number. A claim comes from one
    training run, so the interval asks where ONE run's number may fall: the percentile interval of all seeds'
    replicates pooled, i.e. of the mixture over seeds of each run's resampling distribution. It widens with the
    spread between seeds (training variance) as well as with the test set's size; with one seed it is that run's
    bootstrap interval. None when no replicate is finite.
    """
    pooled = np.asarray([v for reps in replicates for v in reps if v is not None], dtype=float)
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        return None
    alpha = 1.0 - level
    low, high = np.quantile(pooled, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def seed_mean(found: Sequence[Mapping[str, Any]], metric: str) -> float | None:
    """The mean over seeds of ``metric`` (fraction) of one cell's runs; None when any seed's value is not defined
    (a failed seed is never hidden behind the others)."""
    values = [mean_value(run, metric) for run in found]
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def _seed_spread(values: Sequence[float]) -> float | None:
    """Sample standard deviation over seeds (None with one seed)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _pct_ci(ci: tuple[float, float] | None) -> tuple[float, float] | None:
    return None if ci is None else (100.0 * ci[0], 100.0 * ci[1])


def _fill_cell(
    runs: Sequence[Mapping[str, Any]], row: RowSpec, col: ColumnSpec, notes: list[str]
) -> tuple[Cell, list[Mapping[str, Any]]]:
    """The cell for (row, col) and the runs it came from, one per seed (none if missing / not applicable)."""
    claimed = _claim(row, col.name)
    if col.name in row.not_applicable:
        return Cell(claimed=claimed, status=NOT_APPLICABLE), []
    metric = _cell_metric(row, col)
    select = _cell_select(row, col)
    found = runs_by_seed(runs, select)
    if not found:
        notes.append(f"missing run: {_describe(select)}")
        return Cell(claimed=claimed, status=MISSING), []
    values = [mean_value(run, metric) for run in found]
    undefined = [run_label(run) for run, value in zip(found, values) if value is None]
    if undefined:
        notes.append(f"{', '.join(undefined)}: {metric} is not defined (null)")
        return Cell(claimed, None, None, seeds=len(found)), found
    if len(found) == 1:
        return Cell(claimed, _pct(values[0]), _pct_ci(ci_value(found[0], metric))), found
    ci = seed_interval([run["mean_replicates"].get(metric) or [] for run in found], confidence(found[0]))
    return Cell(claimed, _pct(float(np.mean(values))), _pct_ci(ci), std=_pct(_seed_spread(values)),
                seeds=len(found)), found


def _replicate_ci(
    runs: Sequence[Mapping[str, Any]], metric: str, level: float
) -> tuple[tuple[float, float] | None, str | None, list[float]]:
    """Percentile CI of the mean over datasets, replicate by replicate, and those replicate averages; (None, reason,
    []) if impossible."""
    reps = [r["mean_replicates"].get(metric) for r in runs]
    lacking = [run_label(r) for r, rep in zip(runs, reps) if not rep]
    if lacking:
        return None, f"no {metric} replicates in {', '.join(lacking)}", []
    counts = sorted({len(rep) for rep in reps})
    if len(counts) > 1:
        return None, f"{metric} replicate counts differ between datasets ({', '.join(map(str, counts))})", []
    averages = np.asarray(np.asarray(reps, dtype=float).mean(axis=0))
    finite = averages[np.isfinite(averages)]
    if finite.size == 0:
        return None, f"every {metric} replicate average is NaN", []
    alpha = 1.0 - level
    low, high = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(low), float(high)), None, finite.tolist()


def _average_cell(
    row: RowSpec, cols: Sequence[ColumnSpec], cells: Mapping[str, Cell],
    used: Mapping[str, Sequence[Mapping[str, Any]]], with_ci: bool = True,
) -> tuple[Cell, str | None]:
    """Average over the row's applicable columns; all must have a value (else None with a reason).

    Per training seed, the mean over the columns of that seed's runs; the cell shows the mean over seeds (± their
    spread) and, as interval, :func:`seed_interval` of the per-seed replicate averages. ``with_ci=False`` skips the
    interval (for numbers whose runs carry no bootstrap replicates)."""
    applicable = [c for c in cols if c.name not in row.not_applicable]
    metrics = {_cell_metric(row, c) for c in applicable}
    if len(metrics) != 1:
        raise ConfigError(f"row {row.key}: an Average needs one metric across columns, got {sorted(metrics)}")
    metric = next(iter(metrics))
    claimed = _claim(row, AVERAGE)
    label = "/".join(row.key)
    absent = [c.name for c in applicable if cells[c.name].reproduced is None]
    if absent:
        return Cell(claimed=claimed), f"{AVERAGE} of row {label} not computed: no value for {', '.join(absent)}"
    seeds = [tuple(r["run"]["seed"] for r in used[c.name]) for c in applicable]
    if len(set(seeds)) > 1:
        return Cell(claimed=claimed), (f"{AVERAGE} of row {label} not computed: its columns were run with different "
                                       f"training seeds ({sorted(set(seeds))})")
    per_seed = [[used[c.name][s] for c in applicable] for s in range(len(seeds[0]))]
    values = [float(np.mean([mean_value(r, metric) for r in runs])) for runs in per_seed]
    std = _pct(_seed_spread(values))
    value = 100.0 * float(np.mean(values))
    if not with_ci:
        return Cell(claimed, value, std=std, seeds=len(values)), None
    intervals = [_replicate_ci(runs, metric, confidence(runs[0])) for runs in per_seed]
    reason = next((why for _, why, _ in intervals if why), None)
    if reason is None:
        ci = intervals[0][0] if len(per_seed) == 1 else seed_interval(
            [averages for _, _, averages in intervals], confidence(per_seed[0][0]))
    note = None if reason is None else f"{AVERAGE} CI of row {label} not computed: {reason}"
    return Cell(claimed, value, None if reason else _pct_ci(ci), std=std, seeds=len(values)), note


def _common_confidence(used: Sequence[Mapping[str, Any]]) -> float | None:
    levels = {confidence(r) for r in used}
    if len(levels) > 1:
        raise DataError(
            f"runs of one table use different bootstrap confidence levels {sorted(levels)}; "
            "re-evaluate them with one 'bootstrap.confidence' setting"
        )
    return levels.pop() if levels else None


def _not_run_cells(row: RowSpec, names: Sequence[str]) -> dict[str, Cell]:
    """The cells of a row whose method is not run: its claims, status ``not_run`` ("–" where not applicable)."""
    return {n: Cell(claimed=_claim(row, n), status=NOT_APPLICABLE if n in row.not_applicable else NOT_RUN)
            for n in names}


def _run_warnings(used: Sequence[Mapping[str, Any]], shown: set[str]) -> list[str]:
    """The runs' warnings that concern the table: those naming a ``shown`` metric, or no metric of the run at all (a
    warning about AU-PRO has no place under an AUROC table)."""
    notes = []
    for run in used:
        others = set(run.get("mean", {})) - shown
        for warning in run.get("warnings", []) or []:
            if any(m in warning for m in shown) or not any(m in warning for m in others):
                notes.append(f"{run_label(run)}: {warning}")
    return notes


def build_claim_table(
    runs: Sequence[Mapping[str, Any]],
    rows: Sequence[RowSpec],
    columns: Sequence[ColumnSpec],
    *,
    name: str,
    title: str,
    row_header: Sequence[str],
    average: bool = False,
    average_ci: bool = True,
    column_header: str = "dataset",
    notes: Sequence[str] = (),
) -> ClaimTable:
    """Fill every (row, column) cell from exactly one matching run; optionally add an Average column
    (with a bootstrap CI unless ``average_ci`` is False). Rows marked ``not_run`` keep their claims only.

    Raises:
        DataError: several runs match one cell, demo and real runs are mixed, or confidence levels differ.
        ConfigError: the row/column specs are inconsistent.
    """
    demo = demo_flag(runs)
    all_notes = list(notes)
    cells: dict[tuple[RowKey, str], Cell] = {}
    used_all: list[Mapping[str, Any]] = []
    names = [c.name for c in columns] + ([AVERAGE] if average else [])
    for row in rows:
        if row.not_run:
            cells.update({(row.key, n): cell for n, cell in _not_run_cells(row, names).items()})
            continue
        row_cells: dict[str, Cell] = {}
        used: dict[str, list[Mapping[str, Any]]] = {}
        for col in columns:
            cell, found = _fill_cell(runs, row, col, all_notes)
            row_cells[col.name] = cells[(row.key, col.name)] = cell
            if found:
                used[col.name] = found
        used_all.extend(run for found in used.values() for run in found)
        if average:
            cells[(row.key, AVERAGE)], note = _average_cell(row, columns, row_cells, used, average_ci)
            if note:
                all_notes.append(note)
    unique_used = list({id(r): r for r in used_all}.values())
    shown = {m for m in [*(r.metric for r in rows), *(c.metric for c in columns)] if m}
    all_notes.extend(_run_warnings(unique_used, shown))
    return ClaimTable(
        name=name,
        title=title,
        row_header=tuple(row_header),
        row_keys=[r.key for r in rows],
        columns=names,
        cells=cells,
        notes=list(dict.fromkeys(all_notes)),
        demo=demo,
        confidence=_common_confidence(unique_used),
        column_header=column_header,
    )


def _check_names(medical: set[str], datasets: Mapping[str, str]) -> None:
    unknown = sorted(set(medical) - set(datasets))
    if unknown:
        raise ConfigError(
            f"medical dataset(s) {', '.join(unknown)} are not among the table's datasets "
            f"({', '.join(datasets)}); fix the report configuration"
        )


def _reference_notes(reference: pd.DataFrame, datasets: Mapping[str, str], average: bool,
                     keys: Sequence[str] = ("level", "method")) -> list[str]:
    source = reference.attrs.get("source", "reference table")
    wanted = list(datasets.values()) + ([AVERAGE] if average else [])
    notes = [f"{source}: no column {c!r}; its claims show as n/a" for c in wanted if c not in reference.columns]
    return notes + average_scope_notes(reference, wanted, keys) if average else notes


def average_scope_notes(reference: pd.DataFrame, columns: Sequence[str], keys: Sequence[str]) -> list[str]:
    """A note when the paper's Average covers datasets the table does not show (its claim is then n/a)."""
    if reference.empty or AVERAGE not in reference.columns:
        return []
    outside = average_outside(reference, dict.fromkeys(keys), columns)
    if not outside:
        return []
    return [f"The paper's Average also covers {', '.join(outside)}, which this table does not show: the claimed "
            "Average is shown as n/a and not checked (the reproduced Average is over the columns shown)."]


def reference_methods(reference: pd.DataFrame) -> list[str]:
    """The reference's ``method`` values in its row order, each once (the paper's row order of a table)."""
    return list(dict.fromkeys(map(str, reference["method"]))) if "method" in reference.columns else []


def method_rows(methods: Mapping[str, str], order: Sequence[str]) -> list[tuple[str | None, str]]:
    """(config name, display name) per row: the display names of ``order`` first (config name None where no
    configured method has that display name: a "not run" row), then the configured methods ``order`` lacks."""
    by_display = {display: name for name, display in methods.items()}
    rows: list[tuple[str | None, str]] = [(by_display.get(d), d) for d in dict.fromkeys(order)]
    return rows + [(name, display) for name, display in methods.items() if display not in order]


def _level_row(reference: pd.DataFrame, level: str, metric: str, method: str | None, display: str,
               select: Mapping[str, Any], skip: frozenset[str], columns: Sequence[str]) -> RowSpec | None:
    """One (level, method) row; a not-run method without claims at this level gets no row."""
    claimed = reference_claims(reference, {"level": level, "method": display}, columns)
    if method is None:
        return None if claimed is None else RowSpec((level, display), {}, metric, claimed, skip, not_run=True)
    return RowSpec((level, display), select, metric, claimed, skip)


def dataset_rows(
    reference: pd.DataFrame,
    *,
    methods: Mapping[str, str],
    datasets: Mapping[str, str],
    medical: set[str],
    setting: str,
    variant: str = "default",
    setting_overrides: Mapping[str, str] | None = None,
    levels: Mapping[str, str] = LEVEL_METRICS,
    order: Sequence[str] | None = None,
) -> tuple[list[RowSpec], list[str]]:
    """Rows of a (level, method) x dataset table like Tables 1 and 2, plus notes on absent claims.

    All methods of one level come before the next level. Levels whose metric is a pixel metric are
    not applicable on ``medical`` datasets. ``setting_overrides`` maps a method to another setting
    (Table 2 repeats SIAD-LLM's UZAD row; training-free methods have their one run). ``order``: the paper's
    row order as display names (e.g. :func:`reference_methods`): its methods that are not configured become
    "not run" rows keeping their claims (None: the configured methods only, in their order).
    """
    _check_names(medical, datasets)
    overrides = dict(setting_overrides or {})
    source = reference.attrs.get("source", "reference table")
    columns = list(datasets.values()) + [AVERAGE]
    medical_names = frozenset(datasets[d] for d in medical)
    rows, notes = [], []
    for level, metric in levels.items():
        skip = medical_names if metric.startswith("pixel") else frozenset()
        for method, display in method_rows(methods, order or ()):
            select = {"setting": overrides.get(method, setting), "method": method, "variant": variant}
            row = _level_row(reference, level, metric, method, display, select, skip, columns)
            if method is not None and row.claimed is None:
                notes.append(f"{source}: no {level}-level row for method {display!r}; its claims show as n/a")
            if row is not None:
                rows.append(row)
    return rows, notes


def not_run_note(rows: Sequence[RowSpec]) -> list[str]:
    """A note naming the rows of methods this suite did not run (none when every row ran)."""
    names = list(dict.fromkeys(r.key[-1] for r in rows if r.not_run))
    if not names:
        return []
    return [f"Not run: {', '.join(names)} (not implemented in this suite yet, or not listed in this table's "
            "`methods`): their rows show the paper's claims only, and the claims check lists them as \"not run\"."]


def build_dataset_table(
    runs: Sequence[Mapping[str, Any]],
    reference: pd.DataFrame,
    *,
    name: str,
    title: str,
    methods: Mapping[str, str],
    datasets: Mapping[str, str],
    medical: set[str],
    setting: str,
    variant: str = "default",
    setting_overrides: Mapping[str, str] | None = None,
    order: Sequence[str] | None = None,
    notes: Sequence[str] = (),
) -> ClaimTable:
    """A (level, method) x dataset table with an Average column (paper Tables 1 and 2, the ZAD table).

    ``methods`` and ``datasets`` map config names to display names, in display order; display
    names must match the reference's ``method`` values and column headers. ``order``: see
    :func:`dataset_rows`; ``notes`` come first in the table's notes.
    """
    rows, row_notes = dataset_rows(
        reference, methods=methods, datasets=datasets, medical=medical, setting=setting,
        variant=variant, setting_overrides=setting_overrides, order=order,
    )
    columns = [ColumnSpec(display, {"target": cfg}) for cfg, display in datasets.items()]
    all_notes = [*notes, *not_run_note(rows), *_reference_notes(reference, datasets, average=True), *row_notes]
    return build_claim_table(
        runs, rows, columns, name=name, title=title, row_header=("level", "method"), average=True, notes=all_notes
    )


def build_table1(
    runs: Sequence[Mapping[str, Any]],
    reference: pd.DataFrame,
    *,
    methods: Mapping[str, str],
    datasets: Mapping[str, str],
    medical: set[str],
    setting: str = "uzad",
    setting_overrides: Mapping[str, str] | None = None,
    order: Sequence[str] | None = None,
) -> ClaimTable:
    """Paper Table 1: image- then pixel-level AUROC per method and dataset, default variants (``order``: the
    paper's rows, its unconfigured methods "not run"; see :func:`dataset_rows`)."""
    title = f"Table 1: zero-shot anomaly detection, {setting.upper()} setting, AUROC (%)"
    return build_dataset_table(
        runs, reference, name="table1", title=title, methods=methods, datasets=datasets,
        medical=medical, setting=setting, setting_overrides=setting_overrides, order=order,
    )

"""SIAD-LLM Figures 1 (right panel) and 2, drawn from the runs' metrics.json / predictions.npz files alone.

* **Figure 1** (``report.figure1``, ``figure1_auroc.{png,pdf}``): image AUROC per method under UZAD, the mean over
  the industrial protocol targets and the mean over the medical ones, reproduced (bars) beside claimed (markers).
  The paper prints no numbers for the figure, so the claimed values are the same means over its Table 1 image rows
  (``siad_table1_uzad.csv``). Methods of Table 1 the suite does not run show their claims only, marked "not run".
* **Figure 2** (``report.figure2``, ``figure2_zero_shot.{png,pdf}``): (a) image AUROC of the zero-shot methods under
  ZAD and (c) under UZAD, per protocol target, the same methods in the same order on the same axes; claimed markers
  from FiLo's Table 1 for (a) (the methods' own ZAD numbers, MVTecAD and VisA only) and from SIAD-LLM Table 1 for
  (c). (b) the qualitative panel of those methods' UZAD anomaly maps on the same images (the Figure-4 panel code,
  images chosen with the config seed, no answers).

Values of trained methods are the mean over their training seeds (:func:`siad.report.tables.seed_mean`, as in
the tables); a training-free method has one run that serves both settings. Every figure is stamped in the demo
profile and refuses metrics files of another run specification, as the tables do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from siad.data.registry import get_dataset
from siad.engine.protocol import RunKey
from siad.errors import ConfigError, DataError
from siad.report.figures import (
    PanelSpec,
    draw_examples,
    figure4_outputs,
    figure4_runs,
    panel_examples,
    save_figure,
    stamped_title,
)
from siad.report.paper import Config, check_listed, display, protocol_targets, run_keys, run_setting, target_runs
from siad.report.reference import load_reference, reference_claims
from siad.report.runs import demo_flag, load_runs, refuse_stale_runs
from siad.report.setting_tables import zad_reference
from siad.report.tables import method_rows, reference_methods, runs_by_seed, seed_mean

FIGURE1, FIGURE2 = "figure1", "figure2"
STEMS = {FIGURE1: "figure1_auroc", FIGURE2: "figure2_zero_shot"}
#: The claimed-number files each figure reads (inputs of its rule: an edited claim redraws it).
REFERENCES = {FIGURE1: ("siad_table1_uzad.csv",), FIGURE2: ("siad_table1_uzad.csv", "filo_table1.csv")}
METRIC = "image_auroc"
DOMAINS = {"industrial": "Industrial", "medical": "Medical"}
COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


@dataclass(frozen=True)
class Series:
    """One method's bars: ``reproduced`` per category (percent; None: not defined), or None when not run."""

    label: str
    reproduced: tuple[float | None, ...] | None
    claimed: tuple[float | None, ...]


@dataclass(frozen=True)
class BarPanel:
    """A grouped bar chart: one group per category, one bar per series (with its claimed marker)."""

    title: str
    categories: tuple[str, ...]
    series: tuple[Series, ...]


# --- configuration and runs -------------------------------------------------------------------------------------


def figure_methods(config: Config, name: str) -> list[str] | None:
    """``report.<name>.methods`` (checked), or None when the figure is not configured."""
    section = config["report"].get(name)
    if not section:
        return None
    check_listed(config, f"{name}/methods", section["methods"])
    return list(section["methods"])


def figure2_panel_spec(config: Config) -> PanelSpec | None:
    """Figure 2(b): the methods of ``report.figure2`` on ``datasets`` (default: the industrial protocol targets),
    ``count`` anomalous images each (default 1), panels of ``size`` pixels (default 160), UZAD runs."""
    methods = figure_methods(config, FIGURE2)
    if methods is None:
        return None
    section = config["report"][FIGURE2]
    industrial = [d for d in protocol_targets(config) if get_dataset(d).domain == "industrial"]
    datasets = tuple(section.get("datasets", industrial))
    for dataset in datasets:
        if dataset not in protocol_targets(config):
            raise ConfigError(f"report/{FIGURE2}/datasets: {dataset!r} is no protocol target (the panel shows maps "
                              "of the runs that (c) plots); list protocol targets only")
    return PanelSpec(tuple(methods), datasets, int(section.get("count", 1)), "uzad", int(section.get("size", 160)))


def figure2_datasets(config: Config) -> list[str]:
    """The datasets of Figure 2(b), in row order (none when the figure is not configured)."""
    spec = figure2_panel_spec(config)
    return [] if spec is None else list(spec.datasets)


def figure1_runs(config: Config) -> list[RunKey]:
    """Figure 1 reads every protocol target's UZAD run of its methods (none when not configured)."""
    return target_runs(config, "uzad", figure_methods(config, FIGURE1) or [])


def figure2_runs(config: Config) -> list[RunKey]:
    """Figure 2(a) and (c) read every protocol target's ZAD and UZAD run of its methods."""
    methods = figure_methods(config, FIGURE2) or []
    return list(dict.fromkeys([*target_runs(config, "zad", methods), *target_runs(config, "uzad", methods)]))


def figure2_panel_runs(config: Config) -> list[RunKey]:
    """The runs whose maps Figure 2(b) shows, dataset-major: each method's UZAD run (its first training seed's)."""
    spec = figure2_panel_spec(config)
    if spec is None:
        return []
    return [run_keys(config, spec.setting, m, "default", d)[0] for d in spec.datasets for m in spec.methods]


def figure_runs(config: Config) -> list[RunKey]:
    """Every run the configured figures read (Figures 1, 2 and 4), without duplicates."""
    return list(dict.fromkeys([*figure4_runs(config), *figure1_runs(config), *figure2_runs(config),
                               *figure2_panel_runs(config)]))


def figure_outputs(tables_dir: str | Path, config: Config) -> list[str]:
    """The files of every configured figure under ``tables_dir`` (PNG and PDF each)."""
    paper = [str(Path(tables_dir) / f"{STEMS[name]}.{ext}") for name in (FIGURE1, FIGURE2)
             if config["report"].get(name) for ext in ("png", "pdf")]
    return figure4_outputs(tables_dir, config) + paper


# --- values -----------------------------------------------------------------------------------------------------


def image_auroc(runs: Sequence[Mapping[str, Any]], select: Mapping[str, Any]) -> float | None:
    """The image AUROC (percent) of the runs matching ``select``: the mean over their training seeds, as in the
    tables (:func:`siad.report.tables.seed_mean`); None where any seed's value is not defined.

    Raises:
        DataError: no run matches, or two of one seed do (the figure was given the wrong files).
    """
    found = runs_by_seed(runs, select)
    if not found:
        raise DataError(f"no run matches {dict(select)}; pass exactly the metrics.json files of the figure's runs "
                        "(one per method, setting, target and training seed)")
    value = seed_mean(found, METRIC)
    return None if value is None else 100.0 * value


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean, or None when a value is missing (a partial mean would compare other datasets)."""
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def _select(method: str, setting: str, target: str) -> dict[str, str]:
    return {"setting": run_setting(method, setting), "method": method, "variant": "default", "target": target}


def _image_claims(reference: pd.DataFrame, method: str, columns: Sequence[str]) -> dict[str, float | None]:
    """The reference's image-level claims of ``method`` per column (all None when it has no such row)."""
    claims = reference_claims(reference, {"level": "image", "method": method}, columns)
    return claims or dict.fromkeys(columns)


def domain_groups(config: Config) -> dict[str, dict[str, str]]:
    """"Industrial" / "Medical" -> the protocol targets of that domain (config name -> display name), non-empty."""
    groups = {label: {n: d for n, d in protocol_targets(config).items() if get_dataset(n).domain == domain}
              for domain, label in DOMAINS.items()}
    return {label: targets for label, targets in groups.items() if targets}


def figure1_panel(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame) -> BarPanel:
    """Figure 1's bars: per method (Table 1's row order, then the other configured ones), the mean image AUROC over
    each domain's protocol targets, reproduced and claimed (the same mean over the reference's Table 1 values)."""
    groups = domain_groups(config)
    methods = {m: display(config, m) for m in figure_methods(config, FIGURE1) or []}
    columns = [d for targets in groups.values() for d in targets.values()]
    series = []
    for method, label in method_rows(methods, reference_methods(reference)):
        claims = _image_claims(reference, label, columns)
        claimed = tuple(_mean([claims[d] for d in targets.values()]) for targets in groups.values())
        reproduced = None if method is None else tuple(
            _mean([image_auroc(runs, _select(method, "uzad", n)) for n in targets]) for targets in groups.values())
        series.append(Series(label, reproduced, claimed))
    return BarPanel("UZAD, image AUROC: mean over each domain's protocol targets", tuple(groups), tuple(series))


def dataset_panel(config: Config, runs: Sequence[Mapping[str, Any]], reference: pd.DataFrame, setting: str,
                  title: str) -> BarPanel:
    """Image AUROC of the figure-2 methods per protocol target under ``setting``, claims from ``reference``
    (a (level, method) x dataset frame like Table 1's)."""
    targets = protocol_targets(config)
    series = []
    for method in figure_methods(config, FIGURE2) or []:
        claims = _image_claims(reference, display(config, method), list(targets.values()))
        series.append(Series(display(config, method),
                             tuple(image_auroc(runs, _select(method, setting, n)) for n in targets),
                             tuple(claims[d] for d in targets.values())))
    return BarPanel(title, tuple(targets.values()), tuple(series))


def figure2_panels(config: Config, runs: Sequence[Mapping[str, Any]], table1: pd.DataFrame,
                   filo: pd.DataFrame) -> tuple[BarPanel, BarPanel]:
    """Figure 2(a) (ZAD; claims: FiLo's Table 1) and (c) (UZAD; claims: SIAD-LLM Table 1)."""
    zad = zad_reference(filo, list(protocol_targets(config).values()))
    return (dataset_panel(config, runs, zad, "zad", "(a) ZAD: image AUROC"),
            dataset_panel(config, runs, table1, "uzad", "(c) UZAD: image AUROC"))


# --- drawing ----------------------------------------------------------------------------------------------------


def _legend_handles(panel: BarPanel) -> list[Any]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="white" if s.reproduced is None else COLOURS[i % len(COLOURS)],
                     edgecolor=COLOURS[i % len(COLOURS)], hatch="///" if s.reproduced is None else None,
                     label=s.label + (" (not run)" if s.reproduced is None else ""))
               for i, s in enumerate(panel.series)]
    return handles + [Line2D([], [], marker="D", linestyle="", markerfacecolor="white", markeredgecolor="black",
                             label="claimed (paper; hatched: claimed only)")]


def bar_legend(target: Any, panel: BarPanel, loc: str) -> None:
    """One legend for the panels drawn on ``target`` (a Figure or SubFigure), outside the axes."""
    target.legend(handles=_legend_handles(panel), loc=loc, fontsize=7, frameon=False,
                  ncols=min(len(panel.series) + 1, 4))


def _value_label(ax: Any, x: float, value: float, vertical: bool) -> None:
    """The reproduced value written inside the top of its bar (above a short one)."""
    inside = value >= 15
    ax.text(x, value - 1 if inside else value + 1, f"{value:.1f}", rotation=90 if vertical else 0, ha="center",
            va="top" if inside else "bottom", fontsize=5 if vertical else 6, color="white" if inside else "black")


def _draw_series(ax: Any, x: np.ndarray, width: float, series: Series, colour: str, vertical: bool) -> None:
    """One method's bars (hatched outlines at the claimed values when it is not run) and its claimed markers."""
    for xi, value, claim in zip(x, series.reproduced or [None] * len(x), series.claimed):
        if series.reproduced is None:
            ax.bar(xi, claim or 0.0, width, facecolor="white", edgecolor=colour, hatch="///", linewidth=0.6)
            ax.text(xi, 1, "not run", rotation=90, ha="center", va="bottom", fontsize=5, color=colour)
        elif value is None:
            ax.text(xi, 1, "n/a", rotation=90, ha="center", va="bottom", fontsize=5, color=colour)
        else:
            ax.bar(xi, value, width, color=colour)
            _value_label(ax, xi, value, vertical)
    claimed = [(xi, c) for xi, c in zip(x, series.claimed) if c is not None]
    if claimed:
        ax.scatter(*zip(*claimed), marker="D", s=16, facecolor="white", edgecolor="black", zorder=3)


def draw_bars(ax: Any, panel: BarPanel) -> None:
    """A grouped bar chart on ``ax``: 0-100 % axis, one colour per method, claimed values as diamonds (the legend
    is :func:`bar_legend`'s)."""
    n = max(len(panel.series), 1)
    width = 0.8 / n
    vertical = len(panel.categories) * n > 8
    for i, series in enumerate(panel.series):
        x = np.arange(len(panel.categories)) - 0.4 + width * (i + 0.5)
        _draw_series(ax, x, width, series, COLOURS[i % len(COLOURS)], vertical)
    ax.set_xticks(range(len(panel.categories)), panel.categories, rotation=30 if len(panel.categories) > 4 else 0,
                  fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel("image AUROC (%)", fontsize=8)
    ax.set_title(panel.title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


FIGURE1_TEXT = ("SIAD-LLM Fig. 1 (right): image AUROC (%) of each method under UZAD, mean over the industrial and "
                "the medical protocol targets. Bars: reproduced (mean over training seeds); diamonds: claimed, the "
                "same means over the paper's Table 1 image row (the figure's own numbers are not printed). Methods "
                "this suite does not run show their claims only (not run).")
FIGURE2_TEXT = ("SIAD-LLM Fig. 2: (a) image AUROC (%) of zero-shot methods under ZAD (trained with real auxiliary "
                "anomalies; claimed: the methods' own papers via FiLo Table 1, MVTecAD and VisA only), (b) their UZAD "
                "anomaly maps (scaled per method and dataset), (c) image AUROC under UZAD (claimed: SIAD-LLM Table 1). "
                "Bars: reproduced (mean over training seeds; a training-free method's one run serves both settings); "
                "diamonds: claimed. ZAD on the medical targets trains on the Br35H / BrainMRI test splits (SIAD's "
                "source mapping; their anomalies have no masks), where the releases use industrially trained weights.")


def draw_figure1(panel: BarPanel, *, demo: bool) -> Any:
    """Figure 1 as a matplotlib Figure (no pyplot state)."""
    from matplotlib.figure import Figure

    width = max(8.0, 1.2 + 0.45 * len(panel.series) * len(panel.categories))
    fig = Figure(figsize=(width, 5.8 + (0.8 if demo else 0.0)), layout="constrained")
    draw_bars(fig.subplots(), panel)
    bar_legend(fig, panel, "outside lower center")
    fig.suptitle(stamped_title(FIGURE1_TEXT, demo, int(14 * width)), fontsize=7,
                 color="darkred" if demo else "black")
    return fig


def draw_figure2(panels: tuple[BarPanel, BarPanel], examples: Sequence[Any], method_names: Sequence[str], *,
                 demo: bool) -> Any:
    """Figure 2 as a matplotlib Figure: (a) | (c) bar charts on one shared axis above the (b) panel."""
    from matplotlib.figure import Figure

    width = max(10.0, 1.9 * (2 + len(method_names)))
    panel_height = 2.0 * len(examples)
    fig = Figure(figsize=(width, 4.8 + panel_height + (1.0 if demo else 0.4)), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[4.8, max(panel_height, 0.1)])
    axes = top.subplots(1, 2, sharey=True)
    for ax, panel in zip(axes, panels):
        draw_bars(ax, panel)
    bar_legend(top, panels[0], "outside lower center")
    if examples:
        draw_examples(bottom, examples, method_names, answers=False)
        bottom.suptitle("(b) UZAD: anomalous test images, ground truth, anomaly maps", fontsize=9)
    fig.suptitle(stamped_title(FIGURE2_TEXT, demo, int(14 * width)), fontsize=7, color="darkred" if demo else "black")
    return fig


# --- rendering --------------------------------------------------------------------------------------------------


def _runs(config: Config, metrics: Sequence[str | Path], require_current: bool) -> tuple[list[dict[str, Any]], bool]:
    """The runs of ``metrics`` and whether they are demo runs; stale files refused (unless not ``require_current``:
    tests with hand-made metrics)."""
    runs = load_runs([Path(p) for p in metrics])
    if require_current:
        refuse_stale_runs(config, runs)
    return runs, demo_flag(runs) or bool(config["demo"])


def render_figure1(config: Config, metrics: Sequence[str | Path], reference_dir: str | Path, out_dir: str | Path,
                   *, require_current: bool = True) -> list[Path]:
    """Draw Figure 1 from the metrics.json files of :func:`figure1_runs`; write ``figure1_auroc.{png,pdf}``."""
    if figure_methods(config, FIGURE1) is None:
        raise ConfigError(f"report/{FIGURE1} is not configured; add report/{FIGURE1}/methods to draw Figure 1")
    runs, demo = _runs(config, metrics, require_current)
    panel = figure1_panel(config, runs, load_reference(Path(reference_dir) / REFERENCES[FIGURE1][0]))
    return save_figure(draw_figure1(panel, demo=demo), out_dir, STEMS[FIGURE1])


def render_figure2(config: Config, metrics: Sequence[str | Path], predictions: Sequence[str | Path],
                   metas: Sequence[str | Path], reference_dir: str | Path, out_dir: str | Path, *,
                   require_current: bool = True) -> list[Path]:
    """Draw Figure 2 from the metrics.json files of :func:`figure2_runs`, the predictions.npz files of
    :func:`figure2_panel_runs` and the (b) datasets' meta.json files; write ``figure2_zero_shot.{png,pdf}``."""
    spec = figure2_panel_spec(config)
    if spec is None:
        raise ConfigError(f"report/{FIGURE2} is not configured; add report/{FIGURE2}/methods to draw Figure 2")
    runs, demo = _runs(config, metrics, require_current)
    table1, filo = (load_reference(Path(reference_dir) / name) for name in REFERENCES[FIGURE2])
    examples, panel_demo = panel_examples(config, spec, FIGURE2, predictions, metas)
    fig = draw_figure2(figure2_panels(config, runs, table1, filo), examples,
                       [display(config, m) for m in spec.methods], demo=demo or panel_demo)
    return save_figure(fig, out_dir, STEMS[FIGURE2])


def render_paper_figure(name: str, config: Config, *, metrics: Sequence[str | Path],
                        predictions: Sequence[str | Path], metas: Sequence[str | Path], reference_dir: str | Path,
                        out_dir: str | Path) -> list[Path]:
    """The workflow's entry point: draw figure ``name`` (``figure1`` / ``figure2``) from its rule's inputs."""
    if name == FIGURE1:
        return render_figure1(config, metrics, reference_dir, out_dir)
    if name == FIGURE2:
        return render_figure2(config, metrics, predictions, metas, reference_dir, out_dir)
    raise ConfigError(f"unknown paper figure {name!r}; known: {FIGURE1}, {FIGURE2}")

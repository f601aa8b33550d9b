"""The qualitative figure in the style of the SIAD-LLM paper's Figure 4.

One row per chosen anomalous test image; columns: the image, its ground-truth mask, then each
configured method's anomaly map (overlaid on the image), with the method's LLM answer for that image
written under its map. Config (``report.figure4``)::

    figure4:
      methods: [anomalygpt, siad_llm]     # map columns, in order (variant "default")
      datasets: [mvtec, visa, mpdd, btad] # protocol targets, in row order
      count: 2                            # anomalous test images per dataset
      setting: uzad                       # optional
      size: 224                           # optional: side of each panel in pixels

Choices (the paper does not say how its examples were picked):

* Images are chosen deterministically from the first method's ``predictions.npz``: the anomalous
  test images of each class in path order, shuffled per class by a generator seeded with the config
  seed and the dataset name, then taken round-robin over the classes (sorted), so a dataset's rows
  show as many different classes as ``count`` allows. Every method must have predicted the same images.
* Each method's maps are min–max scaled over *all* of its test maps of that dataset (not per image),
  so a weak response stays weak; the colour scale is the same for every panel of that method and
  dataset. Panels are resized to ``size`` × ``size`` (images bilinear, masks nearest).
* A dataset without masks (the medical ones) shows "(no ground-truth mask)" in the mask column; a run
  that recorded no answers (a method that gives none, e.g. the CLIP family) gets no caption under its maps.

The panel code (choice of images, scaled maps, the image | mask | maps grid) is shared with the qualitative
panel of Figure 2(b) (:mod:`siad.report.paper_figures`), which shows maps without answers; :func:`save_figure`
writes every figure.
"""

from __future__ import annotations

import textwrap
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from siad.config import dataset_root
from siad.data.imageio import read_image, read_mask, resize_mask
from siad.data.records import load_meta
from siad.data.registry import get_dataset
from siad.engine.protocol import RunKey
from siad.errors import ConfigError, DataError
from siad.report.paper import Config, check_listed, display, run_keys
from siad.report.render import DEMO_STAMP
from siad.report.runs import demo_flag, load_runs

SECTION = "figure4"
FIGURE_STEM = "figure4_qualitative"
FORMATS = ("png", "pdf")
NO_ANSWER = "(no answer recorded)"
NO_MASK = "(no ground-truth mask)"
ANSWER_WIDTH = 34  # characters per line of the answer under a map
ANSWER_MAX = 240  # longer answers are cut (with "…") so the figure stays readable


@dataclass(frozen=True)
class PanelSpec:
    """What a qualitative panel shows (``report.figure4``, or Figure 2(b)'s part of ``report.figure2``)."""

    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    count: int
    setting: str = "uzad"
    size: int = 224




@dataclass
class Example:
    """One row of the figure: an anomalous test image, its mask and every method's map and answer."""

    dataset: str
    cls_name: str
    img_path: str
    image: np.ndarray  # [S, S, 3] uint8
    mask: np.ndarray | None  # [S, S] bool, None without a mask
    maps: list[np.ndarray]  # per method, [S, S] float in [0, 1]
    answers: list[str]  # per method


def figure4_spec(config: Config) -> PanelSpec | None:
    """The figure's configuration, or None when ``report.figure4`` is absent.

    Raises:
        ConfigError: a method or dataset is not configured.
    """
    section = config["report"].get(SECTION)
    if not section:
        return None
    check_listed(config, f"{SECTION}/methods", section["methods"])
    check_listed(config, f"{SECTION}/datasets", section["datasets"], "datasets")
    return PanelSpec(tuple(section["methods"]), tuple(section["datasets"]), int(section["count"]),
                       section.get("setting", "uzad"), int(section.get("size", 224)))


def figure4_runs(config: Config) -> list[RunKey]:
    """The runs the figure reads (dataset-major, methods in column order; a trained method's maps are those of its
    first training seed); none when not configured."""
    spec = figure4_spec(config)
    if spec is None:
        return []
    return [run_keys(config, spec.setting, m, "default", d)[0] for d in spec.datasets for m in spec.methods]


def figure4_outputs(tables_dir: str | Path, config: Config) -> list[str]:
    """The figure files under ``tables_dir`` (PNG and PDF), or none when the figure is not configured."""
    if figure4_spec(config) is None:
        return []
    return [str(Path(tables_dir) / f"{FIGURE_STEM}.{ext}") for ext in FORMATS]


def select_examples(cls_names: Sequence[str], img_paths: Sequence[str], labels: Sequence[int], count: int,
                    rng: np.random.Generator) -> list[int]:
    """Indices of up to ``count`` anomalous images: per-class shuffles taken round-robin over the classes."""
    by_class: dict[str, list[int]] = {}
    for i in sorted((i for i, label in enumerate(labels) if int(label) == 1), key=lambda i: img_paths[i]):
        by_class.setdefault(str(cls_names[i]), []).append(i)
    queues = [[by_class[c][j] for j in rng.permutation(len(by_class[c]))] for c in sorted(by_class)]
    picks: list[int] = []
    while len(picks) < count and any(queues):
        for queue in queues:
            if queue and len(picks) < count:
                picks.append(int(queue.pop(0)))
    return picks


def dataset_rng(seed: int, dataset: str) -> np.random.Generator:
    """The generator choosing a dataset's examples: independent of which other datasets are shown."""
    return np.random.default_rng([seed, zlib.crc32(dataset.encode())])


# --- reading a run -----------------------------------------------------------------------------


@dataclass
class _RunData:
    source: Path
    index: dict[str, int]  # img_path -> row of the arrays
    arrays: dict[str, np.ndarray]
    maps: list[np.ndarray]
    answers: list[str] | None
    low: float
    high: float


def _read_run(path: Path) -> _RunData:
    from siad.engine.evaluate import load_maps

    try:
        arrays, maps = load_maps(path)
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{path}: unreadable predictions ({err}); re-run the evaluation of this run") from None
    answers = [str(a) for a in arrays["answers"]] if "answers" in arrays else None  # LLM methods only
    n = len(arrays["img_paths"])
    if len(maps) != n or (answers is not None and len(answers) != n):
        raise DataError(f"{path}: {n} images but {len(maps)} maps / "
                        f"{'no' if answers is None else len(answers)} answers; re-run the evaluation of this run")
    lows = [float(np.min(m)) for m in maps] or [0.0]
    highs = [float(np.max(m)) for m in maps] or [1.0]
    index = {str(p): i for i, p in enumerate(arrays["img_paths"])}
    return _RunData(path, index, dict(arrays), maps, answers, min(lows), max(highs))


def _scaled(run: _RunData, i: int, size: int) -> np.ndarray:
    values = run.maps[i].astype(np.float32)
    span = run.high - run.low
    scaled = (values - run.low) / span if span > 0 else np.zeros_like(values)
    resized = Image.fromarray(scaled, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def _answer(run: _RunData, i: int) -> str:
    if run.answers is None:
        return NO_ANSWER
    text = " ".join(run.answers[i].split()) or "(empty answer)"
    return text if len(text) <= ANSWER_MAX else text[: ANSWER_MAX - 1] + "…"


def _dataset_examples(config: Config, spec: PanelSpec, dataset: str, predictions: Sequence[Path],
                      meta: Path, section: str = SECTION) -> list[Example]:
    runs = [_read_run(path) for path in predictions]
    first = runs[0].arrays
    picks = select_examples(first["cls_names"], first["img_paths"], first["labels"], spec.count,
                            dataset_rng(int(config["seed"]), dataset))
    if not picks:
        raise DataError(f"{runs[0].source}: no anomalous test image to show; check the dataset's test split "
                        f"or remove {dataset!r} from report/{section}/datasets")
    root = dataset_root(config, dataset)
    masks = {r["img_path"]: r["mask_path"] for rs in load_meta(meta)["test"].values() for r in rs}
    examples = []
    for i in picks:
        path = str(first["img_paths"][i])
        rows = []
        for run in runs:
            if path not in run.index:
                raise DataError(f"{run.source}: has no prediction for {path} (predicted by {runs[0].source}); "
                                "the runs are stale or use other classes: re-run their evaluation")
            rows.append(run.index[path])
        image = read_image(root / path).resize((spec.size, spec.size), Image.Resampling.BILINEAR)
        mask_path = masks.get(path, "")
        mask = resize_mask(read_mask(root / mask_path), (spec.size, spec.size)) if mask_path else None
        examples.append(Example(dataset, str(first["cls_names"][i]), path, np.asarray(image), mask,
                                [_scaled(run, j, spec.size) for run, j in zip(runs, rows)],
                                [_answer(run, j) for run, j in zip(runs, rows)]))
    return examples


def collect_examples(config: Config, predictions: Sequence[str | Path], metas: Sequence[str | Path]
                     ) -> tuple[PanelSpec, list[Example], bool]:
    """The figure's spec, its rows (datasets in config order) and whether the runs are demo runs.

    ``predictions`` are the runs' predictions.npz files in :func:`figure4_runs` order (dataset-major,
    methods in column order), each with its metrics.json beside it; ``metas`` the datasets' meta.json
    files in ``report.figure4.datasets`` order. (Paths rather than run keys, so the figure job does not
    import every method to find the runs' sources again.)

    Raises:
        ConfigError: the figure is not configured, or the files do not match it.
        DataError: a run's predictions or metrics are missing or inconsistent.
    """
    spec = figure4_spec(config)
    if spec is None:
        raise ConfigError(f"report/{SECTION} is not configured; add it (methods, datasets, count) to draw the figure")
    examples, demo = panel_examples(config, spec, SECTION, predictions, metas)
    return spec, examples, demo


def panel_examples(config: Config, spec: PanelSpec, section: str, predictions: Sequence[str | Path],
                   metas: Sequence[str | Path]) -> tuple[list[Example], bool]:
    """The rows of a qualitative panel (datasets in ``spec`` order) and whether its runs are demo runs.

    ``predictions``: the runs' predictions.npz files, dataset-major with methods in ``spec.methods`` order, each
    with its metrics.json beside it; ``metas``: the datasets' meta.json files in ``spec.datasets`` order.

    Raises:
        ConfigError: the number of files does not match ``spec`` (``section`` names the config key).
        DataError: a run's predictions or metrics are missing or inconsistent.
    """
    n = len(spec.methods)
    if len(predictions) != n * len(spec.datasets) or len(metas) != len(spec.datasets):
        raise ConfigError(f"report/{section}: {len(predictions)} predictions and {len(metas)} dataset indexes given "
                          f"for {len(spec.datasets)} datasets x {n} methods; pass the files of its runs")
    paths = [Path(p) for p in predictions]
    demo = demo_flag(load_runs([p.parent / "metrics.json" for p in paths]))
    examples = [e for k, d in enumerate(spec.datasets)
                for e in _dataset_examples(config, spec, d, paths[k * n:(k + 1) * n], Path(metas[k]), section)]
    return examples, demo or bool(config["demo"])


# --- drawing -----------------------------------------------------------------------------------


def stamped_title(text: str, demo: bool, width: int) -> str:
    """A figure title wrapped to ``width`` characters; demo figures start with the demo stamp."""
    title = textwrap.fill(text, width)
    return (textwrap.fill(DEMO_STAMP, width) + "\n\n" + title) if demo else title


def _title(setting: str, demo: bool, width: int) -> str:
    return stamped_title(f"Qualitative results, {setting.upper()} (in the style of SIAD-LLM Fig. 4): anomalous test "
                         "images, ground truth, anomaly maps (scaled per method and dataset) and each method's "
                         "LLM answer", demo, width)


def draw_figure4(examples: Sequence[Example], method_names: Sequence[str], *, setting: str, demo: bool) -> Any:
    """A matplotlib Figure (no pyplot state): one row per example, image | mask | one map per method."""
    from matplotlib.figure import Figure

    n_cols = 2 + len(method_names)
    width_in = 1.9 * n_cols
    fig = Figure(figsize=(width_in, 2.6 * len(examples) + (1.4 if demo else 0.8)), layout="constrained")
    draw_examples(fig, examples, method_names, answers=True)
    fig.suptitle(_title(setting, demo, int(15 * width_in)), fontsize=8, color="darkred" if demo else "black")
    return fig


def draw_examples(target: Any, examples: Sequence[Example], method_names: Sequence[str], *, answers: bool) -> None:
    """Draw a panel into ``target`` (a matplotlib Figure or SubFigure): one row per example, image | mask | one map
    per method overlaid on the image; ``answers``: each method's LLM answer under its map."""
    n_cols = 2 + len(method_names)
    axes = np.asarray(target.subplots(len(examples), n_cols, squeeze=False))
    headers = ["Image", "Ground truth", *method_names]
    for r, example in enumerate(examples):
        row = axes[r]
        row[0].imshow(example.image)
        row[0].set_ylabel(f"{get_dataset(example.dataset).display_name}\n{example.cls_name}", fontsize=8)
        if example.mask is None:
            row[1].imshow(np.full(example.image.shape[:2], 0.85), cmap="gray", vmin=0, vmax=1)  # grey: no mask
            row[1].set_xlabel(NO_MASK, fontsize=6)
        else:
            row[1].imshow(example.mask, cmap="gray", vmin=0, vmax=1)
        for ax, anomaly_map, answer in zip(row[2:], example.maps, example.answers):
            ax.imshow(example.image)
            ax.imshow(anomaly_map, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            if answers and answer != NO_ANSWER:  # a method without answers (CLIP family) gets no caption
                ax.set_xlabel(textwrap.fill(answer, ANSWER_WIDTH), fontsize=6)
        for c, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(headers[c], fontsize=9)


def _save_atomic(fig: Any, path: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    metadata = {"CreationDate": None} if fmt == "pdf" else {}  # byte-identical PDFs across runs
    try:
        fig.savefig(tmp, format=fmt, dpi=150, metadata=metadata)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_figure(fig: Any, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` and ``<stem>.pdf`` into ``out_dir``, each atomically; return the paths."""
    return [_save_atomic(fig, Path(out_dir) / f"{stem}.{ext}", ext) for ext in FORMATS]


def render_figure4(config: Config, predictions: Sequence[str | Path], metas: Sequence[str | Path],
                   out_dir: str | Path) -> list[Path]:
    """Draw the figure (inputs as in :func:`collect_examples`); write ``<FIGURE_STEM>.{png,pdf}`` to ``out_dir``."""
    spec, examples, demo = collect_examples(config, predictions, metas)
    fig = draw_figure4(examples, [display(config, m) for m in spec.methods], setting=spec.setting, demo=demo)
    return save_figure(fig, out_dir, FIGURE_STEM)

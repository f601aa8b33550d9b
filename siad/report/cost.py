"""The cost table of the paper-scale dry run (:mod:`siad.engine.scale`): ``tables/<profile>/cost.{md,csv}``.

Markdown: a first line that says what the numbers are (GPU at the paper architectures, or CPU-scaled: never
GPU numbers), the totals per method and for the whole paper profile, then one row per job with its stages,
peak memory, extrapolated hours, whether it fits the card and the switches it needs. CSV: one row per job ×
stage (the long form), the job's memory estimate on each of its rows.
"""

from __future__ import annotations

import csv
import io

from siad.engine.scale import JobCost, ScaleRun

__all__ = ["CSV_COLUMNS", "headline", "hours_label", "render_cost"]

CSV_COLUMNS = ("job", "method", "seed", "source", "runs", "stage", "unit", "units", "seconds_per_unit",
               "peak_mib", "peak_measure", "hours", "hours_basis", "in_total", "memory_estimate_gib",
               "fits_card", "switches", "mode", "device")


def hours_label(run: ScaleRun) -> str:
    """What an hour in this table is: GPU-hours (gpu mode) or CPU-scaled hours."""
    return "GPU-hours" if run.mode == "gpu" else "CPU-scaled hours"


def headline(run: ScaleRun) -> str:
    """The table's first line."""
    if run.mode == "gpu":
        return (f"> **Paper-scale dry run on {run.device}: the paper architectures with random weights, times "
                f"extrapolated to every job of {run.paper_config}: GPU-hours.**")
    return (f"> **CPU-SCALED DRY RUN: tiny width/depth-reduced architectures on the CPU, small synthetic images; the "
            f"hours are CPU-scaled extrapolations of {run.paper_config}'s jobs, NOT GPU numbers. Run on a GPU "
            "(scale.mode: gpu) for the real cost.**")


def _num(value: float | None, fmt: str = "{:.3g}") -> str:
    return "–" if value is None else fmt.format(value)


def _fit(job: JobCost) -> str:
    if job.undecided:
        return "unknown (a lower bound under the card: activations not measured on a CPU)"
    if job.fits is None:
        return "– (no training)"
    if job.fits:
        return "yes"
    return "no: " + ", ".join(job.switches)


def _stage(job: JobCost, prefix: str) -> str:
    rows = [s for s in job.stages if s.stage.startswith(prefix)]
    if not rows:
        return "–"
    return "; ".join(f"{s.units:,} {s.unit}s × {_num(s.seconds)} s" for s in rows)


def _job_row(job: JobCost) -> str:
    w = job.work
    cells = [w.rule, w.method, str(w.seed), w.source, str(w.n_runs), _stage(job, "feature"), _stage(job, "training"),
             _stage(job, "evaluation"), _stage(job, "LLM generation"),
             _num(job.peak_mib, "{:,.0f}"), _num(job.memory.total if job.memory else None, "{:.1f}"),
             f"{job.hours:.2f}", _fit(job)]
    return "| " + " | ".join(cells) + " |"


def _method_totals(run: ScaleRun) -> list[tuple[str, int, float, int]]:
    """(method, jobs, hours, jobs that do not fit) in first-seen order."""
    totals: dict[str, list] = {}
    for job in run.jobs:
        entry = totals.setdefault(job.work.method, [0, 0.0, 0])
        entry[0] += 1
        entry[1] += job.hours
        entry[2] += int(job.fits is False)  # decided only: a CPU-scaled lower bound under the card is "unknown"
    return [(m, n, h, bad) for m, (n, h, bad) in totals.items()]


def render_cost(run: ScaleRun) -> tuple[str, str]:
    """(Markdown, CSV) of ``run``."""
    label = hours_label(run)
    total = sum(job.hours for job in run.jobs)
    lines = [headline(run), "",
             f"Mode `{run.mode}` on `{run.device}`; {len(run.jobs)} jobs of `{run.paper_config}`, "
             f"{len(run.kinds)} kinds measured in {run.seconds:.0f} s; card: {run.gpu_memory_gib:g} GB "
             f"({run.budget_gib:.1f} GiB usable).", "",
             f"### Totals ({label})", "", f"| method | jobs | {label} | jobs over the card |", "|---|---:|---:|---:|"]
    for method, n, hours, bad in _method_totals(run):
        lines.append(f"| {method} | {n} | {hours:.2f} | {bad} |")
    lines += [f"| **all** | {len(run.jobs)} | {total:.2f} | {sum(int(j.fits is False) for j in run.jobs)} |", "",
              f"### Jobs (units × seconds per unit; peak: {run.memory_measure})", "",
              "| job | method | seed | source | runs | feature extraction | training | evaluation | "
              f"LLM generation (in evaluation) | peak MiB | est. GiB at paper arch. | {label} | fits the card |",
              "|---|---|---:|---|---:|---|---|---|---|---:|---:|---:|---|"]
    lines += [_job_row(job) for job in run.jobs]
    lines += ["", *[f"_{note}_" for note in _notes(run)]]
    return "\n".join(lines) + "\n", _csv(run)


def _notes(run: ScaleRun) -> list[str]:
    notes = [
        "Units: training = optimiser steps (epochs × ⌈training images / images per step⌉ per stage); feature "
        "extraction = training images whose frozen features the method caches (once each); evaluation = test images "
        "of every run (each computes its frozen pass: the paper's shared feature cache lets later seeds reuse them).",
        "Seconds per step: the median interval between optimiser steps in the second of two capped epochs; per "
        "image: predict_batch over evaluation batches after a warm-up batch; feature extraction: a bare backbone "
        "forward; LLM generation: the generations' share of evaluation (fixed answer length; random LLMs never stop).",
        "Est. GiB: weights + trainable fp32 weight, gradient and Adam moments + activations (+ the LLaMA's activations "
        "from Korthikanti et al. 2022 at the measured sequence length); fits = est. ≤ usable card memory. Switches "
        "are config keys (methods/<method>/params/<key>), tried in order: llm_gradient_checkpointing, "
        "llm_load_in_8bit, then the largest smaller batch.",
    ]
    if run.mode != "gpu":
        notes.append("CPU-scaled: peaks are CPU peak-RSS growth (working memory, resident weights excluded) of the "
                     "tiny architectures. The paper-architecture estimate is a LOWER BOUND: the paper backbone's "
                     "and the LLM's weights, the optimiser state of the trainable parameters at the tiny width, the "
                     "LLM's analytic activations; the image tower's activations and FiLo's Grounding DINO are not "
                     "counted. So \"no\" (the bound alone exceeds the card) is decided, \"unknown\" is not: run "
                     "scale.mode: gpu for the measured answer. Hours are CPU seconds of tiny models, not a GPU "
                     "forecast.")
    return notes + list(run.notes)


def _csv(run: ScaleRun) -> str:
    buffer = io.StringIO()
    buffer.write(f"# {headline(run).strip('> *')}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for job in run.jobs:
        w = job.work
        for stage in job.stages:
            writer.writerow([w.rule, w.method, w.seed, w.source, w.n_runs, stage.stage, stage.unit, stage.units,
                             _csv_num(stage.seconds), _csv_num(stage.peak_mib if stage.peak_mib is not None
                                                               else job.peak_mib), run.memory_measure,
                             _csv_num(stage.hours), hours_label(run), stage.in_total,
                             _csv_num(job.memory.total if job.memory else None),
                             "unknown" if job.undecided else "" if job.fits is None else job.fits,
                             "; ".join(job.switches), run.mode, run.device])
    return buffer.getvalue()


def _csv_num(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"

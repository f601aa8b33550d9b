"""The cost table: columns, totals, the CPU-scaled label and the switches shown."""

from __future__ import annotations

import csv
import io

from siad.engine.scale import JobCost, JobWork, MemoryEstimate, ScaleRun, StageCost
from siad.report.cost import CSV_COLUMNS, render_cost


def _run(mode: str) -> ScaleRun:
    work = JobWork("run_siad_llm_seed0_mvtec", "siad_llm", 0, "mvtec", 5, ((("default", "uzad"), 3629),),
                   ((("default", "uzad"), 1000),))
    stages = (StageCost("training", "step", 454, 2.0), StageCost("evaluation", "image", 1000, 0.36),
              StageCost("LLM generation (in evaluation)", "image", 1000, 0.2, in_total=False))
    memory = MemoryEstimate(2.0, 12.6, 0.5, 1.0, 20.0, 8, "test")
    llm_job = JobCost(work, stages, memory, False, ("methods/siad_llm/params/llm_gradient_checkpointing: true",), 900.0)
    clip = JobCost(JobWork("run_clip_seed0", "clip", 0, "none", 9, (), ((("default", "uzad"), 3600),)),
                   (StageCost("evaluation", "image", 3600, 0.1),), None, None, (), 100.0)
    return ScaleRun(mode, "cpu" if mode != "gpu" else "cuda", "CPU peak-RSS growth", 22.08, 24.0, (llm_job, clip),
                    (), 12.0, ("a note",), "config/config.yaml")


def test_cpu_scaled_table_says_so_first_and_totals_add_up():
    markdown, table = render_cost(_run("cpu_scaled"))
    first = markdown.splitlines()[0]
    assert "CPU-SCALED" in first and "NOT GPU numbers" in first
    assert "GPU-hours" not in markdown
    hours = (454 * 2.0 + 1000 * 0.36) / 3600 + 3600 * 0.1 / 3600  # generation is inside evaluation
    assert f"| **all** | 2 | {hours:.2f} | 1 |" in markdown
    assert "no: methods/siad_llm/params/llm_gradient_checkpointing: true" in markdown and "– (no training)" in markdown
    assert table.startswith("# CPU-SCALED")
    rows = list(csv.DictReader(io.StringIO(table.split("\n", 1)[1])))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 4
    generation = next(r for r in rows if r["stage"].startswith("LLM"))
    assert generation["in_total"] == "False" and generation["hours_basis"] == "CPU-scaled hours"


def test_gpu_table_is_in_gpu_hours():
    markdown, _ = render_cost(_run("gpu"))
    assert "GPU-hours" in markdown.splitlines()[0] and "CPU-SCALED" not in markdown

"""The paper-scale dry run (issue 12), run from the top: the paper profile's plan → its jobs → their cost.

This module sits above the plan (:mod:`siad.plan`), as the plan sits above the engine and the report: it loads and
validates the paper config, builds its :class:`~siad.plan.WorkflowPlan` (the run jobs the tables need), turns each
job into the engine's :class:`~siad.engine.scale.JobWork` and has :func:`siad.engine.scale.cost_jobs` measure and
extrapolate them. The engine never imports the plan or the report; :mod:`siad.report.cost` renders the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from siad.engine.protocol import NO_SOURCE
from siad.engine.scale import (
    TRAINING_SCHEDULES,
    JobWork,
    ScaleRun,
    cost_jobs,
    resolve_mode,
    test_images,
    training_images,
)
from siad.plan import WorkflowPlan, build_plan, validate_workflow_config
from siad.yaml_check import load_yaml

__all__ = ["job_work", "load_config", "run_scale"]


def load_config(path: str | Path) -> dict[str, Any]:
    """The workflow config at ``path``, validated as the Snakefile validates it."""
    return validate_workflow_config(load_yaml(Path(path)))


def job_work(plan: WorkflowPlan, train_counts: Mapping[str, int]) -> list[JobWork]:
    """The work of every job of ``plan``, in the plan's order: one training per distinct training specification
    (variants that differ only in evaluation params share one, as the job does) and one evaluation per run."""
    config = plan.config
    jobs = []
    for group in plan.groups:
        trainings: dict[str, tuple[tuple[str, str], int]] = {}
        evaluations = []
        for key in group.keys:
            kind = (key.variant, key.setting)
            if key.source != NO_SOURCE and key.method in TRAINING_SCHEDULES:
                digest = plan.specs[key].shared_training_digest
                trainings.setdefault(digest, (kind, training_images(config, train_counts, key.source, key.setting)))
            evaluations.append((kind, test_images(config, key.target)))
        jobs.append(JobWork(group.rule_name, group.method, group.seed, group.source, len(group.keys),
                            tuple(trainings.values()), tuple(evaluations)))
    return jobs


def run_scale(config: Mapping[str, Any], *, base_dir: Path | None = None, jobs_limit: int | None = None,
              log: Callable[[str], None] = print) -> ScaleRun:
    """The dry run of ``config['scale']``: the paper plan's jobs (``scale.methods``: only these methods;
    ``jobs_limit``: the first n jobs, for tests), every (method, variant, setting) they train or evaluate measured,
    every job costed. ``base_dir``: where relative config paths are read from (the repository)."""
    started = time.perf_counter()
    section = config["scale"]
    base = Path(base_dir or ".")
    mode = resolve_mode(section.get("mode", "auto"))
    paper = load_config(base / section["paper_config"])
    cpu = load_config(base / section.get("cpu_params_from", "config/demo.yaml")) if mode == "cpu_scaled" else None
    works = job_work(build_plan(paper), section.get("train_images", {}))
    wanted = section.get("methods")
    if wanted:
        works = [w for w in works if w.method in wanted]
    if jobs_limit is not None:
        works = works[:jobs_limit]
    run = cost_jobs(works, paper=paper, cpu=cpu, section=section, mode=mode, paper_config=str(section["paper_config"]),
                    log=log)
    return replace(run, seconds=time.perf_counter() - started)

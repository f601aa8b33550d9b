# Runs: one job per (method, training seed, source) of the runs the tables and the figures need, every setting in
# one process (the job start-up costs more than a demo model's whole run); with `workflow: {job_per: method}` one job
# per (method, training seed) holds every source (the demo: fewer start-ups). A job trains each (setting, variant) of
# the method on the source (trained methods; an intact model whose training fingerprint matches is reused), then
# evaluates every target of it, writing per-run metrics.json (stamped with the run's specification digest) and
# predictions.npz. `params.spec` holds each run's config digest (siad/engine/spec.py): a change of method
# parameters or defaults, setting options, variant, seed, device, evaluation settings, data options or code reruns
# the job.


for _group in RUN_GROUPS:
    if _group.method in EXTERNAL_METHODS:
        continue

    rule:
        name:
            _group.rule_name
        input:
            meta=[meta_path(d) for d in _group.datasets],
        output:
            metrics=[run_file(k, "metrics.json") for k in _group.keys],
            predictions=[run_file(k, "predictions.npz") for k in _group.keys],
        params:
            runs=[(k.setting, k.variant, k.source, k.target) for k in _group.keys],
            method=_group.method,
            seed=_group.seed,
            datasets=_group.datasets,
            spec=PLAN.group_params(_group),
        log:
            f"{RESULTS}/logs/runs/{_group.log_name}.log",
        benchmark:
            f"{RESULTS}/benchmarks/runs/{_group.log_name}.tsv"
        threads: threads_of("run", _group.method)
        resources:
            **resources_of("run", _group.method),
        conda:
            "../envs/siad.yaml"
        script:
            "../scripts/run_group.py"


# External methods (`methods.<m>.external`): the user's rule writes each run's external.npz (README: Adding a
# baseline; siad/engine/external.py has the contract); one job per group checks and scores them like any run.
for _group in RUN_GROUPS:
    if _group.method not in EXTERNAL_METHODS:
        continue

    rule:
        name:
            _group.rule_name.replace("run_", "score_", 1)
        input:
            meta=[meta_path(d) for d in _group.datasets],
            external=[external_file(k, RESULTS) for k in _group.keys],
        output:
            metrics=[run_file(k, "metrics.json") for k in _group.keys],
            predictions=[run_file(k, "predictions.npz") for k in _group.keys],
        params:
            runs=[(k.setting, k.variant, k.source, k.target) for k in _group.keys],
            method=_group.method,
            seed=_group.seed,
            datasets=_group.datasets,
            spec=PLAN.group_params(_group),
        log:
            f"{RESULTS}/logs/runs/{_group.log_name}.log",
        threads: threads_of("score_external", _group.method)
        resources:
            **resources_of("score_external", _group.method),
        conda:
            "../envs/siad.yaml"
        script:
            "../scripts/score_external.py"

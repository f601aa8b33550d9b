# Scale profile (config/scale.yaml): a paper-scale dry run. The paper profile's run jobs are timed with random
# weights on synthetic images (capped steps and predictions), extrapolated to the full run, with peak memory and
# a 24 GB fit check per job (siad/scale.py, siad/engine/scale.py, docs/scale.md). Built by `all` when the config has `scale:`.


from siad.code_hash import json_digest, modules_hash


rule scale_cost:
    output:
        md=f"{TABLES}/cost.md",
        csv=f"{TABLES}/cost.csv",
    params:
        base=workflow.basedir,
        # the section and the code that measures and renders: a change of either measures again
        spec=json_digest({"scale": config.get("scale", {}),
                          "code": modules_hash(("siad.scale", "siad.engine.scale", "siad.report.cost"))}),
    log:
        f"{RESULTS}/logs/scale_cost.log",
    benchmark:
        f"{RESULTS}/benchmarks/scale_cost.tsv"
    threads: threads_of("scale_cost")
    resources:
        **resources_of("scale_cost"),
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/scale_cost.py"

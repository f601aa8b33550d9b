# Scale profile (config/scale.yaml): a paper-scale dry run. The paper profile's run jobs are timed with random
# weights on synthetic images (capped steps and predictions), extrapolated to the full run, with peak memory and
# a 24 GB fit check per job (siad/scale.py, siad/engine/scale.py, docs/scale.md). Built by `all` when the config has `scale:`.


rule scale_cost:
    output:
        md=f"{TABLES}/cost.md",
        csv=f"{TABLES}/cost.csv",
    params:
        base=workflow.basedir,
        spec=str(config.get("scale", {})),
    log:
        f"{RESULTS}/logs/scale_cost.log",
    benchmark:
        f"{RESULTS}/benchmarks/scale_cost.tsv"
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/scale_cost.py"

# Training on the auxiliary (source) dataset; training-free methods never reach this rule.


rule fit:
    input:
        meta=lambda wc: meta_path(wc.source),
    output:
        info=f"{RESULTS}/{{setting}}/{{method}}/{{variant}}/{{source}}/model.json",
    log:
        f"{RESULTS}/logs/fit/{{setting}}/{{method}}/{{variant}}/{{source}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/fit/{{setting}}/{{method}}/{{variant}}/{{source}}.tsv"
    wildcard_constraints:
        source="|".join(DATASETS),
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/fit.py"

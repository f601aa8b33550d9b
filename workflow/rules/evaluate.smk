# Evaluation: one job per (setting, method, variant, source, target) run of the protocol.


rule evaluate:
    input:
        meta=lambda wc: meta_path(wc.target),
        model=trained_model,
    output:
        metrics=f"{RESULTS}/{{setting}}/{{method}}/{{variant}}/{{source}}/{{target}}/metrics.json",
        predictions=f"{RESULTS}/{{setting}}/{{method}}/{{variant}}/{{source}}/{{target}}/predictions.npz",
    log:
        f"{RESULTS}/logs/evaluate/{{setting}}/{{method}}/{{variant}}/{{source}}/{{target}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{setting}}/{{method}}/{{variant}}/{{source}}/{{target}}.tsv"
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/evaluate.py"

# Data: synthetic stand-ins (demo) or real downloads, converted to the community meta.json index.


rule synthesize_standin:
    output:
        touch(f"{RESULTS}/datasets/{{dataset}}/standin.done"),
    params:
        root=lambda wc: str(dataset_root(config, wc.dataset)),
    log:
        f"{RESULTS}/logs/synthesize_standin/{{dataset}}.log",
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/synthesize_standin.py"


rule prepare_dataset:
    input:
        standin=lambda wc: (
            f"{RESULTS}/datasets/{wc.dataset}/standin.done" if config["data"]["synthetic"] else []
        ),
    output:
        meta=f"{RESULTS}/datasets/{{dataset}}/meta.json",
        info=f"{RESULTS}/datasets/{{dataset}}/dataset.json",
    params:
        root=lambda wc: str(dataset_root(config, wc.dataset)),
    log:
        f"{RESULTS}/logs/prepare_dataset/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_dataset/{{dataset}}.tsv"
    retries: 0
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/prepare_dataset.py"

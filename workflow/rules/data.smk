# Data: synthetic stand-ins (demo) or real downloads, converted to the community meta.json index.


# `params.spec` digests what a stand-in is made of (options, seed, classes, generator code), what shapes an
# index (options, classes, root, converter code) and the dataset folder's state (siad/plan.py, siad/data/folder_state.py): an edited image,
# a changed option or converter re-prepares the dataset, and the runs that read it follow (their meta.json input).


rule synthesize_standin:
    output:
        done=f"{RESULTS}/datasets/{{dataset}}/standin.done",
    params:
        root=lambda wc: str(dataset_root(config, wc.dataset)),
        spec=lambda wc: standin_params(config, wc.dataset),
        state=lambda wc: standin_state_param(config, wc.dataset, f"{RESULTS}/datasets/{wc.dataset}/standin.done"),
    log:
        f"{RESULTS}/logs/synthesize_standin/{{dataset}}.log",
    threads: threads_of("synthesize_standin")
    resources:
        **resources_of("synthesize_standin"),
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
        spec=lambda wc: prepare_params(config, wc.dataset),
        state=lambda wc: dataset_state_param(config, wc.dataset, f"{RESULTS}/datasets/{wc.dataset}/dataset.json"),
    log:
        f"{RESULTS}/logs/prepare_dataset/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_dataset/{{dataset}}.tsv"
    retries: 0
    threads: threads_of("prepare_dataset")
    resources:
        **resources_of("prepare_dataset"),
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/prepare_dataset.py"

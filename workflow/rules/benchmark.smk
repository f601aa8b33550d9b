# Speed: milliseconds per image with random weights, as a ratio to a bare forward of each group's backbone
# (CLIP/AnoVL rows at the paper architecture; AnomalyGPT and SIAD-LLM with the image-pass / generation /
# second-pass breakdown, batch sizes and peak memory). One table; its group column names each reference.


rule speed:
    input:
        claimed=repo_file("config/reference/anovl_timing.csv"),
    output:
        md=f"{TABLES}/speed.md",
        csv=f"{TABLES}/speed.csv",
    params:
        spec=PLAN.speed_params() if "speed" in config else "",
    log:
        f"{RESULTS}/logs/speed.log",
    benchmark:
        f"{RESULTS}/benchmarks/speed.tsv"
    threads: threads_of("speed")
    resources:
        **resources_of("speed"),
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/speed.py"

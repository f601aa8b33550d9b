# Speed: milliseconds per image at the paper architecture, as a ratio to a bare backbone forward.


rule speed:
    input:
        claimed=repo_file("config/reference/anovl_timing.csv"),
    output:
        md=f"{TABLES}/speed.md",
        csv=f"{TABLES}/speed.csv",
    log:
        f"{RESULTS}/logs/speed.log",
    benchmark:
        f"{RESULTS}/benchmarks/speed.tsv"
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/speed.py"

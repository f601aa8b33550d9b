# Report: the paper's tables with claimed numbers beside reproduced ones, and the claims check.


rule report:
    input:
        metrics=table1_metrics(),
        table1_reference=repo_file(config["report"]["table1"]["reference"]),
    output:
        table1=multiext(f"{TABLES}/table1_uzad", ".md", ".tex", ".csv"),
        claims=f"{TABLES}/claims_check.md",
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/render_report.py"

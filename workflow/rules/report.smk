# Report: the paper's tables with claimed numbers beside reproduced ones, and the claims check.


rule report:
    input:
        metrics=report_metrics(),
        references=repo_file("config/reference"),
    output:
        report_outputs(),
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/render_report.py"

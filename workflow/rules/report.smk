# Report: the paper's tables with claimed numbers beside reproduced ones, and the claims check.


def table1_metrics():
    section = config["report"]["table1"]
    setting = section.get("setting", "uzad")
    return [path for method in section["methods"] for path in run_metrics(setting, method)]


rule report:
    input:
        metrics=table1_metrics(),
        reference=str(Path(workflow.basedir) / config["report"]["table1"]["reference"]),
    output:
        table1=multiext(f"{TABLES}/table1_uzad", ".md", ".tex", ".csv"),
        claims=f"{TABLES}/claims_check.md",
    params:
        repo_root=workflow.basedir,
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/render_report.py"


def all_outputs():
    return [*rules.report.output]

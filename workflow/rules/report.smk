# Report: the paper's tables with claimed numbers beside reproduced ones, the claims check, the figure.
from siad.report.figures import FIGURE_STEM, figure4_runs


rule report:
    input:
        metrics=report_metrics(),
        references=reference_files(),
    output:
        report_outputs(),
    params:
        reference_dir=repo_file("config/reference"),
        spec=PLAN.report_params(),
    log:
        f"{RESULTS}/logs/report.log",
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/render_report.py"



# Qualitative figure in the style of SIAD-LLM Fig. 4: `all` asks for it when report.figure4 is configured.
rule figure4:
    input:
        predictions=[str(key.run_dir(RESULTS) / "predictions.npz") for key in figure4_runs(config)],
        metrics=[str(key.run_dir(RESULTS) / "metrics.json") for key in figure4_runs(config)],
        metas=[meta_path(d) for d in config["report"].get("figure4", {}).get("datasets", [])],
    output:
        png=f"{TABLES}/{FIGURE_STEM}.png",
        pdf=f"{TABLES}/{FIGURE_STEM}.pdf",
    params:
        spec=PLAN.report_params(),
    log:
        f"{RESULTS}/logs/figure4.log",
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/render_figure.py"

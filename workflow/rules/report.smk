# Report: the paper's tables with claimed numbers beside reproduced ones, the claims check, the figures.
from siad.report.figures import FIGURE_STEM, figure4_runs
from siad.report.paper_figures import (
    FIGURE1,
    FIGURE2,
    REFERENCES as FIGURE_REFERENCES,
    STEMS as FIGURE_STEMS,
    figure1_runs,
    figure2_panel_runs,
    figure2_datasets,
    figure2_runs,
)


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


# SIAD-LLM Fig. 1 (right) and Fig. 2: `all` asks for each one when report.figure1 / report.figure2 is configured.
# Inputs: exactly the run files each figure reads, the dataset indexes of its qualitative panel and its claims.
rule figure1:
    input:
        metrics=[run_file(key, "metrics.json") for key in figure1_runs(config)],
        predictions=[],
        metas=[],
        references=[repo_file(f"config/reference/{name}") for name in FIGURE_REFERENCES[FIGURE1]],
    output:
        png=f"{TABLES}/{FIGURE_STEMS[FIGURE1]}.png",
        pdf=f"{TABLES}/{FIGURE_STEMS[FIGURE1]}.pdf",
    params:
        figure=FIGURE1,
        reference_dir=repo_file("config/reference"),
        spec=PLAN.report_params(),
    log:
        f"{RESULTS}/logs/figure1.log",
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/render_paper_figure.py"


rule figure2:
    input:
        metrics=[run_file(key, "metrics.json") for key in figure2_runs(config)],
        predictions=[run_file(key, "predictions.npz") for key in figure2_panel_runs(config)],
        metas=[meta_path(d) for d in figure2_datasets(config)],
        references=[repo_file(f"config/reference/{name}") for name in FIGURE_REFERENCES[FIGURE2]],
    output:
        png=f"{TABLES}/{FIGURE_STEMS[FIGURE2]}.png",
        pdf=f"{TABLES}/{FIGURE_STEMS[FIGURE2]}.pdf",
    params:
        figure=FIGURE2,
        reference_dir=repo_file("config/reference"),
        spec=PLAN.report_params(),
    log:
        f"{RESULTS}/logs/figure2.log",
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/render_paper_figure.py"

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


# One job per table, rendered inside the Snakemake process (a table needs only the suite, which planning the workflow
# has imported: no Python start-up per table) and on the submitting host under a cluster executor (localrule).
# `snakemake tables/<profile>/<table>.md` builds exactly the runs that table reads.
for _name in TABLE_NAMES:

    rule:
        name:
            f"table_{_name}"
        input:
            metrics=table_metrics(_name),
            references=reference_files([_name]),
        output:
            md=f"{TABLES}/{table_stem(_name)}.md",
            tex=f"{TABLES}/{table_stem(_name)}.tex",
            csv=f"{TABLES}/{table_stem(_name)}.csv",
        params:
            table=_name,
            reference_dir=repo_file("config/reference"),
            spec=PLAN.table_params(_name),
        log:
            f"{RESULTS}/logs/tables/{_name}.log",
        threads: threads_of("table")
        resources:
            **resources_of("table"),
        localrule: True
        run:
            from siad.report.paper import render_table
            from siad.runtime import run_inline

            run_inline(lambda: render_table(config, params.table, [Path(p) for p in input.metrics],
                                            Path(output.md).parent, Path(params.reference_dir)), log[0], config)


# The claims check: every claimed number of every configured paper table beside its reproduction.
rule claims_check:
    input:
        metrics=claims_metrics(),
        references=reference_files(),
    output:
        f"{TABLES}/claims_check.md",
    params:
        reference_dir=repo_file("config/reference"),
        spec=PLAN.claims_params(),
    log:
        f"{RESULTS}/logs/claims_check.log",
    threads: threads_of("claims_check")
    resources:
        **resources_of("claims_check"),
    localrule: True
    run:
        from siad.report.paper import render_claims_check
        from siad.runtime import run_inline

        run_inline(lambda: render_claims_check(config, [Path(p) for p in input.metrics], Path(output[0]),
                                               Path(params.reference_dir)), log[0], config)


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
    threads: threads_of("figure4")
    resources:
        **resources_of("figure4"),
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
    threads: threads_of("figure1")
    resources:
        **resources_of("figure1"),
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
    threads: threads_of("figure2")
    resources:
        **resources_of("figure2"),
    conda:
        "../envs/siad.yaml"
    script:
        "../scripts/render_paper_figure.py"

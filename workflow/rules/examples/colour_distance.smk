# A worked example of a baseline added as its own rule (README: Adding a baseline, "A baseline as a rule").
#
# The suite knows this method only from its config entry:
#
#   methods:
#     colour_distance:
#       display_name: Colour distance
#       external: {rules: workflow/rules/examples/colour_distance.smk, training_free: true}
#       params: {blur: 2}
#
# and from this rule, which writes the suite's prediction format for a run key: each run's external.npz, at the
# path `external_predictions(<method>)` gives (wildcards: setting, variant, seed, source, target). The suite then
# checks the file (every test image once, finite scores and 2-D maps) and scores, tabulates and claim-checks it like
# any other method. The script needs numpy and Pillow only, so it can run in its own environment (`conda:`, used
# with --use-conda); a wrapper of an official repository's test script would call it here instead.


rule colour_distance:
    input:
        meta=lambda wc: meta_path(wc.target),
    output:
        predictions=external_predictions("colour_distance"),
    params:
        root=lambda wc: dataset_folder(wc.target),
        method=lambda wc: external_params("colour_distance", wc.variant),
    log:
        f"{RESULTS}/logs/external/colour_distance/{{setting}}_{{variant}}_seed{{seed}}_{{source}}_{{target}}.log",
    threads: 1
    conda:
        "../../envs/colour_distance.yaml"
    script:
        "../../scripts/examples/colour_distance.py"

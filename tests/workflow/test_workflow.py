"""The Snakemake workflow: dry-run job lists, start-up validation, and a tiny end-to-end demo."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from siad.data.registry import get_dataset
from siad.engine.protocol import protocol_runs
from siad.engine.runs import job_per
from siad.plan import build_plan, validate_workflow_config
from siad.report.paper import table_runs

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.workflow


def snakemake(workdir: Path, *args: str, configfile: Path | None = None,
              preload: Path | None = None) -> subprocess.CompletedProcess:
    """Run Snakemake in a subprocess; ``preload`` is a Python file imported first (e.g. to register a toy method
    before the Snakefile validates the config; fine for dry runs, whose jobs never start)."""
    args = ["--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir), "--cores", "1", *args]
    if configfile:
        args += ["--configfile", str(configfile)]
    if preload is None:
        cmd = [sys.executable, "-m", "snakemake", *args]
    else:
        code = ("import runpy, sys; from snakemake.cli import main; runpy.run_path(sys.argv[1]); "
                "main(sys.argv[2:])")
        cmd = [sys.executable, "-c", code, str(preload), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


def dry_run_jobs(output: str) -> list[tuple[str, dict[str, str], list[str]]]:
    """(rule, wildcards, outputs) of every job of a dry run."""
    jobs = re.findall(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", output, flags=re.S | re.M)
    parsed = []
    for rule, body in jobs:
        wildcards = re.search(r"wildcards: ([^\n]*)", body)
        outputs = re.search(r"output: ([^\n]*)", body)
        parsed.append((rule, dict(kv.split("=") for kv in wildcards.group(1).split(", ")) if wildcards else {},
                       outputs.group(1).split(", ") if outputs else []))
    return parsed


def run_paths(output: str) -> dict[str, list[tuple[str, ...]]]:
    """rule name -> (setting, method, variant, seed folder, source, target) of the runs each ``run_*`` job writes."""
    jobs = {}
    for rule, _, outputs in dry_run_jobs(output):
        if rule.startswith(("run_", "score_")):  # score_: an external method's runs
            jobs[rule] = [Path(o).parts[-7:-1] for o in outputs if o.endswith("metrics.json")]
    return jobs


def run_jobs(output: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """rule name -> (method, variant, source, target) of the runs each ``run_*`` job writes (from its outputs)."""
    return {rule: [(m, v, s, t) for _, m, v, _, s, t in runs] for rule, runs in run_paths(output).items()}


def job_of(rule: str, outputs: list[str]) -> str:
    """A job named by what it runs, whatever its part: ``run_<method>_seed<s>_<source>`` for a run or scoring job
    (from its outputs), ``report`` for a table or the claims check, else the rule."""
    metrics = [Path(o).parts[-7:-1] for o in outputs if o.endswith("metrics.json")]
    if rule.startswith(("run_", "score_")) and metrics:
        _, method, _, seed, source, _ = metrics[0]
        return f"run_{method}_{seed}_{source}"
    return "report" if rule.startswith("table_") or rule == "claims_check" else rule


def merged_run_jobs(output: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """:func:`run_jobs` merged by (method, seed, source): the runs of each, whatever part of the jobs holds them."""
    merged: dict[str, list[tuple[str, str, str, str]]] = {}
    for rule, _, outputs in dry_run_jobs(output):
        if rule.startswith(("run_", "score_")):
            merged.setdefault(job_of(rule, outputs), []).extend(
                (m, v, s, t) for _, m, v, _, s, t in (Path(o).parts[-7:-1] for o in outputs
                                                      if o.endswith("metrics.json")))
    return merged


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def demo_config() -> dict:
    return yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


@pytest.mark.parametrize("profile", ["config.yaml", "demo.yaml"])
def test_dry_run_has_one_job_per_method_seed_source_covering_every_required_run(tmp_path, profile):
    config = yaml.safe_load((ROOT / "config" / profile).read_text())
    result = snakemake(tmp_path, "-n", "all", configfile=ROOT / "config" / profile)
    assert result.returncode == 0, result.stderr + result.stdout
    paths = run_paths(result.stdout + result.stderr)
    runs = [run for group in paths.values() for run in group]
    required = [(k.setting, k.method, k.variant, k.seed_folder, k.source, k.target) for k in build_plan(config).runs]
    assert len(runs) == len(set(runs)) and set(runs) == set(required)
    per = job_per(config)  # the paper profile: one job per source; the demo: one per method (fewer start-ups)
    assert per == ("method" if profile == "demo.yaml" else "source")
    for rule, group in paths.items():  # all settings in one job; one source, or every source of the method
        assert len({(m, sd) + ((s,) if per == "source" else ()) for _, m, _, sd, s, _ in group}) == 1, rule
    seeds = {f"seed{s}" for s in config["training"]["seeds"]}
    trained = {(st, m) for st, m, _, sd, s, _ in runs if s != "none"}
    assert {st for st, _ in trained} == {"uzad", "pseudo", "zad"}  # Tables 1 and 2, the ZAD table
    for setting, method in trained:  # every trained run under every training seed
        assert {sd for st, m, _, sd, _, _ in runs if (st, m) == (setting, method)} == seeds
    assert {sd for _, _, _, sd, s, _ in runs if s == "none"} == {f"seed{config['seed']}"}  # training-free: once
    table1 = [
        (key.method, key.variant, key.source, key.target)
        for key in protocol_runs(config["protocol"], setting="uzad", method="clip", variant="default",
                                 training_free=True, seeds=[config["seed"]])
    ]
    clip_rule = f"run_clip_seed{config['seed']}" + ("_none" if per == "source" else "")
    clip_runs = [run for rule, group in run_jobs(result.stdout + result.stderr).items()
                 if rule.startswith(clip_rule + "_") for run in group]  # the jobs are cut by the tables they serve
    assert len(table1) == 9 and set(table1) <= set(clip_runs)
    print(f"{profile}: {len(paths)} run jobs, {len(runs)} runs")
    jobs = run_jobs(result.stdout + result.stderr)
    siad = [run for rule, group in jobs.items() if "siad_llm" in rule for run in group]
    assert {v for _, v, _, _ in siad} == {"default", *config["methods"]["siad_llm"]["variants"]}


def test_trained_method_gets_one_job_per_source(tmp_path):
    config = tiny_demo()
    config["methods"]["test_mean_image"] = {"display_name": "Mean", "params": {"size": 32},
                                            "variants": {"small": {"size": 16}}}
    config["report"]["table1"]["methods"] = ["clip", "test_mean_image"]
    config["report"]["tables"] = ["table1_uzad", "siad_table7_training_free"]
    for figure in ("figure1", "figure2"):
        config["report"].pop(figure)
    result = snakemake(tmp_path, "-n", "all", configfile=write_config(tmp_path, config),
                       preload=ROOT / "tests" / "engine" / "test_runs.py")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    jobs = merged_run_jobs(output)
    assert sorted(jobs) == ["run_anovl_seed0_none", "run_clip_seed0_none", "run_colour_distance_seed0_none",
                            "run_test_mean_image_seed0_br35h", "run_test_mean_image_seed0_mvtec"]
    for source in ("mvtec", "br35h"):
        targets = next(e["targets"] for e in config["protocol"] if e["source"] == source)
        assert sorted(jobs[f"run_test_mean_image_seed0_{source}"]) == sorted(
            ("test_mean_image", "default", source, t) for t in targets)
    assert sorted(t for _, _, _, t in jobs["run_clip_seed0_none"]) == ["headct", "sdd", "visa"]
    assert not [rule for rule, _, _ in dry_run_jobs(output) if rule in ("fit", "evaluate")]


def test_default_profile_is_the_paper_profile(tmp_path):
    result = snakemake(tmp_path, "-n", "all")
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "results/paper/datasets/mvtec/meta.json" in text
    assert "synthesize_standin" not in text  # real data are prepared, not synthesised


def test_malformed_config_stops_before_any_job(tmp_path):
    config = demo_config()
    config["evaluation"]["bath_size"] = 4
    result = snakemake(tmp_path, "-n", "all", configfile=write_config(tmp_path, config))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "invalid configuration" in output and "bath_size" in output


def test_unknown_method_stops_with_the_known_names(tmp_path):
    config = demo_config()
    config["methods"]["clipp"] = {"display_name": "CLIPP"}
    result = snakemake(tmp_path, "-n", "all", configfile=write_config(tmp_path, config))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    known = re.search(r"unknown method 'clipp'; known: ([\w, ]+)", output)
    assert known and {"anovl", "clip"} <= set(known.group(1).split(", "))


def tiny_demo() -> dict:
    config = demo_config()
    config["workflow"] = {"job_per": "source"}  # the rerun tests below name one job per source
    config["datasets"] = {"mvtec": {"classes": ["bottle"]}, "visa": {"classes": ["candle"]}, "sdd": {},
                          "br35h": {}, "headct": {}}
    config["protocol"] = [{"source": "mvtec", "targets": ["visa", "sdd"]}, {"source": "br35h", "targets": ["headct"]}]
    config["data"]["standin"] = {"size": 32, "n_train": 2, "n_test_normal": 3, "n_test_anomalous": 3}
    config["evaluation"].update(size=32, n_bootstrap=20)
    config["report"]["tables"] = ["table1_uzad", "table2_pseudo", "table_zad", "siad_table7_training_free",
                                  "filo_table1_zad"]
    config["report"]["table7"] = {"methods": ["anovl"]}  # SIAD-LLM's row would train it: too slow here
    config["report"].pop("figure4", None)  # not all its datasets are targets here
    config["report"]["table1"]["methods"] = ["clip", "anomalygpt"]  # one trained LLM method: grouped evaluation
    # the settings' tables and figures with the CLIP-family baselines under uzad, pseudo and zad
    config["report"]["table2"] = {"methods": ["anomalyclip", "adaclip", "filo", "aaclip"], "repeat_uzad": []}
    config["report"]["zad"] = {"methods": ["clip", "anomalyclip", "adaclip", "filo", "aaclip"]}
    config["report"]["figure1"] = {"methods": ["clip", "anomalygpt"]}
    config["report"]["figure2"] = {"methods": ["clip", "anomalyclip"], "datasets": ["visa", "sdd"], "count": 1}
    config["methods"]["anomalyclip"]["params"].update(epochs=1)
    config["methods"]["adaclip"]["params"].update(epochs=1)
    config["methods"]["filo"]["params"].update(epochs=1, adapter_epochs=1, detector_size=64)
    config["methods"]["aaclip"]["params"].update(stage1_epochs=1, stage2_epochs=1, checkpoint_epoch=1)
    config["training"] = {"normal_images": "train", "normal_images_per_dataset": {"br35h": "all"}}
    config["speed"]["llm"].update(batch_sizes=[1, 2], n_batches=1, warmup=0)
    config["speed"].update(backbone="tiny-vit-b16plus-demo", image_size=112, n_images=2, warmup=1)
    for group in config["speed"]["groups"].values():
        group.update(n_images=2, warmup=1)
    return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny demo, run once to completion; tests that change it restore what they changed."""
    tmp_path = tmp_path_factory.mktemp("tiny")
    configfile = write_config(tmp_path, tiny_demo())
    result = snakemake(tmp_path, "all", configfile=configfile)
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp_path, configfile


def test_tiny_demo_end_to_end_and_resumable(tiny_run):
    tmp_path, configfile = tiny_run
    tables = tmp_path / "tables" / "demo"
    for name in ("table1_uzad.md", "table1_uzad.tex", "table1_uzad.csv", "claims_check.md", "table2_pseudo.md",
                 "table_zad.md", "siad_table7_training_free.md", "speed.md", "speed.csv"):
        first_line = (tables / name).read_text().splitlines()[0]
        assert "synthetic" in first_line and "random-initialised" in first_line, name
    for figure in ("figure1_auroc", "figure2_zero_shot"):
        assert (tables / f"{figure}.png").stat().st_size > 0 and (tables / f"{figure}.pdf").stat().st_size > 0
    for table, setting in (("table2_pseudo.md", "pseudo"), ("table_zad.md", "zad")):  # the baselines' own runs
        for method, name in (("anomalyclip", "AnomalyCLIP"), ("adaclip", "AdaCLIP"), ("filo", "FiLo"),
                             ("aaclip", "AA-CLIP")):
            claim = r"\d+\.\d" if table == "table2_pseudo.md" else r"(?:\d+\.\d|n/a)"  # FiLo's Table 1: 2 of 3
            assert re.search(rf"\| image \| {name} \| \d+\.\d \({claim}\) \|", (tables / table).read_text()), (
                table, name)
            model = tmp_path / "results" / "demo" / setting / method / "default" / "seed0" / "mvtec" / "model.json"
            counts = json.loads(model.read_text())["training_set"]
            assert 0 < counts["anomalous"] < counts["images"], (setting, method, counts)
    table = (tables / "table1_uzad.md").read_text()
    assert re.search(r"\| image \| CLIP \| \d+\.\d \(\d+\.\d\) \| \d+\.\d \(\d+\.\d\) \| \d+\.\d \(\d+\.\d\)", table)
    pixel_row = next(line for line in table.splitlines() if line.startswith("| pixel | CLIP"))
    assert pixel_row.count("–") == 1  # HeadCT has no masks
    for target in ("visa", "sdd", "headct"):
        run_dir = tmp_path / "results" / "demo" / "uzad" / "clip" / "default" / "seed0" / "none" / target
        assert (run_dir / "metrics.json").is_file()
    assert list((tmp_path / "results" / "demo" / "benchmarks" / "runs" / "clip" / "seed0" / "none").glob("*.tsv"))
    assert re.search(r"\| image \| AnomalyGPT \| \d+\.\d \(\d+\.\d\) \|", table)
    trained = tmp_path / "results" / "demo" / "uzad" / "anomalygpt" / "default" / "seed0"
    for source, targets in (("mvtec", ("visa", "sdd")), ("br35h", ("headct",))):
        assert list((tmp_path / "results" / "demo" / "logs" / "runs" / "anomalygpt" / "seed0" / source).glob(
            "*.log"))  # jobs per source (cut by the tables they serve)
        assert (trained / source / "model.json").is_file()
        for target in targets:
            llm = json.loads((trained / source / target / "metrics.json").read_text())["llm"]
            assert set(llm["mean"]) == {"accuracy", "unparsed_rate", "p_yes_auroc"}
            assert 0.0 <= llm["mean"]["accuracy"] <= 1.0
    table7 = (tables / "siad_table7_training_free.md").read_text()
    assert re.search(r"\| AnoVL \| \d+\.\d \(n/a\) \| \d+\.\d \(n/a\) \|", table7)
    filo = (tables / "filo_table1_zad.md").read_text()  # FiLo's own Table 1: its VisA columns (MVTecAD: no target)
    assert re.search(r"\| FiLo \| ViT-L/14@336px \| \d+\.\d \(83\.9\) \| \d+\.\d \(95\.9\) \|", filo), filo
    assert re.search(r"\| WinCLIP \| ViT-B/16@240px \| not run \(78\.1\) \|", filo), filo
    speed = (tables / "speed.md").read_text()
    # batch | ms/image median | min | x bare forward: median of the rounds' ratios | of the minima
    cells = r"\| cpu \| 1 \| \d+\.\d \| \d+\.\d \| \d+\.\d\d \| \d+\.\d\d \|"
    for row in ("FiLo", "FiLo w/o Grounding DINO"):  # FiLo's own group: its bare forward, with and without the detector
        assert re.search(rf"\| {row} {cells}", speed), row
    for row in ("bare forward", "CLIP", "AnoVL-TFA", "AnoVL-TFA fused", "AnoVL-TTA"):
        assert re.search(rf"\| {row} {cells}", speed), row

    again = snakemake(tmp_path, "all", configfile=configfile)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


# --- reruns: a change reruns exactly the jobs that depend on it, nothing else --------------------------------

ANOMALYCLIP_JOBS = {"run_anomalyclip_seed0_mvtec", "run_anomalyclip_seed0_br35h"}  # uzad, pseudo and zad in each
# the trained CLIP-family baselines (AnomalyCLIP, AdaCLIP, AA-CLIP): one job per source, every setting in it
CLIP_FAMILY_JOBS = {f"run_{m}_seed0_{s}" for m in ("anomalyclip", "adaclip", "filo", "aaclip")
                    for s in ("mvtec", "br35h")}
RUN_JOBS = {"run_clip_seed0_none", "run_anovl_seed0_none", "run_anomalygpt_seed0_mvtec",
            "run_anomalygpt_seed0_br35h", "run_colour_distance_seed0_none"} | CLIP_FAMILY_JOBS
FIGURES = {"figure1", "figure2"}
TINY_DATASETS = ("mvtec", "visa", "sdd", "br35h", "headct")
PREPARE = {f"prepare_dataset[{d}]" for d in TINY_DATASETS}
STANDIN = {f"synthesize_standin[{d}]" for d in TINY_DATASETS}


def planned_jobs(output: str) -> set[str]:
    """The jobs of a dry run as ``rule`` or ``rule[dataset]``, without the ``all`` target."""
    return {f"{rule}[{wc['dataset']}]" if "dataset" in wc else job_of(rule, outputs)
            for rule, wc, outputs in dry_run_jobs(output) if rule != "all"}


def dry_run_with(tmp_path: Path, mutate=None, preload: Path | None = None) -> set[str]:
    config = tiny_demo()
    if mutate:
        mutate(config)
    configfile = tmp_path / "changed.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "all", configfile=configfile, preload=preload)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return planned_jobs(output)


@pytest.mark.parametrize(("mutate", "expected"), [
    (None, set()),
    (lambda c: c["methods"]["clip"]["params"].update(logit_scale=50.0),
     {"run_clip_seed0_none", "report", "speed"} | FIGURES),
    (lambda c: c["methods"]["anomalygpt"]["params"].update(lr=0.002),
     {"run_anomalygpt_seed0_mvtec", "run_anomalygpt_seed0_br35h", "report", "speed", "figure1"}),
    (lambda c: c["methods"]["anomalyclip"]["params"].update(lr=0.002), ANOMALYCLIP_JOBS | {"report", "figure2"}),
    # the pseudo runs have jobs of their own (Table 2's): the uzad and zad runs, and Figure 2 that reads them, stay
    (lambda c: c["training"].update(pseudo={"anomalous_fraction": 0.5}), CLIP_FAMILY_JOBS | {"report"}),
    (lambda c: c["methods"]["adaclip"]["params"].update(mosaic_rate=0.5),
     {"run_adaclip_seed0_mvtec", "run_adaclip_seed0_br35h", "report"}),
    (lambda c: c["evaluation"].update(size=16), RUN_JOBS | {"report"} | FIGURES),
    (lambda c: c["evaluation"].update(aupro_limit=0.05), RUN_JOBS | {"report"} | FIGURES),
    # the top-level seed seeds the stand-ins, the frozen random weights and the bootstrap; with no training.seeds it is
    # also the one training seed, so every run moves to seed7
    (lambda c: c.update(seed=7), {j.replace("seed0", "seed7") for j in RUN_JOBS} | PREPARE | STANDIN
     | {"report", "speed", "colour_distance"} | FIGURES),
    # another training seed adds that seed's jobs of the trained methods; the seed-0 runs stay as they are
    (lambda c: c["training"].update(seeds=[0, 5]),
     {"run_anomalygpt_seed5_mvtec", "run_anomalygpt_seed5_br35h", "report"} | FIGURES
     | {j.replace("seed0", "seed5") for j in CLIP_FAMILY_JOBS}),
    (lambda c: c["data"]["standin"].update(n_test_normal=4),
     RUN_JOBS | PREPARE | STANDIN | {"report", "colour_distance"} | FIGURES),
    (lambda c: c["data"]["options"].update(medical_protocol="dra_75_25"),
     {"prepare_dataset[br35h]", "prepare_dataset[headct]", "run_clip_seed0_none", "run_anovl_seed0_none",
      "run_colour_distance_seed0_none", "colour_distance", "run_anomalygpt_seed0_br35h", "report"} | FIGURES
     | {j for j in CLIP_FAMILY_JOBS if j.endswith("br35h")}),
    (lambda c: c["methods"]["clip"].update(display_name="CLIP (ViT-L)"), {"report"} | FIGURES),
    (lambda c: c["methods"]["clip"].update(variants={"cold": {"logit_scale": 10.0}}), set()),  # no table uses it
    (lambda c: c["datasets"]["visa"].update(classes=["candle", "pcb1"]),
     {"synthesize_standin[visa]", "prepare_dataset[visa]", "run_clip_seed0_none", "run_anovl_seed0_none",
      "run_colour_distance_seed0_none", "colour_distance", "run_anomalygpt_seed0_mvtec", "report"} | FIGURES
     | {j for j in CLIP_FAMILY_JOBS if j.endswith("mvtec")}),
])
def test_a_config_change_reruns_exactly_the_jobs_that_depend_on_it(tiny_run, mutate, expected):
    tmp_path, _ = tiny_run
    assert dry_run_with(tmp_path, mutate) == expected


def test_a_changed_default_in_code_reruns_that_method_only(tiny_run, tmp_path):
    workdir, _ = tiny_run
    preload = tmp_path / "change_default.py"
    preload.write_text("from siad.methods import get_method_class\n"
                       "cls = get_method_class('anomalygpt')\n"
                       "cls.defaults = {**cls.defaults, 'label_threshold': 0.4}\n")
    assert dry_run_with(workdir, preload=preload) == {
        "run_anomalygpt_seed0_mvtec", "run_anomalygpt_seed0_br35h", "report", "speed", "figure1"}


def test_an_edited_image_re_prepares_its_dataset_and_reruns_its_readers(tiny_run):
    tmp_path, _ = tiny_run
    image = sorted((tmp_path / "data" / "demo").glob("**/*.png"))[0]
    dataset = next(d for d in TINY_DATASETS if (tmp_path / "data" / "demo" / get_dataset(d).folder) in image.parents)
    original, stat = image.read_bytes(), image.stat()
    try:
        image.write_bytes(original + b"\0")
        jobs = dry_run_with(tmp_path)
    finally:
        image.write_bytes(original)
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert {j for j in jobs if j.startswith("prepare_dataset")} == {f"prepare_dataset[{dataset}]"}
    assert "report" in jobs and not {j for j in jobs if j.startswith("synthesize_standin")}
    assert dry_run_with(tmp_path) == set()  # restored: nothing to do


def test_the_report_reads_the_claimed_numbers_as_inputs(tiny_run):
    tmp_path, configfile = tiny_run
    result = snakemake(tmp_path, "-n", "--forcerun", "table_table1_uzad", "all", configfile=configfile)
    report = re.search(r"^rule table_table1_uzad:\n(.*?)(?=^\S|\Z)", result.stdout + result.stderr,
                       flags=re.S | re.M).group(1)
    assert str(ROOT / "config" / "reference" / "siad_table1_uzad.csv") in report


def test_the_report_refuses_a_stale_metrics_file(tiny_run):
    tmp_path, configfile = tiny_run
    metrics = tmp_path / "results" / "demo" / "uzad" / "clip" / "default" / "seed0" / "none" / "visa" / "metrics.json"
    original, stat = metrics.read_bytes(), metrics.stat()
    tables = tmp_path / "tables" / "demo" / "table1_uzad.md"
    before = tables.read_bytes()
    body = json.loads(original)
    body["spec"]["digest"] = "0" * 64  # as if computed under another configuration
    metrics.write_text(json.dumps(body))
    os.utime(metrics, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    try:
        result = snakemake(tmp_path, "--forcerun", "table_table1_uzad", "all", configfile=configfile)
    finally:
        metrics.write_bytes(original)
        os.utime(metrics, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    log = (tmp_path / "results" / "demo" / "logs" / "tables" / "table1_uzad.log").read_text()
    after = tables.read_bytes() if tables.exists() else None
    assert snakemake(tmp_path, "all", configfile=configfile).returncode == 0  # the table again, for the next tests
    assert result.returncode != 0 and "computed under another run specification" in log
    assert "uzad/clip/default/seed0/none/visa/metrics.json" in log and "stamp does not match" in log
    assert "--force results/demo/uzad/clip/default/seed0/none/visa/metrics.json, then" in log
    assert after is None or after == before


def test_booleans_from_the_command_line_are_read_as_booleans(tmp_path):
    result = snakemake(tmp_path, "-n", "all", "--config", "data={verify_counts: false, download: false}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    wrong = snakemake(tmp_path, "-n", "all", "--config", "data={verify_counts: perhaps}")
    output = wrong.stdout + wrong.stderr
    assert wrong.returncode != 0 and "data.verify_counts: 'perhaps' is not a boolean" in output


# --- one table at a time ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mutate", [
    lambda c: c["report"].update(tables=["table_zad"]),
    lambda c: c["report"].update(tables=["siad_table7_training_free", "table1_uzad"]),
    lambda c: c["report"].pop("user_tables"),
])
def test_choosing_other_tables_reruns_no_finished_run(tiny_run, mutate):
    tmp_path, _ = tiny_run
    config = tiny_demo()
    mutate(config)
    configfile = tmp_path / "chosen.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "all", configfile=configfile)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    # the claims check lists the claims of the chosen tables: it alone is written again
    assert {rule for rule, _, _ in dry_run_jobs(output) if rule != "all"} <= {"claims_check"}, output[-3000:]


def test_one_table_builds_exactly_the_runs_it_reads(tmp_path):
    config = tiny_demo()
    configfile = write_config(tmp_path, config)
    result = snakemake(tmp_path, "-n", "tables/demo/siad_table7_training_free.md", configfile=configfile)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    built = {run for group in run_paths(output).values() for run in group}
    needed = {(k.setting, k.method, k.variant, k.seed_folder, k.source, k.target)
              for k in table_runs(validate_workflow_config(config), "siad_table7_training_free")}
    # AnoVL's default model only (no other method, no other table's variant), on every protocol target
    assert {run[:5] for run in built} == {run[:5] for run in needed} and needed <= built
    # every run of those models the plan holds: each protocol target, and any target another table reads of them
    planned = {(k.setting, k.method, k.variant, k.seed_folder, k.source, k.target)
               for k in build_plan(validate_workflow_config(config)).runs}
    assert built == {run for run in planned if run[:5] in {n[:5] for n in needed}}
    assert {"visa", "sdd", "headct"} <= {run[5] for run in built}
    rules = {rule for rule, _, _ in dry_run_jobs(output)}
    assert "table_siad_table7_training_free" in rules and not {r for r in rules if r.startswith("table_")} - {
        "table_siad_table7_training_free"} and "claims_check" not in rules


def test_a_user_table_and_an_external_method_join_the_demo(tiny_run):
    tmp_path, _ = tiny_run
    table = (tmp_path / "tables" / "demo" / "rule_baseline.md").read_text()
    assert "claimed" not in table.split("Notes:")[0] and "no paper claims these numbers" in table
    for row in ("CLIP", "Colour distance", "AnoVL (TFA)"):
        assert re.search(rf"\| image \| {re.escape(row)} \| \d+\.\d \| \d+\.\d \| \d+\.\d \| \d+\.\d \|", table), row
    run = tmp_path / "results" / "demo" / "uzad" / "colour_distance" / "default" / "seed0" / "none" / "visa"
    assert (run / "external.npz").is_file() and (run / "predictions.npz").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run"]["method"] == "colour_distance" and "spec" in metrics


def test_no_table_note_prints_a_path_of_this_machine(tiny_run):
    tmp_path, _ = tiny_run
    for table in (tmp_path / "tables" / "demo").glob("*.*"):
        if table.suffix in (".md", ".tex", ".csv"):
            text = table.read_text()
            assert str(ROOT) not in text and str(tmp_path) not in text and "/tmp/" not in text, table.name

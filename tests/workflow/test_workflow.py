"""The Snakemake workflow: dry-run job lists, start-up validation, and a tiny end-to-end demo."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from siad.engine.protocol import protocol_runs
from siad.report.paper import required_runs

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.workflow


def snakemake(workdir: Path, *args: str, configfile: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--cores", "1", *args]
    if configfile:
        cmd += ["--configfile", str(configfile)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def evaluate_jobs(output: str) -> list[tuple[str, str, str, str]]:
    """(method, variant, source, target) of every evaluate job of a dry run."""
    jobs = re.findall(r"rule evaluate:.*?wildcards: ([^\n]*)", output, flags=re.S)
    parsed = [dict(kv.split("=") for kv in w.split(", ")) for w in jobs]
    return [(w["method"], w["variant"], w["source"], w["target"]) for w in parsed]


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def demo_config() -> dict:
    return yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


@pytest.mark.parametrize("profile", ["config.yaml", "demo.yaml"])
def test_dry_run_lists_one_evaluate_job_per_protocol_run(tmp_path, profile):
    config = yaml.safe_load((ROOT / "config" / profile).read_text())
    result = snakemake(tmp_path, "-n", "all", configfile=ROOT / "config" / profile)
    assert result.returncode == 0, result.stderr + result.stdout
    jobs = evaluate_jobs(result.stdout + result.stderr)
    table1 = [
        (key.method, key.variant, key.source, key.target)
        for key in protocol_runs(config["protocol"], setting="uzad", method="clip", variant="default",
                                 training_free=True)
    ]
    assert len(table1) == 9 and set(table1) <= set(jobs)
    assert sorted(jobs) == sorted((k.method, k.variant, k.source, k.target) for k in required_runs(config))


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
    assert "unknown method 'clipp'; known: anovl, clip" in output


def tiny_demo() -> dict:
    config = demo_config()
    config["datasets"] = {"mvtec": {"classes": ["bottle"]}, "visa": {"classes": ["candle"]}, "sdd": {},
                          "br35h": {}, "headct": {}}
    config["protocol"] = [{"source": "mvtec", "targets": ["visa", "sdd"]}, {"source": "br35h", "targets": ["headct"]}]
    config["data"]["standin"] = {"size": 32, "n_train": 2, "n_test_normal": 3, "n_test_anomalous": 3}
    config["evaluation"].update(size=32, n_bootstrap=20)
    config["report"]["tables"] = ["table1_uzad", "siad_table7_training_free"]
    config["speed"].update(backbone="tiny-vit-b16plus-demo", image_size=112, n_images=2, warmup=1)
    return config


def test_tiny_demo_end_to_end_and_resumable(tmp_path):
    configfile = write_config(tmp_path, tiny_demo())
    result = snakemake(tmp_path, "all", configfile=configfile)
    assert result.returncode == 0, result.stderr[-4000:]
    tables = tmp_path / "tables" / "demo"
    for name in ("table1_uzad.md", "table1_uzad.tex", "table1_uzad.csv", "claims_check.md",
                 "siad_table7_training_free.md", "speed.md", "speed.csv"):
        first_line = (tables / name).read_text().splitlines()[0]
        assert "synthetic" in first_line and "random-initialised" in first_line, name
    table = (tables / "table1_uzad.md").read_text()
    assert re.search(r"\| image \| CLIP \| \d+\.\d \(\d+\.\d\) \| \d+\.\d \(\d+\.\d\) \| \d+\.\d \(\d+\.\d\)", table)
    pixel_row = next(line for line in table.splitlines() if line.startswith("| pixel | CLIP"))
    assert pixel_row.count("–") == 1  # HeadCT has no masks
    for target in ("visa", "sdd", "headct"):
        run_dir = tmp_path / "results" / "demo" / "uzad" / "clip" / "default" / "none" / target
        assert (run_dir / "metrics.json").is_file()
    assert (tmp_path / "results" / "demo" / "benchmarks" / "evaluate").is_dir()
    table7 = (tables / "siad_table7_training_free.md").read_text()
    assert re.search(r"\| AnoVL \| \d+\.\d \(n/a\) \| \d+\.\d \(n/a\) \|", table7)
    speed = (tables / "speed.md").read_text()
    for row in ("bare forward", "CLIP", "AnoVL-TFA", "AnoVL-TTA"):
        assert re.search(rf"\| {row} \| cpu \| \d+\.\d ± \d+\.\d \| \d+\.\d\d \|", speed), row

    again = snakemake(tmp_path, "all", configfile=configfile)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

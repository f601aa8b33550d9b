"""The workflow profiles (profiles/slurm, profiles/local): Snakemake accepts them, and the SLURM executor plugin turns
the resources the config gives each job into the sbatch options profiles/slurm/config.yaml documents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.workflow


class FakeJob:
    """The part of a Snakemake job the plugin's submit-string helpers read: resources, threads, rule name."""

    class Resources(dict):
        """A dict with attribute access, as Snakemake's resources object."""

        def __getattr__(self, name: str) -> Any:
            try:
                return self[name]
            except KeyError as err:
                raise AttributeError(name) from err

    def __init__(self, threads: int, **resources: Any) -> None:
        self.threads = threads
        self.resources = self.Resources(resources)
        self.name = "run_x"

    def is_group(self) -> bool:
        return False


def sbatch_options(threads: int = 1, **resources: Any) -> str:
    """The sbatch command line snakemake-executor-plugin-slurm builds for a job with these resources."""
    plugin = pytest.importorskip("snakemake_executor_plugin_slurm", reason='needs snakemake-executor-plugin-slurm '
                                 '(pip install -e ".[test]")')
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command

    job = FakeJob(threads, **resources)
    params = {"run_uuid": "run", "slurm_logfile": "log", "comment_str": "rule_run_x", "account": "",
              "partition": "", "workdir": "/work"}
    return get_submit_command(job, params) + plugin.set_gres_string(job)


def test_the_plugin_maps_the_config_resources_as_the_slurm_profile_says():
    cpu = sbatch_options(threads=4, mem_mb=16000, runtime=120, gpu=0)
    assert "--cpus-per-task=4" in cpu and "--mem 16000" in cpu and "-t 120" in cpu
    assert "gpu" not in cpu and "gres" not in cpu  # gpu: 0 is a CPU job: no GPU option at all
    assert sbatch_options(gpu=1).endswith(" --gpus=1")
    assert sbatch_options(gpu=2, gpu_model="a100").endswith(" --gpus=a100:2")
    assert sbatch_options(gres="gpu:a100:1").endswith(" --gres=gpu:a100:1")
    # the trap the profile warns about: a GPU model on a CPU job still asks for GPUs of that model
    assert sbatch_options(gpu=0, gpu_model="a100").endswith(" --gpus=a100:0")


@pytest.mark.parametrize("profile", ["slurm", "local"])
def test_snakemake_accepts_the_profile(tmp_path: Path, profile: str):
    """Every key of the profile is a Snakemake (or plugin) option: a dry run of the demo with it succeeds."""
    if profile == "slurm":
        pytest.importorskip("snakemake_executor_plugin_slurm", reason="needs snakemake-executor-plugin-slurm")
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
         "--workflow-profile", str(ROOT / "profiles" / profile), "-n", "all",
         "--configfile", str(ROOT / "config" / "demo.yaml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]  # a misspelt key stops Snakemake: "unrecognized arguments"
    assert f"Using workflow specific profile {ROOT / 'profiles' / profile} " in output
    settings = yaml.safe_load((ROOT / "profiles" / profile / "config.yaml").read_text())
    if profile == "local":
        assert settings["resources"] == {"gpu": 1}  # one GPU job at a time
    else:
        assert settings["executor"] == "slurm"

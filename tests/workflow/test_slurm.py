"""SLURM for real: a tiny workflow run with ``--workflow-profile profiles/slurm`` on a one-node cluster started on this
machine (:mod:`slurm_cluster`) submits every non-local job through ``sbatch``, asks SLURM for the resources the config
gives, and writes byte for byte the tables, metrics and predictions of the same workflow run locally.

Skipped (never failed) where SLURM cannot run here: no root, no ``slurm-wlm``/``munge`` (``.ci/run`` installs them),
no executor plugin (``pip install -e ".[test]"``), or daemons that do not start. Deselect with ``-m "not slurm"``.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

# the cluster helper sits beside this file (tests/ is no package; the suite imports test helpers by path)
_spec = importlib.util.spec_from_file_location("slurm_cluster", Path(__file__).with_name("slurm_cluster.py"))
slurm_cluster_module = sys.modules.setdefault("slurm_cluster", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(slurm_cluster_module)
ClusterUnavailable = slurm_cluster_module.ClusterUnavailable
SlurmCluster = slurm_cluster_module.SlurmCluster
slurm_cluster = slurm_cluster_module.slurm_cluster
pytestmark = [pytest.mark.workflow, pytest.mark.slurm]

#: What every job of the tiny config asks for (``resources.default``): values no default has, so the check that
#: sbatch received them cannot pass by accident.
JOB_MEM_MB, JOB_RUNTIME_MIN = 512, 7


def tiny_config() -> dict:
    """The demo profile cut to one training-free method (CLIP), one source -> one target, Table 1 and the claims
    check: three SLURM jobs in a chain (stand-in, preparation, the run) and the report rules."""
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["datasets"] = {"mvtec": {"classes": ["bottle"]}, "visa": {"classes": ["candle"]}}
    config["protocol"] = [{"source": "mvtec", "targets": ["visa"]}]
    config["methods"] = {"clip": config["methods"]["clip"]}
    config.pop("speed", None)
    config["data"]["standin"] = {"size": 32, "n_train": 2, "n_test_normal": 3, "n_test_anomalous": 3}
    config["evaluation"].update(size=32, n_bootstrap=20)
    config["report"] = {"tables": ["table1_uzad"], "table1": {**config["report"]["table1"], "methods": ["clip"]}}
    config["resources"] = {"default": {"threads": 1, "mem_mb": JOB_MEM_MB, "runtime": JOB_RUNTIME_MIN}}
    return config


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    """``snakemake all`` of the tiny config in ``workdir`` (which holds ``config.yaml``)."""
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "all", *args, "--configfile", str(workdir / "config.yaml")]


def compared_outputs(workdir: Path) -> dict[str, bytes]:
    """The files that must not depend on where the jobs ran: every table and every run's metrics and predictions.

    Not compared, because they legitimately differ between two runs: logs and ``benchmarks/`` (timings), and
    ``results/<profile>/datasets/<name>/dataset.json`` (the dataset's absolute root and the state of its folder:
    file sizes and modification times)."""
    files = [*(workdir / "tables").rglob("*"), *(workdir / "results").rglob("metrics.json"),
             *(workdir / "results").rglob("predictions.npz")]
    return {str(path.relative_to(workdir)): path.read_bytes() for path in files if path.is_file()}


def job_blocks(output: str) -> list[tuple[bool, str, int]]:
    """(local?, rule, Snakemake job id) of every job Snakemake started, from its log (``rule x:``, ``localrule x:``)."""
    return [(bool(local), rule, int(jobid)) for local, rule, jobid in
            re.findall(r"^(local)?rule (\w+):\n(?:    .*\n)*?    jobid: (\d+)$", output, flags=re.M)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A one-node SLURM cluster for this module's tests; skipped where it cannot run here."""
    pytest.importorskip("snakemake_executor_plugin_slurm", reason='needs snakemake-executor-plugin-slurm '
                        '(pip install -e ".[test]")')
    try:
        with slurm_cluster(tmp_path_factory.mktemp("slurm-cluster")) as running:
            yield running
    except ClusterUnavailable as err:
        pytest.skip(f"no local SLURM cluster: {err}")


def test_every_job_goes_through_sbatch_and_writes_what_a_local_run_writes(cluster: SlurmCluster, tmp_path: Path):
    config = yaml.safe_dump(tiny_config())
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    for workdir in (on_slurm, local):
        workdir.mkdir()
        (workdir / "config.yaml").write_text(config)
    started = time.monotonic()
    # the local reference runs meanwhile: the SLURM run spends most of its time waiting for status polls
    reference = subprocess.Popen(snakemake_command(local, "--cores", "1"), cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    try:
        # --retries 0: a failing job fails now, with its log; squeue for status (there is no accounting database);
        # the first status poll after 1 s instead of the plugin's 40 s
        result = subprocess.run(
            snakemake_command(on_slurm, "--workflow-profile", str(ROOT / "profiles" / "slurm"), "--retries", "0",
                              "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1"),
            cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=480)
        reference_output, _ = reference.communicate(timeout=300)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.communicate()
    output = result.stdout + result.stderr
    print(f"SLURM run: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, f"{output[-6000:]}\n{cluster.logs_tail()}"
    assert reference.returncode == 0, reference_output[-4000:]

    # every job Snakemake did not run itself was submitted, once, and SLURM ran it to completion
    blocks = job_blocks(output)
    remote = {jobid: rule for local_job, rule, jobid in blocks if not local_job}
    submitted = {int(j): int(s) for j, s in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", output)}
    assert {"synthesize_standin", "prepare_dataset"} <= set(remote.values()), blocks
    assert any(rule.startswith("run_clip") for rule in remote.values()), blocks
    assert set(submitted) == set(remote), (remote, submitted)
    assert sorted(submitted.values()) == sorted(cluster.submitted_job_ids())  # nothing else reached slurmctld
    run_id = re.search(r"SLURM run ID: (\S+)", output).group(1)
    finished = cluster.completed_jobs()
    assert set(finished) == set(submitted.values()), finished
    for record in finished.values():
        assert record["JobState"] == "COMPLETED" and record["Name"] == run_id, record
        # the config's resources reached sbatch: threads -> cpus, mem_mb -> --mem, runtime -> -t; gpu: 0 asks no GPU
        assert record["Tres"].startswith(f"cpu=1,mem={JOB_MEM_MB}M,"), record
        assert "gpu" not in record["Tres"] and record["TimeLimit"] == str(JOB_RUNTIME_MIN), record  # minutes

    # the same bytes as the local run
    expected, got = compared_outputs(local), compared_outputs(on_slurm)
    assert any(name.endswith("metrics.json") for name in expected) and "tables/demo/table1_uzad.md" in expected
    assert sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []

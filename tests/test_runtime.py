"""siad.runtime: every failure of a workflow step ends with one line in the job's log file (and on stderr) naming
the file or config key and the fix; resolve_device refuses a GPU that is not there."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from siad import runtime
from siad.errors import ConfigError, DataError
from siad.runtime import explain_failure, resolve_device, run_step


@pytest.fixture(autouse=True)
def restore_logging():
    """run_step replaces the root logger's handlers (as a job's process does); put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def run_job(step, tmp_path, capsys, config=None):
    """Run ``step`` as a workflow script would; returns (exit code, log file lines, stderr text)."""
    log_file = tmp_path / "logs" / "job.log"
    smk = SimpleNamespace(log=[str(log_file)], config=config or {})
    code = 0
    try:
        run_step(step, smk)
    except SystemExit as exit_:
        code = exit_.code
    lines = log_file.read_text().splitlines() if log_file.exists() else []
    return code, lines, capsys.readouterr().err


def raising(err):
    def step(smk):
        logging.getLogger("siad").info("working")
        raise err
    return step


def test_success_logs_to_the_file_and_exits_normally(tmp_path, capsys):
    code, lines, err = run_job(lambda smk: logging.getLogger("siad").info("all good"), tmp_path, capsys)
    assert code == 0 and lines[-1].endswith("all good") and "all good" in err


def test_suite_error_is_one_clean_line(tmp_path, capsys):
    code, lines, err = run_job(raising(DataError("data/x.png: unreadable; replace it")), tmp_path, capsys)
    assert code == 1
    assert lines[-1].endswith("DataError: data/x.png: unreadable; replace it")
    assert "Traceback" not in "\n".join(lines) + err


def test_disk_full_names_the_path_and_the_config_key(tmp_path, capsys):
    cache = tmp_path / "cache"
    config = {"methods": {"anovl": {"params": {"feature_cache": str(cache)}}}, "data": {"root": "data/demo"}}
    failing = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(cache / "anovl" / "f.pt"))
    code, lines, err = run_job(raising(failing), tmp_path, capsys, config)
    assert code == 1
    last = lines[-1]
    assert "no space left" in last and str(cache / "anovl" / "f.pt") in last
    assert "methods.anovl.params.feature_cache" in last and "free space" in last
    assert str(tmp_path / "logs" / "job.log") in last
    assert any("Traceback" in line for line in lines)  # the traceback is in the log file ...
    assert "Traceback" not in err and "no space left" in err  # ... and only the explanation on the console


def test_disk_full_while_writing_without_a_file_name(tmp_path, capsys):
    # a write() on a full disk raises ENOSPC without a file name: the open file in the traceback names it
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")

    def step(smk):
        with open("/dev/full", "w") as handle:
            handle.write("x" * 100_000)

    code, lines, _ = run_job(step, tmp_path, capsys)
    assert code == 1 and "no space left on the disk holding /dev/full" in lines[-1]


def test_torch_save_on_a_full_disk_is_explained(tmp_path, capsys):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    code, lines, _ = run_job(lambda smk: torch.save({"a": torch.ones(1000)}, "/dev/full"), tmp_path, capsys)
    assert code == 1 and "writing /dev/full failed" in lines[-1] and "disk is probably full" in lines[-1]


@pytest.mark.parametrize("code_", [errno.EACCES, errno.EROFS])
def test_read_only_folder_names_the_key_that_sets_it(tmp_path, capsys, code_):
    config = {"data": {"root": str(tmp_path / "data")}}
    target = tmp_path / "data" / "mvtec" / "meta.json"
    code, lines, _ = run_job(raising(OSError(code_, os.strerror(code_), str(target))), tmp_path, capsys, config)
    assert code == 1
    assert str(target) in lines[-1] and "data.root" in lines[-1] and "writable" in lines[-1]
    assert ("read-only" if code_ == errno.EROFS else "permission denied") in lines[-1]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_real_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "cache"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        config = {"methods": {"m": {"params": {"feature_cache": str(folder)}}}}
        code, lines, _ = run_job(lambda smk: (folder / "x.pt").write_bytes(b"x"), tmp_path, capsys, config)
    finally:
        folder.chmod(0o700)
    assert code == 1 and "methods.m.params.feature_cache" in lines[-1] and "permission denied" in lines[-1]


def test_results_folder_without_a_key_points_to_the_working_directory():
    message = explain_failure(OSError(errno.ENOSPC, "No space left on device", "results/demo/x/metrics.json"))
    assert "results/demo/x/metrics.json" in message and "--directory" in message


def corrupt_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"a": torch.ones(3)}, good)
    data = good.read_bytes()
    files = {
        "truncated.pt": data[: len(data) // 2],
        "garbage.pt": b"this is not a checkpoint" * 10,
        "empty.pt": b"",
        "legacy.pt": pickle.dumps({"a": 1})[:5],
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return [tmp_path / name for name in files]


def test_corrupt_checkpoints_name_the_file_and_say_delete_it(tmp_path, capsys):
    for path in corrupt_files(tmp_path):
        code, lines, err = run_job(lambda smk, p=path: torch.load(p, weights_only=True), tmp_path, capsys)
        assert code == 1, path
        last = lines[-1]
        assert str(path) in last and "corrupt" in last and "Delete it and rerun" in last, last
        assert "weights_only" not in last and "weights_only" not in err, last  # never advise unsafe loading
        assert not any("weights_only=False" in line or "weights_only` set to `False" in line for line in lines)


def test_corrupt_npz_and_json_name_the_file(tmp_path, capsys):
    npz = tmp_path / "predictions.npz"
    np.savez(npz, a=np.ones(100))
    npz.write_bytes(npz.read_bytes()[:50])
    code, lines, _ = run_job(lambda smk: np.load(npz)["a"], tmp_path, capsys)
    assert code == 1 and str(npz) in lines[-1] and "corrupt" in lines[-1]

    record = tmp_path / "model.json"
    record.write_text('{"weights": "model.pt"')

    def read_record(smk):
        info_path = record
        return json.loads(info_path.read_text())

    code, lines, _ = run_job(read_record, tmp_path, capsys)
    assert code == 1 and str(record) in lines[-1] and "corrupt" in lines[-1]


def test_corrupt_image_names_the_file(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "000.png"
    image.write_bytes(b"not a png")
    code, lines, _ = run_job(lambda smk: Image.open(image), tmp_path, capsys)
    assert code == 1 and str(image) in lines[-1] and "corrupt" in lines[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_names_the_device_key(tmp_path, capsys):
    code, lines, _ = run_job(lambda smk: torch.zeros(1, device="cuda"), tmp_path, capsys, {"device": "cuda"})
    assert code == 1
    assert "no usable GPU for device 'cuda'" in lines[-1] and "device: auto" in lines[-1] and "device: cpu" in lines[-1]


@pytest.mark.parametrize("message", ["Found no NVIDIA driver on your system.", "Torch not compiled with CUDA enabled",
                                     "CUDA error: invalid device ordinal"])
def test_cuda_unavailable_messages(message):
    assert "device: cpu" in explain_failure(RuntimeError(message), {"device": "cuda:1"})


def test_gpu_out_of_memory_says_lower_the_batch_size():
    assert "evaluation.batch_size" in explain_failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried ..."))


def test_a_gpu_checkpoint_without_map_location_is_not_called_corrupt():
    err = RuntimeError("Attempting to deserialize object on a CUDA device but torch.cuda.is_available() is False.")
    message = explain_failure(err)
    assert message is None or "corrupt" not in message


def test_unexpected_error_logs_traceback_and_a_summary_line(tmp_path, capsys):
    def buggy(smk):
        return {}["missing"]

    code, lines, err = run_job(buggy, tmp_path, capsys)
    log_file = str(tmp_path / "logs" / "job.log")
    assert code == 1
    assert lines[-1].endswith(f"job failed: KeyError: 'missing' — see {log_file}; "
                              "report a bug if this is not an input problem")
    text = "\n".join(lines)
    assert "Traceback (most recent call last)" in text and "in buggy" in text
    assert "Traceback" not in err and "job failed: KeyError" in err


def test_without_a_log_file_the_traceback_goes_to_stderr(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_step(raising(ValueError("boom")), SimpleNamespace(log=[], config={}))
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" in err and "job failed: ValueError: boom" in err


def test_an_unwritable_log_folder_still_reports_on_stderr(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    smk = SimpleNamespace(log=[str(blocker / "job.log")], config={})  # a file where the log folder should be
    with pytest.raises(SystemExit):
        run_step(raising(ValueError("boom")), smk)
    err = capsys.readouterr().err
    assert "cannot write the log file" in err and "job failed: ValueError: boom" in err


# --------------------------------------------------------------------------------------------
# resolve_device
# --------------------------------------------------------------------------------------------


def test_resolve_device_auto_and_cpu():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_a_config_error_naming_the_key(monkeypatch, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device: .*(device: auto).*(device: cpu)"):
        resolve_device(device)


def test_cuda_index_beyond_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match=r"only 2 GPU\(s\) are visible"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("device", ["gpu", "CUDA", "cuda:", "cuda:x", "", None, 0, "mps"])
def test_unknown_device_strings_are_refused(device):
    with pytest.raises(ConfigError, match="is not a device; use auto, cpu, cuda or cuda:N"):
        resolve_device(device)


def test_the_config_error_reaches_the_job_log(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, lines, _ = run_job(lambda smk: resolve_device(smk.config["device"]), tmp_path, capsys, {"device": "cuda"})
    assert code == 1 and lines[-1].split(" ERROR ")[-1].startswith("ConfigError: device: 'cuda' asks for a GPU")


def test_runtime_stays_light_at_import():
    import subprocess
    import sys

    code = "import sys, siad.runtime; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0, runtime.__file__


def test_run_inline_logs_what_it_wrote_and_a_failure_as_one_explained_line(tmp_path):
    from siad.errors import DataError
    from siad.runtime import StepFailed, run_inline

    log = tmp_path / "logs" / "table.log"
    run_inline(lambda: [tmp_path / "a.md", tmp_path / "a.csv"], log)
    assert log.read_text() == f"wrote {tmp_path / 'a.md'}\nwrote {tmp_path / 'a.csv'}\n"

    def stale() -> None:
        raise DataError("results/x/metrics.json: computed under another run specification")

    with pytest.raises(StepFailed, match=r"results/x/metrics.json: computed under another run specification"):
        run_inline(stale, log)
    assert "computed under another run specification" in log.read_text()

    def bug() -> None:
        raise ZeroDivisionError("division by zero")

    with pytest.raises(StepFailed, match=r"ZeroDivisionError: division by zero \(traceback in .*table.log\)"):
        run_inline(bug, log)
    assert "Traceback" in log.read_text() and "in bug" in log.read_text()

"""Process-wide set-up shared by every workflow step: logging and clean errors (seeding and the device choice
are :mod:`siad.seeding`, re-exported here).

Every job ends, when it fails, with one short line in its log file (and on stderr) that names the file or
the config key at fault and the fix (:func:`run_step`, :func:`explain_failure`); the full traceback of an
unexpected error goes to the log file above that line.

Imports of numpy and torch are deferred so light steps (data preparation) start fast.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from siad.errors import SiadError
from siad.seeding import DEVICE_FIX, resolve_device, seed_everything

__all__ = ["DEVICE_FIX", "explain_failure", "report_failure", "resolve_device", "run_step", "seed_everything",
           "setup_logging"]

log = logging.getLogger("siad")


# --------------------------------------------------------------------------------------------
# explaining a failure
# --------------------------------------------------------------------------------------------

_CUDA_UNAVAILABLE = (
    "found no nvidia driver", "torch not compiled with cuda", "no cuda gpus are available",
    "cuda driver initialization failed", "invalid device ordinal", "no cuda-capable device",
    "busy or unavailable", "nvidia driver on your system is too old", "cudagetdevicecount",
)
# (path suffix of the module, function, argument holding the file): loaders whose failure means a bad file
_LOADERS = (
    ("torch/serialization.py", "load", "f"),
    ("numpy/lib/_npyio_impl.py", "load", "file"),
    ("numpy/lib/npyio.py", "load", "file"),
    ("safetensors/torch.py", "load_file", "filename"),
    ("safetensors/torch.py", "load", "data"),
    ("PIL/Image.py", "open", "fp"),
)
_SAVERS = (("torch/serialization.py", "save", "f"),)  # torch.save reports a full disk as a RuntimeError:
_WRITE_FAILED = ("file write failed", "unexpected pos", "pytorchstreamwriter failed", "inline_container")
# where a folder comes from when no config key names it
_PATH_KEYS_HINT = ("data.root, datasets.<name>.root, data.archive_dir, methods.<name>.params.feature_cache, "
                   "methods.<name>.params.weights_dir or methods.<name>.params.checkpoint")


def explain_failure(err: BaseException, config: Mapping[str, Any] | None = None) -> str | None:
    """One line saying what went wrong, naming the file or config key and the fix; None when the error is not one
    a user can cause (then it is reported as a possible bug with its traceback)."""
    config = config or {}
    if isinstance(err, SiadError):
        return f"{type(err).__name__}: {err}"
    if isinstance(err, MemoryError):
        return ("out of memory (RAM): lower evaluation.batch_size, evaluation.num_workers or the method's "
                "batch_size param, or run fewer jobs at once (--cores / --resources)")
    message = str(err)
    lowered = message.lower()
    if type(err).__name__ == "OutOfMemoryError" or "cuda out of memory" in lowered:
        return (f"the GPU ran out of memory ({_first_line(message)}): lower evaluation.batch_size or the method's "
                "batch_size param, free the GPU of other processes, or set `device: cpu`")
    if isinstance(err, (RuntimeError, AssertionError)) and any(p in lowered for p in _CUDA_UNAVAILABLE):
        asked = config.get("device", "cuda")
        return f"no usable GPU for device {asked!r} ({_first_line(message)}); {DEVICE_FIX}"
    saved = _loader_argument(err, _SAVERS)
    if saved is not None and (isinstance(err, OSError) or any(p in lowered for p in _WRITE_FAILED)):
        return _save_message(err, saved, config)
    bad_file = _corrupt_file(err)
    if bad_file is not None:
        return _corrupt_message(err, bad_file, config)
    if isinstance(err, OSError) and err.errno is not None:
        return _os_message(err, config)
    return None


def _first_line(message: str, limit: int = 200) -> str:
    """The first sentence of ``message`` (a library's remedy text that follows it is left out)."""
    line = message.strip().splitlines()[0] if message.strip() else ""
    sentence = re.split(r"(?<=\.)\s", line, maxsplit=1)[0]
    return sentence if len(sentence) <= limit else sentence[: limit - 1] + "…"


def _frames(err: BaseException) -> Iterator[tuple[Any, str]]:
    """(frame, code file) of the traceback, innermost first."""
    tb: TracebackType | None = err.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        yield frame, frame.f_code.co_filename.replace(os.sep, "/")


def _as_path(value: Any) -> str | None:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    name = getattr(value, "name", None)  # an open file object
    return name if isinstance(name, str) else None


def _corrupt_file(err: BaseException) -> str | None:
    """The file a loader failed on, when ``err`` means the file's content is bad (not missing/unreadable)."""
    if isinstance(err, OSError) and err.errno is not None:
        return None  # missing, permission, disk: reported as an OS error
    if "cuda" in str(err).lower():
        return None  # e.g. a GPU checkpoint loaded without map_location: the file is fine
    if isinstance(err, json.JSONDecodeError):
        return _caller_file(err, (".json",)) or ""
    if type(err).__name__ == "UnidentifiedImageError":
        found = re.search(r"'([^']+)'", str(err))
        return found.group(1) if found else ""
    return _loader_argument(err, _LOADERS)


def _loader_argument(err: BaseException, functions: tuple[tuple[str, str, str], ...]) -> str | None:
    """The file argument of the outermost listed library function the error passed through ("" when it is not a
    path), or None when it passed through none of them."""
    found = None
    for frame, filename in _frames(err):
        for suffix, function, argument in functions:
            if filename.endswith(suffix) and frame.f_code.co_name == function:
                found = _as_path(frame.f_locals.get(argument)) or ""
    return found


def _path_in_frames(err: BaseException) -> str | None:
    """The innermost path or open file among the traceback's local variables (an OSError of a write often carries
    no file name)."""
    import io
    from pathlib import PurePath

    for frame, _ in _frames(err):
        for value in frame.f_locals.values():
            if isinstance(value, PurePath):
                return str(value)
            if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str):
                return value.name
    return None


def _caller_file(err: BaseException, suffixes: tuple[str, ...]) -> str | None:
    """The innermost local variable (outside the standard library) that names an existing file with a suffix."""
    stdlib = os.path.dirname(os.__file__).replace(os.sep, "/")
    for frame, filename in _frames(err):
        if filename.startswith(stdlib):
            continue
        for value in frame.f_locals.values():
            path = _as_path(value)
            if path and path.endswith(suffixes) and os.path.isfile(path):
                return path
    return None


def _corrupt_message(err: BaseException, path: str, config: Mapping[str, Any]) -> str:
    what = path or "a file"
    detail = _first_line(str(err)) if "weights_only" not in _first_line(str(err)) else ""
    reason = f"{type(err).__name__}{': ' + detail if detail else ''}"
    keys = _config_keys(path, config) if path else []
    supplied = f" ({', '.join(keys)})" if keys else ""
    return (f"{what} cannot be read: it is corrupt, truncated or not the kind of file expected ({reason}). "
            f"Delete it and rerun: files the workflow writes or downloads (results, caches, archives) are made "
            f"again; a file you supplied{supplied} needs a good copy")


def _save_message(err: BaseException, path: str, config: Mapping[str, Any]) -> str:
    if isinstance(err, OSError) and err.errno is not None:
        if err.filename is None and path:
            err.filename = path
        return _os_message(err, config)
    where = path or "a file"
    keys = _config_keys(path, config) if path else []
    return (f"writing {where} failed ({_first_line(str(err))}): the disk is probably full{_free_space(path)} or the "
            f"folder not writable: free space there, or move that folder: {_move_hint(path or None, keys)}")


def _free_space(path: str) -> str:
    import shutil

    folder = os.path.dirname(os.path.abspath(path)) if path else None
    try:
        return f" ({shutil.disk_usage(folder).free / 2**20:.0f} MiB free there)" if folder else ""
    except OSError:
        return ""


def _os_message(err: OSError, config: Mapping[str, Any]) -> str:
    path = err.filename if err.filename is not None else _path_in_frames(err)
    path = os.fspath(path) if path is not None else None
    where = path or "a file"
    code = err.errno
    keys = _config_keys(path, config) if path else []
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (f"no space left on the disk holding {where} (disk full or quota exceeded): free space there, or "
                f"move that folder to a disk with space: {_move_hint(path, keys)}")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        problem = "read-only file system" if code == errno.EROFS else "permission denied"
        return (f"{where}: {problem}: make it writable (or readable), or point "
                f"{_key_hint(path, keys)} to a folder you can write")
    if code == errno.ENOENT:
        hint = (f"check {', '.join(keys)}" if keys else
                "check the path; if an earlier step makes it, rerun the workflow (missing outputs are remade)")
        return f"{where}: no such file or directory: {hint}"
    name = errno.errorcode.get(code, str(code))
    return f"{where}: {err.strerror or err} ({name}){': check ' + ', '.join(keys) if keys else ''}"


def _move_hint(path: str | None, keys: list[str]) -> str:
    if keys:
        return "set " + " or ".join(keys) + " to a folder on another disk"
    if path and _under(path, "results"):
        return ("results/ lies in the working directory: run from another disk (snakemake --directory DIR) or make "
                "results/ a link to one")
    if path and _under(path, tempfile.gettempdir()):
        return "set the TMPDIR environment variable to a folder on another disk"
    if path and _under(path, os.path.expanduser("~/.cache")):
        return "the download cache is in your home folder: set methods.<name>.params.weights_dir or XDG_CACHE_HOME"
    return f"the folders come from {_PATH_KEYS_HINT}, results/ from the working directory"


def _key_hint(path: str | None, keys: list[str]) -> str:
    if keys:
        return " or ".join(keys)
    if path and _under(path, "results"):
        return "the working directory (snakemake --directory DIR; results/ is made there)"
    return f"the config key that sets it ({_PATH_KEYS_HINT})"


def _under(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _config_keys(path: str, config: Mapping[str, Any]) -> list[str]:
    """Config keys whose value is ``path`` or a folder holding it, most specific first, as ``key (= value)``."""
    found = []
    for key, value in _string_leaves(config):
        if value and ("/" in value or os.sep in value or key.endswith(("root", "dir", "cache", "checkpoint"))):
            if _under(path, value):
                found.append((len(os.path.abspath(value)), f"{key} (= {value})"))
    return [text for _, text in sorted(found, reverse=True)]


def _string_leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _string_leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, str):
        yield prefix, value


# --------------------------------------------------------------------------------------------
# running a workflow step
# --------------------------------------------------------------------------------------------


class _NotFileOnly(logging.Filter):
    """Keeps records marked ``file_only`` (tracebacks) off stderr when they go to a log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def _log_path(smk: Any) -> str | None:
    logs = getattr(smk, "log", None)
    try:
        return str(logs[0]) if logs is not None and len(logs) else None
    except (TypeError, IndexError, KeyError):
        return None


def setup_logging(log_path: str | None) -> str | None:
    """Log INFO and above to stderr and to ``log_path`` (overwritten); returns the log file actually used (None when
    there is none or it cannot be opened, which is then reported on stderr)."""
    stderr = logging.StreamHandler(sys.stderr)
    handlers: list[logging.Handler] = [stderr]
    problem = None
    if log_path:
        try:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(log_path, mode="w"))
            stderr.addFilter(_NotFileOnly())
        except OSError as err:
            problem = explain_failure(err) or str(err)
            log_path = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers,
                        force=True)
    logging.captureWarnings(True)  # Python warnings (e.g. a recomputed cache entry) reach the job log too
    if problem:
        log.warning("cannot write the log file: %s; logging to stderr only", problem)
    return log_path


def report_failure(err: BaseException, *, log_path: str | None, config: Mapping[str, Any] | None = None) -> None:
    """Log why the job failed: the explanation (:func:`explain_failure`) as the last line, or, for an unexpected
    error, its traceback (to the log file only, when there is one) and a summary line pointing to it."""
    explanation = explain_failure(err, config)
    where = f"see {log_path}" if log_path else "see the traceback above"
    if not isinstance(err, SiadError):
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip()
        if "weights_only" in str(err):  # torch's advice to load unsafely: never repeated, not even in the log
            text = text.replace(str(err), _first_line(str(err)) + " [torch's remedy text omitted]")
        label = "traceback" if explanation is not None else "traceback (for a bug report)"
        log.error("%s:\n%s", label, text, extra={"file_only": True})
    if explanation is not None:
        log.error("%s%s", explanation, f" (details: {log_path})" if log_path and not isinstance(err, SiadError)
                  else "")
    else:
        log.error("job failed: %s: %s — %s; report a bug if this is not an input problem",
                  type(err).__name__, _first_line(str(err), 300) or "(no message)", where)


def _threads_of_cluster_job(smk: Any) -> None:
    """In a SLURM job, torch uses the job's ``threads`` (its cpus-per-task) unless OMP_NUM_THREADS says otherwise:
    torch would otherwise start one thread per core of the node, over the cores other jobs hold. Off a cluster the
    local default is kept (the demo's numbers and speed do not change)."""
    threads = getattr(smk, "threads", None)
    if os.environ.get("SLURM_JOB_ID") and "OMP_NUM_THREADS" not in os.environ and isinstance(threads, int):
        import torch

        torch.set_num_threads(max(1, threads))


def run_step(step: Callable[[Any], None], smk: Any) -> None:
    """Run a workflow script body with its log file; any failure ends the job (exit code 1) with one line, in the
    log file and on stderr, naming the file or config key and the fix (:func:`explain_failure`)."""
    log_path = setup_logging(_log_path(smk))
    try:
        _threads_of_cluster_job(smk)
        step(smk)
    except KeyboardInterrupt:
        log.error("job interrupted; rerun the workflow (with --rerun-incomplete) to finish it")
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 (every failure must end with a message in the job's log)
        try:
            report_failure(err, log_path=log_path, config=getattr(smk, "config", None))
        finally:
            for handler in logging.getLogger().handlers:
                handler.flush()
        sys.exit(1)


class StepFailed(RuntimeError):
    """A step run inside the Snakemake process (:func:`run_inline`) failed; the message is the explanation."""


def run_inline(step: Callable[[], Any], log_path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> None:
    """Run a light step (a table, the claims check) inside the Snakemake process, without a Python start-up.

    It leaves the process's logging alone: the log file gets what the step wrote (or the explanation of its
    failure, :func:`explain_failure`, with the traceback of an unexpected error), and a failure raises
    :class:`StepFailed` carrying the one-line explanation, which Snakemake prints.
    """
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = step()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 (every failure must end with a message in the job's log)
        explanation = explain_failure(err, config)
        text = explanation or "".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip()
        line = explanation or f"{type(err).__name__}: {_first_line(str(err))} (traceback in {path})"
        path.write_text(text + "\n")
        raise StepFailed(line) from None
    written = result if isinstance(result, list | tuple) else [result] if result is not None else []
    path.write_text("".join(f"wrote {p}\n" for p in written))

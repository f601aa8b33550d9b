"""The state of a dataset folder as the data jobs last left it: what lets a rerun notice an edited image or a
deleted stand-in.

One mechanism (:func:`held_param`, :func:`hold_param`) serves both data jobs: the preparation's
``params.state`` follows the folder listing, the stand-in's whether its folder exists. Light on purpose: the
data jobs import it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from siad.code_hash import json_digest
from siad.config import dataset_root
from siad.files import write_text_atomic

#: Key of the held state inside a job's record file (``dataset.json``, ``standin.done``).
STATE_KEY = "workflow_state"


def folder_listing_digest(root: Path) -> str:
    """Digest of every file below ``root`` (relative path, size, modification time); ``absent`` if no folder.

    Cheap (one ``stat`` per file, no reads), and it changes when an image is added, removed, replaced or edited.
    Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are not part of any dataset and are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        return "absent"
    entries = []
    for folder, folders, files in os.walk(root.resolve(), followlinks=True):
        folders[:] = [f for f in folders if not f.startswith(".")]
        for name in (f for f in files if not f.startswith(".")):
            path = Path(folder, name)
            try:
                stat = path.stat()
            except OSError:
                continue  # a broken link: preparation reports it
            entries.append((str(path.relative_to(root.resolve())), stat.st_size, stat.st_mtime_ns))
    return json_digest(sorted(entries))


def held_param(record: Path, observed: str) -> str:
    """A job's Snakemake parameter that stays what the job last ran with while the world it looks at is as the job
    left it, and changes as soon as it is not.

    ``observed`` describes that world now (a folder listing, whether a folder exists). The last run of the job
    stored, under :data:`STATE_KEY` of the JSON file ``record``, the parameter it ran with and what it observed
    after running (:func:`hold_param`). Equal observations return the stored parameter, so Snakemake sees no
    change; otherwise a new value, never the stored one, so the job reruns. (The parameter cannot simply be the
    observation: an earlier job of the same invocation may write the folder after the parameters are computed.)
    """
    state = _held_state(record)
    if state is not None and state["observed"] == observed:
        return str(state["param"])
    return json_digest([None if state is None else state["param"], observed])


def hold_param(record: Path, param: str, observed: str) -> None:
    """After a job ran with ``param``: store it and what the job now observes in ``record`` (merged, atomically)."""
    record = Path(record)
    try:
        body = json.loads(record.read_text())
    except (OSError, ValueError):
        body = {}
    body = body if isinstance(body, dict) else {}
    body[STATE_KEY] = {"param": param, "observed": observed}
    write_text_atomic(record, json.dumps(body, indent=1, sort_keys=True))


def _held_state(record: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(Path(record).read_text()).get(STATE_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return state if isinstance(state, dict) and {"param", "observed"} <= set(state) else None


COUNTS_CHECKED = ";counts checked"


def dataset_state_param(config: Mapping[str, Any], dataset: str, info_path: Path) -> str:
    """The preparation job's folder parameter (:func:`held_param` on the folder listing, stored in
    ``dataset.json``): an added, removed, replaced or edited file prepares the dataset again, and so does asking
    for the published-count check when the last preparation did not run it (turning it off reruns nothing)."""
    listing = folder_listing_digest(dataset_root(config, dataset))
    state = _held_state(info_path)
    if not config["data"]["verify_counts"] and state is not None and state["observed"] == listing + COUNTS_CHECKED:
        return str(state["param"])  # a check done before still holds
    return held_param(info_path, listing + (COUNTS_CHECKED if config["data"]["verify_counts"] else ""))


def record_dataset_state(config: Mapping[str, Any], dataset: str, info_path: Path, param: str) -> None:
    """After preparing ``dataset``: hold the job's parameter against the folder as the preparation left it."""
    listing = folder_listing_digest(dataset_root(config, dataset))
    hold_param(info_path, param, listing + (COUNTS_CHECKED if config["data"]["verify_counts"] else ""))


def standin_state_param(config: Mapping[str, Any], dataset: str, done_path: Path) -> str:
    """The stand-in job's folder parameter (:func:`held_param` on whether the folder exists): a deleted demo folder
    is written again, instead of the preparation failing behind an up-to-date ``standin.done``."""
    return held_param(done_path, _presence(config, dataset))


def record_standin(config: Mapping[str, Any], dataset: str, done_path: Path, param: str) -> None:
    """After writing a stand-in: hold the job's parameter in ``standin.done``."""
    hold_param(done_path, param, _presence(config, dataset))


def _presence(config: Mapping[str, Any], dataset: str) -> str:
    return "present" if dataset_root(config, dataset).is_dir() else "missing"

"""The state of a dataset folder as the preparation job last saw it: what lets a rerun notice an edited image.

The preparation job's ``params.state`` (:func:`dataset_state_param`) stays what it was while the folder is as
the last preparation left it, and changes when a file below it is added, removed, replaced or edited, so
Snakemake's params trigger prepares the dataset again. Light on purpose: the preparation job imports it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from siad.code_hash import json_digest
from siad.config import dataset_root

#: Where the preparation job records the state of the dataset folder it indexed (inside dataset.json).
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


def dataset_state_param(config: Mapping[str, Any], dataset: str, info_path: Path) -> str:
    """The preparation job's folder-state parameter: unchanged while the folder is as the last preparation left it.

    The last preparation recorded, in ``dataset.json``, the parameter it ran with, the folder's listing digest
    after it ran and whether it checked the published counts. While the folder still has that listing (and a
    count check, if now asked for, was done) the recorded parameter is returned, so Snakemake sees no change;
    otherwise the current listing is, and the dataset is prepared again. (The folder may be written by the
    stand-in or download step of the same run, so the parameter cannot simply be the current listing.)
    """
    verify = bool(config["data"]["verify_counts"])
    listing = folder_listing_digest(dataset_root(config, dataset))
    recorded = recorded_state(info_path)
    if recorded and recorded.get("listing") == listing and (recorded.get("counts_verified") or not verify):
        return str(recorded["param"])
    return f"listing={listing};verify_counts={verify}"


def recorded_state(info_path: Path) -> dict[str, Any] | None:
    """The folder state the last preparation recorded in ``dataset.json`` (None if none)."""
    try:
        state = json.loads(Path(info_path).read_text()).get(STATE_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return state if isinstance(state, dict) and "param" in state else None


def record_state(config: Mapping[str, Any], dataset: str, info_path: Path, param: str) -> None:
    """After preparing ``dataset``: store the job's state parameter and the folder listing in ``dataset.json``."""
    info_path = Path(info_path)
    info = json.loads(info_path.read_text())
    info[STATE_KEY] = {"param": param, "listing": folder_listing_digest(dataset_root(config, dataset)),
                       "counts_verified": bool(config["data"]["verify_counts"])}
    tmp = info_path.with_name(info_path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    tmp.replace(info_path)


def standin_state_param(config: Mapping[str, Any], dataset: str, done_path: Path) -> str:
    """The stand-in job's folder parameter: what the last stand-in job recorded while the folder exists, and a
    new value once the folder is gone, so a deleted demo folder is written again (instead of the preparation
    failing on a missing folder behind an up-to-date ``standin.done``)."""
    try:
        recorded = json.loads(Path(done_path).read_text()).get("param", "")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded is not None and dataset_root(config, dataset).is_dir():
        return str(recorded)
    return f"{recorded or ''}+written"


def record_standin(done_path: Path, param: str) -> None:
    """After writing a stand-in: the job's folder parameter, in ``standin.done``."""
    Path(done_path).write_text(json.dumps({"param": param}))

"""The resolved run specification: everything one run's numbers depend on, resolved once, hashed once.

A :class:`RunSpec` is computed at workflow start-up for every run the tables need (and again by the job and
the report, from the same inputs). It overlays the method class's defaults with the config params and the
variant, and adds the setting, seed, device, the data options that shape the source and target sets, the
evaluation settings, the content fingerprint of each dataset index involved, the package version and a hash
of the source code the method and the evaluation run. Three digests come from it:

- :attr:`RunSpec.planned_digest`: everything but the dataset fingerprints, the run job's Snakemake ``params``
  entry, so Snakemake's own params trigger reruns exactly the jobs whose configuration or code changed. The
  dataset content is known only after the preparation job has run, so it is tracked by the job's ``meta.json``
  input instead (a changed index is a newer input);
- :attr:`RunSpec.training_digest`: the part a trained model depends on (no evaluation settings, no target),
  stored in ``model.json``; a model is reused only when it matches;
- :attr:`RunSpec.digest`: the whole specification, stamped in ``metrics.json``; the report refuses a run whose
  stamp differs from the specification of the current config, data and code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import siad
from siad.code_hash import json_digest, module_closure, modules_hash
from siad.config import method_params, results_root, training_normal_images
from siad.data.folder_state import folder_listing_digest
from siad.data.hashing import sha256sum
from siad.engine.protocol import NO_SOURCE, RunKey, training_meta
from siad.engine.settings import setting_options
from siad.files import file_fingerprint

#: Parameters that say where a cache lives or how progress is shown, not what is computed: left out of every digest.
PLACEMENT_PARAMS = frozenset({"feature_cache", "progress"})

#: Parameters naming files the user supplies (weights, instruction data): their identity (size and modification
#: time of every file) is part of the specification, so replacing the file at the same path reruns.
INPUT_FILE_PARAMS = ("checkpoint", "vicuna_dir", "pandagpt_delta", "sft_data", "sft_image_dir", "detector_checkpoint")

#: Modules whose code shapes every evaluation (the run loop, seeding, loading, scoring, answer parsing), hashed as
#: they are. Not their imports: the config layer would pull in every converter and backbone, so editing one
#: converter would rerun every method. ``tests/engine/test_spec.py`` checks that every module the run loop reaches
#: is here, in a method's own closure, or in :data:`UNHASHED_MODULES` with a reason.
EVALUATION_MODULES = ("siad.engine.runs", "siad.engine.evaluate", "siad.engine.protocol", "siad.metrics",
                      "siad.seeding", "siad.data.loading", "siad.data.imageio", "siad.data.records",
                      "siad.data.registry", "siad.llm.answers")

#: Modules whose code shapes every training run (the training glue, seeding, image and index loading).
TRAINING_MODULES = ("siad.engine.runs", "siad.engine.settings", "siad.data.pseudo", "siad.seeding",
                    "siad.data.loading", "siad.data.imageio", "siad.data.records", "siad.data.registry")

#: Modules the run loop reaches that cannot change a number, or whose effect is fingerprinted otherwise.
UNHASHED_MODULES = {
    "siad": "the package version is in the specification",
    "siad.config": "config lookups; the values it returns are in the specification",
    "siad.errors": "exception classes and messages",
    "siad.registry": "name registry",
    "siad.code_hash": "this fingerprinting itself",
    "siad.data.folder_state": "dataset folder fingerprints (preparation)",
    "siad.data.hashing": "file hashes (fingerprints, not numbers)",
    "siad.files": "atomic writes and file fingerprints",
    "siad.data.flags": "boolean parsing of config values",
    "siad.yaml_check": "config file checks",
    "siad.runtime": "job plumbing: logging and failure messages (seeding and the device are siad.seeding)",
    "siad.data.sources": "download locations; the prepared index's content is fingerprinted",
    "siad.data.converters": "converters shape meta.json, whose content is fingerprinted",
    "siad.data.duplicates": "the leakage guard: it refuses or reports, it changes no number",
    "siad.engine.spec": "this specification",
}


@dataclass(frozen=True)
class RunSpec:
    """One run, fully resolved. Build it with :func:`resolve_run_spec`; compare runs by their digests.

    Mappings held here are plain JSON-able values in sorted order; treat them as read-only.
    """

    key: RunKey
    params: Mapping[str, Any]  # class defaults <- config params <- variant overrides (placement params dropped)
    inputs: Mapping[str, str]  # input-file param -> identity of the file(s) it names
    seed: int  # the run's seed (a trained method's training seed): the key's
    config_seed: int  # the config ``seed``: random stand-ins of pretrained weights, bootstrap resampling
    device: str  # the config value (``auto`` stays ``auto``: the planning host and the job's may differ)
    data: Mapping[str, Any]  # per dataset of the run: its options (with defaults) and its class selection
    training: Mapping[str, Any] | None  # None for training-free methods; else which source images it trains on
    evaluation: Mapping[str, Any]  # evaluation grid, batch size, bootstrap size, AU-PRO limit
    datasets: Mapping[str, str | None]  # dataset -> SHA-256 of its meta.json (None: not prepared yet)
    training_images: str | None  # digest of the training records the source index gives this run (None: none)
    version: str  # the suite's package version
    code: Mapping[str, str]  # "method" / "training" / "evaluation" -> hash of the source modules involved

    # --- identities --------------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """The whole specification as a JSON-able dict (what :attr:`digest` hashes and metrics.json stores)."""
        key = self.key
        return {
            "run": {"setting": key.setting, "method": key.method, "variant": key.variant,
                    "source": key.source, "target": key.target},
            "params": dict(self.params), "inputs": dict(self.inputs), "seed": self.seed,
            "config_seed": self.config_seed, "device": self.device,
            "data": dict(self.data), "training": None if self.training is None else dict(self.training),
            "evaluation": dict(self.evaluation), "datasets": dict(self.datasets),
            "training_images": self.training_images, "version": self.version, "code": dict(self.code),
        }

    def config_identity(self) -> dict[str, Any]:
        """:meth:`identity` without the dataset content fingerprints (known before any job runs)."""
        return {k: v for k, v in self.identity().items() if k not in ("datasets", "training_images")}

    def training_identity(self) -> dict[str, Any]:
        """What a trained model depends on: no target, no evaluation settings, no evaluation code, and of the source
        index only the records it trains on (a changed test image of the source retrains nothing)."""
        key = self.key
        return {
            "run": {"setting": key.setting, "method": key.method, "variant": key.variant, "source": key.source},
            "params": dict(self.params), "inputs": dict(self.inputs), "seed": self.seed,
            "config_seed": self.config_seed, "device": self.device,
            "data": {key.source: self.data.get(key.source)}, "training": self.training,
            "training_images": self.training_images, "version": self.version,
            "code": {"method": self.code["method"], "training": self.code.get("training")},
        }

    def shared_training_identity(self) -> dict[str, Any]:
        """:meth:`training_identity` without the variant's name and the method's evaluation-only parameters
        (``Method.evaluation_params``): variants of one job with equal values train the same model, which
        :func:`siad.engine.runs.run_group` trains once and copies."""
        from siad.methods import get_method_class

        identity = self.training_identity()
        evaluation_only = get_method_class(self.key.method).evaluation_params
        run = {k: v for k, v in identity["run"].items() if k != "variant"}
        params = {k: v for k, v in identity["params"].items() if k not in evaluation_only}
        inputs = {k: v for k, v in identity["inputs"].items() if k not in evaluation_only}
        return {**identity, "run": run, "params": params, "inputs": inputs}

    @property
    def shared_training_digest(self) -> str:
        """SHA-256 of :meth:`shared_training_identity`."""
        return json_digest(self.shared_training_identity())

    @property
    def digest(self) -> str:
        """SHA-256 of :meth:`identity`: the stamp of metrics.json."""
        return json_digest(self.identity())

    @property
    def planned_digest(self) -> str:
        """SHA-256 of :meth:`config_identity`: the run job's Snakemake ``params`` entry."""
        return json_digest(self.config_identity())

    @property
    def training_digest(self) -> str:
        """SHA-256 of :meth:`training_identity`: the training fingerprint stored in model.json."""
        return json_digest(self.training_identity())

    def stamp(self) -> dict[str, Any]:
        """What metrics.json records: the digest and the specification it hashes."""
        return {"digest": self.digest, "spec": self.identity()}


def spec_differences(expected: Mapping[str, Any], recorded: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two specification dicts (what changed since a run)."""
    keys = sorted(set(expected) | set(recorded))
    diffs: list[str] = []
    for key in keys:
        a, b, name = expected.get(key), recorded.get(key), f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += spec_differences(a, b, f"{name}.")
        elif a != b:
            diffs.append(name)
    return diffs


# --- building a spec ---------------------------------------------------------------------------------------


def meta_path(config: Mapping[str, Any], dataset: str) -> Path:
    """Where the workflow writes dataset ``dataset``'s index (``results/<profile>/datasets/<name>/meta.json``)."""
    return results_root(config) / "datasets" / dataset / "meta.json"


def file_sha256(path: Path) -> str | None:
    """SHA-256 of a file's bytes, or None when it does not exist (yet)."""
    try:
        return sha256sum(Path(path))
    except FileNotFoundError:
        return None


def resolve_run_spec(
    config: Mapping[str, Any], key: RunKey, meta_paths: Mapping[str, Path] | None = None
) -> RunSpec:
    """The specification of run ``key`` under ``config``.

    ``meta_paths``: dataset → meta.json (default: the workflow's location of each index). An index that does
    not exist yet has fingerprint None. An empty ``key.target`` resolves the training part only (for training).
    """
    from siad.methods import get_method_class

    cls = get_method_class(key.method)
    params = cls.resolve_params(method_params(config, key.method, key.variant))
    names = [n for n in ([key.target] if key.source == NO_SOURCE else [key.source, key.target]) if n]
    paths = {name: Path((meta_paths or {}).get(name) or meta_path(config, name)) for name in names}
    training = None
    if key.source != NO_SOURCE:
        normal_images = training_normal_images(config, key.source)
        training = {"normal_images": normal_images, "setting_options": setting_options(config, key.setting)}
    evaluation = config["evaluation"]
    return RunSpec(
        key=key,
        params=_canonical({k: v for k, v in params.items() if k not in PLACEMENT_PARAMS}),
        inputs={k: input_file_identity(params[k]) for k in INPUT_FILE_PARAMS if params.get(k)},
        seed=key.seed,
        config_seed=int(config["seed"]),
        device=str(config["device"]),
        data={name: _dataset_choice(config, name) for name in names},
        training=training,
        evaluation={"size": evaluation["size"], "batch_size": int(evaluation["batch_size"]),
                    "n_bootstrap": int(evaluation["n_bootstrap"]),
                    "aupro_limit": float(evaluation.get("aupro_limit", 0.3))},
        datasets={name: file_sha256(path) for name, path in paths.items()},
        training_images=None if training is None else training_images_digest(
            paths[key.source], key.setting, training["normal_images"], config["datasets"][key.source].get("classes")),
        version=siad.__version__,
        code={"method": method_code_hash(cls), "evaluation": modules_hash(EVALUATION_MODULES, transitive=False),
              **({} if training is None else {"training": modules_hash(TRAINING_MODULES, transitive=False)})},
    )


def _dataset_choice(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The options and class selection that shape dataset ``name``'s index as the run reads it."""
    from siad.data.registry import get_dataset

    classes = config["datasets"][name].get("classes")
    return {"options": get_dataset(name).options_with_defaults(config["data"].get("options", {})),
            "classes": sorted(classes) if classes else None}


def _canonical(value: Any) -> Any:
    """A JSON round trip: tuples become lists, keys sorted, so equal configurations compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def input_file_identity(path: str | Path) -> str:
    """Identity of a user-supplied file or folder: size and modification time of every file (no reads, so a
    13 GB checkpoint costs one ``stat``); ``absent`` when it does not exist."""
    path = Path(path).expanduser()
    return file_fingerprint(path) if path.is_file() else folder_listing_digest(path)


def method_code_hash(cls: type) -> str:
    """Hash of the method's module (or its ``code_modules``: an external method's stand-in names the modules that
    check and score its predictions) and every project module they import, transitively, with their data files."""
    return modules_hash(tuple(getattr(cls, "code_modules", None) or (cls.__module__,)))


def evaluation_code_modules() -> frozenset[str]:
    """Every project module the run loop reaches (what :data:`EVALUATION_MODULES` must account for)."""
    return module_closure("siad.engine.runs")


#: Keys of a metrics.json body that :func:`results_digest` leaves out: the stamp itself, and what a reader adds.
UNDIGESTED_KEYS = ("spec", "_source")


def results_digest(body: Mapping[str, Any]) -> str:
    """SHA-256 of a metrics.json body's numbers and labels (everything but :data:`UNDIGESTED_KEYS`), as written.

    Stamped beside the specification digest, so the report can tell a file edited by hand from one the
    evaluation wrote. ``body`` must be what JSON gives back (the writer round-trips it first).
    """
    return json_digest({k: v for k, v in body.items() if k not in UNDIGESTED_KEYS})


def training_images_digest(meta_path: Path, setting: str, normal_images: str, classes: Any) -> str | None:
    """Digest of the records a model trained on the index at ``meta_path`` sees (None: no index yet)."""
    try:
        stat = Path(meta_path).stat()
    except FileNotFoundError:
        return None
    return _training_images_digest(str(meta_path), stat.st_mtime_ns, stat.st_size, setting, normal_images,
                                   tuple(sorted(classes)) if classes else None)


@cache
def _training_images_digest(path: str, mtime_ns: int, size: int, setting: str, normal_images: str,
                            classes: tuple[str, ...] | None) -> str:
    train = training_meta(json.loads(Path(path).read_text()), setting, normal_images)["train"]
    fields = ("img_path", "sha256", "mask_path", "mask_sha256", "anomaly")
    return json_digest({cls: [[r.get(f) for f in fields] for r in records] for cls, records in sorted(train.items())
                        if classes is None or cls in classes})

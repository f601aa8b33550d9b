"""One workflow job = one call here (:func:`run_group`): for one (method, seed, source), train each (setting,
variant) (:func:`fit_run`, skipped when a model with the same training fingerprint exists) and evaluate its targets
with one method instance (:func:`evaluate_runs`; :func:`evaluate_run` for a single target).

Kept out of the Snakemake scripts so the same code runs from Python, tests and notebooks.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from siad import metrics
from siad.config import dataset_root, method_params, training_normal_images
from siad.data.imageio import read_image
from siad.data.loading import AnomalyDataset
from siad.data.records import load_meta
from siad.data.registry import get_dataset
from siad.engine.evaluate import evaluate_predictions, predict_dataset, save_predictions
from siad.engine.protocol import NO_SOURCE, RunKey, check_no_leakage
from siad.engine.settings import TrainingSetRequest, build_training_set, label_counts
from siad.engine.spec import RunSpec, file_sha256, resolve_run_spec, results_digest
from siad.errors import ConfigError, DataError, LeakageError
from siad.files import atomic_output, write_text_atomic
from siad.methods import Method, build_method
from siad.seeding import resolve_device, seed_everything

log = logging.getLogger("siad")

MODEL_INFO = "model.json"
WEIGHTS = "model.pt"


def read_model_record(model_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``model_dir``'s ``model.json`` and None, or None and why it cannot be used (missing, unreadable, foreign)."""
    info_path = model_dir / MODEL_INFO
    if not info_path.is_file():
        return None, "no trained model here"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return None, f"unreadable model record ({err})"
    if not isinstance(info, dict) or not isinstance(info.get("weights"), str) or "trained_on" not in info:
        return None, "not a model record of this suite (no 'weights'/'trained_on')"
    return info, None


def _trained_info(model_dir: Path) -> dict[str, Any]:
    info, problem = read_model_record(model_dir)
    if info is None:
        raise DataError(f"{model_dir / MODEL_INFO}: {problem}; rerun the run job of this model, which trains it "
                        "(again)")
    return info


def load_trained(method: Method, model_dir: Path) -> list[str]:
    """Load the model trained in ``model_dir`` into ``method`` and return the datasets it was trained on.

    The weights file must have the SHA-256 recorded in ``model.json`` when it was written: a truncated,
    corrupt or swapped file is refused (DataError naming it), never loaded. It is checked again after loading, so a
    file another process replaced while this one read it is refused too.
    """
    info = _trained_info(model_dir)
    weights = model_dir / info["weights"]
    problem = _weights_problem(info, weights)
    if problem:
        raise DataError(f"{weights}: {problem}; delete {model_dir} and rerun the run job, which trains it again")
    method.load(weights)
    if file_sha256(weights) != info["weights_sha256"]:
        raise DataError(f"{weights}: replaced while it was being loaded (another job writes this model); run the job "
                        "again once that job has finished")
    return list(info["trained_on"])


def _weights_problem(info: Mapping[str, Any], weights: Path) -> str | None:
    """Why ``weights`` is not the file ``model.json`` describes, or None when its SHA-256 matches."""
    recorded = info.get("weights_sha256")
    if not recorded:
        return "model.json records no SHA-256 of the weights (written by an older version)"
    actual = file_sha256(weights)
    if actual is None:
        return "the weights file is missing"
    if actual != recorded:
        return "the weights file does not have the SHA-256 recorded in model.json (truncated, corrupt or replaced)"
    return None


def evaluate_run(
    config: Mapping[str, Any],
    key: RunKey,
    *,
    meta_path: Path,
    metrics_path: Path,
    predictions_path: Path,
    model_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict ``key.target``'s test split with the run's method and write metrics and predictions."""
    return evaluate_runs(config, [key], meta_paths=[meta_path], metrics_paths=[metrics_path],
                         predictions_paths=[predictions_path], model_dir=model_dir, progress=progress)[0]


def evaluate_runs(
    config: Mapping[str, Any],
    keys: Sequence[RunKey],
    *,
    meta_paths: Sequence[Path],
    metrics_paths: Sequence[Path],
    predictions_paths: Sequence[Path],
    model_dir: Path | None = None,
    progress: bool = True,
    method: Method | None = None,
    specs: Sequence[RunSpec] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate several targets of ONE (setting, method, variant, source) with one method instance.

    ``method``: an instance that already holds the model of ``model_dir`` (just trained by :func:`fit_run`);
    None builds the method and loads the model. ``specs``: each run's resolved specification (stamped in its
    metrics.json); None resolves them here from ``config`` and the meta paths.

    The method is built (and its trained weights loaded) once, then each target is predicted and
    scored in turn; ``meta_paths[i]``/``metrics_paths[i]``/``predictions_paths[i]`` belong to
    ``keys[i]``. This is what a workflow job of a trained method does for all the targets the
    protocol gives its source: building the method, its text features and loading the model are paid
    once instead of once per target. Every target is checked against leakage (by dataset name and by image
    content) before any is evaluated.
    The global RNGs are re-seeded before each target, so a target's numbers do not depend on which
    other targets share the job (methods must not carry prediction state from one dataset to the next).
    """
    group = _run_group(keys, meta_paths, metrics_paths, predictions_paths)
    if specs is None:
        specs = [resolve_run_spec(config, key, {key.target: path}) for key, path in zip(keys, meta_paths)]
    seed = specs[0].seed
    seed_everything(seed)
    info: dict[str, Any] = {}
    if group.source != NO_SOURCE:
        info = _trained_info(model_dir or Path("."))
    if method is None:
        method = build_method(group.method, method_params(config, group.method, group.variant),
                              device=resolve_device(specs[0].device), seed=seed, weights_seed=specs[0].config_seed)
        if group.source != NO_SOURCE:
            load_trained(method, model_dir or Path("."))
    trained_on = list(info.get("trained_on", []))
    for key in keys:
        check_no_leakage(trained_on, key.target)
    metas = [load_meta(path, dataset_root(config, key.target)) for key, path in zip(keys, meta_paths)]
    near = [check_no_content_leakage(info, meta, key.target) for key, meta in zip(keys, metas)]
    bodies = []
    for spec, meta, close, metrics_path, predictions_path in zip(specs, metas, near, metrics_paths,
                                                                 predictions_paths):
        seed_everything(seed)
        bodies.append(_evaluate_target(config, method, spec, meta, trained_on, near_duplicates=close,
                                       metrics_path=metrics_path, predictions_path=predictions_path,
                                       progress=progress))
    return bodies


def check_no_content_leakage(info: Mapping[str, Any], target_meta: Mapping[str, Any], target: str) -> list[list]:
    """Refuse a target whose test images include any image of the model's training data (same SHA-256); return the
    perceptual near-duplicates between the training images and the target's test images (reported, not refused).

    ``info``: the model record (``model.json``; empty for training-free methods, which saw no images).
    """
    from siad.data.duplicates import exact_overlap, near_duplicates

    trained = info.get("training_images")
    if not trained:
        return []
    tests = [r for records in target_meta.get("test", {}).values() for r in records]
    overlap = exact_overlap(trained, tests)
    if overlap:
        shown = "; ".join(f"{a} = {b}" for a, b in overlap[:5])
        raise LeakageError(
            f"refusing to evaluate on {target!r}: {len(overlap)} of its test images are byte-identical to images the "
            f"model was trained on ({info.get('trained_on')}): {shown}. Zero-shot evaluation requires unseen images; "
            "remove the duplicates from one of the datasets (or restrict its classes) and prepare it again"
        )
    return [list(pair) for pair in near_duplicates(trained, tests)]


def _run_group(keys: Sequence[RunKey], *paths: Sequence[Path]) -> RunKey:
    """The (setting, method, variant, source) shared by ``keys`` (target left empty); paths align with keys."""
    if not keys:
        raise ConfigError("evaluate_runs: no runs given; pass at least one RunKey")
    if any(len(p) != len(keys) for p in paths):
        raise ConfigError(f"evaluate_runs: {len(keys)} runs but {[len(p) for p in paths]} meta/metrics/"
                          "predictions paths; pass one of each per run")
    groups = {replace(key, target="") for key in keys}
    if len(groups) > 1:
        raise ConfigError(f"evaluate_runs: the runs {[str(k) for k in keys]} differ in setting, method, variant, "
                          "source or seed; one job evaluates the targets of one trained model only")
    targets = [key.target for key in keys]
    if len(set(targets)) != len(targets):
        raise ConfigError(f"evaluate_runs: target(s) listed twice in {targets}; list each target once")
    return groups.pop()


def give_references(method: Method, root: Path, meta: Mapping[str, Any], classes: Sequence[str]) -> list[str]:
    """Hand a few-shot method its ``references_needed`` normal train images per target class: the first k in
    path order (deterministic); returns their paths (recorded in metrics.json)."""
    k = method.references_needed
    train = {c: sorted((r for r in meta.get("train", {}).get(c, []) if not r["anomaly"]), key=lambda r: r["img_path"])
             for c in classes}
    short = [c for c, records in train.items() if len(records) < k]
    if short:
        raise DataError(f"{root}: classes {short} have fewer than {k} normal train images for the few-shot "
                        "references (few_shot_k); use a dataset layout with a train split or set few_shot_k: 0")
    chosen = {c: records[:k] for c, records in train.items()}
    method.set_references({c: torch.stack([method.transform(read_image(root / r["img_path"])) for r in records])
                           for c, records in chosen.items()})
    return [r["img_path"] for records in chosen.values() for r in records]


def _evaluate_target(
    config: Mapping[str, Any], method: Method, spec: RunSpec, meta: Mapping[str, Any], trained_on: list[str], *,
    near_duplicates: Sequence[Sequence[Any]], metrics_path: Path, predictions_path: Path, progress: bool,
) -> dict[str, Any]:
    """Predict one target's test split with a ready method; write predictions.npz and metrics.json (stamped)."""
    key = spec.key
    root = dataset_root(config, key.target)
    evaluation = spec.evaluation
    size = evaluation["size"]
    dataset = AnomalyDataset(
        root,
        meta,
        split="test",
        # sorted as the run specification holds them: the config's order of the classes changes no number
        classes=sorted(config["datasets"][key.target].get("classes") or []) or None,
        transform=method.transform,
        mask_size=None if size == "original" else (int(size), int(size)),
        name=key.target,
    )
    log.info("evaluating %s on %s (%d images)", key, key.target, len(dataset))
    if near_duplicates:
        log.warning("%d test image(s) of %s are perceptual near-duplicates of training images (listed in "
                    "metrics.json under near_duplicates); they are scored", len(near_duplicates), key.target)
    references = []
    if method.references_needed:
        references = give_references(method, root, meta, dataset.classes)
    preds = predict_dataset(method, dataset, batch_size=evaluation["batch_size"],
                            num_workers=config["evaluation"].get("num_workers", 0), progress=progress)
    body = evaluate_predictions(preds, with_pixel=get_dataset(key.target).has_masks,
                                n_bootstrap=evaluation["n_bootstrap"], seed=spec.config_seed,
                                aupro_limit=evaluation["aupro_limit"], progress=progress)
    body["metric_labels"] = metrics.metric_labels(evaluation["aupro_limit"])
    body["run"] = {
        "profile": config["profile"],
        "demo": bool(config["demo"] or method.random_init),
        "random_init": method.random_init,
        "setting": key.setting,
        "method": key.method,
        "variant": key.variant,
        "source": key.source,
        "references": references,
        "target": key.target,
        "trained_on": trained_on,
        "eval_size": size,
        "seed": spec.seed,
        "device": str(method.device),
    }
    body["near_duplicates"] = [list(pair) for pair in near_duplicates]
    body = json.loads(json.dumps(body, default=_jsonable))  # as a reader will see it
    body["spec"] = {**spec.stamp(), "results_digest": results_digest(body)}
    for warning in body.get("warnings", []):
        log.warning(warning)
    save_predictions(preds, predictions_path)
    _write_json(body, metrics_path)
    return body


def _write_json(body: Mapping[str, Any], path: Path) -> None:
    write_text_atomic(path, json.dumps(body, indent=1, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def fit_run(
    config: Mapping[str, Any], key: RunKey, *, meta_path: Path, model_dir: Path, spec: RunSpec | None = None,
) -> Method:
    """Train ``key.method``/``key.variant`` on ``key.source`` under ``key.setting`` with ``key.seed``; write the
    weights and ``model.json``; return the method.

    The training set is the setting's (:mod:`siad.engine.settings`), built here and handed to ``Method.fit``.
    ``spec``: the run's resolved specification (any target; None resolves one here): its
    :attr:`~siad.engine.spec.RunSpec.training_digest` is the fingerprint that decides reuse. The weights are
    written to a temporary file and renamed, then ``model.json`` (also atomic) records their SHA-256, the
    fingerprint and the training images' content hashes (for the content leakage guard). A crash at any point
    leaves either no ``model.json`` or one that does not match the weights, and the model is trained again.
    """
    key = replace(key, target="")
    if spec is None:
        spec = resolve_run_spec(config, key, {key.source: meta_path})
    seed_everything(spec.seed)
    method = build_method(key.method, method_params(config, key.method, key.variant),
                          device=resolve_device(spec.device), seed=spec.seed, weights_seed=spec.config_seed)
    root = dataset_root(config, key.source)
    dataset = build_training_set(TrainingSetRequest(
        setting=key.setting, name=key.source, root=root, meta=load_meta(meta_path, root),
        classes=config["datasets"][key.source].get("classes"), normal_images=training_normal_images(config, key.source),
        transform=method.transform, input_size=method.input_size, seed=spec.seed,
        options=spec.training["setting_options"], mask_resize=method.training_mask_resize))
    counts = label_counts(dataset)
    log.info("training %s/%s (seed %d) on %s under %s (%d images, %d anomalous)", key.method, key.variant, spec.seed,
             key.source, key.setting, counts["images"], counts["anomalous"])
    method.fit(dataset, key.setting)
    save_trained(method, model_dir, {
        "trained_on": [key.source], "setting": key.setting, "method": key.method, "variant": key.variant,
        "seed": spec.seed, "random_init": method.random_init, "device": str(method.device),
        "fingerprint": spec.training_digest, "training_spec": spec.training_identity(), "training_set": counts,
        "training_images": [_image_identity(r) for r in dataset.records],
    })
    return method


def _image_identity(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in ("img_path", "sha256", "dhash")}


def save_trained(method: Method, model_dir: Path, info: Mapping[str, Any]) -> None:
    """Write ``method``'s weights and then ``model.json`` (``info`` + the weights' SHA-256), each atomically.

    Any previous ``model.json`` is removed first, so an interruption between the two writes never pairs new
    weights with an old record (or old weights with a new one). The SHA-256 recorded is that of the bytes this
    process wrote (hashed before they are renamed into place): should another process replace the weights before
    this record is written, the record does not match them and :func:`load_trained` refuses the pair.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / MODEL_INFO).unlink(missing_ok=True)
    with atomic_output(model_dir / WEIGHTS) as tmp:  # a unique temporary name: concurrent writers never share one
        method.save(tmp)
        digest = file_sha256(tmp)
    _write_json({**info, "weights": WEIGHTS, "weights_sha256": digest}, model_dir / MODEL_INFO)


def copy_trained(source_dir: Path, model_dir: Path, spec: RunSpec) -> None:
    """Give ``model_dir`` the model of ``source_dir``, a variant of the same job whose training differs only in the
    method's evaluation-only parameters (:attr:`RunSpec.shared_training_digest`): the weights are copied and
    ``model.json`` records this variant's own fingerprint and where the weights came from (written like
    :func:`save_trained`: weights first, then the record)."""
    info, problem = read_model_record(source_dir)
    if info is None:  # pragma: no cover - the source was written or checked in this job
        raise DataError(f"{source_dir / MODEL_INFO}: {problem}; run the job again")
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / MODEL_INFO).unlink(missing_ok=True)
    with atomic_output(model_dir / WEIGHTS) as tmp:
        shutil.copyfile(source_dir / info["weights"], tmp)
        digest = file_sha256(tmp)
    record = {**info, "variant": spec.key.variant, "fingerprint": spec.training_digest,
              "training_spec": spec.training_identity(), "shared_from": str(source_dir), "weights": WEIGHTS,
              "weights_sha256": digest}
    _write_json(record, model_dir / MODEL_INFO)
    log.info("%s/%s trains exactly as %s (they differ only in evaluation settings): its model is copied, not trained "
             "again", spec.key.method, spec.key.variant, source_dir)


def trained_model_is_current(spec: RunSpec, model_dir: Path) -> bool:
    """True when ``model_dir`` holds an intact model trained under exactly ``spec``'s training specification.

    A record that does not parse, a fingerprint that differs, or weights whose SHA-256 differs from the recorded
    one mean "train again"; the last two cases are logged as warnings naming the file.
    """
    info, problem = read_model_record(model_dir)
    if info is None:
        if (model_dir / MODEL_INFO).is_file():
            log.warning("%s: %s; training again", model_dir / MODEL_INFO, problem)
        return False
    if info.get("fingerprint") != spec.training_digest:
        log.info("the model in %s was trained under another specification; training again", model_dir)
        return False
    problem = _weights_problem(info, model_dir / info["weights"])
    if problem:
        log.warning("%s: %s; training again", model_dir / info["weights"], problem)
        return False
    return True


#: How the runs are cut into workflow jobs (``workflow.job_per`` in the config): one job per (method, training seed,
#: source), or per (method, training seed) with every source in it.
JOB_GROUPINGS: tuple[str, ...] = ("source", "method")
#: The ``source`` field of a group that spans every source of its method (``job_per: method``).
ALL_SOURCES = "all"


def planned_runs(method: str, seed: int, runs: Sequence[Sequence[str]], spec: Sequence[str]) -> dict[RunKey, str]:
    """A run job's params back as {run: the config digest the workflow planned it with}: ``runs`` holds
    (setting, variant, source, target) per run, ``spec`` the matching ``setting/variant/source/target=digest``
    entries (:meth:`siad.plan.WorkflowPlan.group_params`)."""
    keys = [RunKey(setting, method, variant, source, target, seed) for setting, variant, source, target in runs]
    return dict(zip(keys, (entry.rpartition("=")[2] for entry in spec), strict=True))


def job_per(config: Mapping[str, Any]) -> str:
    """The configured job grouping (``workflow.job_per``; ``source`` when unset)."""
    return (config.get("workflow") or {}).get("job_per", "source")


@dataclass(frozen=True)
class RunGroup:
    """The runs of one workflow job: one (method, training seed, source) — or, with ``job_per: method``, one (method,
    training seed) with every source (``source == "all"``) — and one ``part`` of its runs: the workflow plan cuts a
    method's runs by the set of tables and figures that read them (:mod:`siad.plan`), so that building one table runs
    only the jobs it needs, and choosing other tables never changes a job that has run. One process per group pays the
    process start, the imports and the frozen model once for all of its runs (the job start-up costs more than a tiny
    model's whole run)."""

    method: str
    seed: int
    source: str
    keys: tuple[RunKey, ...]
    part: str = ""  # a name for the tables the runs serve ("" when the runs are not cut)

    @classmethod
    def of(cls, key: RunKey, per: str = "source", part: str = "") -> RunGroup:
        """The (empty) group ``key`` belongs to under grouping ``per``: its rule name and log path, no members."""
        return cls(key.method, key.seed, key.source if per == "source" else ALL_SOURCES, (), part)

    @property
    def rule_name(self) -> str:
        """The Snakemake rule of this job."""
        suffix = "" if self.source == ALL_SOURCES else f"_{self.source}"
        part = f"_{self.part}" if self.part else ""
        return f"run_{self.method}_seed{self.seed}{suffix}{part}"

    @property
    def log_name(self) -> str:
        """The job's log and benchmark path below ``logs/runs`` / ``benchmarks/runs`` (without a suffix)."""
        part = f"/{self.part}" if self.part else ""
        return f"{self.method}/seed{self.seed}/{self.source}{part}"

    @property
    def datasets(self) -> list[str]:
        """Datasets whose index the job reads: the sources (trained methods), then the targets."""
        names = [d for k in self.keys for d in (k.source, k.target)]
        return list(dict.fromkeys(d for d in names if d != NO_SOURCE))


def group_runs(keys: Sequence[RunKey], per: str = "source",
               part_of: Callable[[RunKey], str] | None = None) -> list[RunGroup]:
    """Runs grouped by (method, seed, source) — or by (method, seed) with ``per="method"`` — and by ``part_of(key)``
    (default: one part), in first-seen order: one workflow job each (see :func:`run_group`)."""
    if per not in JOB_GROUPINGS:
        raise ConfigError(f"workflow/job_per: {per!r}; choose one of {list(JOB_GROUPINGS)}")
    groups: dict[tuple[str, int, str, str], list[RunKey]] = {}
    for key in dict.fromkeys(keys):
        group = RunGroup.of(key, per, part_of(key) if part_of else "")
        groups.setdefault((group.method, group.seed, group.source, group.part), []).append(key)
    return [RunGroup(method, seed, source, tuple(members), part)
            for (method, seed, source, part), members in groups.items()]


def run_group(
    config: Mapping[str, Any], keys: Sequence[RunKey], *, meta_paths: Mapping[str, Path], results_root: Path,
    progress: bool = True, expected_digests: Mapping[RunKey, str] | None = None,
) -> None:
    """One workflow job: every (source, setting, variant) of one (method, seed) in turn — train it unless an intact
    model with the same training fingerprint is already there, then evaluate all its targets. Each (source, setting,
    variant) has its own method instance and model folder; the process start, imports and feature caches are
    shared. The job holds one source (``workflow.job_per: source``) or all of the method's (``method``).

    ``meta_paths``: dataset name → its ``meta.json`` (the source and every target). ``expected_digests``: run →
    the config digest the workflow planned it with (the job's ``params``); a run whose specification resolves
    differently here (the config or code changed while the workflow ran) is refused rather than stamped.
    """
    spans = sorted({(k.method, k.seed) for k in keys})
    if len(spans) != 1:
        raise ConfigError(f"run_group: the runs span {spans}; one job covers one (method, seed)")
    missing = sorted({d for k in keys for d in (k.source, k.target) if d != NO_SOURCE} - set(meta_paths))
    if missing:
        raise ConfigError(f"run_group: no meta.json given for {missing}")
    specs = {key: resolve_run_spec(config, key, meta_paths) for key in keys}
    _check_planned(specs, expected_digests or {})
    trained: dict[str, Path] = {}  # shared training digest -> a current model of this job
    for source, setting, variant in dict.fromkeys((k.source, k.setting, k.variant) for k in keys):
        model_keys = [k for k in keys if (k.source, k.setting, k.variant) == (source, setting, variant)]
        first = model_keys[0]
        model_dir, method = None, None
        if first.source != NO_SOURCE:
            model_dir = first.model_dir(results_root)
            shared = specs[first].shared_training_digest
            if trained_model_is_current(specs[first], model_dir):
                log.info("reusing the trained model in %s (same training specification, weights intact)", model_dir)
            elif shared in trained:
                copy_trained(trained[shared], model_dir, specs[first])
            else:
                method = fit_run(config, first, meta_path=meta_paths[first.source], model_dir=model_dir,
                                 spec=specs[first])
            trained.setdefault(shared, model_dir)
        evaluate_runs(
            config, model_keys, meta_paths=[meta_paths[k.target] for k in model_keys],
            metrics_paths=[k.run_dir(results_root) / "metrics.json" for k in model_keys],
            predictions_paths=[k.run_dir(results_root) / "predictions.npz" for k in model_keys],
            model_dir=model_dir, progress=progress, method=method, specs=[specs[k] for k in model_keys],
        )


def _check_planned(specs: Mapping[RunKey, RunSpec], expected: Mapping[RunKey, str]) -> None:
    changed = [str(key) for key, digest in expected.items() if specs[key].planned_digest != digest]
    if changed:
        raise ConfigError(f"the specification of {changed} changed after the workflow planned it (the config or the "
                          "code was edited while it ran); run snakemake again so it plans with the current state")

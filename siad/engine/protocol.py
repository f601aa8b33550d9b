"""The evaluation protocol: settings, (source → target) pairs, run keys and the leakage guard.

SIAD-LLM Sec. 4.1: industrial models train on MVTecAD and are tested on the other industrial sets,
MVTecAD itself with VisA-trained weights; medical models train on Br35H and are tested on BrainMRI
and HeadCT, Br35H with BrainMRI-trained weights. Training-free methods have no source: they run once
per target (source ``none``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siad.errors import ConfigError, LeakageError

SETTINGS = ("uzad", "pseudo", "zad")
"""uzad: auxiliary normal images only; pseudo: normal + pseudo-anomalies; zad: auxiliary anomalies."""

NO_SOURCE = "none"


@dataclass(frozen=True)
class RunKey:
    """Identifies one evaluation: ``{setting}/{method}/{variant}/seed{seed}/{source}/{target}``.

    ``seed`` is the training seed of a trained method (one run per entry of ``training.seeds``) and the config
    ``seed`` for a training-free one (it has one run).
    """

    setting: str
    method: str
    variant: str
    source: str
    target: str
    seed: int

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"run {self.setting}/{self.method}/{self.variant}: seed must be an integer, got "
                              f"{self.seed!r}")

    @classmethod
    def from_run(cls, ident: Mapping[str, Any]) -> RunKey:
        """The key of a metrics.json ``run`` section."""
        return cls(ident["setting"], ident["method"], ident["variant"], ident["source"], ident["target"],
                   int(ident["seed"]))

    @property
    def seed_folder(self) -> str:
        """The seed level of the results layout (``seed0``, ``seed42`` ...)."""
        return f"seed{self.seed}"

    def run_dir(self, results_root: str | Path) -> Path:
        """Where this run's predictions and metrics live."""
        return self.model_dir(results_root) / self.target

    def model_dir(self, results_root: str | Path) -> Path:
        """Where the model trained for this run lives (shared by all targets of one source and seed)."""
        return Path(results_root, self.setting, self.method, self.variant, self.seed_folder, self.source)


def protocol_pairs(protocol: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(source, target) pairs in config order; a pair whose target is its source is refused."""
    pairs = []
    for entry in protocol:
        for target in entry["targets"]:
            if target == entry["source"]:
                raise ConfigError(f"protocol: {target!r} is both source and target; zero-shot forbids it")
            pairs.append((entry["source"], target))
    targets = [t for _, t in pairs]
    duplicated = sorted({t for t in targets if targets.count(t) > 1})
    if duplicated:
        raise ConfigError(f"protocol: target(s) {duplicated} appear under more than one source")
    return pairs


def protocol_runs(
    protocol: Sequence[Mapping[str, Any]], *, setting: str, method: str, variant: str, training_free: bool,
    seeds: Sequence[int],
) -> list[RunKey]:
    """The runs of one (setting, method, variant): one per target and seed, source ``none`` if training-free."""
    if setting not in SETTINGS:
        raise ConfigError(f"unknown setting {setting!r}; known: {SETTINGS}")
    return [
        RunKey(setting, method, variant, NO_SOURCE if training_free else source, target, seed)
        for source, target in protocol_pairs(protocol)
        for seed in seeds
    ]


def check_no_leakage(trained_on: Iterable[str], target: str) -> None:
    """Refuse to evaluate on a dataset the model saw in training (the zero-shot guarantee)."""
    seen = set(trained_on)
    if target in seen:
        raise LeakageError(
            f"refusing to evaluate on {target!r}: the model was trained on {sorted(seen)}. "
            "Zero-shot evaluation requires an unseen target; fix the protocol in the config."
        )


def training_meta(meta: Mapping[str, Any], setting: str, normal_images: str = "train") -> dict[str, Any]:
    """The auxiliary training data of ``setting`` as a one-split index (``train``).

    uzad / pseudo: normal images only (``normal_images``: ``train`` = the train split, the SIAD
    reading of "normal images of the auxiliary dataset"; ``all`` = normal images of train and test).
    :mod:`siad.engine.settings` turns a share of them into pseudo-anomalies for ``pseudo``. zad: the auxiliary
    *test* split with its real anomalies and masks, as AnomalyCLIP / AdaCLIP train.
    """
    if setting == "zad":
        return {"train": {c: list(rs) for c, rs in meta["test"].items()}}
    if normal_images not in ("train", "all"):
        raise ConfigError(f"training.normal_images must be 'train' or 'all', not {normal_images!r}")
    splits = ("train",) if normal_images == "train" else ("train", "test")
    by_class: dict[str, list] = {}
    for split in splits:
        for cls, records in meta.get(split, {}).items():
            by_class.setdefault(cls, []).extend(r for r in records if not r["anomaly"])
    return {"train": {c: rs for c, rs in by_class.items() if rs}}

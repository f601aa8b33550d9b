"""The method interface every baseline and SIAD-LLM implement, and the method registry.

A method turns a batch of preprocessed images into image scores and anomaly maps. Training-based
methods learn in :meth:`Method.fit` from an auxiliary dataset; training-free ones do nothing there
(test-time adaptation belongs in :meth:`Method.predict`).
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor

from siad.errors import ConfigError
from siad.registry import Registry

Batch = Mapping[str, Any]
"""A batch: ``image`` [B,3,H,W] (the method's own transform applied), ``cls_name`` list[str],
``img_path`` list[str] (relative to the dataset root), ``image_file`` list[str] (the files, for
feature caches; absent when the images do not come from files), and for training ``mask`` [B,H,W]
and ``label`` [B]."""


@dataclass
class MethodOutput:
    """What a method returns for one batch: what the engine scores and stores.

    ``answers`` and ``p_yes`` are given by LLM methods only (AnomalyGPT, SIAD-LLM): the generated
    answer per image, and P("Yes") at the answer's first token (the LLM's own continuous score). A
    method gives both or neither, for every batch.
    """

    scores: Tensor  # [B] image scores
    maps: Tensor  # [B, h, w] anomaly maps
    answers: list[str] | None = None  # the LLM's generated answer per image
    p_yes: Tensor | None = None  # [B] P("Yes") at the answer's first token


class Method(ABC):
    """Base class of all methods.

    Subclasses declare ``training_free`` and the parameters they accept (``defaults``); the config
    entry of the method (plus the variant's overrides) arrives as ``params``.
    """

    training_free: ClassVar[bool] = False
    defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, params: Mapping[str, Any] | None = None, *, device: str = "cpu", seed: int = 0) -> None:
        self.params = self.resolve_params(params or {})
        self.device = torch.device(device)
        self.seed = seed

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``params``; an unknown key is a config error (typos never pass)."""
        unknown = set(params) - set(cls.defaults)
        if unknown:
            raise ConfigError(
                f"method {cls.__name__}: unknown parameter(s) {sorted(unknown)}; accepted: {sorted(cls.defaults)}"
            )
        return {**cls.defaults, **params}

    def check_choice(self, name: str, allowed: Sequence[Any]) -> None:
        """Refuse a value of parameter ``name`` outside ``allowed``: a config error naming the method and the key."""
        value = self.params[name]
        if value not in allowed:
            raise ConfigError(f"method {type(self).__name__}: {name}={value!r}; choose one of {list(allowed)} "
                              "(config methods/<name>/params or variants)")

    @property
    @abstractmethod
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image → input tensor [3,H,W] (resize + normalisation of this method's backbone)."""

    @property
    @abstractmethod
    def input_size(self) -> int:
        """Side of the square input image in pixels (training masks are resized to it)."""

    @property
    def random_init(self) -> bool:
        """True when any pretrained part is replaced by random weights (demo); stamped on outputs."""
        return False

    def fit(self, train_data: torch.utils.data.Dataset, setting: str) -> None:
        """Learn from the auxiliary data of ``setting``; training-free methods keep this no-op."""
        if not self.training_free:
            raise NotImplementedError(f"{type(self).__name__} must implement fit()")

    @abstractmethod
    def predict(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores [B] and anomaly maps [B,h,w] (any resolution; resized for evaluation)."""

    def predict_batch(self, batch: Batch) -> MethodOutput:
        """What the engine calls: :meth:`predict` wrapped as a :class:`MethodOutput`.

        LLM methods override this to add their ``answers`` and ``p_yes``.
        """
        scores, maps = self.predict(batch)
        return MethodOutput(scores, maps)

    @property
    def references_needed(self) -> int:
        """Normal train images per class of the *target* the method needs before predicting (few-shot modes
        such as AnomalyGPT's memory map); 0 = none, the zero-shot default."""
        return 0

    def set_references(self, references: Mapping[str, torch.Tensor]) -> None:
        """Receive ``references_needed`` transformed normal images per target class ({class: [k, 3, H, W]})."""
        raise NotImplementedError(f"{type(self).__name__} takes no reference images (references_needed is 0)")

    def save(self, path: Path) -> None:
        """Write the learned state (training-free methods have none)."""
        torch.save({}, path)

    def load(self, path: Path) -> None:
        """Read the state written by :meth:`save`."""
        torch.load(path, map_location=self.device, weights_only=True)


METHODS: Registry[type[Method]] = Registry("method")

_PLUGIN_PACKAGES = ("baselines", "siad.methods")


def _discover() -> None:
    """Import every module of the method packages so their ``@METHODS.register`` lines run."""
    for package_name in _PLUGIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")


def get_method_class(name: str) -> type[Method]:
    """The method class registered as ``name`` (modules of ``baselines/`` are discovered on demand)."""
    if name not in METHODS:
        _discover()
    return METHODS.get(name)


def build_method(name: str, params: Mapping[str, Any] | None = None, *, device: str = "cpu", seed: int = 0) -> Method:
    """Instantiate the method ``name`` with config ``params``."""
    return get_method_class(name)(params, device=device, seed=seed)

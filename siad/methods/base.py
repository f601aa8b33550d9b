"""The method interface every baseline and SIAD-LLM implement, and the method registry.

A method turns a batch of preprocessed images into image scores and anomaly maps. Training-based
methods learn in :meth:`Method.fit` from an auxiliary dataset; training-free ones do nothing there
(test-time adaptation belongs in :meth:`Method.predict`).
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor

from siad.errors import ConfigError, UnknownNameError
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


class ParamRule(ABC):
    """What one method parameter may hold; :meth:`problem` says what is wrong with a value (``None``: nothing)."""

    @abstractmethod
    def problem(self, value: Any) -> str | None:
        """``None`` when ``value`` is acceptable, else the fix to tell the user (e.g. "use a positive integer")."""

    def coerce(self, value: Any) -> Any:
        """``value`` as this rule reads text (Snakemake's nested ``--config`` values and YAML's ``1e-3`` arrive as
        strings); anything it cannot read is returned unchanged, for :meth:`problem` to refuse naming the key."""
        return value


@dataclass(frozen=True)
class Choice(ParamRule):
    """One of ``options`` (compared with ``in``, so ``None`` may be an option)."""

    options: tuple[Any, ...]

    def problem(self, value: Any) -> str | None:
        return None if value in self.options else f"choose one of {list(self.options)}"


@dataclass(frozen=True)
class Registered(ParamRule):
    """A name registered in ``registry`` (a :class:`siad.registry.Registry`: backbones, prompt ensembles)."""

    registry: Registry[Any]

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str) and value in self.registry:
            return None
        return f"use a registered {self.registry.kind} name: {self.registry.names()}"


@dataclass(frozen=True)
class Flag(ParamRule):
    """``true`` or ``false`` (a YAML boolean, not a string or a number)."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else "use true or false"

    def coerce(self, value: Any) -> Any:
        from siad.data.flags import FALSE_WORDS, TRUE_WORDS

        word = value.strip().lower() if isinstance(value, str) else None
        return True if word in TRUE_WORDS else False if word in FALSE_WORDS else value


@dataclass(frozen=True)
class Text(ParamRule):
    """A string (a path, a name); ``optional`` also accepts ``null``."""

    optional: bool = True

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str) or (value is None and self.optional):
            return None
        return "use a string (a path or a name)" + (" or null" if self.optional else "")


@dataclass(frozen=True)
class Number(ParamRule):
    """A finite number (``integer``: a whole number) in [low, high]; ``*_open`` excludes that end, ``optional``
    also accepts ``null``. Booleans are refused (YAML ``true`` is not 1), and so are strings: PyYAML reads
    ``1e-3`` (no dot) as a string, which is caught here rather than deep inside the optimiser."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        kinds = (int,) if self.integer else (int, float)
        fix = f"use {self.describe()}" + (" or null" if self.optional else "")
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            return fix + (" (YAML reads 1e-3 without a dot as text: write 1.0e-3)" if _numeric_text(value) else "")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return fix if too_low or too_high else None

    def coerce(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            number = float(value.strip())
        except ValueError:
            return value
        if self.integer:
            return int(number) if number.is_integer() else value
        return number

    def describe(self) -> str:
        """E.g. "an integer ≥ 1", "a finite number in (0, 1]"."""
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '≥'} {self.low:g}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '≤'} {self.high:g}"
        return kind


def _numeric_text(value: Any) -> bool:
    """Whether ``value`` is text that reads as a number (e.g. YAML's ``1e-3``, which PyYAML leaves a string)."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


@dataclass(frozen=True)
class BlockList(ParamRule):
    """A non-empty list of distinct block numbers ≥ 1 (1-indexed, as the release's ``--features_list``)."""

    def problem(self, value: Any) -> str | None:
        ok = (isinstance(value, (list, tuple)) and value and len(set(value)) == len(value)
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))
        return None if ok else "use a non-empty list of distinct 1-indexed block numbers, e.g. [24]"

    def coerce(self, value: Any) -> Any:
        each = Number(low=1, integer=True)
        return [each.coerce(v) for v in value] if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class NumberList(ParamRule):
    """A list of ``length`` numbers, each as ``each`` says (e.g. Adam's betas)."""

    length: int
    each: Number

    def problem(self, value: Any) -> str | None:
        if isinstance(value, (list, tuple)) and len(value) == self.length and not any(map(self.each.problem, value)):
            return None
        return f"use a list of {self.length} numbers, each {self.each.describe()}"

    def coerce(self, value: Any) -> Any:
        return [self.each.coerce(v) for v in value] if isinstance(value, (list, tuple)) else value


class Method(ABC):
    """Base class of all methods.

    Subclasses declare ``training_free``, the parameters they accept (``defaults``) and what each may hold
    (``param_rules``, checked by :meth:`validate_params`); the config entry of the method (plus the variant's
    overrides) arrives as ``params``.
    """

    training_free: ClassVar[bool] = False
    defaults: ClassVar[Mapping[str, Any]] = {}
    param_rules: ClassVar[Mapping[str, ParamRule]] = {}
    #: How the real masks of a training set reach the input size (``nearest`` or ``bilinear``, see
    #: :func:`siad.data.imageio.resize_mask`): each method's release decides; evaluation masks are always nearest.
    training_mask_resize: ClassVar[str] = "nearest"
    #: True for a method whose released evaluation post-processes its outputs over every test image of a class
    #: (AA-CLIP's per-class min–max normalisation): the engine then holds a class's raw outputs and calls
    #: :meth:`postprocess_class` once per class before the maps are resized for evaluation.
    per_class_postprocess: ClassVar[bool] = False
    #: Parameters that change only the evaluation (test-time switches such as FiLo's box suppression): variants that
    #: differ in nothing else share one trained model in a job (trained once, copied to each variant's folder).
    evaluation_params: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: Mapping[str, Any] | None = None, *, device: str = "cpu", seed: int = 0,
                 weights_seed: int | None = None) -> None:
        self.params = self.resolve_params(params or {})
        self.device = torch.device(device)
        self.seed = seed  # the run's (training) seed: trainable initialisation, data order, pseudo-anomalies
        # seeds the random stand-ins of *pretrained* weights (demo, tests): the config seed, so that every training
        # seed of a run trains on the same frozen model, as with real weights
        self.weights_seed = seed if weights_seed is None else weights_seed

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``params``, validated (:meth:`validate_params`); an unknown key is a config error
        (typos never pass). The workflow's config validation calls this for every variant at start-up, and
        ``__init__`` calls it before anything is built or downloaded, so a bad value never reaches a job."""
        unknown = set(params) - set(cls.defaults)
        if unknown:
            raise ConfigError(
                f"methods/{cls.config_name()}/params: unknown parameter(s) {sorted(unknown)}; accepted: "
                f"{sorted(cls.defaults)}"
            )
        resolved = {**cls.defaults, **params}
        cls.validate_params(resolved)
        return resolved

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        """Refuse a bad value of the resolved ``params`` without building anything (no weights, no downloads).

        The base checks every ``param_rules`` entry; subclasses add what a rule cannot say (registry names,
        combinations of parameters), calling ``super().validate_params(params)`` first. Raise
        :meth:`param_error` so the message names ``methods/<name>/params/<key>`` and the fix.
        """
        for key, rule in cls.param_rules.items():
            problem = rule.problem(params[key])
            if problem is not None:
                raise cls.param_error(key, params[key], problem)

    @classmethod
    def param_error(cls, key: str, value: Any, fix: str) -> ConfigError:
        """A config error naming the parameter as the config spells it, its value and the fix."""
        name = cls.config_name()
        return ConfigError(f"methods/{name}/params/{key}: {value!r} is not accepted; {fix} "
                           f"(set under methods/{name}/params, or in the variant that overrides {key})")

    @classmethod
    def config_name(cls) -> str:
        """The name the method is registered under (``methods.<name>`` in the config); for an unregistered
        subclass (e.g. a test double) the nearest registered ancestor's, else the class name."""
        for klass in cls.__mro__:
            names = [name for name in METHODS if METHODS.get(name) is klass]
            if names:
                return names[0]
        return cls.__name__

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

    def postprocess_class(self, cls_name: str, scores: Tensor, maps: Tensor) -> tuple[Tensor, Tensor]:
        """Scores [n] and maps [n, h, w] of *all* n test images of one class, as :meth:`predict` gave them, mapped to
        the final ones (called only when ``per_class_postprocess``; the default returns them unchanged)."""
        return scores, maps

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
    if name not in METHODS:
        module = _module_named(name)
        if module is not None:
            raise UnknownNameError(
                f"unknown method {name!r}: {module} exists and was imported, but it registered no method named "
                f"{name!r}; decorate its Method subclass with @METHODS.register({name!r}) (README: Adding a baseline)")
        raise UnknownNameError(
            f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS.get(name)


def _module_named(name: str) -> str | None:
    """The file of the plugin module called ``name`` (``baselines/<name>.py`` or a package), if there is one."""
    for package_name in _PLUGIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name == name:
                return f"{package_name.replace('.', '/')}/{name}{'/' if info.ispkg else '.py'}"
    return None


def build_method(name: str, params: Mapping[str, Any] | None = None, *, device: str = "cpu", seed: int = 0,
                 weights_seed: int | None = None) -> Method:
    """Instantiate the method ``name`` with config ``params``; ``seed`` is the run's (training) seed, ``weights_seed``
    seeds random stand-ins of pretrained weights (default: ``seed``)."""
    return get_method_class(name)(params, device=device, seed=seed, weights_seed=weights_seed)

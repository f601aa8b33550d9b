"""External methods: baselines whose predictions come from the user's own Snakemake rule, not from a method class.

A method entry with an ``external`` section (``methods.<name>.external``) is such a baseline: the user's rule file
(``external.rules``) writes ``external.npz`` for each run (:mod:`siad.engine.external` says what it must hold and
checks it), and the suite scores, tabulates and claim-checks it like any other method. This module gives each one
a registered stand-in class, so that every part of the suite asking "is it training-free, what are its parameters,
what code does it depend on" gets an answer; the class never predicts anything itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from siad.errors import ConfigError
from siad.methods.base import METHODS, Batch, Method, MethodOutput


class ExternalMethod(Method):
    """A method whose runs are predicted by a user's rule; its parameters are free-form and passed to that rule.

    ``external_spec`` is the config's ``external`` section (``rules``, ``training_free``): part of the run
    specification through :meth:`resolve_params`, so editing it reruns the scoring.
    """

    external_spec: ClassVar[Mapping[str, Any]] = {}
    #: The code a run's numbers depend on (its run specification's code hash): this stand-in and the contract checks
    #: and scoring of siad/engine/external.py; the user's rule is tracked by Snakemake (its output is an input).
    code_modules: ClassVar[tuple[str, ...]] = ("siad.methods.external", "siad.engine.external")
    #: img_path -> (score, map [H, W], answer | None, p_yes | None): an external file's predictions being scored
    #: (:func:`siad.engine.external.score_external_runs`); None outside scoring.
    replay: Mapping[str, tuple[float, Any, str | None, float | None]] | None = None

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters as given (the user's rule reads them), plus the ``external`` section under ``_external``."""
        return {**dict(params), "_external": dict(cls.external_spec)}

    @property
    def transform(self) -> Callable[[Any], torch.Tensor]:
        """No pixels: the scoring reads the predictions from the rule's file, not the images."""
        return _no_pixels

    @property
    def input_size(self) -> int:
        return 0

    def predict(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - see predict_batch
        raise NotImplementedError

    def predict_batch(self, batch: Batch) -> MethodOutput:
        """The replayed predictions of the batch's images (maps may differ in size: a list of [H, W] tensors)."""
        if self.replay is None:
            raise ConfigError(f"methods/{self.config_name()}: an external method is predicted by its own rule "
                              f"({self.external_spec.get('rules')}), not by the suite; run it through the workflow")
        rows = [self.replay[path] for path in batch["img_path"]]
        answers = [row[2] for row in rows] if rows[0][2] is not None else None
        p_yes = torch.tensor([row[3] for row in rows]) if rows[0][3] is not None else None
        maps = [torch.as_tensor(row[1]) for row in rows]
        return MethodOutput(torch.tensor([row[0] for row in rows]), maps, answers, p_yes)  # type: ignore[arg-type]


def _no_pixels(image: Any) -> torch.Tensor:
    return torch.zeros(0)


def external_methods(config: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Method name -> its ``external`` section, for every external method of ``config``."""
    return {name: entry["external"] for name, entry in config.get("methods", {}).items()
            if isinstance(entry, Mapping) and isinstance(entry.get("external"), Mapping)}


def register_external_methods(config: Mapping[str, Any], *, check_names: bool = True) -> list[str]:
    """Register a stand-in class for every external method of ``config`` (idempotent); return their names.

    A name taken by a method class of the suite or of ``baselines/`` is refused: an external entry may not hide it.
    ``check_names=False`` skips that check, which imports every method module (a job of a workflow whose config was
    validated when it was planned: the scoring and figure jobs).
    """
    from siad.methods.base import _discover

    names = []
    for name, spec in external_methods(config).items():
        if name in METHODS:
            known = METHODS.get(name)
            if isinstance(known, type) and issubclass(known, ExternalMethod):
                known.external_spec = dict(spec)  # the same process planning another config
                known.training_free = bool(spec.get("training_free", True))
                names.append(name)
                continue
        if check_names:
            _discover()
        if name in METHODS:
            raise ConfigError(f"methods/{name}/external: {name!r} is the name of a method class of the suite "
                              f"({METHODS.get(name).__module__}); give the external method another name")
        cls = type(f"External_{name}", (ExternalMethod,), {
            "__module__": __name__, "external_spec": dict(spec), "training_free": bool(spec.get("training_free", True)),
            "__doc__": f"External method {name!r}: predicted by the rules in {spec.get('rules')}."})
        METHODS.add(name, cls)
        names.append(name)
    return names

"""Configuration: schema validation and the cross-field checks a schema cannot express.

The workflow calls :func:`validate_config` at start-up, so a typo or an unknown dataset/method name
stops the run before any job starts, with the offending key in the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from siad.errors import ConfigError, SiadError, UnknownNameError
from siad.yaml_check import check_finite_numbers

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def load_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """Read the JSON schema (stored as YAML)."""
    return yaml.safe_load(Path(path).read_text())


def validate_config(config: Mapping[str, Any], schema_path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """Validate ``config`` against the schema, then the names, the protocol, the method parameters, the speed
    section and the device; return it as a dict with booleans and numbers given as text converted
    (:func:`coerce_text_values`). Non-finite numbers are refused anywhere.

    Raises:
        ConfigError: with the path of the offending key and what is expected.
    """
    config = coerce_text_values(config, load_schema(schema_path))
    check_finite_numbers(config)  # NaN passes every schema bound (comparisons with NaN are false)
    validator = jsonschema.Draft202012Validator(load_schema(schema_path))
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {'/'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in errors[:10]]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    from siad.methods.external import register_external_methods

    register_external_methods(config)  # methods predicted by the user's own rules get their stand-in class
    _check_names(config)
    return config


def coerce_text_values(config: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` whose booleans and numbers given as text are booleans and numbers: where the schema
    says ``boolean``, ``integer`` or ``number``, and in method parameters whose rule is a number
    (``Method.param_rules``).

    Snakemake reads nested ``--config`` values as text (``--config data='{verify_counts: false}'`` gives
    ``"false"``, which is truthy), and YAML reads ``1e-3`` without a dot as text. Method parameters are read by
    their rule (``ParamRule.coerce``: numbers, flags, lists of numbers). A boolean that is no boolean
    spelling is a ConfigError naming the key; text that is no number is left for the schema and the parameter
    rules to refuse, naming the key.
    """
    config = _coerce_by_schema(config, schema, "")
    methods = config.get("methods")
    if isinstance(methods, Mapping):
        config["methods"] = {name: _coerce_method(name, entry) for name, entry in methods.items()}
    return config


def _coerce_by_schema(value: Any, schema: Mapping[str, Any], key: str) -> Any:
    from siad.data.flags import parse_bool

    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if isinstance(value, str) and "boolean" in kinds:
        return parse_bool(value, key)
    if isinstance(value, str) and ("integer" in kinds or "number" in kinds):
        return _number(value, integer="number" not in kinds)
    if isinstance(value, Mapping):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {k: _coerce_by_schema(v, props.get(k, extra if isinstance(extra, Mapping) else {}),
                                     f"{key}.{k}" if key else str(k))
                for k, v in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_coerce_by_schema(v, schema["items"], key) for v in value]
    for alternative in schema.get("oneOf", []) + schema.get("anyOf", []):
        coerced = _coerce_by_schema(value, alternative, key)
        if coerced is not value:
            return coerced
    return value


def _coerce_method(name: str, entry: Any) -> Any:
    from siad.methods import get_method_class

    try:
        rules = get_method_class(name).param_rules
    except UnknownNameError:
        return entry  # reported by the name checks
    if not isinstance(entry, Mapping):
        return entry

    def coerce(params: Any) -> Any:
        if not isinstance(params, Mapping):
            return params
        return {k: rules[k].coerce(v) if k in rules else v for k, v in params.items()}

    entry = dict(entry)
    if "params" in entry:
        entry["params"] = coerce(entry["params"])
    if isinstance(entry.get("variants"), Mapping):
        entry["variants"] = {v: coerce(p) for v, p in entry["variants"].items()}
    return entry


def _number(text: str, *, integer: bool) -> Any:
    """``text`` as an int (``integer``) or a float, or unchanged when it is no such number (the parameter rules'
    reading, :meth:`siad.methods.base.Number.coerce`)."""
    from siad.methods.base import Number

    return Number(integer=integer).coerce(text)


def _check_names(config: Mapping[str, Any]) -> None:
    from siad.data.registry import get_dataset
    from siad.engine.protocol import protocol_pairs
    from siad.methods import get_method_class
    from siad.seeding import resolve_device

    try:
        for name, entry in config["datasets"].items():
            spec = get_dataset(name)
            unknown = set(entry.get("classes", [])) - set(spec.classes)
            if unknown:
                raise ConfigError(
                    f"datasets/{name}/classes: unknown class(es) {sorted(unknown)}; known: {list(spec.classes)}"
                )
        for source, target in protocol_pairs(config["protocol"]):
            for name in (source, target):
                if name not in config["datasets"]:
                    raise ConfigError(f"protocol: dataset {name!r} is not listed under `datasets`")
        for name, entry in config["methods"].items():
            try:
                cls = get_method_class(name)
            except UnknownNameError as err:
                raise ConfigError(f"methods/{name}: {err}; fix the name, add baselines/{name}.py registering it "
                                  "(README: Adding a baseline), or declare it as an external method "
                                  "(methods.<name>.external)") from None
            for variant, overrides in [("default", {}), *entry.get("variants", {}).items()]:
                _check_variant_params(cls, name, variant, entry.get("params", {}), overrides)
        _check_speed(config)
        resolve_device(config["device"])  # `device: cuda` without a GPU stops here, not in the first job
    except ConfigError:
        raise
    except SiadError as err:
        raise ConfigError(f"invalid configuration: {err}") from None


def _check_variant_params(cls: Any, method: str, variant: str, params: Mapping[str, Any],
                          overrides: Mapping[str, Any]) -> None:
    """Resolve one variant's parameters; a bad key or value that the variant sets is reported at its own config path
    (``methods/<m>/variants/<v>/<key>``), not at ``methods/<m>/params``."""
    from siad.methods.external import ExternalMethod

    where = f"methods/{method}/variants/{variant}"
    if variant != "default" and not issubclass(cls, ExternalMethod):
        unknown = sorted(set(overrides) - set(cls.defaults))
        if unknown:
            raise ConfigError(f"{where}: unknown parameter(s) {unknown}; accepted: {sorted(cls.defaults)}")
    try:
        cls.resolve_params({**params, **overrides})
    except ConfigError as err:
        text = str(err)
        for key in overrides if variant != "default" else ():
            prefix = f"methods/{method}/params/{key}:"
            if text.startswith(prefix):
                text = (f"{where}/{key}:" + text[len(prefix):]).replace(
                    f" (set under methods/{method}/params, or in the variant that overrides {key})",
                    f" (variant {variant!r} sets it: fix it under {where})")
                raise ConfigError(text) from None
        raise


def _check_speed(config: Mapping[str, Any]) -> None:
    """The speed table's backbones and rows must exist; the LLM group's rows must be LLM methods."""
    from siad.backbones import get_backbone_spec
    from siad.methods import get_method_class

    if "speed" not in config:
        return
    speed = config["speed"]
    get_backbone_spec(speed["backbone"])
    _check_speed_rows(config, speed["rows"], "speed/rows")
    for label, group in speed.get("groups", {}).items():
        get_backbone_spec(group["backbone"])
        _check_speed_rows(config, group["rows"], f"speed/groups/{label}/rows")
    if "llm" in speed:
        get_backbone_spec(speed["llm"]["backbone"])
        _check_speed_rows(config, speed["llm"]["rows"], "speed/llm/rows")
        for name, row in speed["llm"]["rows"].items():
            cls = get_method_class(row["method"])
            if not all(callable(getattr(cls, hook, None)) for hook in ("first_pass", "judge", "predict_batch")):
                raise ConfigError(
                    f"speed/llm/rows/{name}: {row['method']!r} is not an LLM method (no first_pass/judge); the LLM "
                    "group times AnomalyGPT/SIAD-LLM-style methods, put other methods under speed/rows"
                )


def _check_speed_rows(config: Mapping[str, Any], rows: Mapping[str, Any], key: str) -> None:
    for name, row in rows.items():
        if row["method"] not in config["methods"]:
            raise ConfigError(f"{key}/{name}: method {row['method']!r} is not listed under `methods`")
        if "external" in config["methods"][row["method"]]:
            raise ConfigError(f"{key}/{name}: {row['method']!r} is an external method (predicted by its own rule): "
                              "the speed table times method classes only; remove the row")
        if row.get("variant", "default") not in method_variants(config, row["method"]):
            raise ConfigError(f"{key}/{name}: unknown variant {row.get('variant')!r} of {row['method']!r}")
        if row.get("params"):  # the row's own parameters, over its variant's: checked now, not when the table is timed
            from siad.methods import get_method_class

            try:
                get_method_class(row["method"]).resolve_params(
                    {**method_params(config, row["method"], row.get("variant", "default")), **row["params"]})
            except ConfigError as err:
                raise ConfigError(f"{key}/{name}/params: {err}") from None


def method_variants(config: Mapping[str, Any], method: str) -> list[str]:
    """Variant names of ``method`` ("default" first)."""
    return ["default", *[v for v in config["methods"][method].get("variants", {}) if v != "default"]]


def method_params(config: Mapping[str, Any], method: str, variant: str) -> dict[str, Any]:
    """The method's parameters with the variant's overrides applied."""
    entry = config["methods"][method]
    variants = entry.get("variants", {})
    if variant != "default" and variant not in variants:
        raise ConfigError(f"methods/{method}: unknown variant {variant!r}; known: {method_variants(config, method)}")
    return {**entry.get("params", {}), **variants.get(variant, {})}


def training_normal_images(config: Mapping[str, Any], source: str) -> str:
    """``train`` or ``all`` for ``source``: ``training.normal_images_per_dataset`` overrides ``normal_images``.

    Under the all_test medical protocol the medical train splits are empty, so the paper's medical UZAD
    training (on Br35H, and on BrainMRI for the Br35H column) can only use their normal test images.
    """
    training = config.get("training", {})
    return training.get("normal_images_per_dataset", {}).get(source, training.get("normal_images", "train"))


def training_seeds(config: Mapping[str, Any], method: str) -> list[int]:
    """The seeds ``method`` runs under: ``training.seeds`` (default ``[seed]``) for a trained method, ``[seed]`` for
    a training-free one (it learns nothing, so another seed would repeat the same run)."""
    from siad.methods import get_method_class

    if get_method_class(method).training_free:
        return [int(config["seed"])]
    return [int(s) for s in config.get("training", {}).get("seeds", [config["seed"]])]


def dataset_root(config: Mapping[str, Any], name: str) -> Path:
    """Folder holding dataset ``name`` in its native layout (per-dataset override or <data.root>/<folder>)."""
    from siad.data.registry import get_dataset

    override = config["datasets"].get(name, {}).get("root")
    return Path(override) if override else Path(config["data"]["root"]) / get_dataset(name).folder


def results_root(config: Mapping[str, Any]) -> Path:
    """``results/<profile>``: every run of this profile lives below it."""
    return Path("results") / config["profile"]


def tables_root(config: Mapping[str, Any]) -> Path:
    """``tables/<profile>``: the rendered tables and figures of this profile."""
    return Path("tables") / config["profile"]

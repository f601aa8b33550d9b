"""Strict reading of YAML config files: every problem is a ConfigError "<file>:<line>:<column>: <problem>".

Snakemake 9 answers a config file with a YAML syntax error with only "Config file is not valid JSON or
YAML" (no file, line or column) and silently keeps the last of two equal keys; a ``.nan`` or ``.inf``
passes the JSON schema (comparisons with NaN are false). :func:`load_yaml` reports each of these at its
place in the file, :func:`check_finite_numbers` checks a merged config (``--config lr=nan`` gives a float
NaN) and ``python -m siad.yaml_check FILE...`` checks files from the command line.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from siad.errors import ConfigError

_NON_FINITE_TEXT = re.compile(r"[-+]?\.?(nan|inf|infinity)", re.IGNORECASE)


def _place(path: Path | str, mark: yaml.Mark | None) -> str:
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and non-finite numbers (each with its position)."""

    source: str = "<config>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first is not None:
                raise ConfigError(
                    f"{_place(self.source, key_node.start_mark)}: duplicate key {key!r} (first at line "
                    f"{first.line + 1}); YAML would silently keep only the last value: delete one of them"
                )
            seen[key] = key_node.start_mark
            self._check_number(value_node, key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        self._check_number(node, None)
        return super().construct_yaml_float(node)

    def _check_number(self, node: yaml.Node, key: Any) -> None:
        if not (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:float"):
            return
        value = yaml.SafeLoader.construct_yaml_float(self, node)
        if not math.isfinite(value):
            what = f"{key}: " if key is not None else ""
            raise ConfigError(
                f"{_place(self.source, node.start_mark)}: {what}{node.value} is not a finite number; give a finite "
                "value (NaN or infinity is never a valid setting here)"
            )


_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_yaml_float)


def _syntax_message(path: Path | str, err: yaml.YAMLError) -> str:
    if not isinstance(err, yaml.MarkedYAMLError):
        return f"{path}: not valid YAML ({err})"
    mark = err.problem_mark or err.context_mark
    problem = err.problem or err.context or "not valid YAML"
    text = f"{_place(path, mark)}: {problem}"
    if err.context and err.problem and err.context_mark is not None:
        text += f" ({err.context} at line {err.context_mark.line + 1}, column {err.context_mark.column + 1})"
    if "\\t" in problem or "\t" in problem:
        text += "; indent with spaces, not tabs"
    for candidate in (mark, err.context_mark):  # at the end of the file the problem line is empty
        snippet = candidate.get_snippet() if candidate is not None else None
        if snippet and snippet.splitlines()[0].strip():
            return f"{text}\n{snippet}"
    return text


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict; raise :class:`ConfigError` "<file>:<line>:<column>: <problem>" for a
    syntax error, a duplicate key or a non-finite number, and name the file when it is missing, unreadable, empty
    or not a mapping at the top level."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; check the path given to --configfile") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file ({err})") from None
    loader = _StrictLoader(text)
    loader.source = str(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(_syntax_message(path, err)) from None
    finally:
        loader.dispose()
    if data is None:
        raise ConfigError(f"{path}: the config file is empty; start from config/config.yaml or config/demo.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1:1: the top level must be a mapping of config keys (key: value), "
                          f"not a {type(data).__name__}")
    return data


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


def check_finite_numbers(config: Mapping[str, Any]) -> None:
    """Refuse NaN/infinite numbers anywhere in ``config`` (a ConfigError naming the key), and the same written as
    text (``--config`` parses nested values as strings: ``methods={m: {params: {lr: .nan}}}`` gives ``'.nan'``)."""
    for key, value in _leaves(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: {value} is not a finite number; give a finite value in the config file or "
                              "in --config")
        if isinstance(value, str) and _NON_FINITE_TEXT.fullmatch(value.strip()):
            raise ConfigError(f"{key}: {value!r} is not a finite number (and is text, not a number); give a finite "
                              "number in the config file or in --config")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m siad.yaml_check FILE...``: check config files; print where each problem is."""
    files = list(sys.argv[1:] if argv is None else argv)
    if not files:
        print("usage: python -m siad.yaml_check CONFIG.yaml [...]", file=sys.stderr)
        return 2
    status = 0
    for name in files:
        try:
            check_finite_numbers(load_yaml(name))
        except ConfigError as err:
            print(err, file=sys.stderr)
            status = 1
        else:
            print(f"{name}: ok")
    return status


if __name__ == "__main__":
    sys.exit(main())

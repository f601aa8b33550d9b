"""Booleans from the configuration, whatever way they arrived.

A YAML config file gives real booleans, but Snakemake's command line does not: ``--config`` accepts
only top-level keys (``--config data.verify_counts=false`` is refused: "Config entry must start with a
valid identifier"), and a nested value given as ``--config data='{verify_counts: false}'`` is parsed with
YAML's BaseLoader, so it arrives as the *string* ``"false"`` (merged into the ``data`` block of the
config file). A string ``"false"`` is truthy in Python; :func:`parse_bool` turns such spellings into
real booleans and refuses anything else, naming the config key.
"""

from __future__ import annotations

from siad.errors import ConfigError

TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})


def parse_bool(value: object, key: str) -> bool:
    """``value`` as a bool: a bool, 0 / 1, or (any case) true/false, yes/no, on/off, 1/0.

    Args:
        key: the dotted config key (``data.verify_counts``), named in the error.

    Raises:
        ConfigError: for any other value, with the spelling that works on the command line.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ConfigError(f"{key}: {value!r} is not a boolean; write true or false (in the config file "
                      f"`{key}: false`, on the command line {command_line_override(key, 'false')})")


def command_line_override(key: str, value: str) -> str:
    """The ``--config`` argument that sets the dotted ``key`` (``a.b.c`` -> ``--config a='{b: {c: v}}'``)."""
    top, *rest = key.split(".")
    if not rest:
        return f"--config {top}={value}"
    nested = value
    for part in reversed(rest):
        nested = f"{{{part}: {nested}}}"
    return f"--config {top}='{nested}'"

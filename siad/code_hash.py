"""Hashes of the suite's own code and of JSON-able identities: what lets a rerun notice that the code changed.

A module's hash is of its *meaning*, not its text: the parsed syntax tree with docstrings removed, so a
comment, a docstring or a reformatting does not rerun anything, while any change of a statement, a name or
a constant does. A package's data files (the tiny model configs, the tokenizer, the class descriptions) are
hashed with the package's modules: they shape numbers as much as code does.

Light on purpose (standard library only): the data, backbone and engine layers all use it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any

PROJECT_PACKAGES = ("siad", "baselines")

#: Package → its data folders (the ``package-data`` of pyproject.toml), hashed with the package's modules.
PACKAGE_DATA = {
    "siad.backbones": ("model_configs",),
    "siad.llm": ("tokenizer", "descriptions"),
}


def json_digest(obj: Any) -> str:
    """SHA-256 of a JSON-able identity (keys sorted). Paths are written as text; any other non-JSON value is a
    TypeError rather than a ``repr`` that could differ between processes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_jsonable).encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, set, frozenset)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"cannot fingerprint a {type(value).__name__} ({value!r}); give a JSON value")


def modules_hash(roots: tuple[str, ...] | list[str], *, transitive: bool = True) -> str:
    """SHA-256 over the code of ``roots`` and (``transitive``) the project modules they import, at any depth,
    plus the data files of every package involved (:data:`PACKAGE_DATA`).

    Imports are read from the source, so an import inside a function counts as well. A name that is no module
    of the project (``siad``, ``baselines``) hashes as empty.
    """
    closures = [module_closure(name) if transitive else frozenset({name}) for name in roots]
    modules = sorted(set().union(*closures))
    digest = hashlib.sha256()
    for name in modules:
        digest.update(name.encode() + b"\0" + module_fingerprint(name).encode() + b"\0")
    for package, folders in sorted(PACKAGE_DATA.items()):
        if any(m == package or m.startswith(package + ".") for m in modules):
            digest.update(package_data_hash(package, folders).encode())
    return digest.hexdigest()


@cache
def module_closure(name: str) -> frozenset[str]:
    """Module ``name`` and every project module it imports, at any depth."""
    seen: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        if current in seen or module_file(current) is None:
            continue
        seen.add(current)
        pending += _project_imports(current)
    return frozenset(seen)


@cache
def module_file(name: str) -> Path | None:
    """The source file of project module ``name`` (None for anything else)."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found and found.origin and found.origin.endswith(".py") else None


@cache
def module_fingerprint(name: str) -> str:
    """SHA-256 of the module's syntax tree without docstrings (comments and formatting do not count)."""
    path = module_file(name)
    if path is None:
        return ""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and _is_docstring(body[0]):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()


def _is_docstring(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


@cache
def package_data_hash(package: str, folders: tuple[str, ...]) -> str:
    """SHA-256 over the files (names and bytes) of ``folders`` inside ``package``."""
    init = module_file(package)
    digest = hashlib.sha256()
    if init is None:
        return ""
    for folder in folders:
        for path in sorted((init.parent / folder).rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                digest.update(str(path.relative_to(init.parent)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _project_imports(name: str) -> list[str]:
    """Project modules imported anywhere in module ``name`` (``from a import b`` counts ``a.b`` if a module)."""
    path = module_file(name)
    assert path is not None
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]
    return [m for m in found if m.split(".")[0] in PROJECT_PACKAGES]


def _absolute(module: str | None, level: int, package: str) -> str:
    if level == 0:
        return module or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - level + 1])
    return f"{base}.{module}" if module else base

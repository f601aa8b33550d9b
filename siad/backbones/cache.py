"""A disk cache of frozen-backbone features: computed once per image, read back by every later pass.

Training epochs, ablations and evaluation of the methods built on a frozen backbone all need the same
stage features of the same images. :class:`FeatureCache` stores them once, keyed so that a change of
anything that changes the features misses instead of returning stale numbers:

* **Namespace** (one folder per namespace): everything about *how* features are made -- backbone name,
  architecture, weights identity (pretrained tag, checkpoint file fingerprint, or the seed of a random
  init), input size, taps, feature options (ln_post / projection / attention variant), library versions.
  The namespace is canonicalised to JSON and hashed into the folder name (``<label>-<16 hex>``); the JSON
  is written inside the folder as ``namespace.json`` for humans. :func:`backbone_namespace` builds one
  from a :class:`~siad.backbones.registry.BackboneSpec`.
* **Key** (one file per image): *which* image -- by convention ``"<dataset>/<split>/<image path>"``
  (:func:`image_key`), hashed into the file name and stored inside the entry, so a hash collision or a
  misplaced file is detected.
* **Fingerprint** (optional, per image): the image file's identity (:func:`file_fingerprint`: size and
  mtime, or a content hash), so a replaced image misses although its path is the same.

Safety: every file is written to a unique temporary file in the same folder (``tempfile.mkstemp``, so
concurrent writers never share a name), flushed, fsynced and moved into place with ``os.replace``; an
interrupted run leaves at most a ``.tmp-*`` file, which is never read as an entry
(:meth:`FeatureCache.remove_temp_files` deletes old ones). Two processes computing the same entry both
write complete files and the last rename wins. An entry that cannot be read (truncated, corrupt, wrong
layout, another key inside) is recomputed and overwritten with a warning, never used.

Dtypes: entries keep each tensor's dtype (float32 features read back bit-exact). ``store_dtype=
torch.float16`` halves the disk size of floating tensors; they are then returned in their original dtype
*after* the float16 round trip, for freshly computed and cached images alike, so a first and a second pass
see identical numbers. Tensors are returned on the CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from torch import Tensor

from siad.backbones.registry import BackboneSpec
from siad.errors import ConfigError, SiadError
from siad.files import TEMP_PREFIX, atomic_write, file_fingerprint

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
NAMESPACE_FILE = "namespace.json"
ENTRY_SUFFIX = ".pt"

ComputeFn = Callable[[Sequence[int]], Mapping[str, Tensor]]


# -------------------------------------------------------------------------------------------- namespace


def _canonical(value: Any, where: str) -> Any:
    """``value`` as plain JSON types (tuples -> lists, paths and dtypes -> str); anything else is refused."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"feature cache namespace: {where} is {value}; use a finite number")
        return value
    if isinstance(value, np.generic):
        return _canonical(value.item(), where)
    if isinstance(value, PurePath | torch.dtype):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canonical(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"feature cache namespace: {where} has non-string keys; use string keys")
        return {k: _canonical(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(
        f"feature cache namespace: {where} has type {type(value).__name__}, which has no stable text form; "
        "use str/int/float/bool/None, lists or dicts of them"
    )


def canonical_namespace(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The namespace as canonical JSON-compatible data (what is hashed and written to ``namespace.json``)."""
    if not isinstance(namespace, Mapping) or not namespace:
        raise ConfigError("feature cache namespace must be a non-empty mapping (backbone, weights, size, taps, ...)")
    return _canonical(namespace, "namespace")


def _namespace_json(canonical: Mapping[str, Any]) -> str:
    return json.dumps({"format": CACHE_FORMAT_VERSION, "namespace": canonical}, sort_keys=True, indent=1)


def namespace_digest(namespace: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical namespace (and the cache format version)."""
    return hashlib.sha256(_namespace_json(canonical_namespace(namespace)).encode()).hexdigest()


def _label(namespace: Mapping[str, Any]) -> str:
    backbone = namespace.get("backbone")
    if isinstance(backbone, Mapping):
        backbone = backbone.get("name")
    text = backbone if isinstance(backbone, str) and backbone else "features"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:40]


def _weights_identity(spec: BackboneSpec, seed: int) -> dict[str, Any]:
    if spec.checkpoint is not None:
        path = Path(spec.checkpoint).expanduser()
        return {"checkpoint": str(path), "file": file_fingerprint(path)}
    random_init = getattr(spec, "random_init", spec.pretrained is None)
    if random_init:
        return {"random_init_seed": seed}
    return {"pretrained": spec.pretrained, "url": getattr(spec, "url", None)}


#: The code every cached feature passes through: the backbone layer (with its model configs) and image loading.
FEATURE_CODE = ("siad.backbones", "siad.data.imageio", "siad.data.loading")


def backbone_namespace(
    spec: BackboneSpec, *, taps: Sequence[int] | None = None, seed: int = 0, code_modules: Sequence[str] = (),
    **options: Any,
) -> dict[str, Any]:
    """The namespace of features from ``spec`` at ``taps`` (default: the spec's taps), with feature ``options``.

    Includes every field of the spec (architecture, size, GELU flavour, normalisation, URL, ...), the
    weights identity (pretrained tag/URL; checkpoint path + file fingerprint; or ``seed`` for random
    weights, where the seed decides the weights), the taps, the options (e.g. ``ln_post=True, proj=True,
    attention="vv"``), the torch / open_clip versions (their numerics can change between releases) and a
    hash of the code that computes the features: the backbone layer, image loading and ``code_modules``
    (the caller's own module, whose feature pass is part of what is cached). Changed code, changed
    namespace: a cache never hands back features of older code.
    """
    import open_clip

    from siad.code_hash import modules_hash

    if taps is None:
        taps = getattr(spec, "taps", ())
    return {
        "backbone": dataclasses.asdict(spec),
        "weights": _weights_identity(spec, seed),
        "taps": list(taps),
        "options": dict(options),
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        "code": modules_hash((*FEATURE_CODE, *code_modules)),
    }


def image_key(dataset: str, split: str, image_path: str | os.PathLike) -> str:
    """The conventional per-image cache key ``"<dataset>/<split>/<image path>"``."""
    return f"{dataset}/{split}/{Path(image_path).as_posix()}"


# ---------------------------------------------------------------------------------------------- storage


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


@dataclass
class CacheStats:
    """Counters for logging. ``stale`` and ``corrupt`` entries are also counted as misses."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    corrupt: int = 0
    written: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for metrics/log files)."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (
            f"feature cache: {self.hits} hits, {self.misses} misses ({self.stale} stale, {self.corrupt} corrupt), "
            f"{self.written} written"
        )


class _Unusable(Exception):
    """An entry file exists but must not be used (the message says why)."""


class FeatureCache:
    """Per-image tensors under ``root/<label>-<namespace hash>/``; see the module docstring for the keying.

    Args:
        root: the cache root (e.g. ``cache/features``); created on demand.
        namespace: everything that determines the features except the image (see :func:`backbone_namespace`).
        store_dtype: store floating tensors in this dtype (e.g. ``torch.float16``); None keeps each dtype.
    """

    def __init__(
        self, root: str | os.PathLike, namespace: Mapping[str, Any], *, store_dtype: torch.dtype | None = None
    ) -> None:
        if store_dtype is not None and not store_dtype.is_floating_point:
            raise ConfigError(f"feature cache: store_dtype {store_dtype} is not a floating dtype; use e.g. float16")
        # the storage dtype changes what is read back (float16 entries are rounded): part of the namespace, so a run
        # with another dtype never reads entries of this one
        stored = {"store_dtype": str(store_dtype).removeprefix("torch.")} if store_dtype is not None else {}
        self.namespace = canonical_namespace({**namespace, **stored})
        self.digest = namespace_digest(self.namespace)
        self.folder = Path(root) / f"{_label(self.namespace)}-{self.digest[:16]}"
        self.store_dtype = store_dtype
        self.cache_stats = CacheStats()
        self._write_namespace()

    # ---------------------------------------------------------------------------------------- namespace file

    def _write_namespace(self) -> None:
        """Write ``namespace.json``; an existing one must describe the same namespace (else: collision/edit)."""
        text = _namespace_json(self.namespace)
        path = self.folder / NAMESPACE_FILE
        if path.is_file():
            try:
                existing = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                warnings.warn(f"feature cache: unreadable {path} ({err}); rewriting it", stacklevel=3)
            else:
                if existing == json.loads(text):
                    return
                raise SiadError(
                    f"feature cache folder {self.folder} holds a different namespace ({path}); it was edited or "
                    "two namespaces collide. Delete the folder to rebuild it"
                )
        atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))

    # --------------------------------------------------------------------------------------------- entries

    def entry_path(self, key: str) -> Path:
        """Where the entry of ``key`` lives (sharded by the first two hex digits of its hash)."""
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.folder / "entries" / digest[:2] / f"{digest}{ENTRY_SUFFIX}"

    def _read(self, key: str, fingerprint: str | None) -> dict[str, Tensor] | None:
        """The cached tensors of ``key``, or None on a miss (absent, stale or unusable: counted and warned)."""
        path = self.entry_path(key)
        if not path.is_file():
            return None
        try:
            payload = self._load_payload(path)
            if payload.get("key") != key:
                raise _Unusable(f"it holds key {payload.get('key')!r}")
        except Exception as err:  # any unreadable entry is recomputed, never trusted
            self.cache_stats.corrupt += 1
            warnings.warn(
                f"feature cache: unusable entry {path} for {key!r} ({type(err).__name__}: {err}); recomputing it",
                stacklevel=3,
            )
            return None
        if fingerprint is not None and payload["fingerprint"] != fingerprint:
            self.cache_stats.stale += 1
            return None
        return payload["tensors"]

    @staticmethod
    def _load_payload(path: Path) -> dict[str, Any]:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT_VERSION:
            raise _Unusable("not an entry of this cache format")
        tensors, dtypes = payload.get("tensors"), payload.get("dtypes")
        if not isinstance(tensors, dict) or not isinstance(dtypes, dict) or set(tensors) != set(dtypes) or not tensors:
            raise _Unusable("malformed tensors/dtypes")
        if not all(isinstance(t, Tensor) for t in tensors.values()):
            raise _Unusable("non-tensor values")
        payload["tensors"] = {name: t.to(_dtype_from_name(dtypes[name])) for name, t in tensors.items()}
        return payload

    def _stored_form(self, tensor: Tensor) -> Tensor:
        tensor = tensor.detach().to("cpu").clone()  # clone: never save the storage of the whole batch
        if self.store_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.store_dtype)
        return tensor

    def _write(self, key: str, fingerprint: str | None, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Store one image's tensors; returns them exactly as a later read will (after any dtype round trip)."""
        stored = {name: self._stored_form(t) for name, t in tensors.items()}
        payload = {
            "format": CACHE_FORMAT_VERSION,
            "key": key,
            "fingerprint": fingerprint,
            "dtypes": {name: str(t.dtype) for name, t in tensors.items()},
            "tensors": stored,
        }
        atomic_write(self.entry_path(key), lambda handle: torch.save(payload, handle))
        self.cache_stats.written += 1
        return {name: stored[name].to(tensors[name].dtype) for name in tensors}

    # ---------------------------------------------------------------------------------------------- public

    def get_or_compute(
        self,
        keys: Sequence[str],
        compute: ComputeFn,
        *,
        fingerprints: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> dict[str, Tensor]:
        """Tensors for every key, stacked in ``keys`` order; only the missing ones are computed.

        Args:
            keys: unique per-image ids (:func:`image_key`).
            compute: called with positions into ``keys`` of the missing images (at most ``batch_size`` per
                call); returns a mapping name -> tensor with those images along dim 0.
            fingerprints: per-image file identity (:func:`file_fingerprint`); a changed one misses. None
                accepts any stored entry of the key.
            batch_size: largest number of images per ``compute`` call (None: all missing at once). Each
                batch is written before the next is computed, so an interrupted run keeps its progress.

        Returns:
            name -> tensor of shape ``[len(keys), ...]`` on the CPU; ``{}`` for no keys.
        """
        keys = list(keys)
        prints = self._check_arguments(keys, fingerprints, batch_size)
        found: list[dict[str, Tensor] | None] = [self._read(k, f) for k, f in zip(keys, prints, strict=True)]
        missing = [i for i, item in enumerate(found) if item is None]
        self.cache_stats.hits += len(keys) - len(missing)
        self.cache_stats.misses += len(missing)
        step = batch_size or max(len(missing), 1)
        for start in range(0, len(missing), step):
            positions = missing[start : start + step]
            batch = self._call_compute(compute, positions)
            for j, i in enumerate(positions):
                found[i] = self._write(keys[i], prints[i], {name: t[j] for name, t in batch.items()})
        return self._stack(keys, found)

    def remove_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files left by interrupted writes that are older than ``older_than_s``."""
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.folder.rglob(f"{TEMP_PREFIX}*"):
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # --------------------------------------------------------------------------------------------- helpers

    @staticmethod
    def _check_arguments(
        keys: list[str], fingerprints: Sequence[str] | None, batch_size: int | None
    ) -> list[str | None]:
        if not all(isinstance(k, str) and k for k in keys):
            raise SiadError("feature cache: every key must be a non-empty string (e.g. '<dataset>/<split>/<path>')")
        if len(set(keys)) != len(keys):
            dupes = sorted({k for k in keys if keys.count(k) > 1})[:5]
            raise SiadError(f"feature cache: duplicate keys {dupes}; each image must appear once per call")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"feature cache: batch_size must be >= 1, got {batch_size}")
        if fingerprints is None:
            return [None] * len(keys)
        if len(fingerprints) != len(keys):
            raise SiadError(f"feature cache: {len(fingerprints)} fingerprints for {len(keys)} keys; give one per key")
        return list(fingerprints)

    @staticmethod
    def _call_compute(compute: ComputeFn, positions: list[int]) -> Mapping[str, Tensor]:
        batch = compute(positions)
        if not isinstance(batch, Mapping) or not batch:
            raise SiadError(f"feature cache: compute must return a non-empty mapping name -> tensor, got {batch!r}")
        for name, tensor in batch.items():
            if not isinstance(tensor, Tensor) or tensor.dim() == 0 or tensor.shape[0] != len(positions):
                shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
                raise SiadError(
                    f"feature cache: compute returned {name!r} with shape {shape} for {len(positions)} images; "
                    "it must stack the requested images along dim 0"
                )
        return batch

    def _stack(self, keys: list[str], found: list[dict[str, Tensor] | None]) -> dict[str, Tensor]:
        """Stack per-image tensors; all images must have the same names, shapes and dtypes."""
        items = [item for item in found if item is not None]
        if len(items) != len(keys):
            raise SiadError("feature cache: internal error, an image was neither read nor computed")
        if not items:
            return {}
        reference = _layout(items[0])
        for key, item in zip(keys, items, strict=True):
            if _layout(item) != reference:
                raise SiadError(
                    f"feature cache {self.folder}: entry {key!r} has tensors {_layout(item)}, the first image "
                    f"{reference}. The namespace misses a setting that changes the features; add it to the "
                    "namespace (or delete the folder)"
                )
        return {name: torch.stack([item[name] for item in items]) for name in sorted(reference)}


def _layout(tensors: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}

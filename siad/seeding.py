"""Seeding and the device choice: the two pieces of process set-up that shape a run's numbers.

Kept apart from :mod:`siad.runtime` (logging and failure messages) so that the run specification can hash
this code (:data:`siad.engine.spec.EVALUATION_MODULES`) without a reworded error message rerunning every run.
Imports of numpy and torch are deferred so light steps start fast.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

from siad.errors import ConfigError


def derived_seed(seed: int, *names: str | int) -> int:
    """The seed of one component (a tensor, a stream) of a run seeded with ``seed``: a SHA-256 of (seed, names).

    Components get independent streams, and neighbouring run seeds share none: with ``seed + 1`` for a second tensor,
    training seed 0's second tensor would start as training seed 1's first.
    """
    import hashlib

    digest = hashlib.sha256(repr((int(seed), *names)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch and ask for deterministic kernels (same seed → same numbers)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


# --------------------------------------------------------------------------------------------
# device
# --------------------------------------------------------------------------------------------

_DEVICE = re.compile(r"cpu|auto|cuda(:[0-9]+)?")
DEVICE_FIX = "set `device: auto` (the GPU when one is visible, else the CPU) or `device: cpu` in the config, " \
             "or add --config device=cpu to the command"


def resolve_device(device: Any, *, key: str = "device") -> str:
    """The torch device of config value ``device``: ``auto`` → ``cuda`` when a GPU is visible, else ``cpu``.

    ``cuda`` / ``cuda:N`` are checked: without a visible GPU (or with fewer than N + 1) this raises a
    :class:`ConfigError` naming the config key ``key`` and the fix, instead of a CUDA error deep inside a job.
    Any other value is refused too.
    """
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ConfigError(f"{key}: {device!r} is not a device; use auto, cpu, cuda or cuda:N (N = GPU index)")
    if device == "cpu":
        return device
    import torch

    available = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if available else "cpu"
    if not available:
        why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
               else "PyTorch sees no GPU (no NVIDIA driver or device, or CUDA_VISIBLE_DEVICES hides them)")
        raise ConfigError(f"{key}: {device!r} asks for a GPU but {why}; {DEVICE_FIX.replace('device', key)}")
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"{key}: {device!r} but only {count} GPU(s) are visible (cuda:0 to cuda:{count - 1}); "
                          f"pick one of those, or {DEVICE_FIX.replace('device', key)}")
    return device

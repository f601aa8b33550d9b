"""Process-wide set-up shared by every workflow step: seeding, device choice, logging, clean errors.

Imports of numpy and torch are deferred so light steps (data preparation) start fast.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Callable
from typing import Any

from siad.errors import SiadError


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


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def run_step(step: Callable[[Any], None], smk: Any) -> None:
    """Run a workflow script body with its log file, turning suite errors into one clear message."""
    log_path = smk.log[0] if len(smk.log) else None
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w"))
    log_format = "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_format, handlers=handlers, force=True)
    try:
        step(smk)
    except SiadError as err:
        logging.getLogger("siad").error("%s: %s", type(err).__name__, err)
        sys.exit(1)

"""Anomaly-map post-processing shared by the methods (tensors in, tensors out).

- :func:`smooth_maps`: scipy's ``gaussian_filter`` per image at the input size, as the CLIP-family releases
  (AnomalyCLIP, AdaCLIP, FiLo) smooth their test maps (σ = 4; mode ``reflect``, truncate 4, float32 on the CPU).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import Tensor

__all__ = ["smooth_maps"]


def smooth_maps(maps: Tensor, sigma: float = 4.0) -> Tensor:
    """scipy ``gaussian_filter(sigma)`` (mode reflect, truncate 4) per image of [B, S, S], in float32 on the CPU.

    ``sigma`` ≤ 0 returns a float32 CPU copy unchanged.
    """
    array = maps.detach().to("cpu", torch.float32).numpy()
    if sigma <= 0:
        return torch.from_numpy(array.copy())
    return torch.from_numpy(np.stack([gaussian_filter(m, sigma=sigma) for m in array]))

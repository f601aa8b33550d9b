"""Test helper: a tiny training set in the engine's format, shared by the CLIP-family method tests.

Not a test file; load it by path (pytest runs in importlib mode), as the tests of AdaCLIP and FiLo do.
"""

from __future__ import annotations

import torch


def toy_images(n: int, seed: int, size: int) -> torch.Tensor:
    """n seeded N(0, 1) images [n, 3, size, size]."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class ToyData(torch.utils.data.Dataset):
    """n items: odd items anomalous with a square mask (brightened); the last ``n_pcb`` items are class pcb1, the
    others candle. ``valid=False`` marks the anomalies' masks as no pixel truth; ``anomalies=False``: all normal."""

    def __init__(self, n: int = 6, name: str = "visa", valid: bool = True, anomalies: bool = True, *,
                 size: int = 112, n_pcb: int = 2) -> None:
        self.n, self.name, self.valid, self.anomalies, self.size = n, name, valid, anomalies, size
        self.records = [{"cls_name": "candle" if i < n - n_pcb else "pcb1"} for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        image = toy_images(1, 100 + i, self.size)[0]
        mask = torch.zeros(self.size, self.size, dtype=torch.bool)
        anomalous = self.anomalies and i % 2 == 1
        if anomalous:
            mask[20:60, 30:70] = True
            image[:, 20:60, 30:70] += 2.0
        return {"image": image, "mask": mask, "label": int(anomalous), "cls_name": self.records[i]["cls_name"],
                "img_path": f"img{i}.png", "image_sha256": "", "mask_valid": self.valid or not anomalous}

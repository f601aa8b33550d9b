"""Colour distance: a training-free anomaly map with numpy and Pillow only — the worked example of an external baseline.

Each pixel's anomaly is its (box-blurred) colour's distance to the image's median colour, in units of the image's
median absolute deviation; the image score is the mean of the top 1 % of the map. It reads the target's meta.json
(the suite's index of the dataset) and writes the suite's prediction format (siad/engine/external.py):
``img_paths`` (each test image's meta.json img_path), ``scores`` [N] and ``maps`` [N, H, W] (float32).
"""

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

MAP_SIDE = 64  # the maps' resolution; the suite resizes them to its evaluation size


def anomaly_map(image: Image.Image, blur: int) -> np.ndarray:
    """[MAP_SIDE, MAP_SIDE] float32: distance of each blurred pixel's colour to the median colour, MAD-normalised."""
    small = image.convert("RGB").resize((MAP_SIDE, MAP_SIDE), Image.BILINEAR)
    if blur > 0:
        small = small.filter(ImageFilter.BoxBlur(blur))
    pixels = np.asarray(small, dtype=np.float32) / 255.0
    distance = np.linalg.norm(pixels - np.median(pixels.reshape(-1, 3), axis=0), axis=-1)
    spread = np.median(np.abs(distance - np.median(distance))) + 1e-6
    return (distance / spread).astype(np.float32)


def top_mean(values: np.ndarray, fraction: float = 0.01) -> float:
    """Mean of the largest ``fraction`` of ``values`` (at least one)."""
    flat = np.sort(values.reshape(-1))
    return float(flat[-max(1, int(len(flat) * fraction)):].mean())


def main(meta_file: str, root: str, out_file: str, blur: int, log_file: str | None = None) -> None:
    meta = json.loads(Path(meta_file).read_text())
    records = [r for cls in sorted(meta["test"]) for r in meta["test"][cls]]
    paths, scores, maps = [], [], []
    for record in records:
        with Image.open(Path(root) / record["img_path"]) as image:
            amap = anomaly_map(image, blur)
        paths.append(record["img_path"])
        maps.append(amap)
        scores.append(top_mean(amap))
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".external.", suffix=".npz")  # written whole, then renamed
    with os.fdopen(fd, "wb") as handle:
        np.savez(handle, img_paths=np.array(paths, dtype=str), scores=np.array(scores, dtype=np.float32),
                 maps=np.stack(maps) if maps else np.zeros((0, MAP_SIDE, MAP_SIDE), np.float32))
    os.replace(tmp, out)
    if log_file:
        Path(log_file).write_text(f"colour distance (blur {blur}): {len(paths)} test images of {meta_file} -> {out}\n")


if "snakemake" in globals():
    smk = snakemake  # noqa: F821 (injected by Snakemake)
    main(smk.input.meta, smk.params.root, smk.output.predictions, int(smk.params.method.get("blur", 2)), smk.log[0])

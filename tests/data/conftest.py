"""Tiny native layouts of the nine datasets, each with the pitfalls the converters must survive.

Test modules reach the builders and constants through the ``layouts`` fixture (the suite runs with
``--import-mode=importlib``, so ``conftest`` cannot be imported). Images are 16x16 (SDD parts 8 wide
x 31 high) with seeded random content. Mask files encode which image they belong to: the mask of
``<n>.png`` has exactly ``n + 1`` anomalous pixels, so a test can tell a by-name pairing from a
by-index one.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

SIZE = 16


def write_image(path: Path, mode: str = "RGB", seed: int = 0, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    """Random image of PIL ``size`` (width, height) in ``mode``; the format follows the suffix."""
    rng = np.random.default_rng(seed)
    w, h = size
    shape = (h, w, 4) if mode == "RGBA" else (h, w, 3) if mode == "RGB" else (h, w)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    if mode == "P":
        image = image.convert("RGB").convert("P")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_mask(path: Path, n_on: int, value: int = 255, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    """Mask with its first ``n_on`` pixels (row-major) set to ``value``."""
    arr = np.zeros(size[1] * size[0], dtype=np.uint8)
    arr[:n_on] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.reshape(size[1], size[0])).save(path)
    return path


def mvtec_class(class_dir: Path, defects: dict[str, list[int]], n_train: int = 3, n_good: int = 2,
                mode: str = "RGB", normal: str = "good", img_ext: str = ".png",
                mask_ext: str = ".png", mask_suffix: str = "_mask") -> None:
    """One MVTec-style class: ``defects`` maps a defect folder to the integer stems of its images."""
    for i in range(n_train):
        write_image(class_dir / "train" / normal / f"{i:03d}{img_ext}", mode, seed=i)
    for i in range(n_good):
        write_image(class_dir / "test" / normal / f"{i:03d}{img_ext}", mode, seed=100 + i)
    for defect, stems in defects.items():
        for n in stems:
            write_image(class_dir / "test" / defect / f"{n}{img_ext}", mode, seed=200 + n)
            write_mask(class_dir / "ground_truth" / defect / f"{n}{mask_suffix}{mask_ext}", n + 1)


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """bottle (RGB; stems 1, 10, 2 whose sorted mask names do not align) + grid (grayscale) + root txt files."""
    root = tmp_path / "mvtec"
    mvtec_class(root / "bottle", {"broken_large": [1, 10, 2], "contamination": [0]})
    mvtec_class(root / "grid", {"bent": [3]}, n_train=2, n_good=1, mode="L")
    (root / "license.txt").write_text("CC BY-NC-SA 4.0")
    (root / "readme.txt").write_text("MVTec AD")
    return root


@pytest.fixture
def mpdd_root(tmp_path: Path) -> Path:
    root = tmp_path / "mpdd"
    mvtec_class(root / "tubes", {"anomalous": [0, 1]})
    return root


@pytest.fixture
def dtd_root(tmp_path: Path) -> Path:
    """The doubly nested Drive layout ``DTD-Synthetic/DTD-Synthetic/<Texture_NNN>``, anomaly folder ``bad``."""
    root = tmp_path / "dtd"
    level = root / "DTD-Synthetic" / "DTD-Synthetic"
    mvtec_class(level / "Blotchy_099", {"bad": [0, 1, 2]})
    mvtec_class(level / "Woven_001", {"bad": [4]}, n_good=1)
    return root


VISA_ROWS = [  # object, split, label, image stem, anomalous
    ("candle", "train", "normal", "0000"), ("candle", "train", "normal", "0001"),
    ("candle", "test", "normal", "0002"), ("candle", "test", "normal", "0003"),
    ("candle", "test", "anomaly", "000"), ("candle", "test", "anomaly", "001"),
    ("pcb1", "test", "normal", "0000"), ("pcb1", "test", "anomaly", "000"),
]


@pytest.fixture
def visa_root(tmp_path: Path) -> Path:
    """Upper-case .JPG images, id-valued masks (values 1 and 2, never 255) and ``split_csv/1cls.csv``."""
    root = tmp_path / "visa"
    lines = ["object,split,label,image,mask"]
    for k, (obj, split, label, stem) in enumerate(VISA_ROWS):
        kind = "Anomaly" if label == "anomaly" else "Normal"
        image = f"{obj}/Data/Images/{kind}/{stem}.JPG"
        write_image(root / image, seed=k)
        mask = ""
        if label == "anomaly":
            mask = f"{obj}/Data/Masks/Anomaly/{stem}.png"
            write_mask(root / mask, 5 + k, value=1 + k % 2)
        lines.append(f"{obj},{split},{label},{image},{mask}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    (root / "candle" / "image_anno.csv").write_text("image,label,mask\n")
    return root


KSDD_SIZE = (8, 31)  # width, height: thirds are rows [0:10], [10:20], [20:31]
KSDD_DEFECTS = {("kos01", "Part1"): (12, 15), ("kos02", "Part2"): (25, 28)}  # label rows -> thirds 1 and 2


@pytest.fixture
def ksdd_root(tmp_path: Path) -> Path:
    """Raw KolektorSDD: 3 kos folders x 3 parts; two defective parts; stray files to be ignored."""
    root = tmp_path / "sdd"
    raw = root / "KolektorSDD"
    for k in range(1, 4):
        for p in range(3):
            kos, part = f"kos{k:02d}", f"Part{p}"
            write_image(raw / kos / f"{part}.jpg", "L", seed=10 * k + p, size=KSDD_SIZE)
            label = np.zeros(KSDD_SIZE[::-1], dtype=np.uint8)
            if (kos, part) in KSDD_DEFECTS:
                top, bottom = KSDD_DEFECTS[kos, part]
                label[top:bottom, 2:5] = 255
            Image.fromarray(label).save(raw / kos / f"{part}_label.bmp")
    (raw / "kos01" / "Thumbs.db").write_bytes(b"junk")
    (raw / "readme.txt").write_text("stray file directly under KolektorSDD/")
    return root


@pytest.fixture
def btad_root(tmp_path: Path) -> Path:
    """01: BMP images + PNG masks; 02: PNG + PNG; 03: BMP + BMP (masks named by the image stem)."""
    root = tmp_path / "btad"
    level = root / "BTech_Dataset_transformed"
    for cls, img_ext, mask_ext in (("01", ".bmp", ".png"), ("02", ".png", ".png"), ("03", ".bmp", ".bmp")):
        mvtec_class(level / cls, {"ko": [0, 1]}, n_train=2, n_good=1, normal="ok", img_ext=img_ext,
                    mask_ext=mask_ext, mask_suffix="")
    return root


BRAIN_YES = ["Y1.jpg", "Y 2.JPG", "y3.png"]
BRAIN_NO = ["1 no.jpeg", "N5.jpg", "no 9.png"]  # the third file of each list is mode P (PNG)


@pytest.fixture
def brainmri_root(tmp_path: Path) -> Path:
    """``brain_tumor_dataset/{yes,no}`` with spaces and mixed suffixes/modes, plus duplicate top-level copies."""
    root = tmp_path / "brainmri"
    modes = ["L", "RGB", "P"]
    for offset, (label, names) in enumerate((("yes", BRAIN_YES), ("no", BRAIN_NO))):
        for i, name in enumerate(names):
            seed = 10 * offset + i  # distinct content: no image is a copy of another
            write_image(root / "brain_tumor_dataset" / label / name, modes[i % 3], seed=seed)
            if i < 2:
                write_image(root / label / name, modes[i % 3], seed=seed)
    return root


HEADCT_LABELS = {i: int(i < 4) for i in range(8)}  # ids 0-3 hemorrhage, 4-7 normal


@pytest.fixture
def headct_root(tmp_path: Path) -> Path:
    """``labels.csv`` with the leading-space header and ``head_ct/head_ct/NNN.png``, some RGBA."""
    root = tmp_path / "headct"
    rows = "".join(f"{i},{v}\n" for i, v in HEADCT_LABELS.items())
    root.mkdir()
    (root / "labels.csv").write_text("id, hemorrhage\n" + rows)
    for i in HEADCT_LABELS:
        write_image(root / "head_ct" / "head_ct" / f"{i:03d}.png", "RGBA" if i % 3 == 0 else "RGB", seed=i)
    return root


@pytest.fixture
def br35h_root(tmp_path: Path) -> Path:
    """``yes/`` (3), ``no/`` (4), the unlabelled ``pred/`` and a stale ``meta.json`` in the root."""
    root = tmp_path / "br35h"
    for i in range(3):
        write_image(root / "yes" / f"y{i}.jpg", seed=i)
    for i in range(4):
        write_image(root / "no" / f"no{i}.jpg", seed=10 + i)
    for i in range(2):
        write_image(root / "pred" / f"pred{i}.jpg", seed=20 + i)
    (root / "meta.json").write_text("{}")
    return root


@pytest.fixture
def layouts() -> SimpleNamespace:
    """Builders and constants of this module for the tests."""
    return SimpleNamespace(write_image=write_image, write_mask=write_mask, mvtec_class=mvtec_class,
                           VISA_ROWS=VISA_ROWS, KSDD_SIZE=KSDD_SIZE, KSDD_DEFECTS=KSDD_DEFECTS,
                           BRAIN_YES=BRAIN_YES, BRAIN_NO=BRAIN_NO, HEADCT_LABELS=HEADCT_LABELS)

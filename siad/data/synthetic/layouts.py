"""Writers of the nine native on-disk layouts (as after extracting the real archives).

Each writer puts files under a root exactly where the real dataset has them, with the real naming,
extensions, image modes and pitfalls (spec ``datasets.md`` sections B and D), so the converters in
:mod:`siad.data.registry` run unchanged on a stand-in. :func:`expected_counts` gives the per-class
counts the converters must find with their default options (SDD ``adaclip_thirds``, medical
``all_test``).
"""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from siad.data.synthetic import catalog
from siad.data.synthetic.common import binary_mask, derive_rng, save_image
from siad.data.synthetic.defects import apply_defect
from siad.data.synthetic.medical import render_scan


@dataclass(frozen=True)
class Request:
    """Validated arguments of one stand-in (see :func:`siad.data.synthetic.write_standin`)."""

    name: str
    seed: int
    classes: tuple[str, ...]
    n_train: int
    n_test_normal: int
    n_test_anomalous: int
    size: int

    def rng(self, *keys: str | int) -> np.random.Generator:
        """The generator of one image (or decision) of this stand-in."""
        return derive_rng(self.seed, self.name, *keys)

    def sample(self, cls: str, split: str, index: int, h: int, w: int, *, gray: bool = False,
               defect_kind: str | None = None) -> catalog.Sample:
        """Render image ``index`` of ``split`` of ``cls`` (anomalous iff ``defect_kind`` is given)."""
        return catalog.render_sample(self.name, cls, h, w, self.seed, self.rng(cls, split, index), gray=gray,
                                     defect_kind=defect_kind)

    def anomalies(self, cls: str) -> Iterator[tuple[int, str, str]]:
        """``(index, category name, defect kind)`` of each anomalous test image, categories round-robin."""
        categories = catalog.defect_categories(self.name, cls)
        for i in range(self.n_test_anomalous):
            yield (i, *categories[i % len(categories)])


# --------------------------------------------------------------------------------------------------
# MVTec-style folders: MVTec AD, MPDD, DTD-Synthetic, BTAD
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FolderStyle:
    """Naming of an MVTec-style class folder: normal dir, digits, extensions and mask suffix."""

    normal_dir: str = "good"
    digits: int = 3
    image_ext: str = ".png"
    mask_ext: str = ".png"
    mask_suffix: str = "_mask"


def _write_mvtec_like(cls_dir: Path, req: Request, cls: str, style: FolderStyle, *, h: int, w: int,
                      gray: bool = False) -> None:
    """``train/<normal>``, ``test/<normal>``, ``test/<defect>`` and ``ground_truth/<defect>`` of one class."""
    def stem(k: int) -> str:
        return f"{k:0{style.digits}d}"

    for split, n in (("train", req.n_train), ("test", req.n_test_normal)):
        for i in range(n):
            save_image(req.sample(cls, split, i, h, w, gray=gray).image,
                       cls_dir / split / style.normal_dir / f"{stem(i)}{style.image_ext}")
    per_dir: Counter[str] = Counter()
    for i, defect_dir, kind in req.anomalies(cls):
        k = per_dir[defect_dir]
        per_dir[defect_dir] += 1
        s = req.sample(cls, "anomaly", i, h, w, gray=gray, defect_kind=kind)
        save_image(s.image, cls_dir / "test" / defect_dir / f"{stem(k)}{style.image_ext}")
        mask_name = f"{stem(k)}{style.mask_suffix}{style.mask_ext}"
        save_image(binary_mask(s.mask), cls_dir / "ground_truth" / defect_dir / mask_name)


_README = ("Synthetic stand-in of {title}, generated procedurally by siad.data.synthetic for the offline demo.\n"
           "It mimics the folder layout of the real dataset only; it contains none of its images.\n"
           "The real dataset is distributed under {licence}.\n")


def write_mvtec(root: Path, req: Request) -> None:
    """``<cls>/...`` at the root (the archive extracts flat) plus ``license.txt`` and ``readme.txt``;
    grid, screw and zipper are grayscale (mode L) as in the real set."""
    for cls in req.classes:
        _write_mvtec_like(root / cls, req, cls, FolderStyle(), h=req.size, w=req.size,
                          gray=cls in catalog.GRAYSCALE_MVTEC)
    text = _README.format(title="MVTec AD", licence="CC BY-NC-SA 4.0")
    (root / "license.txt").write_text(text)
    (root / "readme.txt").write_text(text)


def write_mpdd(root: Path, req: Request) -> None:
    """MVTec-identical class folders at the root, RGB PNG."""
    for cls in req.classes:
        _write_mvtec_like(root / cls, req, cls, FolderStyle(), h=req.size, w=req.size)


DTD_FOLDER = "DTD-Synthetic"


def write_dtd(root: Path, req: Request) -> None:
    """``DTD-Synthetic/<Texture_NNN>/{train/good, test/{good,bad}, ground_truth/bad/NNN_mask.png}``.

    This is the tree inside the Drive zip, extracted into ``root`` (one ``DTD-Synthetic`` level);
    users who extract into a folder already called ``DTD-Synthetic`` get two levels, which the
    converter also accepts.
    """
    for cls in req.classes:
        _write_mvtec_like(root / DTD_FOLDER / cls, req, cls, FolderStyle(), h=req.size, w=req.size)


BTAD_FOLDER = "BTech_Dataset_transformed"
# Real BTAD: 01 BMP images / PNG masks (square), 02 PNG / PNG (square), 03 BMP / BMP (800x600, 4:3).
_BTAD_STYLES = {
    "01": (FolderStyle("ok", 4, ".bmp", ".png", ""), 1.0),
    "02": (FolderStyle("ok", 4, ".png", ".png", ""), 1.0),
    "03": (FolderStyle("ok", 4, ".bmp", ".bmp", ""), 4 / 3),
}


def write_btad(root: Path, req: Request) -> None:
    """``BTech_Dataset_transformed/{01,02,03}/{train/ok, test/{ok,ko}, ground_truth/ko}``, masks named by image stem."""
    for cls in req.classes:
        style, aspect = _BTAD_STYLES[cls]
        _write_mvtec_like(root / BTAD_FOLDER / cls, req, cls, style, h=req.size, w=round(req.size * aspect))


# --------------------------------------------------------------------------------------------------
# VisA
# --------------------------------------------------------------------------------------------------
VISA_ASPECT = 1.5  # VisA photos are landscape (~1.5k x 1k)
_SPLIT_COLUMNS = ("object", "split", "label", "image", "mask")


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_visa_class(root: Path, req: Request, cls: str) -> list[tuple[str, ...]]:
    """Images, id-valued masks and ``image_anno.csv`` of one class; returns its ``1cls.csv`` rows."""
    h, w = req.size, round(req.size * VISA_ASPECT)
    n_normal = req.n_train + req.n_test_normal
    test_normals = set(req.rng(cls, "split").permutation(n_normal)[: req.n_test_normal].tolist())
    split_rows, anno_rows = [], []
    for i in range(n_normal):
        rel = f"{cls}/Data/Images/Normal/{i:04d}.JPG"
        save_image(req.sample(cls, "normal", i, h, w).image, root / rel)
        split_rows.append((cls, "test" if i in test_normals else "train", "normal", rel, ""))
        anno_rows.append((rel, "normal", ""))
    categories = [name for name, _ in catalog.defect_categories(req.name, cls)]
    for i, description, kind in req.anomalies(cls):
        rel, mask_rel = f"{cls}/Data/Images/Anomaly/{i:03d}.JPG", f"{cls}/Data/Masks/Anomaly/{i:03d}.png"
        s = req.sample(cls, "anomaly", i, h, w, defect_kind=kind)
        save_image(s.image, root / rel)
        save_image(binary_mask(s.mask, value=categories.index(description) + 1), root / mask_rel)  # class ids
        split_rows.append((cls, "test", "anomaly", rel, mask_rel))
        anno_rows.append((rel, description, mask_rel))
    _write_csv(root / cls / "image_anno.csv", ("image", "label", "mask"), anno_rows)
    return split_rows


def write_visa(root: Path, req: Request) -> None:
    """``<cls>/Data/{Images/{Normal,Anomaly}/*.JPG, Masks/Anomaly/*.png}``, ``<cls>/image_anno.csv`` and
    ``split_csv/{1cls,2cls_fewshot,2cls_highshot}.csv``.

    ``1cls.csv`` is the protocol file (train: normals only; test: normals and all anomalies). The two
    ``2cls`` files exist because the real archive has them; their split here is an approximation
    (half / one of each class's anomalies moved to train) — no protocol of this suite reads them.
    """
    rows = [row for cls in req.classes for row in _write_visa_class(root, req, cls)]
    _write_csv(root / "split_csv" / "1cls.csv", _SPLIT_COLUMNS, rows)
    for filename, share in (("2cls_highshot.csv", 0.5), ("2cls_fewshot.csv", 0.0)):
        _write_csv(root / "split_csv" / filename, _SPLIT_COLUMNS, _two_class_split(rows, share))


def _two_class_split(rows: list[tuple[str, ...]], share: float) -> list[tuple[str, ...]]:
    """Move ``share`` of each class's anomalies (at least one) from test to train."""
    out, moved = [], Counter()
    totals = Counter(r[0] for r in rows if r[2] == "anomaly")
    for obj, split, label, image, mask in rows:
        if label == "anomaly" and moved[obj] < max(1, int(totals[obj] * share)):
            moved[obj] += 1
            split = "train"
        out.append((obj, split, label, image, mask))
    return out


# --------------------------------------------------------------------------------------------------
# KolektorSDD (KSDD1), raw
# --------------------------------------------------------------------------------------------------
KSDD_FOLDER = "KolektorSDD"
KSDD_ASPECT = 2.5  # tall images (~500 x 1240)
KSDD_PARTS_PER_FOLDER = 8


@dataclass(frozen=True)
class KsddPart:
    """One commutator image ``kosNN/PartK.jpg``; ``defect_third`` is the third holding its defect, if any."""

    folder: str
    part: int
    defect_third: int | None

    def third_name(self, third: int) -> str:
        """The converter's name of a third: ``kosNN_PartK_{0,1,2}``."""
        return f"{self.folder}_Part{self.part}_{third}"


def ksdd_plan(req: Request) -> list[KsddPart]:
    """Which parts exist and which are defective.

    Each defective part contributes one anomalous and two normal thirds, so ``n_test_anomalous``
    defective parts are drawn, plus enough defect-free parts that about ``n_train + n_test_normal``
    normal thirds exist (the converter then puts 25 % of them into the test split). Parts are spread
    over at least two ``kosNN`` folders of at most eight parts each.
    """
    n_def = req.n_test_anomalous
    n_ok = int(np.ceil(max(0, req.n_train + req.n_test_normal - 2 * n_def) / 3))
    total = n_def + n_ok
    rng = req.rng(catalog.SDD_CLASS, "plan")
    defective = set(rng.permutation(total)[:n_def].tolist())
    n_folders = max(2, int(np.ceil(total / KSDD_PARTS_PER_FOLDER))) if total > 1 else 1
    parts = []
    for k in range(total):
        folder, part = f"kos{k % n_folders + 1:02d}", k // n_folders
        parts.append(KsddPart(folder, part, int(rng.integers(0, 3)) if k in defective else None))
    return sorted(parts, key=lambda p: (p.folder, p.part))


def ksdd_third_bounds(h: int) -> list[tuple[int, int]]:
    """Row ranges of the three thirds, exactly as the converter cuts them (``[:h//3]``, ...)."""
    return [(0, h // 3), (h // 3, 2 * h // 3), (2 * h // 3, h)]


def write_sdd(root: Path, req: Request) -> None:
    """``KolektorSDD/kosNN/PartK.jpg`` (grayscale) + ``PartK_label.bmp`` (0 everywhere for defect-free parts).

    A defect is drawn inside one third (away from its borders), so exactly that third is anomalous.
    """
    cls = catalog.SDD_CLASS
    h, w = round(req.size * KSDD_ASPECT), req.size
    for p in ksdd_plan(req):
        s = req.sample(cls, p.folder, p.part, h, w, gray=True)
        image, label = s.image, np.zeros((h, w), bool)
        if p.defect_third is not None:
            image, label = _defect_in_third(req, p, image)
        folder = root / KSDD_FOLDER / p.folder
        save_image(image, folder / f"Part{p.part}.jpg")
        save_image(binary_mask(label), folder / f"Part{p.part}_label.bmp")


def _defect_in_third(req: Request, part: KsddPart, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint a defect on a band strictly inside ``part.defect_third``; return image and full-size label."""
    h = image.shape[0]
    top, bottom = ksdd_third_bounds(h)[part.defect_third]
    margin = max(2, (bottom - top) // 8)
    band = image[top + margin : bottom - margin]
    rng = req.rng(catalog.SDD_CLASS, part.folder, part.part, "defect")
    kind = catalog.defect_categories("sdd", catalog.SDD_CLASS)[part.part % 2][1]
    defective, band_mask = apply_defect(band, kind, rng, region=np.ones(band.shape[:2], bool),
                                        background=np.zeros_like(band))
    out, label = image.copy(), np.zeros(image.shape[:2], bool)
    out[top + margin : bottom - margin] = defective
    label[top + margin : bottom - margin] = band_mask
    return out, label


def sdd_counts(req: Request) -> tuple[int, tuple[int, int]]:
    """(train, (test normal, test anomalous)) thirds after the ``adaclip_thirds`` conversion.

    Mirrors the converter: anomalous thirds all go to test; the sorted normal third names are split
    with the converter's own :func:`~siad.data.converters.common.split_normals` (stand-in pieces are all
    distinct, so the converter's grouping of identical pieces changes nothing here).
    """
    from siad.data.converters.common import split_normals

    parts = ksdd_plan(req)
    anomalous = sum(p.defect_third is not None for p in parts)
    normal = sorted(p.third_name(t) for p in parts for t in range(3) if t != p.defect_third)
    train, test = split_normals(normal)
    return len(train), (len(test), anomalous)


# --------------------------------------------------------------------------------------------------
# Medical sets (image labels only)
# --------------------------------------------------------------------------------------------------
def _scan_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """Real medical images vary in size: each side drawn from [0.75, 1] x ``size``."""
    return int(rng.integers(int(0.75 * size), size + 1)), int(rng.integers(int(0.75 * size), size + 1))


def _write_scans(req: Request, key: str, n: int, modality: str, path_of: Callable[[int], Path],
                 mode_of: Callable[[int, Path], str], lesion_of: Callable[[int], bool]) -> list[Path]:
    """Write ``n`` scans: scan ``i`` goes to ``path_of(i)`` in mode ``mode_of(i, path)``, with a lesion
    iff ``lesion_of(i)``. Returns the paths."""
    paths = []
    for i in range(n):
        rng = req.rng(key, i)
        h, w = _scan_size(rng, req.size)
        path = path_of(i)
        save_image(render_scan(h, w, rng, modality, lesion_of(i)), path, mode=mode_of(i, path))
        paths.append(path)
    return paths


def _rgb(_i: int, _path: Path) -> str:
    return "RGB"


BRAINMRI_FOLDER = "brain_tumor_dataset"
# Real file names mix cases, extensions and spaces: Y1.jpg, Y2.JPG, "1 no.jpeg", "no 9.png", N1.JPG ...
_BRAIN_NAMES = {"yes": ("Y{n}.jpg", "Y{n}.JPG", "Y{n}.jpg", "Y{n}.png"),
                "no": ("{n} no.jpeg", "no {n}.png", "N{n}.JPG", "No{n}.jpg")}
BRAINMRI_DUPLICATES = 2  # files of each label also present in the duplicate top-level yes/ and no/


def _brain_mode(i: int, path: Path) -> str:
    """Mixed modes as in the real set: palette PNGs, grayscale and RGB JPEGs."""
    return "P" if path.suffix.lower() == ".png" else ("L" if i % 2 else "RGB")


def write_brainmri(root: Path, req: Request) -> None:
    """``brain_tumor_dataset/{yes,no}/`` plus a duplicate top-level ``yes/``, ``no/`` holding copies of a few."""
    for label, n in (("yes", req.n_test_anomalous), ("no", req.n_test_normal)):
        names = _BRAIN_NAMES[label]
        paths = _write_scans(req, label, n, "mri",
                             lambda i, label=label, names=names: root / BRAINMRI_FOLDER / label
                             / names[i % len(names)].format(n=i + 1),
                             _brain_mode, lambda _i, label=label: label == "yes")
        for src in paths[:BRAINMRI_DUPLICATES]:
            (root / label).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / label / src.name)


HEADCT_IMAGES = Path("head_ct") / "head_ct"
HEADCT_RGBA_EVERY = 8  # about 6 % of the real images are RGBA


def _headct_mode(i: int, _path: Path) -> str:
    return "RGBA" if i % HEADCT_RGBA_EVERY == HEADCT_RGBA_EVERY - 1 else "RGB"


def write_headct(root: Path, req: Request) -> None:
    """``labels.csv`` (header ``id, hemorrhage`` with its leading space; haemorrhage ids first, as in the
    real file) and ``head_ct/head_ct/NNN.png``, mostly RGB, some RGBA."""
    n_anom, n_total = req.n_test_anomalous, req.n_test_anomalous + req.n_test_normal
    _write_scans(req, "scan", n_total, "ct", lambda i: root / HEADCT_IMAGES / f"{i:03d}.png", _headct_mode,
                 lambda i: i < n_anom)
    lines = ["id, hemorrhage"] + [f"{i},{int(i < n_anom)}" for i in range(n_total)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def br35h_pred_count(req: Request) -> int:
    """Unlabelled ``pred/`` images (60 of 3060 in the real set; here a quarter of the labelled, >= 2)."""
    return max(2, (req.n_test_normal + req.n_test_anomalous) // 4)


def write_br35h(root: Path, req: Request) -> None:
    """``yes/yN.jpg`` (tumour), ``no/noN.jpg`` and the unlabelled ``pred/predN.jpg`` that converters must skip."""
    _write_scans(req, "yes", req.n_test_anomalous, "mri", lambda i: root / "yes" / f"y{i}.jpg", _rgb, lambda _i: True)
    _write_scans(req, "no", req.n_test_normal, "mri", lambda i: root / "no" / f"no{i}.jpg", _rgb, lambda _i: False)
    lesions = req.rng("pred", "labels").random(br35h_pred_count(req)) < 0.5
    _write_scans(req, "pred", len(lesions), "mri", lambda i: root / "pred" / f"pred{i}.jpg", _rgb,
                 lambda i: bool(lesions[i]))


WRITERS: dict[str, Callable[[Path, Request], None]] = {
    "mvtec": write_mvtec, "visa": write_visa, "mpdd": write_mpdd, "dtd": write_dtd, "sdd": write_sdd,
    "btad": write_btad, "brainmri": write_brainmri, "headct": write_headct, "br35h": write_br35h,
}
MEDICAL = frozenset({"brainmri", "headct", "br35h"})


def expected_counts(req: Request) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """Per class: train count and (test normal, test anomalous) the converters' default options yield.

    Medical sets put every image in test (``all_test``), so their train count is 0.
    """
    if req.name == "sdd":
        n_train, test = sdd_counts(req)
        return {catalog.SDD_CLASS: n_train}, {catalog.SDD_CLASS: test}
    n_train = 0 if req.name in MEDICAL else req.n_train
    return ({c: n_train for c in req.classes}, {c: (req.n_test_normal, req.n_test_anomalous) for c in req.classes})

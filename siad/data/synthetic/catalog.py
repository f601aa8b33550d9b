"""What each class of each stand-in looks like and which defects it gets.

The class lists come from the dataset registry (the real class names of the nine datasets). Every class maps
to a material (:class:`TextureStyle`) or a product drawing (object recipe) and to its defect
categories: ``(name on disk or in the annotation, defect kind)``. Defect directory names are real
ones of MVTec AD / MPDD (two per class at most, to keep the demo small).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from siad.data.registry import DATASETS as _REGISTRY
from siad.data.synthetic import objects as ob
from siad.data.synthetic.common import add_sensor_noise, derive_rng, to_gray, to_uint8
from siad.data.synthetic.defects import apply_defect
from siad.data.synthetic.textures import TextureStyle, render_texture

# The real class keys, straight from the dataset registry (the converters write these into meta.json).
DATASET_CLASSES: dict[str, tuple[str, ...]] = {name: _REGISTRY.get(name).classes for name in _REGISTRY.names()}
BTAD_CLASSES = DATASET_CLASSES["btad"]
(SDD_CLASS,) = DATASET_CLASSES["sdd"]
(BRAINMRI_CLASS,) = DATASET_CLASSES["brainmri"]
(HEADCT_CLASS,) = DATASET_CLASSES["headct"]
(BR35H_CLASS,) = DATASET_CLASSES["br35h"]
# A mix of textures and objects where the dataset has both.
DEFAULT_CLASSES: dict[str, tuple[str, ...]] = {
    "mvtec": ("bottle", "carpet", "screw"), "visa": ("candle", "macaroni2", "pcb1"),
    "mpdd": ("bracket_black", "metal_plate", "tubes"), "dtd": ("Blotchy_099", "Mesh_114", "Woven_001"),
    "sdd": (SDD_CLASS,), "btad": BTAD_CLASSES, "brainmri": (BRAINMRI_CLASS,), "headct": (HEADCT_CLASS,),
    "br35h": (BR35H_CLASS,),
}
GRAYSCALE_MVTEC = frozenset({"grid", "screw", "zipper"})

_T = TextureStyle
TEXTURES: dict[tuple[str, str], TextureStyle] = {
    ("mvtec", "carpet"): _T("weave", (95, 85, 75), (165, 150, 135), {"period": 2.0}),
    ("mvtec", "grid"): _T("grid", (30, 30, 30), (170, 170, 170), {"period": 6.0, "width": 1.6, "angle": 8.0}),
    ("mvtec", "leather"): _T("cells", (95, 55, 30), (160, 105, 65), {"cell": 12.0}),
    ("mvtec", "tile"): _T("speckle", (120, 120, 115), (215, 210, 200), {"cell": 16.0}),
    ("mvtec", "wood"): _T("stripes", (110, 70, 40), (185, 135, 85), {"period": 7.0, "warp": 0.6}),
    ("dtd", "Blotchy_099"): _T("blobs", (60, 90, 140), (200, 190, 160), {"cell": 14.0}),
    ("dtd", "Fibrous_183"): _T("fibres", (150, 130, 90), (235, 220, 180), {"cell": 2.0}),
    ("dtd", "Marbled_078"): _T("marble", (70, 70, 80), (230, 228, 225), {"period": 14.0, "turbulence": 0.8}),
    ("dtd", "Matted_069"): _T("fbm", (80, 60, 50), (190, 160, 130), {"cell": 6.0}),
    ("dtd", "Mesh_114"): _T("grid", (20, 20, 25), (200, 200, 210), {"period": 8.0, "width": 2.5, "angle": 30.0}),
    ("dtd", "Perforated_037"): _T("dots", (25, 25, 25), (180, 180, 190), {"period": 10.0, "radius": 3.0}),
    ("dtd", "Stratified_154"): _T("layers", (120, 80, 50), (220, 180, 130), {"cell": 3.0}),
    ("dtd", "Woven_001"): _T("weave", (90, 60, 40), (200, 160, 110), {"period": 4.0}),
    ("dtd", "Woven_068"): _T("weave", (40, 60, 110), (150, 170, 220), {"period": 3.0, "angle": 45.0}),
    ("dtd", "Woven_104"): _T("weave", (120, 110, 60), (220, 210, 150), {"period": 5.0, "angle": 10.0}),
    ("dtd", "Woven_125"): _T("weave", (60, 100, 60), (170, 210, 160), {"period": 2.5}),
    ("dtd", "Woven_127"): _T("weave", (110, 40, 40), (220, 140, 120), {"period": 6.0, "angle": 30.0}),
    ("btad", "02"): _T("fibres", (100, 100, 105), (180, 180, 185), {"cell": 1.5}),
    ("sdd", SDD_CLASS): _T("stripes", (70, 70, 70), (160, 160, 160), {"period": 10.0, "warp": 0.1}),
}

RECIPES: dict[tuple[str, str], ob.Recipe] = {
    ("mvtec", "bottle"): ob.concentric((25, 25, 25), [(0.44, (70, 60, 45)), (0.36, (120, 105, 80)),
                                                      (0.2, (45, 40, 30)), (0.1, (150, 140, 120))]),
    ("mvtec", "cable"): ob.cable, ("mvtec", "capsule"): ob.two_tone_capsule, ("mvtec", "hazelnut"): ob.hazelnut,
    ("mvtec", "metal_nut"): ob.metal_nut, ("mvtec", "pill"): ob.pill, ("mvtec", "screw"): ob.screw,
    ("mvtec", "toothbrush"): ob.toothbrush, ("mvtec", "transistor"): ob.transistor, ("mvtec", "zipper"): ob.zipper,
    ("visa", "candle"): ob.candle, ("visa", "capsules"): ob.tray_of_capsules, ("visa", "cashew"): ob.cashew,
    ("visa", "chewinggum"): ob.chewing_gum, ("visa", "fryum"): ob.fryum,
    ("visa", "macaroni1"): ob.macaroni((215, 215, 210)),
    ("visa", "macaroni2"): ob.macaroni(_T("fbm", (40, 70, 60), (70, 100, 80), {"cell": 8.0})),
    ("visa", "pcb1"): ob.pcb((30, 110, 60)), ("visa", "pcb2"): ob.pcb((25, 95, 55)),
    ("visa", "pcb3"): ob.pcb((35, 120, 80)),
    ("visa", "pcb4"): ob.pcb((20, 60, 120)), ("visa", "pipe_fryum"): ob.pipe_fryum,
    ("mpdd", "bracket_black"): ob.bracket((35, 35, 40), (215, 215, 215)),
    ("mpdd", "bracket_brown"): ob.bracket((120, 75, 45), (210, 210, 205)),
    ("mpdd", "bracket_white"): ob.bracket((235, 235, 235), (100, 100, 105)),
    ("mpdd", "connector"): ob.connector, ("mpdd", "metal_plate"): ob.metal_plate, ("mpdd", "tubes"): ob.tubes,
    ("btad", "01"): ob.concentric((30, 30, 30), [(0.42, (140, 135, 130)), (0.3, (110, 105, 100)),
                                                 (0.18, (160, 155, 150))], grain=0.2),
    ("btad", "03"): ob.machined_block,
}

# (name on disk / in the annotation, defect kind). MVTec and MPDD names are real defect directories.
DEFECTS: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("mvtec", "bottle"): (("broken_large", "missing"), ("contamination", "stain")),
    ("mvtec", "cable"): (("cut_outer_insulation", "scratch"), ("missing_wire", "missing")),
    ("mvtec", "capsule"): (("crack", "crack"), ("poke", "hole")),
    ("mvtec", "carpet"): (("color", "stain"), ("hole", "hole")),
    ("mvtec", "grid"): (("broken", "missing"), ("glue", "stain")),
    ("mvtec", "hazelnut"): (("crack", "crack"), ("hole", "hole")),
    ("mvtec", "leather"): (("color", "stain"), ("cut", "scratch")),
    ("mvtec", "metal_nut"): (("color", "stain"), ("scratch", "scratch")),
    ("mvtec", "pill"): (("color", "stain"), ("crack", "crack")),
    ("mvtec", "screw"): (("scratch_neck", "scratch"), ("thread_top", "missing")),
    ("mvtec", "tile"): (("crack", "crack"), ("oil", "stain")),
    ("mvtec", "toothbrush"): (("defective", "missing"),),
    ("mvtec", "transistor"): (("cut_lead", "missing"), ("damaged_case", "crack")),
    ("mvtec", "wood"): (("hole", "hole"), ("scratch", "scratch")),
    ("mvtec", "zipper"): (("broken_teeth", "missing"), ("fabric_interior", "stain")),
    ("mpdd", "bracket_black"): (("hole", "hole"), ("scratches", "scratch")),
    ("mpdd", "bracket_brown"): (("bend_and_parts_mismatch", "crack"), ("parts_mismatch", "missing")),
    ("mpdd", "bracket_white"): (("defective_painting", "stain"), ("scratches", "scratch")),
    ("mpdd", "connector"): (("parts_mismatch", "missing"),),
    ("mpdd", "metal_plate"): (("major_rust", "stain"), ("scratches", "scratch")),
    ("mpdd", "tubes"): (("anomalous", "crack"),),
    ("visa", "candle"): (("chunk of wax missing", "missing"), ("different colour spot", "stain")),
    ("visa", "capsules"): (("bubble", "hole"), ("discolor", "stain")),
    ("visa", "cashew"): (("burnt", "stain"), ("corner or edge breakage", "missing")),
    ("visa", "chewinggum"): (("scratches", "scratch"), ("chunk of gum missing", "missing")),
    ("visa", "fryum"): (("burnt", "stain"), ("corner or edge breakage", "missing")),
    ("visa", "macaroni1"): (("crack", "crack"), ("different colour spot", "stain")),
    ("visa", "macaroni2"): (("small scratches", "scratch"), ("breakage down the middle", "crack")),
    ("visa", "pipe_fryum"): (("burnt", "stain"), ("crack", "crack")),
    ("btad", "01"): (("ko", "crack"), ("ko", "stain")),
    ("btad", "02"): (("ko", "scratch"), ("ko", "hole")),
    ("btad", "03"): (("ko", "missing"), ("ko", "scratch")),
    ("sdd", SDD_CLASS): (("defect", "crack"), ("defect", "scratch")),
}
for _pcb in ("pcb1", "pcb2", "pcb3", "pcb4"):
    DEFECTS[("visa", _pcb)] = (("missing", "missing"), ("scratch", "scratch"))
for _tex in DATASET_CLASSES["dtd"]:  # DTD-Synthetic anomalies: lines, colour changes, shape changes
    DEFECTS[("dtd", _tex)] = (("bad", "scratch"), ("bad", "stain"), ("bad", "crack"), ("bad", "hole"))


def defect_categories(dataset: str, cls: str) -> tuple[tuple[str, str], ...]:
    """The ``(name, kind)`` defect categories of a class (round-robin over anomalous images)."""
    return DEFECTS[(dataset, cls)]


@dataclass(frozen=True)
class Sample:
    """One generated image (``uint8 HxWxC``) and, if anomalous, its bool ``HxW`` mask."""

    image: np.ndarray
    mask: np.ndarray | None


def _render_clean(dataset: str, cls: str, h: int, w: int, seed: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float image, defect region and what a missing part reveals, for a texture or an object class."""
    if (dataset, cls) in TEXTURES:
        style = TEXTURES[(dataset, cls)]
        img = render_texture(style, h, w, rng)
        gap = np.broadcast_to(np.asarray(style.dark, np.float32) * 0.4, img.shape)  # a cut-through gap
        return img, np.ones((h, w), bool), gap
    recipe = RECIPES[(dataset, cls)](derive_rng(seed, dataset, cls, "layout"), rng)
    return ob.render_object(recipe, h, w, rng)


def render_sample(dataset: str, cls: str, h: int, w: int, seed: int, rng: np.random.Generator, *,
                  gray: bool = False, defect_kind: str | None = None) -> Sample:
    """Draw one image of ``cls``; with ``defect_kind`` also paint that defect and return its mask.

    The defect is painted after noise and grayscale conversion, so the mask is exact in the saved mode.
    """
    img, region, behind = _render_clean(dataset, cls, h, w, seed, rng)
    image, behind_u8 = add_sensor_noise(to_uint8(img), rng), to_uint8(behind)
    if gray:
        image, behind_u8 = to_gray(image), to_gray(behind_u8)
    if defect_kind is None:
        return Sample(image, None)
    defective, mask = apply_defect(image, defect_kind, rng, region=region, background=behind_u8)
    return Sample(defective, mask)

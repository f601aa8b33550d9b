"""AA-CLIP's class descriptions ("REAL_NAMES") and domains for the nine datasets of the suite.

AA-CLIP puts a short description of each class into its prompts instead of the class key (``bottle`` → "dark bottle")
and chooses the test-time blur and image score by the dataset's domain (Industrial / Medical). The release
(Mwxinnn/AA-CLIP@53db195, ``dataset/constants.py``) has entries for MVTec AD, VisA, MPDD and BTAD (kept verbatim here,
as prompt data) and "scan" for its radiology sets (BMAD Brain / Liver / Retina). The suite's other datasets have none
there: their entries below are written by the suite and marked ``source="suite"``.

Keys are the suite's class keys (``siad/data/converters``); every key is unique across datasets except ``brain``
(BrainMRI and Br35H), whose two entries agree. The engine's per-class hook only knows the class key, so lookups are
by class key (:func:`class_info`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from siad.errors import ConfigError

__all__ = ["CLASS_INFO", "DATASET_DOMAINS", "DESCRIPTIONS", "DOMAINS", "ClassInfo", "class_info"]

#: The two domains of the release (``DOMAINS`` there: "Industrial" / "Medical").
DOMAINS: tuple[str, ...] = ("industrial", "medical")

#: dataset → domain (the release's DOMAINS for MVTec / VisA / MPDD / BTAD / Brain; the rest by the suite).
DATASET_DOMAINS: Mapping[str, str] = MappingProxyType({
    "mvtec": "industrial", "visa": "industrial", "mpdd": "industrial", "btad": "industrial",
    "dtd": "industrial", "sdd": "industrial",
    "brainmri": "medical", "headct": "medical", "br35h": "medical",
})

_RELEASE: dict[str, dict[str, str]] = {
    "mvtec": {
        "bottle": "dark bottle",
        "cable": "top view of three cables",
        "capsule": "black and orange capsule",
        "carpet": "gray carpet",
        "grid": "metal or plastic mesh",
        "hazelnut": "single brown hazelnut",
        "leather": "brown leather",
        "metal_nut": "metal nut which has four notched edges",
        "pill": "oval white pill with small red speckles and the letters 'FF' engraved",
        "screw": "screw",
        "tile": "speckled tile surface",
        "transistor": "a three-legged transistor placed vertically",
        "toothbrush": "toothbrush head",
        "wood": "wood surface",
        "zipper": "a black zipper",
    },
    "visa": {
        "candle": "candle",
        "pcb3": "infrared sensor pcb module",
        "capsules": "capsules",
        "pipe_fryum": "pipe-shaped fryum",
        "pcb4": "battery charging pcb module",
        "macaroni2": "scattered yellow macaroni",
        "pcb2": "integrated circuits board",
        "chewinggum": "chewing gum",
        "macaroni1": "orange macaroni",
        "cashew": "cashew nut",
        "fryum": "wheel-shaped fryum snack",
        "pcb1": "dual ultrasonic distance sensor pcb module",
    },
    "mpdd": {
        "connector": "metal clamps with black adjustment knobs",
        "tubes": "scattered metal objects",
        "metal_plate": "blue rectangular metal plate with a notch on one side",
        "bracket_white": "white, elongated triangular metal bracket with a smooth, matte finish",
        "bracket_brown": ("brown L-shaped metal bracket with smooth, glossy finish and multiple mounting holes "
                          "along its arms"),
        "bracket_black": "black ornamental metal bracket with spiral design attached to a rectangular frame",
    },
    "btad": {
        "01": "Bright concentric rings in neon yellow and blue tones against a dark blue background, resembling a "
              "stylized wave or energy field radiating outward.",
        "02": "vertical fabric lines in warm, dusty pink and beige tones",
        "03": "oval concentric circular rings in gradient shades of blue and white",
    },
}

# Written by the suite (the release has no entry): short visual descriptions in the release's style; the radiology
# sets use the release's "scan" (its BMAD Brain / Liver / Retina entries).
_SUITE: dict[str, dict[str, str]] = {
    "dtd": {
        "Blotchy_099": "blotchy texture surface",
        "Fibrous_183": "fibrous texture surface",
        "Marbled_078": "marbled texture surface",
        "Matted_069": "matted texture surface",
        "Mesh_114": "mesh texture surface",
        "Perforated_037": "perforated texture surface",
        "Stratified_154": "stratified texture surface",
        "Woven_001": "woven texture surface",
        "Woven_068": "woven texture surface",
        "Woven_104": "woven texture surface",
        "Woven_125": "woven texture surface",
        "Woven_127": "woven texture surface",
    },
    "sdd": {"electrical_commutators": "electrical commutator surface"},
    "brainmri": {"brain": "scan"},
    "headct": {"head": "scan"},
    "br35h": {"brain": "scan"},
}

#: dataset → class key → description (release entries and the suite's).
DESCRIPTIONS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {name: MappingProxyType(dict(table)) for name, table in {**_RELEASE, **_SUITE}.items()})


@dataclass(frozen=True)
class ClassInfo:
    """What AA-CLIP needs of one class key.

    Attributes:
        description: the words put into the prompts (the release's REAL_NAMES entry).
        domain: ``industrial`` or ``medical`` (blur kernel, image-score rule).
        datasets: the suite datasets with this class key.
        source: ``release`` (verbatim from ``dataset/constants.py``) or ``suite`` (written here).
    """

    description: str
    domain: str
    datasets: tuple[str, ...]
    source: str


def _flatten() -> dict[str, ClassInfo]:
    out: dict[str, ClassInfo] = {}
    for source, tables in (("release", _RELEASE), ("suite", _SUITE)):
        for dataset, table in tables.items():
            for key, description in table.items():
                info = ClassInfo(description, DATASET_DOMAINS[dataset], (dataset,), source)
                if key in out:
                    old = out[key]
                    if (old.description, old.domain, old.source) != (info.description, info.domain, info.source):
                        raise AssertionError(f"class key {key!r} has conflicting AA-CLIP entries")
                    info = ClassInfo(description, info.domain, (*old.datasets, dataset), source)
                out[key] = info
    return out


#: class key → :class:`ClassInfo`, for all nine datasets.
CLASS_INFO: Mapping[str, ClassInfo] = MappingProxyType(_flatten())


def class_info(cls_name: str) -> ClassInfo:
    """The entry of a class key; ConfigError naming the fix for a class AA-CLIP has no description of."""
    try:
        return CLASS_INFO[cls_name]
    except KeyError:
        raise ConfigError(
            f"AA-CLIP has no class description (REAL_NAMES) for class {cls_name!r}; add it to "
            "baselines/aaclip/class_names.py, or set methods/aaclip/params/class_descriptions: class_name (prompts "
            "from the class key) and methods/aaclip/params/domain (industrial or medical)"
        ) from None

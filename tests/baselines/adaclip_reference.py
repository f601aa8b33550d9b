"""Test helper: the tiny AdaCLIP reference setting (backbone config, weights, inputs, stored vectors).

`tests/data/adaclip/vectors.npz` holds the outputs of the released AdaCLIP code run on exactly what this module
builds: the tiny ViT-L/14@336-shaped **exact-GELU** CLIP of `ADACLIP_CONFIG`, with the weights of
`tiny_state_dict()`, fed `reference_inputs()`. The inputs, the weight scheme and the seeds are the AnomalyCLIP ones
(`anomalyclip_reference.py`, loaded here by path). `tests/data/adaclip/README.md` lists the keys and how they were
made. `tests/data/adaclip/make_vectors.py` regenerates the file from a checkout of the reference code.

The one change from `anomalyclip_reference.TINY_CONFIG` is `embed_dim` = 64, the text width. The release sizes its
text prompts and its dynamic text-prompt generator with `embed_dim`, so it only runs when `embed_dim` equals the text
width (768 = 768 for ViT-L-14-336). With `TINY_CONFIG`'s 32 its text encoder fails.

The module is not a test file. With pytest's importlib mode, load it by path, e.g.::

    import importlib.util, pathlib
    _p = pathlib.Path(__file__).with_name("adaclip_reference.py")
    _spec = importlib.util.spec_from_file_location("adaclip_reference", _p)
    ref = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(ref)
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_HERE = Path(__file__).resolve().parent
VECTORS_PATH = _HERE.parent / "data" / "adaclip" / "vectors.npz"


def _load_anomalyclip_reference():
    name = "anomalyclip_reference"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _HERE / "anomalyclip_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


acr = _load_anomalyclip_reference()

# AnomalyCLIP's TINY_CONFIG with embed_dim raised to the text width (see the module docstring).
ADACLIP_CONFIG: dict = copy.deepcopy(acr.TINY_CONFIG)
ADACLIP_CONFIG["embed_dim"] = ADACLIP_CONFIG["text_cfg"]["width"]  # 64

WEIGHT_SEED = acr.WEIGHT_SEED  # 1234
INPUT_SEED = acr.INPUT_SEED  # 4321
MODULE_SEED = 111  # torch.manual_seed right before the AdaCLIP module is built (prompts and Linears)
KMEANS_RANDOM_STATE = 0  # put into the release's KMeans (it has none) for determinism
IMAGE_SIZE = acr.IMAGE_SIZE  # 518
GRID = acr.GRID  # 37
NATIVE_GRID = 24  # the state dict's positional embedding: 336 px / 14
FEATURE_LAYERS = (6, 12, 18, 24)
PROMPT_DEPTH = 4
PROMPT_LENGTH = 5
K_CLUSTERS = 20
TRAIN_ORDER = (1, 0, 1)  # image of each batch-1 optimizer step in the stored training chain
CLASS_NAME = "bottle"
EXTRA_CLASS_NAMES = ("metal_nut", "pipe-fryum")

def tiny_model(image_size: int = acr.IMAGE_SIZE) -> torch.nn.Module:
    """An (untrained) open_clip CLIP of ADACLIP_CONFIG with exact GELU (quick_gelu=False), built at `image_size`.

    At 518 px its visual positional embedding has 1 + 37**2 rows. Load `loaded_state_dict()` into it.
    """
    import open_clip

    cfg = copy.deepcopy(ADACLIP_CONFIG)
    cfg["vision_cfg"]["image_size"] = image_size
    return open_clip.model.CLIP(**cfg, quick_gelu=False)


scheme_state_dict = acr.scheme_state_dict  # the one weight scheme of the reference settings


def tiny_state_dict(seed: int = WEIGHT_SEED) -> dict[str, torch.Tensor]:
    """Float32 weights for ADACLIP_CONFIG at the native 336 px (24x24 grid), in OpenAI / open_clip key names.

    This is what the release's loader is given, playing the OpenAI file.
    """
    shapes = {k: tuple(v.shape) for k, v in tiny_model(image_size=NATIVE_GRID * 14).state_dict().items()}
    return scheme_state_dict(shapes, seed)


def fp16_rounded_keys(keys) -> list[str]:
    """The keys the release's loader rounds through float16 (`anomalyclip_reference.openai_fp16_rounded`)."""
    return [k for k in keys if acr.openai_fp16_rounded(k)]


def resize_pos_embed_as_released(pos: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """The release's load-time resize: the CLS row is kept, and the patch rows are resized with
    `F.interpolate(mode='bicubic', align_corners=False)`, no antialias (`method/clip_model.py:382-412`)."""
    old = int(math.isqrt(pos.shape[0] - 1))
    img = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False)
    img = img.permute(0, 2, 3, 1).reshape(grid * grid, -1)
    return torch.cat([pos[:1], img], dim=0)


def loaded_state_dict(seed: int = WEIGHT_SEED) -> dict[str, torch.Tensor]:
    """The backbone weights exactly as the release's 518-px model holds them after loading `tiny_state_dict()`.

    The fp16 keys are rounded (`.half().float()`), and the visual positional embedding is resized to 1 + 37**2 rows
    with `resize_pos_embed_as_released`. make_vectors.py checks that this is bit-identical to the release model's
    state dict. Load it into `tiny_model()` with strict=True.
    """
    sd = tiny_state_dict(seed)
    sd = acr.as_openai_loaded(sd)
    sd["visual.positional_embedding"] = resize_pos_embed_as_released(sd["visual.positional_embedding"])
    return sd


def reference_inputs(seed: int = INPUT_SEED) -> dict[str, torch.Tensor]:
    """The AnomalyCLIP batch (`anomalyclip_reference.reference_inputs`): image [2,3,518,518], mask [2,518,518],
    label [0, 1]. The release runs it as batch-1 items."""
    return acr.reference_inputs(seed)


assert_close = acr.assert_close


def load_vectors(path: str | Path = VECTORS_PATH) -> dict[str, np.ndarray]:
    """All arrays of the vectors file (see tests/data/adaclip/README.md for the keys)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def trainable_names(vectors: dict[str, np.ndarray] | None = None) -> list[str]:
    """The release's names of the trainable tensors (AdaCLIP module `named_parameters`, optimizer order)."""
    v = load_vectors() if vectors is None else vectors
    return [str(n) for n in v["trainable_names"]]


def learnables(prefix: str = "init", vectors: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Trainable tensors stored under `<prefix>/<release name>`, e.g. prefix "init", "step1", "step3" or
    "step0_grad" (the last has no entry for `text_prompter.static_prompts.0`, which gets no gradient)."""
    v = load_vectors() if vectors is None else vectors
    out = {}
    for name in trainable_names(v):
        key = f"{prefix}/{name}"
        if key in v:
            out[name] = torch.from_numpy(v[key].copy())
    return out

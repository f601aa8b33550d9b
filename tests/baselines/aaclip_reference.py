"""Test helper: the tiny AA-CLIP reference setting (backbone config, weights, inputs, stored vectors).

`tests/data/aaclip/vectors.npz` holds the outputs of the released AA-CLIP code (Mwxinnn/AA-CLIP, 53db195) run on
exactly what this module builds: the tiny ViT-L/14@336-shaped CLIP of the AnomalyCLIP helper's `TINY_CONFIG`, but
with **exact GELU** (`quick_gelu=False`, as AA-CLIP builds it), the weights of `tiny_state_dict()`, fed
`reference_inputs()` / `fake_class_inputs()`.  `tests/data/aaclip/README.md` lists the keys and how they were made;
`tests/data/aaclip/make_vectors.py` regenerates the file from a checkout of the reference code.

The tiny weights, config and inputs are those of `anomalyclip_reference.py` (one source); this module loads that
file by path and re-exports them.  With pytest's importlib mode load this module by path as well, e.g.::

    import importlib.util, pathlib
    _p = pathlib.Path(__file__).with_name("aaclip_reference.py")
    _spec = importlib.util.spec_from_file_location("aaclip_reference", _p)
    ref = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(ref)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

_HERE = Path(__file__).resolve().parent
VECTORS_PATH = _HERE.parent / "data" / "aaclip" / "vectors.npz"


def _load_anomalyclip_reference():
    spec = importlib.util.spec_from_file_location("anomalyclip_reference", _HERE / "anomalyclip_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_acr = _load_anomalyclip_reference()

TINY_CONFIG: dict = (
    _acr.TINY_CONFIG
)  # embed 32; vision 24 x width 128 (2 heads), patch 14, 336 px; text 12 x 64 (1 head)
WEIGHT_SEED = _acr.WEIGHT_SEED  # 1234
INPUT_SEED = _acr.INPUT_SEED  # 4321
ADAPTER_SEED = 111  # torch.manual_seed right before AdaptedCLIP(...) is built (its adapter inits)
IMAGE_SIZE = _acr.IMAGE_SIZE  # 518
GRID = _acr.GRID  # 37
ANOMALY_BOX = _acr.ANOMALY_BOX

# The release's hard-coded adapter sizes (model/adapter.py: 1024 = ViT-L visual width, 768 = text width and embed
# dim) map onto the tiny widths as follows when the vectors are made.
VISUAL_WIDTH = TINY_CONFIG["vision_cfg"]["width"]  # 128  (release: 1024)
TEXT_WIDTH = TINY_CONFIG["text_cfg"]["width"]  # 64    (release: 768 as an input width)
EMBED_DIM = TINY_CONFIG["embed_dim"]  # 32             (release: 768 as an output width)


def tiny_model() -> torch.nn.Module:
    """An (untrained) open_clip CLIP of TINY_CONFIG with exact GELU (AA-CLIP runs nn.GELU on OpenAI weights)."""
    import open_clip

    return open_clip.model.CLIP(**TINY_CONFIG, quick_gelu=False)


def tiny_state_dict(seed: int = WEIGHT_SEED, as_loaded: bool = True) -> dict[str, torch.Tensor]:
    """The AnomalyCLIP helper's tiny weights (336 px; OpenAI / open_clip key names).

    as_loaded=True (default) gives the values the release's model actually holds after loading them: every
    Linear / Conv weight and bias, the attention in_proj, `visual.proj` and `text_projection` rounded through
    float16 (`.half().float()`; 291 keys), because `model/openai.py` builds a float16 model, loads the state dict
    into it and casts back.  The real OpenAI checkpoint is float16 already, so there this is a no-op; on the tiny
    float32 weights it is not.  The visual positional embedding stays at 336 px (577 rows); the release resizes it
    to 1370 rows at load (`resize_pos_embed`, bicubic, antialias) - open_clip's `open_clip.model.resize_pos_embed`
    gives the identical table (max |diff| 0).
    """
    sd = _acr.tiny_state_dict(seed)
    if as_loaded:
        sd = _acr.as_openai_loaded(sd)
    return sd


def reference_inputs(seed: int = INPUT_SEED) -> dict[str, torch.Tensor]:
    """The AnomalyCLIP helper's fixed batch: image [2,3,518,518] (normalised), mask [2,518,518], label [0, 1]."""
    return _acr.reference_inputs(seed)


def fake_class_inputs(seed: int = INPUT_SEED) -> dict[str, torch.Tensor]:
    """The 4-image "class" used for the test-time vectors: images 0, 1 and their horizontal flips (flip of W).

    image [4,3,518,518], mask [4,518,518], label [0, 1, 0, 1] (int64).
    """
    x = reference_inputs(seed)
    return {
        "image": torch.cat([x["image"], x["image"].flip(-1)]),
        "mask": torch.cat([x["mask"], x["mask"].flip(-1)]),
        "label": torch.cat([x["label"], x["label"]]),
    }


assert_close = _acr.assert_close


def load_vectors(path: str | Path = VECTORS_PATH) -> dict[str, np.ndarray]:
    """All arrays of the vectors file (see tests/data/aaclip/README.md for the keys)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def initial_adapters(vectors: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Initial values of every trainable tensor, by the release's parameter name (AdaptedCLIP.state_dict names).

    Keys: `text_adapter.{0,1,2}.fc.0.weight` [64,64], `text_adapter.3.fc.0.weight` [32,64],
    `image_adapter.layer_adapters.{0..5}.fc.0.weight` [128,128], `image_adapter.seg_proj.{0..3}.fc.weight` [32,128],
    `image_adapter.det_proj.fc.weight` [32,128] (torch Linear layout [out, in], no biases).
    """
    v = load_vectors() if vectors is None else vectors
    return {k[len("init/") :]: torch.from_numpy(v[k].copy()) for k in v if k.startswith("init/")}

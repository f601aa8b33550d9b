"""Test helper: the tiny AnomalyCLIP reference setting (backbone config, weights, inputs, stored vectors).

`tests/data/anomalyclip/vectors.npz` holds the outputs of the released AnomalyCLIP code run on exactly what this
module builds: the tiny ViT-L/14@336-shaped QuickGELU CLIP of `TINY_CONFIG` with the weights of
`tiny_state_dict()`, fed `reference_inputs()`.  `tests/data/anomalyclip/README.md` lists the keys and how they were
made; `tests/data/anomalyclip/make_vectors.py` regenerates the file from a checkout of the reference code.

The module is not a test file; with pytest's importlib mode load it by path, e.g.::

    import importlib.util, pathlib
    _p = pathlib.Path(__file__).with_name("anomalyclip_reference.py")
    _spec = importlib.util.spec_from_file_location("anomalyclip_reference", _p)
    ref = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(ref)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

VECTORS_PATH = Path(__file__).resolve().parents[1] / "data" / "anomalyclip" / "vectors.npz"

# open_clip `CLIP(**TINY_CONFIG, quick_gelu=True)`: a ViT-L/14@336 layout (24 visual blocks, 14-px patches, 24x24
# grid at 336 px; 12 text blocks, 77 tokens, the CLIP BPE vocabulary) at toy widths.  Head counts follow the
# OpenAI loader's rule (width // 64): 2 visual heads, 1 text head.
TINY_CONFIG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 336, "patch_size": 14, "layers": 24, "width": 128, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 12},
}

WEIGHT_SEED = 1234
INPUT_SEED = 4321
IMAGE_SIZE = 518
GRID = IMAGE_SIZE // 14  # 37
DEFAULT_STD = 0.02
QKV_STD = 0.1  # attention in_proj weights: large enough that Q-K and V-V attention are far from uniform
ANOMALY_BOX = (100, 250, 200, 400)  # rows [r0, r1), cols [c0, c1) of image 1's mask (image 0 is normal)


def tiny_model() -> torch.nn.Module:
    """An (untrained) open_clip CLIP of TINY_CONFIG with QuickGELU; its state_dict keys are the ones filled below."""
    import open_clip

    return open_clip.model.CLIP(**TINY_CONFIG, quick_gelu=True)


def _is_layernorm(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2].startswith("ln_")


def scheme_state_dict(shapes: dict[str, tuple], seed: int = WEIGHT_SEED) -> dict[str, torch.Tensor]:
    """Deterministic float32 weights for any key shapes (the scheme of every CLIP-family reference setting).

    One `torch.Generator().manual_seed(seed)`; keys visited in sorted order; for each key one draw
    `randn(shape, generator=g)` scaled as: LayerNorm weight `1 + 0.1 * r`, LayerNorm bias `0.1 * r`,
    `*.attn.in_proj_weight` `QKV_STD * r`, anything else `0.02 * r`.  `logit_scale` takes no draw and is log(1/0.07).
    """
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        if key == "logit_scale":
            out[key] = torch.tensor(math.log(1 / 0.07), dtype=torch.float32)
            continue
        r = torch.randn(shapes[key], generator=g, dtype=torch.float32)
        if _is_layernorm(key):
            out[key] = 1 + 0.1 * r if key.endswith(".weight") else 0.1 * r
        elif key.endswith("attn.in_proj_weight"):
            out[key] = QKV_STD * r
        else:
            out[key] = DEFAULT_STD * r
    return out


def tiny_state_dict(seed: int = WEIGHT_SEED) -> dict[str, torch.Tensor]:
    """The weights of TINY_CONFIG in the OpenAI / open_clip key names (:func:`scheme_state_dict`)."""
    return scheme_state_dict({k: tuple(v.shape) for k, v in tiny_model().state_dict().items()}, seed)


#: What the AdaCLIP / AA-CLIP releases' OpenAI loader rounds through float16 (it builds a float16 model, loads the
#: weights and casts back): Linear / Conv weights and biases, the attention projections, `visual.proj`,
#: `text_projection`. A no-op on the real (float16) OpenAI file, not on float32 tiny weights.
OPENAI_FP16_SUFFIXES: tuple[str, ...] = (
    "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
)
OPENAI_FP16_KEYS: tuple[str, ...] = ("visual.conv1.weight", "visual.proj", "text_projection")


def openai_fp16_rounded(key: str) -> bool:
    """Whether the releases' OpenAI loader passes this weight through float16."""
    return key in OPENAI_FP16_KEYS or key.endswith(OPENAI_FP16_SUFFIXES)


def as_openai_loaded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The values a release model holds after its OpenAI loader: :func:`openai_fp16_rounded` keys `.half().float()`."""
    return {k: (v.half().float() if openai_fp16_rounded(k) else v) for k, v in state.items()}


def assert_close(actual, expected, atol: float = 1e-5, name: str = "") -> None:
    """Same shape and max |actual − expected| ≤ atol (float64 comparison of tensors or arrays)."""
    actual = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs {expected.shape}"
    diff = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())
    assert diff <= atol, f"{name}: max |diff| {diff:.3g} > {atol:g}"


def reference_inputs(seed: int = INPUT_SEED) -> dict[str, torch.Tensor]:
    """The fixed batch: already-normalised images, binary masks at 518 px and image labels.

    image [2, 3, 518, 518] float32 = randn from `torch.Generator().manual_seed(seed)`, with +1.5 added to image 1
    inside ANOMALY_BOX (all channels); mask [2, 518, 518] float32: image 0 all zero, image 1 one inside ANOMALY_BOX;
    label [2] int64 = [0, 1].  (The vectors file stores checksums of these under `input_*` keys.)
    """
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((2, 3, IMAGE_SIZE, IMAGE_SIZE), generator=g, dtype=torch.float32)
    r0, r1, c0, c1 = ANOMALY_BOX
    image[1, :, r0:r1, c0:c1] += 1.5
    mask = torch.zeros((2, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.float32)
    mask[1, r0:r1, c0:c1] = 1.0
    label = torch.tensor([0, 1], dtype=torch.int64)
    return {"image": image, "mask": mask, "label": label}


def load_vectors(path: str | Path = VECTORS_PATH) -> dict[str, np.ndarray]:
    """All arrays of the vectors file (see tests/data/anomalyclip/README.md for the keys)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def initial_learnables(vectors: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """The prompt learner's initial values as torch tensors: ctx_pos [12, 64], ctx_neg [12, 64], compound [8, 4, 64]."""
    v = load_vectors() if vectors is None else vectors
    return {k: torch.from_numpy(v[f"init_{k}"].copy()) for k in ("ctx_pos", "ctx_neg", "compound")}

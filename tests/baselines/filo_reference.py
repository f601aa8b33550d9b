"""Test helper: the tiny FiLo reference setting (backbone config, weights, learnables, inputs, stored vectors).

`tests/data/filo/vectors.npz` holds the outputs of the released FiLo code (CASIA-IVA-Lab/FiLo@36ff29c) run on exactly
what this module builds: the tiny ViT-L/14@336-shaped **exact-GELU** CLIP of AdaCLIP's `ADACLIP_CONFIG` (embed_dim 64
= text width), with the weights of `loaded_state_dict()` at 518 px, the FiLo learnables of `init_learnables()` (also
returned by `learnables("init")`), fed `reference_inputs()` one image at a time. The weight scheme, the inputs and the
backbone config are the AdaCLIP / AnomalyCLIP ones (`adaclip_reference.py`, loaded here by path).
`tests/data/filo/README.md` lists the keys and how they were made. `tests/data/filo/make_vectors.py` regenerates the
file from a checkout of the reference code.

FiLo's hard-coded widths (1024 visual, 768 embed) are replaced by the tiny ones in that run: `CovLayer(128, 64, 3)`,
`LinearLayer(128, 64, 4)`, prompt learners of dim 64 (meta-net 64 -> 4 -> 64), `Adapter(64)` (64 -> 32 -> 64).

The module is not a test file. With pytest's importlib mode, load it by path, e.g.::

    import importlib.util, pathlib
    _p = pathlib.Path(__file__).with_name("filo_reference.py")
    _spec = importlib.util.spec_from_file_location("filo_reference", _p)
    ref = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(ref)
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import torch

_HERE = Path(__file__).resolve().parent
VECTORS_PATH = _HERE.parent / "data" / "filo" / "vectors.npz"


def _load_adaclip_reference():
    name = "adaclip_reference"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _HERE / "adaclip_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


adr = _load_adaclip_reference()
acr = adr.acr  # anomalyclip_reference: weight scheme, inputs, assert_close

FILO_CONFIG: dict = adr.ADACLIP_CONFIG  # open_clip CLIP(**FILO_CONFIG, quick_gelu=False): exact nn.GELU

WEIGHT_SEED = adr.WEIGHT_SEED  # 1234: backbone weights (scheme_state_dict)
INPUT_SEED = adr.INPUT_SEED  # 4321: reference_inputs
MODULE_SEED = 111  # torch.manual_seed right before FiLo builds its learnable modules (values then overwritten)
LEARNABLE_SEED = 2024  # Generator seed of init_learnables(), the values actually used
IMAGE_SIZE = adr.IMAGE_SIZE  # 518
GRID = adr.GRID  # 37
NATIVE_GRID = adr.NATIVE_GRID  # 24
FEATURE_LAYERS = (6, 12, 18, 24)
VISION_WIDTH = FILO_CONFIG["vision_cfg"]["width"]  # 128 (FiLo hard-codes 1024)
EMBED_DIM = FILO_CONFIG["embed_dim"]  # 64 (FiLo hard-codes 768)
N_CTX = 12  # train.py / test.py default --n_ctx
CLASS_NAME = "bottle"
TRAIN_ORDER = (1, 0, 1)  # image of each batch-1 optimizer step in both stored training chains
LR_PROMPT = 1e-3  # train.py --learning_rate (both prompt learners)
LR_DECODER = 1e-4  # train.py --decoder_learning_rate (decoder_cov, decoder_linear)
ADAPTER_LRS = (1e-5, 1e-3)  # stage-2 chains: "s2a" = released --adapter_learning_rate, "s2b" = 1e-3 (visible moves)
BLUR_KERNEL, BLUR_SIGMA = 3, 4.0  # test.py: torchvision.transforms.GaussianBlur(3, 4.0)
SUPPRESSION = 0.7  # test.py: outside every box the map is multiplied by 0.7
# VisA's meta.json class order (what VisaDataset.get_cls_names() returns; FiLo gets it with "_" -> " ")
VISA_CLASS_ORDER = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
VISA_RECORDED = ("macaroni1", "macaroni2", "pcb3")
POSITION_CASES = (("top left",), ("center",), ())  # `positions=` of the stored test-time passes (with_adapter)
# Hand-made test.py box lists (pixel xyxy, as test.py holds kept boxes), applied to the ("top left",) maps
BOX_CASES = (
    (),  # no box: the whole map is multiplied by 0.7
    ((100.7, 50.2, 300.9, 260.5), (400.3, 400.0, 517.9, 530.0)),
    ((-25.9, 10.0, 77.7, 120.3), (-3.2, 200.0, 517.6, 300.0), (0.3, 0.4, 0.2, 0.1)),
)
COL18 = slice(18, None, 37)  # patch indices 18, 55, ..., 1350 (grid column 18, crosses image 1's box)
S7 = (slice(None, None, 7), slice(None, None, 7))  # "s7": 74 x 74 of a 518 x 518 map
S14 = (slice(None, None, 14), slice(None, None, 14))  # "s14": 37 x 37


def tiny_model(image_size: int = IMAGE_SIZE) -> torch.nn.Module:
    """An (untrained) open_clip CLIP of FILO_CONFIG with exact GELU, built at `image_size` (AdaCLIP's)."""
    return adr.tiny_model(image_size)


scheme_state_dict = acr.scheme_state_dict
tiny_state_dict = adr.tiny_state_dict  # float32 weights at the native 336 px: what the release's loader is given
resize_pos_embed_as_released = adr.resize_pos_embed_as_released  # bicubic, align_corners=False, no antialias


def loaded_state_dict(seed: int = WEIGHT_SEED) -> dict[str, torch.Tensor]:
    """The backbone exactly as the release's 518-px model holds it after loading `tiny_state_dict()`.

    Unlike AdaCLIP / AnomalyCLIP, FiLo's OpenAI loader does **not** round anything through float16
    (`convert_weights_to_fp16` is commented out in `build_model_from_openai_state_dict`, and `cast_dtype` is None for
    fp32), so only the visual positional embedding changes: 577 -> 1370 rows, `resize_pos_embed_as_released`.
    make_vectors.py checks this is bit-identical to the release model's state dict. Load into `tiny_model()`, strict.
    """
    sd = tiny_state_dict(seed)
    sd["visual.positional_embedding"] = resize_pos_embed_as_released(sd["visual.positional_embedding"])
    return sd


def reference_inputs(seed: int = INPUT_SEED) -> dict[str, torch.Tensor]:
    """The AnomalyCLIP batch: image [2,3,518,518], mask [2,518,518], label [0, 1]. Run as batch-1 items."""
    return acr.reference_inputs(seed)


assert_close = acr.assert_close

_KERNELS = (
    ("fc_33", (3, 3)),
    ("fc_11", (1, 1)),
    ("fc_77", (7, 7)),
    ("fc_55", (5, 5)),
    ("fc_51", (5, 1)),
    ("fc_15", (1, 5)),
)  # CovLayer's attribute order


def learnable_shapes() -> dict[str, tuple]:
    """The release's names and shapes of FiLo's learnables at the tiny widths (make_vectors.py checks them)."""
    w, d, h = VISION_WIDTH, EMBED_DIM, EMBED_DIM // 16
    shapes: dict[str, tuple] = {}
    for attr, (kh, kw) in _KERNELS:
        for i in range(3):
            shapes[f"decoder_cov.{attr}.{i}.weight"] = (d, w, kh, kw)
            shapes[f"decoder_cov.{attr}.{i}.bias"] = (d,)
    for i in range(4):
        shapes[f"decoder_linear.fc.{i}.weight"] = (d, w)
        shapes[f"decoder_linear.fc.{i}.bias"] = (d,)
    for p in ("normal_prompt_learner", "abnormal_prompt_learner"):
        shapes[f"{p}.ctx"] = (N_CTX, d)
        shapes[f"{p}.meta_net.linear1.weight"] = (h, d)
        shapes[f"{p}.meta_net.linear1.bias"] = (h,)
        shapes[f"{p}.meta_net.linear2.weight"] = (d, h)
        shapes[f"{p}.meta_net.linear2.bias"] = (d,)
    shapes["adapter.fc.0.weight"] = (d // 2, d)
    shapes["adapter.fc.2.weight"] = (d, d // 2)
    return shapes


def init_learnables(seed: int = LEARNABLE_SEED) -> dict[str, torch.Tensor]:
    """The initial FiLo learnables of the vectors (all 56 tensors), regenerated.

    One `torch.Generator().manual_seed(seed)`, names in sorted order, one `randn` per name: `*.ctx` = 0.02·r (the
    release's `normal_(std=0.02)`), every Linear / Conv weight and bias = r / sqrt(3·fan_in) with fan_in of the weight
    (the std of PyTorch's default uniform(±1/sqrt(fan_in)) init). Not the release's own draw: decoder_cov alone has
    2.3 M values, too many to store, so the npz keeps per-name sums (`init_sums`) and the small tensors (`init/...`).
    """
    shapes = learnable_shapes()
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        r = torch.randn(shapes[name], generator=g, dtype=torch.float32)
        if name.endswith(".ctx"):
            out[name] = 0.02 * r
            continue
        wshape = shapes[name[: -len("bias")] + "weight"] if name.endswith(".bias") else shapes[name]
        fan_in = math.prod(wshape[1:])
        out[name] = r / math.sqrt(3 * fan_in)
    return out


def load_vectors(path: str | Path = VECTORS_PATH) -> dict[str, np.ndarray]:
    """All arrays of the vectors file (see tests/data/filo/README.md for the keys)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def trainable_names(vectors: dict[str, np.ndarray] | None = None) -> list[str]:
    """Stage-1 trainables in the optimizer's order (decoder_cov, decoder_linear, normal, abnormal prompt learner)."""
    v = load_vectors() if vectors is None else vectors
    return [str(n) for n in v["trainable_names"]]


def learnables(prefix: str = "init", vectors: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Tensors stored under `<prefix>/<release name>`, keyed by the release's parameter name.

    Prefixes (README): "init"; stage 1 "s1_grad0", "s1_step1", "s1_step3" (decoder_cov only under "s1_grad0_slice"
    / "s1_step3_slice": `[:2, :2]` of each weight, whole biases); stage 2 "s2a_grad0", "s2a_step1", "s2a_step3",
    "s2b_..." (adapter only). For "init" the result is complete (56 tensors): decoder_cov, which is not stored, comes
    from `init_learnables()`, checked against `init_sums`.
    """
    v = load_vectors() if vectors is None else vectors
    out = {}
    if prefix == "init":
        gen = init_learnables(int(v["meta_seeds"][2]))
        names = [str(n) for n in v["init_names"]]
        sums = v["init_sums"]
        for n, s in zip(names, sums):
            assert abs(float(gen[n].double().sum()) - float(s)) <= 1e-9 * max(1.0, abs(float(s))), n
        out.update(gen)
    for key in v:
        if key.startswith(prefix + "/"):
            out[key[len(prefix) + 1 :]] = torch.from_numpy(v[key].copy())
    return out


#: The main keys (the README has all of them, with shapes and meanings).
KEYS = (
    # setting
    "weights_keys",
    "weights_sum",
    "visual_pos_embed_rows10",
    "init_names",
    "init_sums",
    "init/<name>",
    "trainable_names",
    "meta_seeds",
    "meta_commit",
    # tokens
    "tokens_normal_bottle",
    "tokens_abnormal_bottle",
    "tokens_{normal,abnormal}_{macaroni1,macaroni2,pcb3}",
    # backbone and decoders (stage-1 forward at init)
    "image_features_cls",
    "image_features_col18",
    "patch_tokens_col18",
    "patch_tokens_cls",
    "vv_blocks",
    "decoder_linear_col18",
    "decoder_cov_col18",
    "decoder_cov0_kernels_col18",
    # prompt learners and text
    "meta_bias_normal",
    "meta_bias_abnormal",
    "ctx_shifted_normal",
    "text_normal",
    "text_abnormal",
    "text_features",
    "text_probs",
    "s1_maps_s7",
    # stage 1 training
    "s1_loss_terms_init",
    "s1_train_loss_terms",
    "s1_grad0/<name>",
    "s1_step3/<name>",
    # stage 2
    "s2_adapter_cls",
    "s2_text_probs",
    "s2_loss_init",
    "s2a_train_loss",
    "s2a_grad0/<name>",
    "s2a_step3/<name>",
    "s2b_train_loss",
    "s2b_step3/<name>",
    # test time
    "test_text_probs",
    "test_maps_s14",
    "test_blur_s14",
    "test_mean_s7",
    "test_score",
    "supp_keep",
    "supp_map_s7",
    # grounding post-processing
    "gd_pred_logits",
    "gd_pred_boxes",
    "gd_boxes",
    "gd_phrases",
    "gd_position",
    "gd_center",
)

"""Regenerate `vectors.npz` by running the released AA-CLIP code on the tiny reference setting.

    python tests/data/aaclip/make_vectors.py /path/to/AA-CLIP [--out tests/data/aaclip/vectors.npz]
                                             [--skip-release-scripts]

`/path/to/AA-CLIP` is a checkout of Mwxinnn/AA-CLIP (53db195); nothing of it is copied here: its modules are
imported from that path.  CPU, float32.  What is run:

1. the release's own modules step by step, as `train.py` / `test.py` chain them: `model.clip.create_model`
   (twice: `clip_surgery` with `DAPM_replace(20)`, and `clip_model`), `model.adapter.AdaptedCLIP`,
   `forward_utils.get_adapted_single_class_text_embedding`, `calculate_similarity_map`, `calculate_seg_loss`,
   `test.get_predictions`, `metrics_eval`, Adam / MultiStepLR -> every stored key;
2. the release's `train.train_text_adapter` / `train.train_image_adapter` and `train.main()` itself (3 epochs of one
   2-image batch each), whose adapters must equal the step-by-step ones;
3. the release's `test.main()` itself on the 4-image fake class (MVTec "bottle" and Brain), whose maps, scores
   and metrics must equal the step-by-step ones.
In-process patches only: the model registry points at the tiny config and a saved tiny state dict; AdaptedCLIP's
hard-coded widths (1024 / 768) map onto the tiny ones (128 visual, 64 text, 32 embed); datasets yield the reference
items; `AdaptedCLIP` is seeded right before it is built.  Missing optional imports (`ipdb`, `pkg_resources`) are
replaced by empty stand-ins.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
HELPER = HERE.parents[1] / "baselines" / "aaclip_reference.py"
MODEL_NAME = "ViT-L-14-336"
SURGERY_UNTIL = 20
LEVELS = [6, 12, 18, 24]
TEXT_W, IMAGE_W = 0.1, 0.1  # text_adapt_weight, image_adapt_weight
TEXT_UNTIL, IMAGE_UNTIL = 3, 6
TEXT_NORM_WEIGHT = 0.1
TEXT_LR, TEXT_LR_VISIBLE, IMAGE_LR = 1e-5, 1e-3, 5e-4
BETAS = (0.5, 0.999)
MILESTONES, GAMMA = [16000, 32000], 0.5
STEPS = 3
DATASET_IND, CLASS_IND = "MVTec", "bottle"
DATASET_MED, CLASS_MED = "Brain", "Brain"
TOK14 = slice(None, None, 14)  # subsampling of the 1369-patch axis (CLS dropped): patches 0, 14, ..., 1358 (98)
TOK42 = slice(None, None, 42)  # subsampling of the 1370-token axis (row 0 = CLS): tokens 0, 42, ..., 1344 (33)
TXT_POS = 12  # text positions 0..11 for the text-block keys
TXT_SENT = (0, 6)  # sentence 0 (first normal) and 6 (first abnormal)


def _load_helper():
    spec = importlib.util.spec_from_file_location("aaclip_reference", HELPER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stub_missing_imports():
    """Empty stand-ins for imports the release makes but this run never uses (`ipdb`; `pkg_resources.packaging`)."""
    try:
        import ipdb  # noqa: F401
    except ImportError:
        sys.modules["ipdb"] = types.ModuleType("ipdb")
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import packaging.version

        pr = types.ModuleType("pkg_resources")
        pr.packaging = packaging
        sys.modules["pkg_resources"] = pr


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _tap2(store, block_out, adapter_raw):
    """Forward hook body on an adapter: its input (the block output) and its raw output.  Returns None (no edit)."""
    store["block_out"].append(block_out.detach().clone())
    store["adapter_raw"].append(adapter_raw.detach().clone())


def _tap1(store, mixed):
    """Forward pre-hook body on the next block: its input (the mixed, adapted tokens).  Returns None (no edit)."""
    store["mixed"].append(mixed.detach().clone())


def _git_commit(ref_dir: Path) -> str:
    """The checkout's commit: a `COMMIT` file in it (an exported tree), else `git rev-parse HEAD` of its own repo."""
    marker = ref_dir / "COMMIT"
    if marker.exists():
        return marker.read_text().strip()
    try:
        top = subprocess.run(
            ["git", "-C", str(ref_dir), "rev-parse", "--show-toplevel"], capture_output=True, text=True
        )
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == ref_dir:
            head = subprocess.run(["git", "-C", str(ref_dir), "rev-parse", "HEAD"], capture_output=True, text=True)
            return head.stdout.strip()
    except OSError:
        pass
    return "unknown"


class _TrainItems(torch.utils.data.Dataset):
    """Stands in for the release's `dataset.BaseDataset` (train stage): the fixed items, no augmentation."""

    def __init__(self, inputs, class_name):
        self.inputs, self.class_name = inputs, class_name

    def __len__(self):
        return len(self.inputs["label"])

    def __getitem__(self, i):
        return {
            "image": self.inputs["image"][i],
            "mask": self.inputs["mask"][i][None],
            "label": self.inputs["label"][i].to(torch.int64),
            "file_name": f"img{i}.png",
            "class_name": self.class_name,
        }


class _TestItems(_TrainItems):
    """Stands in for `dataset.BaseSingleClassDataset` (test stage): the label is a plain int, as there."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        item["label"] = int(item["label"])
        return item


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref_dir", type=Path, help="checkout of Mwxinnn/AA-CLIP")
    ap.add_argument("--out", type=Path, default=HERE / "vectors.npz")
    ap.add_argument("--skip-release-scripts", action="store_true", help="skip the train/test entry-point cross-checks")
    args = ap.parse_args(argv)
    t_start = time.time()

    ref = _load_helper()
    ref_dir = args.ref_dir.resolve()
    _stub_missing_imports()
    sys.path.insert(0, str(ref_dir))
    cwd = os.getcwd()
    os.chdir(ref_dir)  # the release resolves a few paths relative to its root (dataset/metadata); nothing is written
    try:
        import forward_utils as fu
        import model.adapter as radapter
        import model.adapter_modules as rmods
        import model.clip as rclip
        import test as rtest
        import train as rtrain
        from dataset import constants as rconst
    finally:
        os.chdir(cwd)
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # train.py / test.py set 4 threads at import
    import kornia

    out: dict[str, np.ndarray] = {}

    def put(key, value, dtype=np.float32):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        out[key] = np.array(value, dtype=dtype, copy=True, order="C")

    # ---- setting -------------------------------------------------------------------------------------------
    sd_raw = ref.tiny_state_dict(as_loaded=False)
    sd_loaded = ref.tiny_state_dict(as_loaded=True)
    inputs = ref.reference_inputs()
    fake = ref.fake_class_inputs()
    image, label = inputs["image"], inputs["label"]
    mask = inputs["mask"][:, None]  # [B,1,518,518], as the release's datasets yield it
    keys = sorted(sd_raw)
    put("weights_keys", np.array(keys), dtype=np.str_)
    put("weights_sum", [sd_raw[k].double().sum().item() for k in keys], dtype=np.float64)
    put("weights_loaded_sum", [sd_loaded[k].double().sum().item() for k in keys], dtype=np.float64)
    put("input_image_sum", image.double().sum(dim=(1, 2, 3)), dtype=np.float64)
    put("input_image_slice", image[:, :, ::37, ::37])
    put("input_mask_sum", mask.double().sum(dim=(1, 2, 3)), dtype=np.float64)
    put("input_label", label, dtype=np.int64)

    tmp = Path(tempfile.mkdtemp(prefix="aaclip_vectors_"))
    weights_path = tmp / "tiny_openai_state_dict.pt"
    torch.save(sd_raw, weights_path)

    # model registry -> tiny config + tiny weights (the OpenAI branch of create_model; the file is a plain state
    # dict, so load_openai_model takes its `torch.load` fallback)
    tiny_cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ref.TINY_CONFIG.items()}
    rclip._MODEL_CONFIGS[MODEL_NAME] = tiny_cfg
    rclip._MODEL_CKPT_PATHS[MODEL_NAME] = str(weights_path)

    def _not_jit(*a, **k):
        raise RuntimeError("not a TorchScript archive")

    # AdaptedCLIP's hard-coded widths -> tiny widths (1024 = visual width, 768 = text width as an input / embed dim
    # as an output); everything else about the modules is the release's.
    w_in = {1024: ref.VISUAL_WIDTH, 768: ref.TEXT_WIDTH}
    w_out = {768: ref.EMBED_DIM}

    class TinySimpleAdapter(rmods.SimpleAdapter):
        def __init__(self, c_in, c_out=768):
            super().__init__(w_in[c_in], w_in[c_out])

    class TinySimpleProj(rmods.SimpleProj):
        def __init__(self, c_in, c_out=768, relu=True):
            super().__init__(w_in[c_in], w_out[c_out], relu)

    radapter.SimpleAdapter = TinySimpleAdapter
    radapter.SimpleProj = TinySimpleProj

    def create():
        with _patched(torch.jit, "load", _not_jit):
            return rclip.create_model(
                model_name=MODEL_NAME,
                img_size=ref.IMAGE_SIZE,
                device="cpu",
                pretrained="openai",
                require_pretrained=True,
            )

    def seeded_adapted_clip(**kw):
        torch.manual_seed(ref.ADAPTER_SEED)
        return radapter.AdaptedCLIP(**kw)

    # ---- models, as train.py main() builds them ------------------------------------------------------------
    clip_surgery = create()
    clip_surgery.eval()
    clip_surgery.visual.DAPM_replace(DPAM_layer=SURGERY_UNTIL)
    clip_model = create()
    clip_model.eval()
    model = seeded_adapted_clip(
        clip_model=clip_model,
        text_adapt_weight=TEXT_W,
        image_adapt_weight=IMAGE_W,
        text_adapt_until=TEXT_UNTIL,
        image_adapt_until=IMAGE_UNTIL,
        relu=False,
    ).to("cpu")
    model.eval()

    msd = clip_model.state_dict()
    for k in keys:
        if k != "visual.positional_embedding":
            assert torch.equal(msd[k], sd_loaded[k]), f"loaded weights differ from tiny_state_dict(as_loaded=True): {k}"
    pos518 = msd["visual.positional_embedding"]
    put("visual_pos_embed_rows10", pos518[::10])
    import open_clip

    oc_sd = {"visual.positional_embedding": sd_raw["visual.positional_embedding"].clone()}
    oc_model = types.SimpleNamespace(visual=types.SimpleNamespace(grid_size=(ref.GRID, ref.GRID)))
    open_clip.model.resize_pos_embed(oc_sd, oc_model)
    pos_diff_openclip = (oc_sd["visual.positional_embedding"] - pos518).abs().max().item()
    assert torch.equal(clip_surgery.visual.positional_embedding, pos518)

    init_text = {k: v.detach().clone() for k, v in model.text_adapter.state_dict().items()}
    init_image = {k: v.detach().clone() for k, v in model.image_adapter.state_dict().items()}
    for k, v in init_text.items():
        put(f"init/text_adapter.{k}", v)
    for k, v in init_image.items():
        put(f"init/image_adapter.{k}", v)

    # ---- text -----------------------------------------------------------------------------------------------
    def class_text(m, dataset, cls, record=False):
        """forward_utils.get_adapted_single_class_text_embedding, recording sentences / tokens / encode_text."""
        rec = {"sentences": [], "tokens": [], "raw": []}
        orig_tok, orig_enc = fu.tokenize, m.encode_text

        def tok(texts, *a, **k):
            rec["sentences"].extend(texts)
            return orig_tok(texts, *a, **k)

        def enc(text, *a, **k):
            o = orig_enc(text, *a, **k)
            rec["tokens"].append(text.detach().clone())
            rec["raw"].append(o.detach().clone())
            return o

        with _patched(fu, "tokenize", tok):
            m.encode_text = enc
            try:
                T = fu.get_adapted_single_class_text_embedding(m, dataset, cls, "cpu")
            finally:
                del m.encode_text
        return (T, rec) if record else T

    hooks, taps = [], {"block_out": [], "adapter_raw": [], "mixed": []}
    for i in range(TEXT_UNTIL):
        hooks.append(model.text_adapter[i].register_forward_hook(lambda mod, a, o: _tap2(taps, a[0], o)))
        hooks.append(
            clip_model.transformer.resblocks[i + 1].register_forward_pre_hook(lambda mod, a: _tap1(taps, a[0]))
        )
    with torch.no_grad():
        T_ind, trec = class_text(model, DATASET_IND, CLASS_IND, record=True)
    for h in hooks:
        h.remove()
    # taps: per encode_text call (normal: 6 sentences, abnormal: 10) x blocks 0..2; tensors LND [77, N, 64]
    for name, seq in taps.items():
        arr = []
        for blk in range(TEXT_UNTIL):
            normal, abnormal = seq[blk], seq[TEXT_UNTIL + blk]
            arr.append(torch.stack([normal[:TXT_POS, 0], abnormal[:TXT_POS, 0]]))  # sentences 0 and 6
        put(f"text_{name}", torch.stack(arr))  # [3, 2, 12, 64]
    tokens = torch.cat(trec["tokens"])
    raw = torch.cat(trec["raw"])
    put("text_sentences", np.array(trec["sentences"]), dtype=np.str_)
    put("text_tokens", tokens, dtype=np.int64)
    put("text_eot_index", tokens.argmax(-1), dtype=np.int64)
    put("text_sentence_raw", raw)
    put("text_sentence_features", raw / raw.norm(dim=-1, keepdim=True))
    put("text_T", T_ind)  # [32, 2]: columns (normal, abnormal)
    with torch.no_grad():
        T_med, mrec = class_text(model, DATASET_MED, CLASS_MED, record=True)
        T_plain = class_text(clip_model, DATASET_IND, CLASS_IND)  # the text_epoch == 0 branch of train.py / test.py
    mtok = torch.cat(mrec["tokens"])
    put("text_med_sentences", np.array(mrec["sentences"]), dtype=np.str_)
    put("text_med_tokens", mtok, dtype=np.int64)
    put("text_med_T", T_med)
    put("text_T_plain_clip", T_plain)

    # ---- stage 1: frozen surgery features + text adapter ----------------------------------------------------
    def surgery_features(img):
        """train_text_adapter's no-grad image block: surgery tokens, g-hat, f = L2(ln_post(tok) @ proj) + g-hat."""
        with torch.no_grad():
            _, patch_tokens = clip_surgery.encode_image(img, LEVELS)
            cls_token, _ = model.clipmodel.encode_image(img, [])
            cls_token = cls_token / cls_token.norm(dim=-1, keepdim=True)
            pf = [clip_surgery.visual.ln_post(t[:, 1:, :]) for t in patch_tokens]
            pf = [t @ clip_surgery.visual.proj for t in pf]
            pf = [t / t.norm(dim=-1, keepdim=True) for t in pf]
            f = [t + cls_token.unsqueeze(1) for t in pf]
        return patch_tokens, cls_token, pf, f

    attn_check = {}

    def attn_hook(mod, a, o):
        q_x = a[0]
        C = q_x.shape[-1]
        v = F.linear(q_x, mod.qkv.weight[2 * C :], mod.qkv.bias[2 * C :])
        attn_check["diff"] = (o[0] - mod.proj(v)).abs().max().item()

    h = clip_surgery.visual.transformer.resblocks[-1].attn.register_forward_hook(attn_hook)
    s1_tokens, ghat, f_nog, s1_f = surgery_features(image)
    d_b2 = attn_check["diff"]
    tok_b1, _, _, f_b1 = surgery_features(image[:1])
    d_b1 = attn_check["diff"]
    h.remove()
    put("s1_surgery_tokens_t42", torch.stack([t[:, TOK42] for t in s1_tokens]))  # [4, 2, 33, 128]
    put("s1_ghat", ghat)
    put("s1_f_t14", torch.stack([t[:, TOK14] for t in s1_f]))  # [4, 2, 98, 32]
    put("s1_b1_surgery_tokens24_t42", tok_b1[-1][:, TOK42])
    put("s1_b1_f24_t14", f_b1[-1][:, TOK14])
    put("s1_attn24_minus_outproj_v_maxabs", [d_b1, d_b2])

    def text_batch(class_names):
        d = {c: fu.get_adapted_single_class_text_embedding(model, DATASET_IND, c, "cpu") for c in set(class_names)}
        return torch.stack([d[c] for c in class_names], dim=0)  # [B, 32, 2]

    def stage1_loss(terms=None):
        """The body of train_text_adapter's batch loop (image features cached: they are no-grad and fixed)."""
        T_b = text_batch([CLASS_IND] * len(image))
        for f in s1_f:
            patch_preds = fu.calculate_similarity_map(f, T_b, ref.IMAGE_SIZE)
            loss = fu.calculate_seg_loss(patch_preds, mask)
            orthogonal_loss = ((T_b[:, :, 0] * T_b[:, :, 1]).sum(1).mean()) ** 2
            loss += orthogonal_loss * TEXT_NORM_WEIGHT
            if terms is not None:
                with torch.no_grad():
                    terms["logits"].append(100.0 * torch.matmul(f, T_b))
                    terms["P"].append(patch_preds.detach())
                    fo = fu.focal_loss(patch_preds, mask)
                    d0 = fu.dice_loss(patch_preds[:, 0, :, :], 1 - mask)
                    d1 = fu.dice_loss(patch_preds[:, 1, :, :], mask)
                    terms["seg"].append(
                        [fo.item(), d0.item(), d1.item(), (loss - orthogonal_loss * TEXT_NORM_WEIGHT).item()]
                    )
                    terms["ortho"] = orthogonal_loss.item()
        return loss  # as released: only the last level's seg loss (+ one orthogonality term) survives

    def run_stage1(lr, tag):
        model.text_adapter.load_state_dict(init_text)
        opt = torch.optim.Adam(model.text_adapter.parameters(), lr=lr, betas=BETAS)
        rows = []
        for step in range(STEPS + 1):
            terms = {"logits": [], "P": [], "seg": []}
            if step == STEPS:
                with torch.no_grad():
                    loss = stage1_loss(terms)
            else:
                loss = stage1_loss(terms)
            rows.append([*terms["seg"][-1][:3], terms["ortho"], loss.item()])
            if step == 0 and tag == "lr1e-5":
                put("s1_logits_t14", torch.stack(terms["logits"])[:, :, TOK14])  # [4, 2, 98, 2]
                P24 = terms["P"][-1]
                put("s1_P24_a_s7", P24[:, 1, ::7, ::7])
                put("s1_P24_a_crop", P24[:, 1, :40, :40])
                put("s1_seg_terms", np.array(terms["seg"]))  # [4 levels, (focal, dice_n, dice_a, seg)]
                put("s1_ortho", terms["ortho"])
                put("s1_loss", loss.item())
                put("s1_loss_f64", loss.item(), dtype=np.float64)
            if step == STEPS:
                break
            opt.zero_grad()
            loss.backward()
            if step == 0 and tag == "lr1e-5":
                for k, p in model.text_adapter.named_parameters():
                    put(f"s1_grad0/text_adapter.{k}", p.grad)
            opt.step()
            if step in (0, STEPS - 1):
                for k, p in model.text_adapter.named_parameters():
                    put(f"s1_{tag}_step{step + 1}/text_adapter.{k}", p)
        put(f"s1_{tag}_losses", np.array(rows))  # [4 steps, (focal24, dice_n24, dice_a24, ortho, total)]
        return rows, {k: v.detach().clone() for k, v in model.text_adapter.state_dict().items()}

    rows_s1, text_after3 = run_stage1(TEXT_LR, "lr1e-5")
    rows_s1v, _ = run_stage1(TEXT_LR_VISIBLE, "lr1e-3")
    model.text_adapter.load_state_dict(init_text)

    # ---- stage 2: image adapter, T fixed ---------------------------------------------------------------------
    T_b2 = torch.stack([T_ind, T_ind])  # T of the *initial* text adapter (no stage-1 step), class "bottle"

    img_taps = {"block_out": [], "adapter_raw": [], "mixed": []}

    def add_image_hooks():
        hs = []
        for i in range(IMAGE_UNTIL):
            hs.append(
                model.image_adapter["layer_adapters"][i].register_forward_hook(
                    lambda mod, a, o: _tap2(img_taps, a[0], o)
                )
            )
            hs.append(
                clip_model.visual.transformer.resblocks[i + 1].register_forward_pre_hook(
                    lambda mod, a: _tap1(img_taps, a[0])
                )
            )
        return hs

    def stage2_loss(m, T_b, terms=None):
        """The body of train_image_adapter's batch loop."""
        patch_features, det_feature = m(image)
        loss = 0.0
        det_feature = det_feature.unsqueeze(1)
        cls_preds = torch.matmul(det_feature, T_b)[:, 0]
        ce = F.cross_entropy(cls_preds, label)
        loss += ce
        segs = []
        for f in patch_features:
            patch_preds = fu.calculate_similarity_map(f, T_b, ref.IMAGE_SIZE)
            s = fu.calculate_seg_loss(patch_preds, mask)
            loss += s
            segs.append(s.item())
            if terms is not None:
                with torch.no_grad():
                    terms["seg"].append(
                        [
                            fu.focal_loss(patch_preds, mask).item(),
                            fu.dice_loss(patch_preds[:, 0, :, :], 1 - mask).item(),
                            fu.dice_loss(patch_preds[:, 1, :, :], mask).item(),
                            s.item(),
                        ]
                    )
        if terms is not None:
            terms.update(F=[f.detach() for f in patch_features], det=det_feature[:, 0].detach(), cls=cls_preds.detach())
        return loss, [ce.item(), *segs, loss.item()]

    def sub_image(k, v):
        return v[::8] if "layer_adapters" in k else v  # layer adapters: rows ::8 of [128, 128]

    def run_stage2(T_b, tag, record):
        model.image_adapter.load_state_dict(init_image)
        opt = torch.optim.Adam(model.image_adapter.parameters(), lr=IMAGE_LR, betas=BETAS)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=MILESTONES, gamma=GAMMA)
        rows, states = [], {}
        for step in range(STEPS + 1):
            terms = {"seg": []}
            hs = add_image_hooks() if (record and step == 0) else []
            if step == STEPS:
                with torch.no_grad():
                    loss, row = stage2_loss(model, T_b, terms)
            else:
                loss, row = stage2_loss(model, T_b, terms)
            for hh in hs:
                hh.remove()
            rows.append(row)
            if record and step == 0:
                mixed = torch.stack([t[TOK42].permute(1, 0, 2) for t in img_taps["mixed"]])  # [6, 2, 33, 128]
                put("s2_adapter_mixed_t42_c2", mixed[..., ::2])
                put("s2_adapter1_mixed_t42", mixed[0])
                put("s2_block1_out_t42", img_taps["block_out"][0][TOK42].permute(1, 0, 2))
                put("s2_adapter1_raw_t42", img_taps["adapter_raw"][0][TOK42].permute(1, 0, 2))
                put("s2_F_t14", torch.stack([f[:, TOK14] for f in terms["F"]]))  # [4, 2, 98, 32]
                put("s2_det", terms["det"])
                put("s2_cls_logits", terms["cls"])
                put("s2_seg_terms", np.array(terms["seg"]))
                put("s2_loss", row[-1])
                put("s2_loss_f64", row[-1], dtype=np.float64)
            if step == STEPS:
                break
            opt.zero_grad()
            loss.backward()
            if record and step == 0:
                for k, p in model.image_adapter.named_parameters():
                    put(f"s2_grad0/image_adapter.{k}", sub_image(k, p.grad))
            opt.step()
            sched.step()
            states[step + 1] = {k: v.detach().clone() for k, v in model.image_adapter.state_dict().items()}
            if record and step in (0, STEPS - 1):
                for k, p in model.image_adapter.named_parameters():
                    put(f"s2_step{step + 1}/image_adapter.{k}", sub_image(k, p))
        if record:
            put("s2_losses", np.array(rows))  # [4 steps, (ce, seg6, seg12, seg18, seg24, total)]
            put("s2_lr_after3", sched.get_last_lr()[0])
        return rows, states

    rows_s2, img_states = run_stage2(T_b2, "", record=True)
    model.image_adapter.load_state_dict(init_image)

    # ---- inference: initial adapters, T of the initial text adapter --------------------------------------------
    with torch.no_grad():
        seg_tokens, det = model(image)
        pred = det @ T_ind
        put("inf_score_raw", (pred[:, 1] + 1) / 2)
        logits = torch.stack([100.0 * torch.matmul(f, T_ind) for f in seg_tokens])  # [4, 2, 1369, 2]
        put("inf_logits_t14", logits[:, :, TOK14])
        grid = logits.permute(0, 1, 3, 2).reshape(len(LEVELS), 2, 2, ref.GRID, ref.GRID)
        m = (grid[:, :, 1] + 1 - grid[:, :, 0]) / 2  # [4, B, 37, 37]
        put("inf_m_grid", m)
        for dom, (ks, sig) in {"ind": (7, 1.0), "med": (9, 1.5)}.items():
            blurred = torch.stack([fu.gaussian_blur2d(ml.unsqueeze(1), (ks, ks), (sig, sig))[:, 0] for ml in m])
            put(f"inf_{dom}_blur_grid", blurred)
            put(f"inf_{dom}_kernel1d", kornia.filters.get_gaussian_kernel1d(ks, sig)[0])
            domain = "Industrial" if dom == "ind" else "Medical"
            maps = [fu.calculate_similarity_map(f, T_ind, ref.IMAGE_SIZE, test=True, domain=domain) for f in seg_tokens]
            up0 = F.interpolate(blurred[0].unsqueeze(1), size=ref.IMAGE_SIZE, mode="bilinear", align_corners=True)
            assert torch.equal(up0, maps[0])
            summed = torch.cat(maps, dim=1).sum(1)
            put(f"inf_{dom}_map_s7", summed[:, ::7, ::7])
            put(f"inf_{dom}_map_crop", summed[:, :40, :40])

    # the 4-image fake class through test.get_predictions + metrics_eval (recorders on the sklearn calls)
    put("inf_fake_label", fake["label"], dtype=np.int64)
    metrics_ref = {}
    for dom, dataset, cls, T in (("ind", DATASET_IND, CLASS_IND, T_ind), ("med", DATASET_MED, CLASS_MED, T_med)):
        with torch.no_grad():
            fake_loader = torch.utils.data.DataLoader(_TestItems(fake, cls), batch_size=32, shuffle=False)
            masks, labels, preds, preds_image, _ = rtest.get_predictions(
                model, T, fake_loader, "cpu", ref.IMAGE_SIZE, dataset
            )
        calls = []

        def rec(fn, calls=calls):
            def wrapped(y, s, *a, **k):
                calls.append(np.array(s, copy=True))
                return fn(y, s, *a, **k)

            return wrapped

        with (
            _patched(fu, "roc_auc_score", rec(fu.roc_auc_score)),
            _patched(fu, "average_precision_score", rec(fu.average_precision_score)),
        ):
            res = fu.metrics_eval(masks, labels, preds, preds_image, cls, domain=rconst.DOMAINS[dataset])
        pix_norm = calls[0].reshape(preds.shape)
        put(f"inf_{dom}_fake_map_s14", preds[:, ::14, ::14])
        put(f"inf_{dom}_fake_map_crop", preds[:, :40, :40])
        put(f"inf_{dom}_fake_map_minmax", [preds.min(), preds.max()])
        put(f"inf_{dom}_fake_map_norm_max", pix_norm.max(axis=(1, 2)))
        put(f"inf_{dom}_fake_score_raw", preds_image)
        put(f"inf_{dom}_fake_image_score", calls[2])
        put(
            f"inf_{dom}_fake_metrics",
            [res["pixel AUC"], res["pixel AP"], res["image AUC"], res["image AP"]],
            dtype=np.float64,
        )
        metrics_ref[dom] = (preds, preds_image, res)
        if dom == "ind":
            assert np.abs(preds[:2, ::7, ::7] - out["inf_ind_map_s7"]).max() < 1e-6, "batch of 4 vs batch of 2"

    # ---- diagnostics --------------------------------------------------------------------------------------------
    P24a = torch.from_numpy(out["s1_P24_a_s7"])
    diag = {
        "open_clip resize_pos_embed vs release table max |diff|": pos_diff_openclip,
        "surgery attn(24) - out_proj(v) max |diff| (batch 1, batch 2)": [d_b1, d_b2],
        "surgery tokens24 image 0: batch-1 vs batch-2 max |diff|": (tok_b1[-1][0] - s1_tokens[-1][0])
        .abs()
        .max()
        .item(),
        "stage-1 P24_a range / per-image std (s7)": [
            P24a.min().item(),
            P24a.max().item(),
            P24a.flatten(1).std(1).tolist(),
        ],
        "stage-1 total per step, lr 1e-5": [r[-1] for r in rows_s1],
        "stage-1 total per step, lr 1e-3": [r[-1] for r in rows_s1v],
        "stage-2 total per step": [r[-1] for r in rows_s2],
        "inference m-grid per-image std (layer 24)": m[-1].flatten(1).std(1).tolist(),
        "inference raw scores": out["inf_score_raw"].tolist(),
        "fake metrics ind / med": [out["inf_ind_fake_metrics"].tolist(), out["inf_med_fake_metrics"].tolist()],
        "T_ind cos(t_n, t_a)": (T_ind[:, 0] @ T_ind[:, 1]).item(),
    }
    for k, v in diag.items():
        print(f"[diag] {k}: {v}")

    # ---- cross-checks: the release's own training / test functions and entry points -----------------------------
    commit = _git_commit(ref_dir)
    if not args.skip_release_scripts:
        logger = logging.getLogger("aaclip_vectors")
        loader2 = lambda: torch.utils.data.DataLoader(_TrainItems(inputs, CLASS_IND), batch_size=2, shuffle=False)  # noqa: E731

        def maxdiff(a, b):
            return max((a[k] - b[k]).abs().max().item() for k in a)

        # 1. train_text_adapter itself, 3 epochs of the one batch, lr 1e-5
        model.text_adapter.load_state_dict(init_text)
        opt = torch.optim.Adam(model.text_adapter.parameters(), lr=TEXT_LR, betas=BETAS)
        rtrain.train_text_adapter(
            adapted_model=model, clip_surgery=clip_surgery, text_norm_weight=TEXT_NORM_WEIGHT, train_loader=loader2(),
            optimizer=opt, device="cpu", start_epoch=0, save_path=str(tmp), text_epoch=STEPS, dataset_name=DATASET_IND,
            img_size=ref.IMAGE_SIZE, logger=logger,
        )  # fmt: skip
        d1 = maxdiff(model.text_adapter.state_dict(), text_after3)
        print(f"[check] train_text_adapter (3 epochs) vs step-by-step text adapter: max |diff| = {d1:.3e}")
        assert d1 < 1e-7
        model.text_adapter.load_state_dict(init_text)

        # 2. train_image_adapter itself, 3 epochs, T of the initial text adapter
        model.image_adapter.load_state_dict(init_image)
        opt = torch.optim.Adam(model.image_adapter.parameters(), lr=IMAGE_LR, betas=BETAS)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=MILESTONES, gamma=GAMMA)
        rtrain.train_image_adapter(
            model=model, text_embeddings={CLASS_IND: T_ind}, train_loader=loader2(), optimizer=opt, scheduler=sched,
            device="cpu", start_epoch=0, save_path=str(tmp), image_epoch=STEPS, img_size=ref.IMAGE_SIZE, logger=logger,
        )  # fmt: skip
        d2 = maxdiff(model.image_adapter.state_dict(), img_states[STEPS])
        ck1 = torch.load(tmp / "image_adapter_1.pth", map_location="cpu")["image_adapter"]
        d2b = maxdiff(ck1, img_states[1])
        print(
            f"[check] train_image_adapter vs step-by-step image adapter: step 3 {d2:.3e}, epoch-1 checkpoint {d2b:.3e}"
        )
        assert d2 < 1e-7 and d2b < 1e-7
        model.image_adapter.load_state_dict(init_image)

        # 3. train.main() itself: both stages, 3 epochs each, batch 2 (DataLoader shuffle as released)
        save = tmp / "main_train"
        argv_train = ["train.py", "--save_path", str(save), "--dataset", DATASET_IND, "--training_mode", "full_shot",
                      "--text_batch_size", "2", "--image_batch_size", "2", "--text_epoch", str(STEPS),
                      "--image_epoch", str(STEPS)]  # fmt: skip
        with contextlib.ExitStack() as st:
            st.enter_context(_patched(sys, "argv", argv_train))
            st.enter_context(
                _patched(
                    rtrain,
                    "get_dataset",
                    lambda *a, **k: (_TrainItems(inputs, CLASS_IND), _TrainItems(inputs, CLASS_IND)),
                )
            )
            st.enter_context(_patched(rtrain, "AdaptedCLIP", seeded_adapted_clip))
            st.enter_context(_patched(torch.jit, "load", _not_jit))
            rtrain.main()
        torch.use_deterministic_algorithms(False)  # setup_seed() turned it on
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        ck_text = torch.load(save / "text_adapter.pth", map_location="cpu")
        d3 = maxdiff(ck_text["text_adapter"], text_after3)
        # its stage 2 uses T of the trained (3-step) text adapter: redo the step-by-step chain with that T
        model.text_adapter.load_state_dict(text_after3)
        with torch.no_grad():
            T_after3 = fu.get_adapted_single_class_text_embedding(model, DATASET_IND, CLASS_IND, "cpu")
        model.text_adapter.load_state_dict(init_text)
        _, states_after3 = run_stage2(torch.stack([T_after3, T_after3]), "", record=False)
        model.image_adapter.load_state_dict(init_image)
        d4 = max(
            maxdiff(torch.load(save / f"image_adapter_{e}.pth", map_location="cpu")["image_adapter"], states_after3[e])
            for e in (1, STEPS)
        )
        print(
            f"[check] train.main(): text_adapter.pth {d3:.3e} (epoch {ck_text['epoch']}); "
            f"image_adapter_1/_3.pth {d4:.3e}"
        )
        assert d3 < 1e-6 and d4 < 1e-6

        # 4. test.main() itself on the fake class, from checkpoints of the initial adapters
        save = tmp / "main_test"
        save.mkdir()
        torch.save({"epoch": 0, "text_adapter": init_text}, save / "text_adapter.pth")
        torch.save({"epoch": 0, "image_adapter": init_image}, save / "image_adapter_0.pth")
        for dom, dataset, cls in (("ind", DATASET_IND, CLASS_IND), ("med", DATASET_MED, CLASS_MED)):
            captured = {}

            def record_metrics(*a, captured=captured, **k):
                captured["args"] = a
                captured["res"] = fu.metrics_eval(*a, **k)
                return captured["res"]

            argv_test = ["test.py", "--save_path", str(save), "--dataset", dataset, "--batch_size", "32"]
            err = None
            with contextlib.ExitStack() as st:
                st.enter_context(_patched(sys, "argv", argv_test))
                st.enter_context(_patched(rtest, "get_dataset", lambda *a, cls=cls, **k: {cls: _TestItems(fake, cls)}))
                st.enter_context(_patched(rtest, "metrics_eval", record_metrics))
                st.enter_context(_patched(torch.jit, "load", _not_jit))
                try:
                    rtest.main()
                except TypeError as e:  # df.mean() over the string column (pandas >= 2), after the metrics
                    err = e
            torch.use_deterministic_algorithms(False)
            torch.set_num_threads(min(2, os.cpu_count() or 1))
            preds, preds_image, res = metrics_ref[dom]
            t_preds, t_preds_image = captured["args"][2], captured["args"][3]
            dm = np.abs(t_preds - preds).max()
            ds = np.abs(t_preds_image - preds_image).max()
            same = captured["res"] == res
            print(f"[check] test.main() {dataset}: maps {dm:.3e}, scores {ds:.3e}, metrics equal {same}"
                  + (f" (then: TypeError in df.mean(): {err})" if err else ""))  # fmt: skip
            assert dm < 1e-6 and ds < 1e-7 and same
            if dom == "ind":
                put("test_main_ind_fake_score_raw", t_preds_image)

    put("meta_commit", np.array(commit), dtype=np.str_)
    put("meta_seeds", [ref.WEIGHT_SEED, ref.INPUT_SEED, ref.ADAPTER_SEED], dtype=np.int64)
    put("meta_versions", np.array([f"torch {torch.__version__}", f"kornia {kornia.__version__}"]), dtype=np.str_)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    size = os.path.getsize(args.out)
    print(
        f"wrote {args.out} ({size / 1e6:.2f} MB, {len(out)} keys, reference commit {commit}, "
        f"{time.time() - t_start:.0f} s)"
    )
    for k in sorted(out):
        print(f"  {k}: {out[k].dtype} {list(out[k].shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Regenerate `vectors.npz` by running the released AdaCLIP code on the tiny reference setting.

    python tests/data/adaclip/make_vectors.py /path/to/AdaCLIP [--out tests/data/adaclip/vectors.npz]
                                              [--skip-release-scripts]

`/path/to/AdaCLIP` is a checkout of caoyunkang/AdaCLIP (e27ee32). Nothing of it is copied here: its modules are
imported from that path. Runs on CPU in float32, with no autocast. Three things are run:

1. The release's own modules step by step, as `AdaCLIP_Trainer` chains them. The model is built through
   `create_model_and_transforms` (release loader) and `AdaCLIP(...)`. Then `forward(aggregation=False / True)` runs,
   followed by `FocalLoss`, `BinaryDiceLoss` and AdamW, giving every intermediate key. Recorders wrap
   `encode_image`, `encode_text`, `visual_text_similarity`, the dynamic-prompt generators, the HSF and its KMeans.
2. The release's `train.train(args)` itself: one epoch of the three batch-1 items of the chain, then its validation
   on both images. Its checkpoint and validation maps must equal the chain's.
3. The release's test entry (`test.train(args)`) on a checkpoint of the initial trainables. Its maps and scores must
   equal the chain's.

In-process patches (this process only) are listed in README.md. In short:
- the tiny model is registered under a model name;
- the OpenAI-file read returns the tiny weights;
- KMeans gets `random_state=0`;
- `Tensor.norm` takes the norm of a clone, so the release's in-place normalisations can be back-propagated in float32;
- the data loading is replaced by the reference items;
- empty stand-ins replace `pkg_resources` / `tensorboard` if they are missing;
- the BPE vocabulary is read from open_clip's identical copy if the checkout only holds its git-LFS pointer.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
HELPER = HERE.parents[1] / "baselines" / "adaclip_reference.py"
MODEL_NAME = "ViT-Tiny-336"  # registered in-process in the release's model-config / pretrained tables
LR = 0.01  # train.py default; AdamW(betas=(0.5, 0.999)) default weight_decay 0.01 (method/trainer.py:87)
COL18 = slice(18, None, 37)  # patch indices 18, 55, ..., 1350: grid column 18, which crosses image 1's box
SIGMA = 4  # gaussian_filter(sigma=4) in AdaCLIP_Trainer.evaluation (method/trainer.py:194)
LEARNABLE = (  # method/trainer.py:69-76
    "text_prompter",
    "visual_prompter",
    "patch_token_layer",
    "cls_token_layer",
    "dynamic_visual_prompt_generator",
    "dynamic_text_prompt_generator",
)


def _load_helper():
    spec = importlib.util.spec_from_file_location("adaclip_reference", HELPER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- process-level shims ---------------------------------------------------------------------------------------


def _stub_missing_imports():
    """Empty stand-ins for imports the release makes but the run never needs."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:  # only `pkg_resources.packaging.version` is used (method/adaclip.py:4, 171)
        import packaging.version

        pr = types.ModuleType("pkg_resources")
        pr.packaging = packaging
        sys.modules["pkg_resources"] = pr
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:  # tools/training_tools.py imports SummaryWriter; train.py only calls add_scalar

        class _Writer:
            def __init__(self, *a, **k):
                pass

            def __getattr__(self, name):
                return lambda *a, **k: None

        tb = types.ModuleType("torch.utils.tensorboard")
        tb.SummaryWriter = _Writer
        sys.modules["torch.utils.tensorboard"] = tb


def _bpe_redirect(ref_dir: Path):
    """If the checkout's `method/bpe_simple_vocab_16e6.txt.gz` is a git-LFS pointer, read open_clip's copy instead,
    after checking that its sha256 is the pointer's oid."""
    bpe = ref_dir / "method" / "bpe_simple_vocab_16e6.txt.gz"
    head = bpe.read_bytes()[:200]
    if not head.startswith(b"version https://git-lfs"):
        return None
    oid = [ln.split(":", 1)[1] for ln in head.decode().splitlines() if ln.startswith("oid sha256:")][0]
    import open_clip

    local = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    assert digest == oid, f"open_clip's BPE file {digest} is not the release's {oid}"
    real_open = gzip.open

    def _open(path, *a, **k):
        if Path(str(path)).resolve() == bpe.resolve():
            path = str(local)
        return real_open(path, *a, **k)

    gzip.open = _open
    return oid


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


_ORIG_NORM = torch.Tensor.norm


def _norm_of_clone(self, *a, **k):
    # Under the release's CUDA fp16 autocast, `norm` runs on a float32 copy of its fp16 input, so the following
    # in-place `x /= x.norm(...)` (method/adaclip.py:223, 225, 482, 486) leaves the saved tensor intact. In float32
    # without autocast, that backward fails ("modified by an inplace operation"). Taking the norm of a clone gives
    # the same values and gradients.
    if torch.is_grad_enabled() and self.requires_grad:
        return _ORIG_NORM(self.clone(), *a, **k)
    return _ORIG_NORM(self, *a, **k)


def _git_commit(ref_dir: Path) -> str:
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


class _Items(torch.utils.data.Dataset):
    """Stands in for the release's datasets: yields `BaseDataset.__getitem__`'s dict for reference images."""

    def __init__(self, inputs, order, cls_name):
        self.inputs, self.order, self.cls_name = inputs, list(order), cls_name

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        b = self.order[i]
        return {
            "img": self.inputs["image"][b].clone(),
            "img_mask": self.inputs["mask"][b][None].clone(),  # target_transform output: [1, 518, 518]
            "cls_name": self.cls_name,
            "anomaly": int(self.inputs["label"][b]),
            "img_path": f"img{b}.png",
        }


def _step1_kept(name: str) -> bool:
    """`step1/` holds the small trainables only (static prompts, biases, cls_token_layer), to keep the file small."""
    return "static_prompts" in name or name.endswith(".bias") or name.startswith("cls_token_layer")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref_dir", type=Path, help="checkout of caoyunkang/AdaCLIP")
    ap.add_argument("--out", type=Path, default=HERE / "vectors.npz")
    ap.add_argument("--skip-release-scripts", action="store_true", help="skip the train.py / test.py cross-checks")
    args = ap.parse_args(argv)

    torch.set_num_threads(min(2, torch.get_num_threads()))
    ref = _load_helper()
    ref_dir = args.ref_dir.resolve()
    _stub_missing_imports()
    bpe_oid = _bpe_redirect(ref_dir)
    sys.path.insert(0, str(ref_dir))
    import warnings

    warnings.filterwarnings("ignore", message=".*autocast.*")
    import method.adaclip as rel_adaclip
    import method.custom_clip as rel_clip
    import method.trainer as rel_trainer
    from loss import BinaryDiceLoss, FocalLoss
    from scipy.ndimage import gaussian_filter
    from sklearn.cluster import KMeans

    out: dict[str, np.ndarray] = {}

    def put(key, value, dtype=np.float32):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        out[key] = np.array(value, dtype=dtype, copy=True, order="C")

    # ---- setting -------------------------------------------------------------------------------------------
    # the weight scheme is AnomalyCLIP's: on its TINY_CONFIG shapes it gives its tiny_state_dict bit for bit
    acr_sd = ref.acr.tiny_state_dict()
    same = ref.scheme_state_dict({k: tuple(v.shape) for k, v in acr_sd.items()}, ref.WEIGHT_SEED)
    assert all(torch.equal(same[k], acr_sd[k]) for k in acr_sd)
    sd = ref.tiny_state_dict()
    inputs = ref.reference_inputs()
    image, mask, label = inputs["image"], inputs["mask"], inputs["label"]
    keys = sorted(sd)
    put("weights_keys", np.array(keys), dtype=np.str_)
    put("weights_sum", [sd[k].double().sum().item() for k in keys], dtype=np.float64)
    put("input_image_sum", image.double().sum(dim=(1, 2, 3)), dtype=np.float64)
    put("input_image_slice", image[:, :, ::37, ::37])
    put("input_mask_sum", mask.double().sum(dim=(1, 2)), dtype=np.float64)
    put("input_label", label, dtype=np.int64)

    tmp = Path(tempfile.mkdtemp(prefix="adaclip_vectors_"))
    cfg = copy.deepcopy(ref.ADACLIP_CONFIG)

    class _OpenAIArchive:
        """What `torch.jit.load` returns for the OpenAI file, reduced to what `load_openai_model` uses of it."""

        def eval(self):
            return self

        def state_dict(self):
            return {k: v.clone() for k, v in sd.items()}

    # register the tiny model where `create_model` looks for ViT-L-14-336 (method/custom_clip.py:103-111, 570-574)
    rel_clip._MODEL_CONFIGS[MODEL_NAME] = copy.deepcopy(cfg)
    rel_clip._PRETRAINED[MODEL_NAME] = {"openai": rel_clip._pcfg(url="tiny://openai-file")}
    rel_clip.download_pretrained = lambda *a, **k: str(tmp / "tiny_openai_file.pt")
    torch.jit.load = lambda *a, **k: _OpenAIArchive()  # load_openai_model's JIT-archive branch (custom_clip.py:442)
    # HSF's KMeans(n_clusters, n_init="auto") without random_state (method/adaclip.py:239): fix it to 0
    rel_adaclip.KMeans = functools.partial(KMeans, random_state=ref.KMEANS_RANDOM_STATE)
    torch.Tensor.norm = _norm_of_clone

    feature_layers = list(ref.FEATURE_LAYERS)
    module_kwargs = dict(
        text_channel=cfg["embed_dim"],
        visual_channel=cfg["vision_cfg"]["width"],
        prompting_length=ref.PROMPT_LENGTH,
        prompting_depth=ref.PROMPT_DEPTH,
        prompting_branch="VL",
        prompting_type="SD",
        use_hsf=True,
        k_clusters=ref.K_CLUSTERS,
        output_layers=feature_layers,
        device="cpu",
        image_size=ref.IMAGE_SIZE,
    )

    original_adaclip = rel_adaclip.AdaCLIP

    def seeded_adaclip(*a, **k):
        torch.manual_seed(ref.MODULE_SEED)
        return original_adaclip(*a, **k)

    # ---- build, as AdaCLIP_Trainer.__init__ does (method/trainer.py:38-54) ----------------------------------
    freeze_clip, _, _ = rel_clip.create_model_and_transforms(MODEL_NAME, ref.IMAGE_SIZE, pretrained="openai")
    freeze_clip = freeze_clip.to("cpu")
    freeze_clip.eval()
    model = seeded_adaclip(freeze_clip=freeze_clip, **module_kwargs).to("cpu")

    loaded = freeze_clip.state_dict()
    expect = ref.loaded_state_dict()
    assert sorted(loaded) == sorted(expect)
    bad = [k for k in expect if not torch.equal(loaded[k], expect[k])]
    assert not bad, f"release-loaded weights differ from adaclip_reference.loaded_state_dict(): {bad[:5]}"
    rounded = ref.fp16_rounded_keys(keys)
    changed = [k for k in keys if k != "visual.positional_embedding" and not torch.equal(loaded[k], sd[k])]
    assert set(changed) <= set(rounded)
    put("fp16_rounded_keys", np.array(rounded), dtype=np.str_)
    pos = loaded["visual.positional_embedding"]
    put("visual_pos_embed_rows10", pos[::10])
    import open_clip

    probe = {"visual.positional_embedding": sd["visual.positional_embedding"].clone()}
    open_clip.model.resize_pos_embed(probe, ref.tiny_model())
    oc_diff = (probe["visual.positional_embedding"] - pos).abs().max().item()
    probe = {"visual.positional_embedding": sd["visual.positional_embedding"].clone()}
    open_clip.model.resize_pos_embed(probe, ref.tiny_model(), antialias=False)
    oc_diff_noaa = (probe["visual.positional_embedding"] - pos).abs().max().item()

    params = [(n, p) for n, p in model.named_parameters() if any(u in n for u in LEARNABLE)]  # trainer.py:78-84
    names = [n for n, _ in params]
    put("trainable_names", np.array(names), dtype=np.str_)
    init_state = {n: p.detach().clone() for n, p in params}
    for n, p in params:
        put(f"init/{n}", p)

    # ---- recorders (they only copy values) -----------------------------------------------------------------
    rec: dict = {}

    def hook_generator(tag):
        def fn(module, inp, output):
            rec[f"{tag}_in"] = inp[0].detach().clone()
            rec[tag] = output.detach().clone()

        return fn

    model.dynamic_visual_prompt_generator.register_forward_hook(hook_generator("dyn_visual"))
    model.dynamic_text_prompt_generator.register_forward_hook(hook_generator("dyn_text"))

    orig_encode_image = model.encode_image

    def encode_image(img):
        pooled, taps, emb = orig_encode_image(img)
        rec["global_raw"] = pooled.detach().clone()
        rec["taps"] = [t.detach().clone() for t in taps]
        return pooled, taps, emb

    model.encode_image = encode_image

    orig_encode_text = model.encode_text

    def encode_text(tokens):
        x = orig_encode_text(tokens)
        rec.setdefault("text_calls", []).append((tokens.clone(), x.detach().clone()))  # before the in-place L2
        return x

    model.encode_text = encode_text

    orig_hsf = model.HSF.forward  # called as `self.HSF.forward(...)` (method/adaclip.py:518), so no module hooks

    def hsf_forward(patch_tokens, anomaly_maps):
        rec["hsf_logits"] = [t.detach().clone() for t in anomaly_maps]
        c = orig_hsf(patch_tokens, anomaly_maps)
        rec["hsf_c"] = c.detach().clone()
        return c

    model.HSF.forward = hsf_forward
    performer = model.HSF.cluster_performer
    orig_fit_predict = performer.fit_predict

    def fit_predict(X, *a, **k):
        labels = orig_fit_predict(X, *a, **k)
        rec["kmeans_in"] = np.array(X, copy=True)
        rec["kmeans_labels"] = np.array(labels, copy=True)
        return labels

    performer.fit_predict = fit_predict

    orig_vts = model.visual_text_similarity

    def visual_text_similarity(g, patches, tfeat, aggregation):
        rec["g"] = g.detach().clone()
        rec["F"] = [p.detach().clone() for p in patches]
        rec["T"] = tfeat.detach().clone()
        maps, score = orig_vts(g, patches, tfeat, aggregation)
        rec["maps"] = maps.detach().clone() if torch.is_tensor(maps) else [m.detach().clone() for m in maps]
        rec["score"] = score.detach().clone()
        return maps, score

    model.visual_text_similarity = visual_text_similarity

    cls = ref.CLASS_NAME
    loss_focal, loss_dice = FocalLoss(), BinaryDiceLoss()

    def step_loss(b):
        """AdaCLIP_Trainer.train_one_batch (method/trainer.py:103-135) on image b as a batch of one, without the
        optimizer calls. Returns the loss tensor and [cls_focal, (focal, dice_a, dice_n) x 4 layers, total]."""
        maps, score = model(image[b : b + 1], [cls], aggregation=False)
        gt = mask[b : b + 1][:, None].clone().squeeze()  # items['img_mask'] [1,1,518,518] -> squeeze -> [518,518]
        gt[gt > 0.5] = 1
        gt[gt <= 0.5] = 0
        is_anomaly = label[b : b + 1].clone()
        is_anomaly[is_anomaly > 0.5] = 1
        is_anomaly[is_anomaly <= 0.5] = 0
        loss = 0
        cls_loss = loss_focal(score, is_anomaly.unsqueeze(1))
        loss += cls_loss
        terms = [cls_loss.item()]
        seg = 0
        for (am,) in zip(maps):
            fo, da, dn = loss_focal(am, gt), loss_dice(am[:, 1, :, :], gt), loss_dice(am[:, 0, :, :], 1 - gt)
            seg += fo + da + dn
            terms += [fo.item(), da.item(), dn.item()]
        loss += seg
        terms.append(loss.item())
        return loss, terms

    def capture(b, prefix):
        """Copy the recorder's per-image values of the last forward."""
        c = {}
        c["g0"] = rec["dyn_visual_in"][0]
        assert torch.equal(rec["dyn_text_in"], rec["dyn_visual_in"])
        c["dyn_visual"], c["dyn_text"] = rec["dyn_visual"][0], rec["dyn_text"][0]
        calls = rec["text_calls"][-2:]  # normal (28 sentences) then abnormal (20)
        c["tokens"] = torch.cat([calls[0][0], calls[1][0]])
        c["text_raw"] = torch.cat([calls[0][1], calls[1][1]])
        c["T"] = rec["T"][0].T  # [2, D]: row 0 normal, row 1 anomaly (release layout [B, D, 2])
        c["global_raw"], c["g"] = rec["global_raw"][0], rec["g"][0]
        c["taps"] = [t[0] for t in rec["taps"]]
        c["F"] = [f[0] for f in rec["F"]]
        c["A"] = [a[0] for a in rec["hsf_logits"]]
        c["score_probs"] = rec["score"][0]
        c["kmeans_in"], c["kmeans_labels"] = rec["kmeans_in"], rec["kmeans_labels"]
        c["hsf_c"] = rec["hsf_c"][0]
        c["maps"] = rec["maps"]
        return c

    # ---- initial trainables: test-time forward (aggregation=True), batch 1, per image -----------------------
    model.eval()
    test0 = []
    with torch.no_grad():
        for b in (0, 1):
            amap, score = model(image[b : b + 1], [cls], aggregation=True)
            test0.append((amap[0].clone(), score[0].clone()))
    test_raw = torch.stack([t[0] for t in test0])
    test_smooth = np.stack([gaussian_filter(t[0].numpy(), sigma=SIGMA) for t in test0])
    test_score = torch.stack([t[1] for t in test0])

    # ---- initial trainables: training forward (aggregation=False) per image; step 0 of the chain is image 1 --
    model.train()
    caps, init_terms = {}, {}
    rec["text_calls"] = []
    with torch.no_grad():
        _, init_terms[0] = step_loss(0)
    caps[0] = capture(0, "init")
    text_calls_img0 = len(rec["text_calls"])  # one encode_text call per state

    optimizer = torch.optim.AdamW([p for _, p in params], lr=LR, betas=(0.5, 0.999))
    assert optimizer.defaults["weight_decay"] == 0.01
    rows = []
    grads0 = None
    for step, b in enumerate(ref.TRAIN_ORDER):
        loss, terms = step_loss(b)
        if step == 0:
            assert b == 1
            caps[1] = capture(1, "init")
            init_terms[1] = terms
        rows.append(terms)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grads0 = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in params}
        optimizer.step()
        if step == 0:
            for n, p in params:
                if _step1_kept(n):
                    put(f"step1/{n}", p)
    with torch.no_grad():
        rows.append(step_loss(1)[1])
    for n, p in params:
        put(f"step3/{n}", p)
    step3_state = {n: p.detach().clone() for n, p in params}
    model.eval()
    test3 = []
    with torch.no_grad():
        for b in (0, 1):
            amap, score = model(image[b : b + 1], [cls], aggregation=True)
            test3.append((amap[0].clone(), score[0].clone()))
    test3_smooth = np.stack([gaussian_filter(t[0].numpy(), sigma=SIGMA) for t in test3])
    test3_score = torch.stack([t[1] for t in test3])

    # ---- back to the initial trainables: text for other names, no-half variants -----------------------------
    with torch.no_grad():
        for n, p in params:
            p.copy_(init_state[n])

    def text_for(b, name):
        with torch.no_grad():
            model.generate_and_set_dynamic_promtps(image[b : b + 1])
            rec["text_calls"] = []
            t = model.text_embedding_layer(model, [name], "cpu")
            return t[0].T.clone(), torch.cat([rec["text_calls"][0][0], rec["text_calls"][1][0]])

    extra = {}
    for name in ref.EXTRA_CLASS_NAMES:
        per = [text_for(b, name) for b in (0, 1)]
        assert torch.equal(per[0][1], per[1][1])
        extra[name] = (torch.stack([p[0] for p in per]), per[0][1])
    t_again = torch.stack([text_for(b, cls)[0] for b in (0, 1)])
    assert torch.equal(t_again, torch.stack([caps[b]["T"] for b in (0, 1)])), "text features not reproducible"
    with _patched(torch.Tensor, "half", lambda self: self):
        t_nohalf = torch.stack([text_for(b, cls)[0] for b in (0, 1)])
        model.eval()
        with torch.no_grad():
            nohalf_test = [model(image[b : b + 1], [cls], aggregation=True) for b in (0, 1)]
        # step-0 gradients with the prompt-token casts made no-ops (diagnostic and the static-prompt keys below)
        model.train()
        model.zero_grad()
        step_loss(1)[0].backward()
        grads0_nohalf = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in params}
        model.zero_grad()

    # ---- store ----------------------------------------------------------------------------------------------
    def stack(key):
        return torch.stack([torch.as_tensor(caps[b][key]) for b in (0, 1)])

    tokens = caps[0]["tokens"]
    assert torch.equal(tokens, caps[1]["tokens"])
    tel = model.text_embedding_layer

    def sentences_for(name):
        # the strings encode_text builds (method/adaclip.py:210-219); checked against the recorded token ids
        sents = [
            t.format(s.format(name.replace("-", " ")))
            for st in tel.prompt_state
            for s in st
            for t in tel.prompt_templates
        ]
        return sents

    sentences = sentences_for(cls)
    assert len(sentences) == 48 and torch.equal(tel.tokenize(sentences, context_length=77), tokens)
    put("text_sentences_bottle", np.array(sentences), dtype=np.str_)
    put("tokens_bottle", tokens, dtype=np.int64)
    put("eot_index_bottle", tokens.argmax(dim=-1), dtype=np.int64)
    for name, (tf, tok) in extra.items():
        key = name.replace("-", "_")
        assert torch.equal(tel.tokenize(sentences_for(name), context_length=77), tok)
        put(f"text_sentences_{key}", np.array(sentences_for(name)), dtype=np.str_)
        put(f"tokens_{key}", tok, dtype=np.int64)
        put(f"text_features_{key}", tf)

    put("g0", stack("g0"))
    put("dyn_visual", stack("dyn_visual"))
    put("dyn_text", stack("dyn_text"))
    raw = stack("text_raw")  # [2, 48, D]
    put("text_sentence_raw", raw)
    unit = raw / raw.norm(dim=-1, keepdim=True)
    put("text_state_mean", torch.stack([unit[:, :28].mean(1), unit[:, 28:].mean(1)], dim=1))
    put("text_features", stack("T"))
    put("text_features_nohalf", t_nohalf)

    put("image_global_raw", stack("global_raw"))
    put("image_global", stack("g"))
    for i, lay in enumerate(feature_layers):
        taps = torch.stack([caps[b]["taps"][i] for b in (0, 1)])  # [2, 1370, W] incl. CLS, prompt tokens removed
        assert taps.shape[1] == 1 + ref.GRID**2
        put(f"vis_tap{lay}_col18", taps[:, 1:][:, COL18])  # grid column 18, rows 0..36 (crosses the box)
        put(f"vis_tap{lay}_cls", taps[:, 0])
        put(f"patch_f{lay}_col18", torch.stack([caps[b]["F"][i] for b in (0, 1)])[:, COL18])
        put(f"logits_{lay}", torch.stack([caps[b]["A"][i] for b in (0, 1)]))

    # HSF (method/adaclip.py:242-286): the map, top-k, the KMeans input and labels, centroids, c, g-hat
    hsf_prob, topk, kin, klab, cents = [], [], [], [], []
    for b in (0, 1):
        A = torch.stack(caps[b]["A"])  # [4, 1369, 2]
        p = torch.softmax(A.mean(0), dim=-1)[:, 1]
        idx = torch.topk(p[None], k=min(p.shape[0], 5 * ref.K_CLUSTERS), dim=1).indices[0]
        gathered = torch.cat([f[idx] for f in caps[b]["F"]], dim=-1)
        assert np.array_equal(gathered.numpy(), caps[b]["kmeans_in"]), "top-k gather does not match KMeans input"
        lab = torch.from_numpy(caps[b]["kmeans_labels"]).long()
        cen = torch.stack([torch.cat([f[idx][lab == k] for f in caps[b]["F"]]).mean(0) for k in range(ref.K_CLUSTERS)])
        c = cen.mean(0)
        c = c / c.norm()
        assert torch.allclose(c, caps[b]["hsf_c"], atol=1e-6), "HSF centroid recomputation"
        hsf_prob.append(p)
        topk.append(idx)
        kin.append(gathered)
        klab.append(lab)
        cents.append(cen)
    put("hsf_prob_a", torch.stack(hsf_prob))
    put("hsf_topk", torch.stack(topk), dtype=np.int64)
    put("hsf_tokens", torch.stack(kin))
    put("hsf_labels", torch.stack(klab), dtype=np.int64)
    put("hsf_centroids", torch.stack(cents))
    put("hsf_c", stack("hsf_c"))
    g = stack("g")
    ghat = 0.2 * stack("hsf_c") + 0.8 * g
    ghat = ghat / ghat.norm(dim=-1, keepdim=True)
    put("hsf_g_hat", ghat)
    T = stack("T")
    logits = 100.0 * torch.einsum("bd,bcd->bc", ghat, T)
    put("image_logits", logits)
    probs = stack("score_probs")
    assert torch.allclose(probs, logits.softmax(-1), atol=1e-6)
    put("image_probs", probs)
    put("image_score", probs[:, 1])

    for i, lay in enumerate(feature_layers):
        P = torch.stack([caps[b]["maps"][i][0] for b in (0, 1)])  # [2, 2, 518, 518] after upsample + softmax
        put(f"train_P{lay}_s7", P[:, 1, ::7, ::7])
        put(f"train_P{lay}_crop", P[:, 1, :40, :40])
    put("test_map_raw_s7", test_raw[:, ::7, ::7])
    put("test_map_raw_crop", test_raw[:, :40, :40])
    put("test_map_smooth_s7", test_smooth[:, ::7, ::7])
    put("test_map_smooth_crop", test_smooth[:, :40, :40])
    put("test_score", test_score)
    assert torch.allclose(test_score, probs[:, 1], atol=1e-6)

    init_terms_arr = np.array([init_terms[0], init_terms[1]], dtype=np.float64)
    put("loss_terms_init", init_terms_arr)
    put("loss_terms_init_f64", init_terms_arr, dtype=np.float64)
    put("train_order", ref.TRAIN_ORDER, dtype=np.int64)
    put("train_loss_terms", np.array(rows, dtype=np.float64))
    put("train_loss_terms_f64", np.array(rows, dtype=np.float64), dtype=np.float64)
    no_grad_names = [n for n in names if grads0[n] is None]
    put("step0_nograd_names", np.array(no_grad_names), dtype=np.str_)
    for n in names:
        if grads0[n] is not None:
            put(f"step0_grad/{n}", grads0[n])
    for n in names:
        if "static_prompts" in n and grads0_nohalf[n] is not None:
            put(f"step0_grad_nohalf/{n}", grads0_nohalf[n])
    put("step3_test_map_smooth_s7", test3_smooth[:, ::7, ::7])
    put("step3_test_score", test3_score)

    # ---- diagnostics -----------------------------------------------------------------------------------------
    nohalf_score = torch.stack([s[1][0] for s in nohalf_test])
    nohalf_map = torch.stack([s[0][0] for s in nohalf_test])
    gdiff = {n: (grads0[n] - grads0_nohalf[n]).abs().max().item() for n in names if grads0[n] is not None}
    worst_g = max(gdiff, key=gdiff.get)
    P24 = torch.stack([caps[b]["maps"][3][0][1] for b in (0, 1)])
    r0, r1, c0, c1 = ref.acr.ANOMALY_BOX
    # the release's dice with batch 1 (gt squeezed to [518, 518], so N = 518 rows) vs a per-image dice
    gt1 = mask[1]
    per_row = loss_dice(P24[1:2], gt1).item()
    per_image = loss_dice(P24[1:2], gt1[None]).item()
    diag = {
        "dice_a layer 24 image 1: release (per row, N=518) / per image": [per_row, per_image],
        "pos-embed: open_clip.model.resize_pos_embed (antialias=True default) vs release max |diff|": oc_diff,
        "pos-embed: open_clip resize_pos_embed(antialias=False) vs release max |diff|": oc_diff_noaa,
        "BPE vocabulary read from open_clip (LFS oid)": bpe_oid,
        "text calls per image forward": text_calls_img0,
        "test map raw min/max per image": [[t.min().item(), t.max().item()] for t in test_raw],
        "test map raw std per image": [t.std().item() for t in test_raw],
        "train P24 anomaly mean inside/outside box (image 1)": [
            P24[1, r0:r1, c0:c1].mean().item(),
            P24[1].mean().item(),
        ],
        "layer logits A std over patches per layer (image 1)": [a[:, 1].std().item() for a in caps[1]["A"]],
        "image_probs": probs.tolist(),
        "hsf cluster sizes image 0 / 1": [np.bincount(caps[b]["kmeans_labels"], minlength=20).tolist() for b in (0, 1)],
        "|c - g| cosine (image 0/1)": [(stack("hsf_c")[b] @ g[b]).item() for b in (0, 1)],
        "text half vs no-half max |diff|": (T - t_nohalf).abs().max().item(),
        "test score half vs no-half max |diff|": (test_score - nohalf_score).abs().max().item(),
        "test map half vs no-half max |diff|": (test_raw - nohalf_map).abs().max().item(),
        "step0 grad half vs no-half max |diff| (worst param)": [worst_g, gdiff[worst_g]],
        "train totals per chain step (+ after 3 steps, image 1)": [r[-1] for r in rows],
        "init loss terms image 0": init_terms[0],
        "init loss terms image 1": init_terms[1],
        "step0 no-grad trainables": no_grad_names,
    }
    for k, v in diag.items():
        print(f"[diag] {k}: {v}")

    # ---- cross-check 1: the release's train.train(args) ------------------------------------------------------
    commit = _git_commit(ref_dir)
    if not args.skip_release_scripts:
        workdir = tmp / "cwd"
        (workdir / "model_configs").mkdir(parents=True)
        (workdir / "model_configs" / f"{MODEL_NAME}.json").write_text(json.dumps(cfg))
        old_cwd = os.getcwd()
        os.chdir(workdir)
        try:
            import test as rel_test
            import train as rel_train

            recorded = {"losses": [], "results": []}
            orig_tob = rel_trainer.AdaCLIP_Trainer.train_one_batch

            def train_one_batch(self, items):
                loss = orig_tob(self, items)
                recorded["losses"].append(loss.item())
                return loss

            orig_metric = rel_trainer.calculate_metric

            def calculate_metric(results, obj):
                recorded["results"].append(
                    (np.stack(results["anomaly_maps"]), np.array(results["anomaly_scores"], dtype=np.float32))
                )
                return orig_metric(results, obj)

            def get_data(dataset_type_list, transform, target_transform, training):
                order = ref.TRAIN_ORDER if training else (0, 1)
                return [cls], _Items(inputs, order, cls), "unused"

            orig_loader = torch.utils.data.DataLoader

            def loader_in_order(*a, **k):  # train.py:306 shuffles; the chain's fixed order is used instead
                k["shuffle"] = False
                return orig_loader(*a, **k)

            targs = argparse.Namespace(
                training_data=["mvtec"],
                testing_data="mvtec",
                save_path=str(tmp / "train_ws"),
                model=MODEL_NAME,
                save_fig=False,
                ckt_path="",
                exp_indx=0,
                epoch=1,
                learning_rate=LR,
                batch_size=1,
                image_size=ref.IMAGE_SIZE,
                print_freq=1,
                valid_freq=1,
                prompting_depth=ref.PROMPT_DEPTH,
                prompting_length=ref.PROMPT_LENGTH,
                prompting_type="SD",
                prompting_branch="VL",
                use_hsf=True,
                k_clusters=ref.K_CLUSTERS,
            )
            with contextlib.ExitStack() as st:
                st.enter_context(_patched(rel_train, "get_data", get_data))
                st.enter_context(_patched(rel_trainer, "AdaCLIP", seeded_adaclip))
                st.enter_context(_patched(rel_trainer, "calculate_metric", calculate_metric))
                st.enter_context(_patched(rel_trainer.AdaCLIP_Trainer, "train_one_batch", train_one_batch))
                st.enter_context(_patched(torch.utils.data, "DataLoader", loader_in_order))
                rel_train.train(targs)
            ck_files = list((tmp / "train_ws" / "models").glob("*_best.pth"))
            assert len(ck_files) == 1
            ck = torch.load(ck_files[0], map_location="cpu")
            assert sorted(ck) == sorted(f"clip_model.{n}" for n in names), "checkpoint keys"
            worst = max((ck[f"clip_model.{n}"] - step3_state[n]).abs().max().item() for n in names)
            dl = max(abs(a - b) for a, b in zip(recorded["losses"], [r[-1] for r in rows[:3]]))
            maps_tr, scores_tr = recorded["results"][-1]
            dm = np.abs(maps_tr - test3_smooth).max()
            ds = np.abs(scores_tr - test3_score.numpy()).max()
            print(
                f"[check] train.train: checkpoint vs chain step3 max |diff| = {worst:.3e}; losses {dl:.3e}; "
                f"validation map {dm:.3e}, score {ds:.3e}"
            )
            assert worst < 1e-6 and dl < 1e-5 and dm < 1e-6 and ds < 1e-6

            # ---- cross-check 2: the release's test entry (test.py `train(args)`) on the initial trainables -----
            # test.py:75-79 writes its csv into <save_path>/csvs but creates only the image dir
            (tmp / "test_ws" / "csvs").mkdir(parents=True)
            ck_path = tmp / "init.pth"
            torch.save({f"clip_model.{n}": v for n, v in init_state.items()}, ck_path)
            recorded["results"] = []
            sargs = argparse.Namespace(
                testing_model="dataset",
                ckt_path=str(ck_path),
                save_fig=False,
                save_path=str(tmp / "test_ws"),
                testing_data="mvtec",
                model=MODEL_NAME,
                batch_size=1,
                image_size=ref.IMAGE_SIZE,
                prompting_depth=ref.PROMPT_DEPTH,
                prompting_length=ref.PROMPT_LENGTH,
                prompting_type="SD",
                prompting_branch="VL",
                use_hsf=True,
                k_clusters=ref.K_CLUSTERS,
            )
            with contextlib.ExitStack() as st:
                st.enter_context(_patched(rel_test, "get_data", get_data))
                st.enter_context(_patched(rel_trainer, "calculate_metric", calculate_metric))
                rel_test.train(sargs)
            maps_te, scores_te = recorded["results"][-1]
            dm = np.abs(maps_te - test_smooth).max()
            ds = np.abs(scores_te - test_score.numpy()).max()
            print(f"[check] test.py entry on the initial trainables: map max |diff| = {dm:.3e}, score {ds:.3e}")
            assert dm < 1e-6 and ds < 1e-6
            put("testpy_map_smooth_s7", maps_te[:, ::7, ::7])
            put("testpy_score", scores_te)
        finally:
            os.chdir(old_cwd)

    put("meta_commit", np.array(commit), dtype=np.str_)
    put(
        "meta_seeds",
        [ref.WEIGHT_SEED, ref.INPUT_SEED, ref.MODULE_SEED, ref.KMEANS_RANDOM_STATE],
        dtype=np.int64,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size / 1e6:.2f} MB, {len(out)} keys, reference commit {commit})")
    for k in sorted(out):
        print(f"  {k}: {out[k].dtype} {list(out[k].shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

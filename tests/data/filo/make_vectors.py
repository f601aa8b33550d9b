"""Regenerate `vectors.npz` by running the released FiLo code on the tiny reference setting.

    python tests/data/filo/make_vectors.py /path/to/FiLo [--out tests/data/filo/vectors.npz]

`/path/to/FiLo` is a checkout of CASIA-IVA-Lab/FiLo (36ff29c). Nothing of it is copied here: its modules are
imported from that path, and the loop bodies of its `train.py` / `test.py` are taken from those files (with `ast`) and
executed as they are. Runs on CPU in float32.

1. `models.FiLo.FiLo` is built through the release's `create_model_and_transforms` (its OpenAI loader) with the
   widths patched to the tiny ones, and its learnables are set to `filo_reference.init_learnables()`.
2. Stage 1: `train.py`'s optimizer construction and the body of its first training loop (forward with
   `with_adapter=False`, FocalLoss / BinaryDiceLoss, zero_grad / backward / AdamW step) run on three batch-1 items.
3. Stage 2: the body of its adapter loop (`only_train_adapter=True, with_adapter=True`, CE at /0.07) runs on three
   batch-1 items, once with the released adapter lr and once with 1e-3.
4. Test time: the two `with torch.no_grad():` blocks of `test.py`'s main loop: Grounding-DINO post-processing (on a
   fake detector with hand-made outputs and a BERT tokenizer on a small vocabulary) and FiLo + blur + score + box
   suppression (on hand-made positions and box lists).

Recorders (forward hooks and a profiler hook that copies `FiLo.forward`'s locals when it returns) only copy values.
In-process patches (this process only) are listed in README.md.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
HELPER = HERE.parents[1] / "baselines" / "filo_reference.py"
MODEL_NAME = "ViT-Tiny-336"  # registered in-process in the release's model-config / pretrained tables
COL18 = slice(18, None, 37)
S7 = (slice(None, None, 7), slice(None, None, 7))  # 74 x 74 of a 518 x 518 map
S14 = (slice(None, None, 14), slice(None, None, 14))  # 37 x 37
NQ = 6  # fake detector queries per grounding case
LOW = -10.0  # pre-sigmoid logit of "nothing"


def _load_helper():
    spec = importlib.util.spec_from_file_location("filo_reference", HELPER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


# ---- stand-ins for imports the run never uses ---------------------------------------------------------------


def _module(name, **attrs):
    m = types.ModuleType(name)
    m.__path__ = []  # lets it act as a package
    for k, v in attrs.items():
        setattr(m, k, v)
    sys.modules[name] = m
    return m


def _extract_function(path: Path, name: str, namespace: dict):
    """Define one top-level function of a source file (its own text, with its line numbers) in `namespace`."""
    tree = ast.parse(path.read_text(), str(path))
    node = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name][0]
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def _stub_imports(ref_dir: Path):
    """test.py imports Grounding DINO (compiled ops, addict, yapf), skimage and prefetch_generator at the top; none of
    it runs here except `get_phrases_from_posmap`, which is defined from the release's own file."""
    for name in ("prefetch_generator",):
        try:
            __import__(name)
        except ImportError:
            _module(name, BackgroundGenerator=lambda it, *a, **k: it)
    try:
        import skimage.measure  # noqa: F401
    except ImportError:
        sk = _module("skimage")
        sk.measure = _module("skimage.measure")

    def unavailable(*a, **k):
        raise RuntimeError("Grounding DINO itself is not run in make_vectors.py")

    from transformers import AutoTokenizer

    ns = {"torch": torch, "Dict": dict, "AutoTokenizer": AutoTokenizer}
    utils_py = ref_dir / "models/GroundingDINO/groundingdino/util/utils.py"
    gpfp = _extract_function(utils_py, "get_phrases_from_posmap", ns)
    base = "models.GroundingDINO.groundingdino"
    pkgs = {
        "models.GroundingDINO": {},
        base: {},
        f"{base}.datasets": {},
        f"{base}.datasets.transforms": {},
        f"{base}.models": {"build_model": unavailable},
        f"{base}.util": {},
        f"{base}.util.slconfig": {"SLConfig": types.SimpleNamespace(fromfile=unavailable)},
        f"{base}.util.utils": {"clean_state_dict": unavailable, "get_phrases_from_posmap": gpfp},
    }
    mods = {name: _module(name, **attrs) for name, attrs in pkgs.items()}
    for name, m in mods.items():
        parent, _, child = name.rpartition(".")
        if parent in mods:
            setattr(mods[parent], child, m)
    return gpfp


def _import_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ != "__main__": only the top level runs
    return mod


# ---- pieces of the release scripts' main blocks -------------------------------------------------------------


class _Script:
    """The `if __name__ == "__main__":` block of a release script, parsed; pieces compiled with their line numbers."""

    def __init__(self, path: Path):
        self.path = path
        tree = ast.parse(path.read_text(), str(path))
        self.main = [
            n
            for n in tree.body
            if isinstance(n, ast.If)
            and isinstance(n.test, ast.Compare)
            and getattr(n.test.left, "id", "") == "__name__"
        ][0].body

    def code(self, nodes):
        return compile(ast.Module(body=list(nodes), type_ignores=[]), str(self.path), "exec")

    def parser_code(self):
        """From `parser = argparse.ArgumentParser(...)` up to (not including) `args = parser.parse_args()`."""
        start = next(i for i, n in enumerate(self.main) if isinstance(n, ast.Assign) and n.targets[0].id == "parser")
        stop = next(
            i
            for i, n in enumerate(self.main)
            if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "args"
        )
        return self.code(self.main[start:stop])

    def assigns(self, *names):
        nodes = [
            n
            for n in self.main
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and getattr(n.targets[0], "id", None) in names
        ]
        assert sorted(n.targets[0].id for n in nodes) == sorted(names), names
        return self.code(nodes)

    def nested_assign(self, name):
        """The one `name = ...` statement anywhere in the main block."""
        nodes = [
            sub
            for n in self.main
            for sub in ast.walk(n)
            if isinstance(sub, ast.Assign) and getattr(sub.targets[0], "id", None) == name
        ]
        assert len(nodes) == 1, name
        return self.code(nodes)

    def for_loops(self, target_name):
        """`for <target_name> in ...:` loops anywhere in the main block, in source order."""
        found = []
        for n in self.main:
            for sub in ast.walk(n):
                if isinstance(sub, ast.For) and getattr(sub.target, "id", None) == target_name:
                    found.append(sub)
        return sorted(found, key=lambda s: s.lineno)


# ---- recorders -------------------------------------------------------------------------------------------------


class _ForwardLocals:
    """While active, copies the locals of every `FiLo.forward` call when it returns (lists shallow-copied)."""

    def __init__(self, code):
        self.code, self.calls = code, []

    def _prof(self, frame, event, arg):
        if event == "return" and frame.f_code is self.code:
            self.calls.append({k: (list(v) if isinstance(v, list) else v) for k, v in frame.f_locals.items()})

    def __enter__(self):
        self.calls = []
        sys.setprofile(self._prof)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)

    @property
    def last(self):
        return self.calls[-1]


class _Calls:
    """Wraps a callable (the release's loss objects, test.py's GaussianBlur) and keeps what it returned."""

    def __init__(self, fn):
        self.fn, self.out = fn, []

    def __call__(self, *a, **k):
        r = self.fn(*a, **k)
        self.out.append(r)
        return r


class _Optimizer:
    """Wraps the release's optimizer: `step()` first copies the gradients; when frozen it does not step."""

    def __init__(self, opt, names):
        self.opt, self.names, self.frozen, self.grads = opt, names, False, None

    def zero_grad(self, *a, **k):
        return self.opt.zero_grad(*a, **k)

    def step(self, *a, **k):
        self.grads = {}
        for group in self.opt.param_groups:
            for p in group["params"]:
                self.grads[self.names[id(p)]] = None if p.grad is None else p.grad.detach().clone()
        if not self.frozen:
            return self.opt.step(*a, **k)


def _np(x, dtype=np.float32):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=dtype, copy=True, order="C")


def _float32_center_input(target: float, w: float, size: int) -> float:
    """A float32 normalised cx whose pixel centre, computed as test.py computes it in float32, is closest to target."""
    scale = torch.tensor([size] * 4, dtype=torch.float32)
    base = np.float32(target / size)
    best, best_err = None, None
    for step in range(-64, 65):
        cx = base
        for _ in range(abs(step)):
            cx = np.nextafter(cx, np.float32(np.inf if step > 0 else -np.inf), dtype=np.float32)
        b = torch.tensor([float(cx), 0.5, w, 0.1], dtype=torch.float32) * scale
        b[:2] -= b[2:] / 2
        b[2:] += b[:2]
        c = float((b[0] + b[2]) / 2)
        err = abs(c - target)
        if best_err is None or err < best_err:
            best, best_err = float(cx), err
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref_dir", type=Path, help="checkout of CASIA-IVA-Lab/FiLo")
    ap.add_argument("--out", type=Path, default=HERE / "vectors.npz")
    args_cli = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ref = _load_helper()
    ref_dir = args_cli.ref_dir.resolve()
    commit = _git_commit(ref_dir)
    _stub_imports(ref_dir)
    sys.path.insert(0, str(ref_dir))
    import warnings

    warnings.filterwarnings("ignore")
    import models.FiLo as rel_filo
    import models.vv_open_clip as voc
    import models.vv_open_clip.factory as rel_factory
    import models.vv_open_clip.openai as rel_openai
    import models.vv_open_clip.pretrained as rel_pretrained
    import models.vv_open_clip.transformer as rel_transformer

    rel_train = _import_file("filo_release_train", ref_dir / "train.py")
    rel_test = _import_file("filo_release_test", ref_dir / "test.py")
    train_py, test_py = _Script(ref_dir / "train.py"), _Script(ref_dir / "test.py")

    out: dict[str, np.ndarray] = {}

    def put(key, value, dtype=np.float32):
        assert key not in out, key
        out[key] = _np(value, dtype)

    # ---- setting -----------------------------------------------------------------------------------------------
    sd = ref.tiny_state_dict()
    inputs = ref.reference_inputs()
    image, mask, label = inputs["image"], inputs["mask"], inputs["label"]
    keys = sorted(sd)
    put("weights_keys", np.array(keys), np.str_)
    put("weights_sum", [sd[k].double().sum().item() for k in keys], np.float64)
    put("input_image_sum", image.double().sum(dim=(1, 2, 3)), np.float64)
    put("input_image_slice", image[:, :, ::37, ::37])
    put("input_mask_sum", mask.double().sum(dim=(1, 2)), np.float64)
    put("input_label", label, np.int64)

    tmp = Path(tempfile.mkdtemp(prefix="filo_vectors_"))
    cfg = copy.deepcopy(ref.FILO_CONFIG)

    class _OpenAIArchive:
        """What `torch.jit.load` returns for the OpenAI file, reduced to what `load_openai_model` uses of it."""

        def eval(self):
            return self

        def state_dict(self):
            return {k: v.clone() for k, v in sd.items()}

    rel_factory._MODEL_CONFIGS[MODEL_NAME] = copy.deepcopy(cfg)
    rel_pretrained._PRETRAINED[MODEL_NAME] = {"openai": rel_pretrained._pcfg(url="tiny://openai-file")}
    rel_openai.download_pretrained_from_url = lambda *a, **k: str(tmp / "tiny_openai_file.pt")
    torch.jit.load = lambda *a, **k: _OpenAIArchive()

    # ---- FiLo's hard-coded widths -> tiny widths (models/FiLo.py:599-628) ----------------------------------------
    W, D = ref.VISION_WIDTH, ref.EMBED_DIM
    orig = {
        n: getattr(rel_filo, n)
        for n in ("CovLayer", "LinearLayer", "PromptLearner_normal", "PromptLearner_abnormal", "Adapter")
    }
    real_init = {n: c.__init__ for n, c in orig.items()}

    def cov_init(self, dim_in, dim_out, k):
        assert (dim_in, dim_out, k) == (1024, 768, 3)
        torch.manual_seed(ref.MODULE_SEED)  # right before the first learnable module is built
        real_init["CovLayer"](self, W, D, k)

    def linear_init(self, dim_in, dim_out, k):
        assert (dim_in, dim_out, k) == (1024, 768, 4)
        real_init["LinearLayer"](self, W, D, k)

    def prompt_init(kind):
        def init(self, classnames, status, clip_model, tokenizer, dim, n_ctx, device, *a, **k):
            assert dim == 768
            real_init[kind](self, classnames, status, clip_model, tokenizer, D, n_ctx, device, *a, **k)

        return init

    def adapter_init(self, c_in, *a, **k):
        assert c_in == 768
        real_init["Adapter"](self, D, *a, **k)

    @contextlib.contextmanager
    def tiny_widths():
        """FiLo.__init__ (models/FiLo.py:540-564) hard-codes 1024 / 768: map them to 128 / 64 while it runs."""
        patched = {
            "CovLayer": cov_init,
            "LinearLayer": linear_init,
            "Adapter": adapter_init,
            "PromptLearner_normal": prompt_init("PromptLearner_normal"),
            "PromptLearner_abnormal": prompt_init("PromptLearner_abnormal"),
        }
        for n, f in patched.items():
            orig[n].__init__ = f
        try:
            yield
        finally:
            for n in patched:
                orig[n].__init__ = real_init[n]

    # the sentences each tokenizer call gets (FiLo.py calls open_clip.get_tokenizer(args.clip_model))
    sentences: list[list[str]] = []
    real_tokenize = voc.tokenize

    def recording_tokenize(texts, *a, **k):
        sentences.append(list(texts))
        return real_tokenize(texts, *a, **k)

    voc.get_tokenizer = lambda name: recording_tokenize

    # ---- the release's argument defaults -------------------------------------------------------------------------
    ns_parse = {"argparse": argparse}
    exec(train_py.parser_code(), ns_parse)
    targs = ns_parse["parser"].parse_args([])
    ns_parse = {"argparse": argparse}
    exec(test_py.parser_code(), ns_parse)
    sargs = ns_parse["parser"].parse_args([])
    for a in (targs, sargs):
        a.clip_model, a.device = MODEL_NAME, "cpu"
    assert targs.image_size == sargs.image_size == ref.IMAGE_SIZE and targs.n_ctx == ref.N_CTX
    assert list(targs.features_list) == list(ref.FEATURE_LAYERS)
    assert (targs.learning_rate, targs.decoder_learning_rate) == (ref.LR_PROMPT, ref.LR_DECODER)
    assert targs.adapter_learning_rate == ref.ADAPTER_LRS[0]
    assert (sargs.box_threshold, sargs.text_threshold, sargs.area_threshold) == (0.25, 0.25, 0.7)

    # ---- build (train.py: FiLo(obj_list, args, device)) -----------------------------------------------------------
    with contextlib.redirect_stdout(io.StringIO()), tiny_widths():
        filo = rel_filo.FiLo([ref.CLASS_NAME], targs, "cpu").to("cpu")
    bottle_sentences = sentences[:]
    assert len(bottle_sentences) == 2

    loaded = filo.clip_model.state_dict()
    expect = ref.loaded_state_dict()
    assert sorted(loaded) == sorted(expect), set(loaded) ^ set(expect)
    bad = [k for k in expect if not torch.equal(loaded[k], expect[k])]
    assert not bad, f"release-loaded weights differ from filo_reference.loaded_state_dict(): {bad[:5]}"
    changed = [k for k in keys if not torch.equal(loaded[k], sd[k])]
    assert changed == ["visual.positional_embedding"], changed  # no fp16 rounding in FiLo's loader
    pos = loaded["visual.positional_embedding"]
    put("visual_pos_embed_rows10", pos[::10])
    import open_clip

    probe = {"visual.positional_embedding": sd["visual.positional_embedding"].clone()}
    open_clip.model.resize_pos_embed(probe, ref.tiny_model())
    oc_diff = (probe["visual.positional_embedding"] - pos).abs().max().item()
    print(
        f"[check] loader: no fp16 rounding; pos-embed resize = adaclip's (no antialias); open_clip antialias=True "
        f"would differ by {oc_diff:.2e}"
    )
    gelu = {type(m).__name__ for m in filo.clip_model.modules() if "GELU" in type(m).__name__}
    assert gelu == {"GELU"}, gelu

    # learnables: the release's own draw after torch.manual_seed(MODULE_SEED) is replaced by init_learnables()
    modules = ("decoder_cov", "decoder_linear", "normal_prompt_learner", "abnormal_prompt_learner", "adapter")
    params = {n: p for n, p in filo.named_parameters() if n.split(".")[0] in modules}
    init = ref.init_learnables()
    assert {n: tuple(p.shape) for n, p in params.items()} == {n: tuple(t.shape) for n, t in init.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(init[n])
    names_by_id = {id(p): n for n, p in params.items()}
    init_names = sorted(init)
    put("init_names", np.array(init_names), np.str_)
    put("init_sums", [init[n].double().sum().item() for n in init_names], np.float64)
    for n in init_names:
        if not n.startswith("decoder_cov."):
            put(f"init/{n}", init[n])
    put("decoder_cov_init_slice", np.stack([init[f"decoder_cov.fc_33.{i}.weight"][:2, :2] for i in range(3)]))

    # ---- token ids: bottle (the model above), VisA classes in meta.json order --------------------------------------
    npl, apl = filo.normal_prompt_learner, filo.abnormal_prompt_learner
    put("sentences_normal_bottle", np.array(bottle_sentences[0]), np.str_)
    put("sentences_abnormal_bottle", np.array(bottle_sentences[1]), np.str_)
    put("tokens_normal_bottle", npl.tokenized_prompts["bottle"], np.int64)
    put("tokens_abnormal_bottle", apl.tokenized_prompts["bottle"], np.int64)
    visa_obj_list = [x.replace("_", " ") for x in ref.VISA_CLASS_ORDER]  # train.py:150
    sentences.clear()
    with contextlib.redirect_stdout(io.StringIO()):
        v_npl = orig["PromptLearner_normal"](
            visa_obj_list, rel_filo.status_normal, filo.clip_model, recording_tokenize, D, ref.N_CTX, "cpu"
        )
        v_apl = orig["PromptLearner_abnormal"](
            visa_obj_list, rel_filo.status_abnormal, filo.clip_model, recording_tokenize, D, ref.N_CTX, "cpu"
        )
    n_visa = len(visa_obj_list)
    visa_abnormal_calls = sentences[n_visa:]  # one call per class, in meta.json order
    for c in ref.VISA_RECORDED:
        key = rel_filo.cls_map[c]  # FiLo.forward looks prompts up by cls_map[cls_name]
        tok_a = v_apl.tokenized_prompts[key]
        winner = [i for i, s in enumerate(visa_abnormal_calls) if torch.equal(real_tokenize(s), tok_a)]
        put(f"tokens_normal_{c}", v_npl.tokenized_prompts[key], np.int64)
        put(f"tokens_abnormal_{c}", tok_a, np.int64)
        put(f"sentences_abnormal_{c}", np.array(visa_abnormal_calls[winner[-1]]), np.str_)
        put(f"prompts_source_class_{c}", np.array(visa_obj_list[max(winner)]), np.str_)
        own = visa_abnormal_calls[visa_obj_list.index(c.replace("_", " "))]
        put(f"own_sentences_abnormal_{c}", np.array(own), np.str_)
    put("visa_class_order", np.array(ref.VISA_CLASS_ORDER), np.str_)

    # ---- recorders -------------------------------------------------------------------------------------------------
    rec: dict = {}
    visual = filo.clip_model.visual

    def hook(tag, fn=None):
        def f(module, inp, output):
            rec.setdefault(tag, []).append(fn(output) if fn else output.detach().clone())

        return f

    def clone_any(o):
        return [t.detach().clone() for t in o] if isinstance(o, (list, tuple)) else o.detach().clone()

    for i in (6, 12, 18, 24):
        visual.transformer.resblocks[i - 1].register_forward_hook(hook(f"block{i}", clone_any))
    filo.decoder_linear.register_forward_hook(hook("dec_linear", clone_any))
    filo.decoder_cov.register_forward_hook(hook("dec_cov", clone_any))
    for attr in ("fc_11", "fc_33", "fc_55", "fc_77", "fc_15", "fc_51"):
        getattr(filo.decoder_cov, attr)[0].register_forward_hook(hook(f"cov0_{attr}"))
    npl.meta_net.register_forward_hook(hook("bias_normal"))
    npl.meta_net.register_forward_hook(
        lambda m, i, o: rec.setdefault("meta_in_normal", []).append(i[0].detach().clone())
    )
    apl.meta_net.register_forward_hook(hook("bias_abnormal"))
    npl.register_forward_hook(hook("prompts_normal"))
    apl.register_forward_hook(hook("prompts_abnormal"))
    filo.text_encoder.register_forward_hook(hook("text_raw"))
    filo.adapter.register_forward_hook(hook("adapter_out"))
    orig_encode_image = filo.clip_model.encode_image

    def encode_image(img, out_layers):
        feats, toks = orig_encode_image(img, out_layers)
        rec.setdefault("encode_image", []).append((feats.detach().clone(), [t.detach().clone() for t in toks]))
        return feats, toks

    filo.clip_model.encode_image = encode_image
    fwd = _ForwardLocals(rel_filo.FiLo.forward.__code__)

    def item(b, cls=ref.CLASS_NAME):
        return {
            "img": image[b : b + 1].clone(),
            "img_mask": mask[b : b + 1][:, None].clone(),  # target_transform output [1,518,518], batched
            "cls_name": [cls],
            "anomaly": label[b : b + 1].clone(),
            "anomaly_class": ["good" if b == 0 else "broken_large"],
            "img_path": [f"img{b}.png"],
        }

    # ---- stage-1 forward at init (with_adapter=False, positions=None), both images -----------------------------------
    stage1 = []
    for b in range(2):
        rec.clear()
        with torch.no_grad(), fwd:
            text_probs, maps = filo(item(b), with_adapter=False)
        stage1.append((dict(rec), fwd.last, text_probs, maps))
        if b == 0:  # the dual-path Attention modules exist after the first forward (lazy surgery)
            for i in (13, 19):
                visual.transformer.resblocks[i - 1].attn.register_forward_hook(hook(f"attn{i}", clone_any))
    r = stage1[1][0]
    t = r["encode_image"][0][1]
    assert torch.equal(r["meta_in_normal"][0], stage1[1][1]["image_features"])
    for j, (blk, nxt) in ((2, ("block12", "attn13")), (4, ("block18", "attn19"))):
        expect_ori = r[blk][0][1] + r[nxt][0][1].transpose(0, 1)  # x_ori += x_ori_res of the next block
        assert torch.equal(t[j], expect_ori.permute(1, 0, 2)), j
    # image_features: ln_post of ALL tokens of the ORI stream, @ proj
    ori24 = r["block24"][0][1].permute(1, 0, 2)
    assert torch.equal(r["encode_image"][0][0], visual.ln_post(ori24) @ visual.proj)
    # the ORI stream against a plain open_clip forward of the same weights (V-V-free), CLS after block 24
    plain = ref.tiny_model()
    plain.load_state_dict(ref.loaded_state_dict())
    plain.eval()
    with torch.no_grad():
        plain.visual.output_tokens = True
        pooled, _ = plain.visual(image[1:2])
    put("ori_vs_plain_openclip_cls_maxdiff", (pooled - r["encode_image"][0][0][:, 0]).abs().max())
    # V-V surgery: which blocks carry the dual-path Attention after the first forward
    vv_blocks = [
        i + 1 for i, blk in enumerate(visual.transformer.resblocks) if isinstance(blk.attn, rel_transformer.Attention)
    ]
    put("vv_blocks", vv_blocks, np.int64)
    text_vv = [
        i
        for i, blk in enumerate(filo.clip_model.transformer.resblocks)
        if isinstance(blk.attn, rel_transformer.Attention)
    ]
    assert not text_vv  # the text tower keeps nn.MultiheadAttention
    put("meta_text_tower_vv", np.array(False), np.bool_)

    def stack(get):
        return torch.stack([get(s) for s in stage1])

    feats = [s[0]["encode_image"][0][0] for s in stage1]  # [1, 1370, 64]
    toks = [s[0]["encode_image"][0][1] for s in stage1]  # 7 x [1, 1370, 128]
    put("image_features_shape", list(feats[0].shape), np.int64)
    put("image_features_cls", torch.cat([f[:, 0] for f in feats]))
    put("image_features_col18", torch.cat([f[:, 1:][:, COL18] for f in feats]))
    put("patch_tokens_col18", torch.stack([torch.cat([t[j][:, 1:][:, COL18] for t in toks]) for j in range(7)]))
    put("patch_tokens_cls", torch.stack([torch.cat([t[j][:, 0] for t in toks]) for j in range(7)]))
    # what the taps are: the V-V stream is one tensor updated in place (x += x_res), the ORI taps are updated in place
    # by the next block's attention residual (x_ori += x_ori_res)
    for s in stage1:
        r = s[0]
        t = r["encode_image"][0][1]
        b6, b12, b18, b24 = r["block6"][0], r["block12"][0], r["block18"][0], r["block24"][0]
        vv_final = b24[0].permute(1, 0, 2)
        for j in (0, 1, 3, 5):
            assert torch.equal(t[j], vv_final), j  # L6, L12vv, L18vv, L24vv all equal the final V-V stream
        assert torch.equal(t[6], b24[1].permute(1, 0, 2))  # L24ori = block-24 output
        assert not torch.equal(t[0], b6.permute(1, 0, 2))
        assert not torch.equal(t[2], b12[1].permute(1, 0, 2)) and not torch.equal(t[4], b18[1].permute(1, 0, 2))
    diag = []
    for s in stage1:
        r = s[0]
        t = r["encode_image"][0][1]
        diag.append(
            [
                (t[0] - r["block6"][0].permute(1, 0, 2)).abs().max().item(),
                (t[1] - r["block12"][0][0].permute(1, 0, 2)).abs().max().item(),
                (t[2] - r["block12"][0][1].permute(1, 0, 2)).abs().max().item(),
                (t[3] - r["block18"][0][0].permute(1, 0, 2)).abs().max().item(),
                (t[4] - r["block18"][0][1].permute(1, 0, 2)).abs().max().item(),
            ]
        )
    put("taps_vs_block_outputs_maxdiff", diag)
    put(
        "decoder_linear_col18",
        torch.stack([torch.cat([s[0]["dec_linear"][0][j][:, COL18] for s in stage1]) for j in range(4)]),
    )
    put(
        "decoder_cov_col18",
        torch.stack([torch.cat([s[0]["dec_cov"][0][j][:, COL18] for s in stage1]) for j in range(3)]),
    )
    put(
        "decoder_cov0_kernels_col18",
        torch.stack(
            [
                torch.cat([s[0][f"cov0_{a}"][0].flatten(2).transpose(1, 2)[:, COL18] for s in stage1])
                for a in ("fc_11", "fc_33", "fc_55", "fc_77", "fc_15", "fc_51")
            ]
        ),
    )
    put("image_features_norm", stack(lambda s: s[1]["image_features"][0]))
    put("meta_bias_normal", stack(lambda s: s[0]["bias_normal"][0][0]))
    put("meta_bias_abnormal", stack(lambda s: s[0]["bias_abnormal"][0][0]))
    put("prompts_normal_first16", stack(lambda s: s[0]["prompts_normal"][0][0][:, :16]))
    put("prompts_abnormal_first16_rows9", stack(lambda s: s[0]["prompts_abnormal"][0][0][:9, :16]))
    put("ctx_shifted_normal", stack(lambda s: s[0]["prompts_normal"][0][0][0, 1 : 1 + ref.N_CTX]))
    put("ctx_shifted_abnormal", stack(lambda s: s[0]["prompts_abnormal"][0][0][0, 1 : 1 + ref.N_CTX]))
    put("text_normal_raw", stack(lambda s: s[0]["text_raw"][0]))
    put("text_abnormal_raw", stack(lambda s: s[0]["text_raw"][1]))
    put("text_normal", stack(lambda s: s[0]["text_raw"][0] / s[0]["text_raw"][0].norm(dim=-1, keepdim=True)))
    put("text_abnormal", stack(lambda s: s[0]["text_raw"][1] / s[0]["text_raw"][1].norm(dim=-1, keepdim=True)))
    put("text_normal_mean", stack(lambda s: s[1]["normal_text_features"][0, 0]))
    put("text_abnormal_mean", stack(lambda s: s[1]["abnormal_text_features"][0, 0]))
    put("text_features", stack(lambda s: s[1]["text_features"][0]))
    put("text_probs", stack(lambda s: s[2][0, 0]))
    put("s1_maps_s7", stack(lambda s: torch.stack([m[0, 1][S7] for m in s[3]])))
    put("s1_maps_crop", stack(lambda s: torch.stack([m[0, 1, :40, :40] for m in s[3]])))
    put(
        "s1_map_normal_minus_1ma_maxabs",
        stack(lambda s: torch.stack([(m[0, 0] - (1 - m[0, 1])).abs().max() for m in s[3]])),
    )
    put("s1_maps_row259", stack(lambda s: torch.stack([m[0, 1, 259] for m in s[3]])))  # full-resolution lines
    put("s1_maps_col517", stack(lambda s: torch.stack([m[0, 1, :, 517] for m in s[3]])))

    # ---- stage 1 training (train.py's optimizer and loop body) ----------------------------------------------------
    ns = dict(vars(rel_train))
    ns.update(filo_model=filo, args=targs, device="cpu")
    exec(
        train_py.assigns(
            "main_part_param_groups",
            "optimizer_main_part",
            "adapter_param_groups",
            "optimizer_adapter",
            "loss_focal",
            "loss_dice",
        ),
        ns,
    )
    opt1 = _Optimizer(ns["optimizer_main_part"], names_by_id)
    trainable = [names_by_id[id(p)] for g in opt1.opt.param_groups for p in g["params"]]
    put("trainable_names", np.array(trainable), np.str_)
    put("optimizer_lrs", [g["lr"] for g in opt1.opt.param_groups], np.float64)
    put(
        "optimizer_defaults",
        [opt1.opt.defaults[k] for k in ("betas",)][0] + (opt1.opt.defaults["eps"], opt1.opt.defaults["weight_decay"]),
        np.float64,
    )
    loops = train_py.for_loops("items")
    assert len(loops) == 2
    body1, body2 = train_py.code(loops[0].body), train_py.code(loops[1].body)
    focal, dice = _Calls(ns["loss_focal"]), _Calls(ns["loss_dice"])
    ns.update(loss_focal=focal, loss_dice=dice, optimizer_main_part=opt1, loss_list=[])

    def s1_step(b, frozen):
        opt1.frozen = frozen
        focal.out.clear(), dice.out.clear()
        ns["items"] = item(b)
        with fwd:
            exec(body1, ns)
        terms = []
        for j in range(7):
            terms += [focal.out[j].item(), dice.out[2 * j].item(), dice.out[2 * j + 1].item()]
        return terms + [ns["loss"].item()], [ns["loss"].double().item()]

    cur = {n: p.detach().clone() for n, p in params.items()}
    init_terms = [s1_step(b, frozen=True)[0] for b in range(2)]
    put("s1_loss_terms_init", init_terms)
    gt = ns["gt"]
    put("s1_gt_shape", list(gt.shape), np.int64)
    # what the dice would be per image (not what the release computes) for the L24 V-V map of image 1
    m = fwd.last["anomaly_maps"][6]
    p, g = m[:, 1].reshape(1, -1), gt.reshape(1, -1)
    put("s1_dice_a6_per_image_img1", 1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1))
    assert all(torch.equal(params[n], cur[n]) for n in params)

    put("train_order", list(ref.TRAIN_ORDER), np.int64)
    rows = []
    for k, b in enumerate(ref.TRAIN_ORDER):
        terms, _ = s1_step(b, frozen=False)
        rows.append(terms)
        if k == 0:
            assert terms == init_terms[1]
            for n in trainable:
                gr = opt1.grads[n]
                if n.startswith("decoder_cov."):
                    put(f"s1_grad0_slice/{n}", gr[:2, :2] if gr.dim() == 4 else gr)
                else:
                    put(f"s1_grad0/{n}", gr)
            put("s1_grad0_sums", [opt1.grads[n].double().sum().item() for n in trainable], np.float64)
            put("s1_grad0_sqsums", [opt1.grads[n].double().pow(2).sum().item() for n in trainable], np.float64)
        if k == 0:
            for n in trainable:
                if "prompt_learner" in n or n.endswith(".bias"):
                    put(f"s1_step1/{n}", params[n])
    rows.append(s1_step(1, frozen=True)[0])
    put("s1_train_loss_terms", rows)
    for n in trainable:
        if n.startswith("decoder_cov."):
            put(f"s1_step3_slice/{n}", params[n][:2, :2] if params[n].dim() == 4 else params[n])
        else:
            put(f"s1_step3/{n}", params[n])
    put("s1_step3_sums", [params[n].double().sum().item() for n in trainable], np.float64)
    put(
        "s1_step3_delta_sqsums",
        [(params[n].double() - init[n].double()).pow(2).sum().item() for n in trainable],
        np.float64,
    )
    assert all(torch.equal(params[n], init[n]) for n in params if n.startswith("adapter."))
    s1_state = {n: p.detach().clone() for n, p in params.items()}

    # ---- stage 2 (train.py's adapter loop body), from the stage-1 step-3 state ------------------------------------
    # forward at the start of stage 2, both images (no update): adapter output, features, text, CE loss
    opt_a = ns["optimizer_adapter"]
    assert [names_by_id[id(p)] for g in opt_a.param_groups for p in g["params"]] == [
        "adapter.fc.0.weight",
        "adapter.fc.2.weight",
    ]
    for tag, lr in zip(("s2a", "s2b"), ref.ADAPTER_LRS):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(s1_state[n])
        targs.adapter_learning_rate = lr
        exec(train_py.assigns("adapter_param_groups", "optimizer_adapter"), ns)
        opt2 = _Optimizer(ns["optimizer_adapter"], names_by_id)
        ns.update(optimizer_adapter=opt2, loss_list=[])

        def s2_step(b, frozen, opt2=opt2):
            opt2.frozen = frozen
            rec.clear()
            ns["items"] = item(b)
            with fwd:
                exec(body2, ns)
            return ns["loss"].item()

        if tag == "s2a":
            start = []
            for b in range(2):
                loss = s2_step(b, frozen=True)
                start.append(
                    (
                        loss,
                        rec["adapter_out"][0],
                        fwd.last,
                        ns["text_probs"].detach().clone(),
                        [t.clone() for t in rec["text_raw"]],
                    )
                )
                assert fwd.last["anomaly_maps"] is None
            put("s2_loss_init", [s[0] for s in start])
            put("s2_adapter_cls", torch.cat([s[1][:, 0] for s in start]))
            put("s2_image_features", torch.cat([s[2]["image_features"] for s in start]))
            put("s2_text_features", torch.stack([s[2]["text_features"][0] for s in start]))
            put("s2_text_probs", torch.stack([s[2]["text_probs"][0, 0] for s in start]))
            put("s2_logits", torch.stack([s[3][0] for s in start]))  # text_probs[:, 0, ...] / 0.07
            put("s2_text_abnormal_raw", torch.stack([s[4][1] for s in start]))
        losses = []
        for k, b in enumerate(ref.TRAIN_ORDER):
            losses.append(s2_step(b, frozen=False))
            if k == 0:
                for n in ("adapter.fc.0.weight", "adapter.fc.2.weight"):
                    put(f"{tag}_grad0/{n}", opt2.grads[n])
            if k == 0:
                for n in ("adapter.fc.0.weight", "adapter.fc.2.weight"):
                    put(f"{tag}_step1/{n}", params[n])
        losses.append(s2_step(1, frozen=True))
        put(f"{tag}_train_loss", losses, np.float32)
        for n in ("adapter.fc.0.weight", "adapter.fc.2.weight"):
            put(f"{tag}_step3/{n}", params[n])
        assert all(torch.equal(params[n], s1_state[n]) for n in params if not n.startswith("adapter."))
    put("s2_adapter_lrs", list(ref.ADAPTER_LRS), np.float64)
    # train.py saves the checkpoint inside the adapter-epoch loop with `save_name = + "filo_train_on_" + ...`
    try:
        exec(train_py.nested_assign("save_name"), dict(ns, args=targs))
        save_error = "none"
    except TypeError as e:
        save_error = f"TypeError: {e}"
    put("meta_train_py_save_error", np.array(save_error), np.str_)

    # ---- test time (test.py's main-loop blocks), at the initial learnables ---------------------------------------
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(init[n])
    tns = dict(vars(rel_test))
    tns.update(args=sargs, device="cpu", image_size=ref.IMAGE_SIZE, dataset_name="mvtec", filo_model=filo)
    exec(test_py.assigns("box_threshold", "text_threshold", "area_threshold", "gaussion_filter"), tns)
    assert (tns["box_threshold"], tns["text_threshold"], tns["area_threshold"]) == (0.25, 0.25, 0.7)
    blur = _Calls(tns["gaussion_filter"])
    tns["gaussion_filter"] = blur
    loops_t = test_py.for_loops("items")
    assert len(loops_t) == 1
    withs = [n for n in loops_t[0].body if isinstance(n, ast.With)]
    assert len(withs) == 2
    grounding_code, scoring_code = test_py.code([withs[0]]), test_py.code([withs[1]])

    def score(b, position, boxes):
        tns.update(
            items=item(b),
            position=list(position),
            results={"pr_sp": [], "anomaly_maps": []},
            boxes_filt=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        )
        blur.out.clear()
        rec.clear()
        with fwd:
            exec(scoring_code, tns)
        # the meta-nets get the adapted, normalised CLS feature
        assert torch.equal(rec["meta_in_normal"][0], fwd.last["image_features"])
        return {
            "locals": fwd.last,
            "blur": [t.clone() for t in blur.out],
            "mean": tns["anomaly_map_ret"].clone(),
            "score": tns["results"]["pr_sp"][0],
            "supp": tns["results"]["anomaly_maps"][0].copy(),
            "keep": (tns["anomaly_score_copy"] == 1).clone(),
            "adapter": rec["adapter_out"][0].clone(),
            "text_raw": [t.clone() for t in rec["text_raw"]],
        }

    tests = [[score(b, pc, ref.BOX_CASES[1]) for b in range(2)] for pc in ref.POSITION_CASES]
    with torch.no_grad(), fwd:
        tp_none, maps_none = filo(item(1), with_adapter=True, positions=None)
    assert torch.equal(tp_none, tests[2][1]["locals"]["text_probs"])  # positions=[] is positions=None
    assert all(torch.equal(a, b) for a, b in zip(maps_none, tests[2][1]["locals"]["anomaly_maps"]))

    def tstack(get):
        return torch.stack([torch.stack([get(t) for t in row]) for row in tests])

    put("test_adapter_cls", torch.cat([t["adapter"][:, 0] for t in tests[0]]))
    put("test_image_features", torch.cat([t["locals"]["image_features"] for t in tests[0]]))
    put("test_text_normal_raw", torch.stack([t["text_raw"][0] for t in tests[0]]))
    put("test_text_abnormal_raw", torch.stack([t["text_raw"][1] for t in tests[0]]))
    put("test_text_features", tstack(lambda t: t["locals"]["text_features"][0]))
    put("test_text_probs", tstack(lambda t: t["locals"]["text_probs"][0, 0]))
    t0 = tests[0]  # positions ("top left",): every map; the other cases differ only through the text features
    put("test_maps_s14", torch.stack([torch.stack([m[0, 1][S14] for m in t["locals"]["anomaly_maps"]]) for t in t0]))
    put("test_blur_s14", torch.stack([torch.stack([m[0][S14] for m in t["blur"]]) for t in t0]))
    put("test_blur_corner", torch.stack([torch.stack([m[0, -12:, -12:] for m in t["blur"]]) for t in t0]))
    put("test_blur_row0", torch.stack([torch.stack([m[0, 0] for m in t["blur"]]) for t in t0]))
    put("test_mean_s7", tstack(lambda t: t["mean"][0, 0][S7]))
    put("test_mean_row259", tstack(lambda t: t["mean"][0, 0, 259]))
    put("test_mean_col517", tstack(lambda t: t["mean"][0, 0, :, 517]))
    put("test_score", [[t["score"] for t in row] for row in tests], np.float64)
    put("position_cases", np.array(["|".join(pc) for pc in ref.POSITION_CASES]), np.str_)

    # box suppression: BOX_CASES on the ("top left",) maps
    supp = [
        [tests[0][b] if k == 1 else score(b, ref.POSITION_CASES[0], boxes) for b in range(2)]
        for k, boxes in enumerate(ref.BOX_CASES)
    ]
    nb = max(len(bx) for bx in ref.BOX_CASES)
    put("supp_boxes", [list(bx) + [[np.nan] * 4] * (nb - len(bx)) for bx in ref.BOX_CASES])
    put("supp_n_boxes", [len(bx) for bx in ref.BOX_CASES], np.int64)
    keep = torch.stack([torch.stack([s["keep"][0, 0] for s in row]) for row in supp])
    assert all(torch.equal(keep[k, 0], keep[k, 1]) for k in range(len(supp)))
    put("supp_keep", keep[:, 0], np.bool_)
    put("supp_map_s7", np.stack([np.stack([s["supp"][S7] for s in row]) for row in supp]))
    put("supp_map_row200", np.stack([np.stack([s["supp"][200] for s in row]) for row in supp]))

    # ---- Grounding DINO post-processing (test.py) on hand-made detector outputs ----------------------------------
    gd = grounding(ref, rel_test, tns, grounding_code, tmp, put)
    print(f"[grounding] {gd} cases")

    put("meta_commit", np.array(commit), np.str_)
    put("meta_seeds", [ref.WEIGHT_SEED, ref.INPUT_SEED, ref.LEARNABLE_SEED, ref.MODULE_SEED], np.int64)
    put(
        "meta_versions",
        np.array(
            [
                f"torch {torch.__version__}",
                f"numpy {np.__version__}",
                f"transformers {__import__('transformers').__version__}",
                f"torchvision {__import__('torchvision').__version__}",
            ]
        ),
        np.str_,
    )
    args_cli.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args_cli.out, **out)
    size = os.path.getsize(args_cli.out)
    print(
        f"wrote {args_cli.out} ({size / 1e6:.2f} MB, {len(out)} keys, reference commit {commit}, "
        f"{time.time() - t_start:.0f} s)"
    )
    for k in sorted(out):
        print(f"  {k}: {out[k].dtype} {list(out[k].shape)}")
    return 0


def grounding(ref, rel_test, tns, grounding_code, tmp, put):
    """test.py's first main-loop block (caption, get_grounding_output, phrase filter, pixel boxes, best box, 3x3
    position) on a fake detector whose outputs are hand-made."""
    from transformers import BertTokenizer

    captions = {}
    for ds, cls in (("mvtec", "bottle"), ("visa", "macaroni1")):
        table = tns["mvtec_anomaly_detail_gpt"] if ds == "mvtec" else tns["visa_anomaly_detail_gpt"]
        captions[cls] = " . ".join(tns["anomaly_status_general"] + table[cls])  # as test.py builds text_prompt
    words = sorted({w for c in captions.values() for w in c.lower().replace(".", " ").split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + words
    tok_dir = tmp / "bert_vocab"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(tok_dir), do_lower_case=True)

    def positions_of(cls, phrase):
        cap = captions[cls].lower().strip()
        ids = tokenizer(cap if cap.endswith(".") else cap + ".")["input_ids"]
        want = tokenizer(phrase, add_special_tokens=False)["input_ids"]
        for i in range(len(ids) - len(want) + 1):
            if ids[i : i + len(want)] == want:
                return list(range(i, i + len(want)))
        raise KeyError(phrase)

    def box_at(cx_px, cy_px, w=0.1, h=0.1):
        cx = _float32_center_input(cx_px, w, ref.IMAGE_SIZE)
        cy = _float32_center_input(cy_px, h, ref.IMAGE_SIZE)
        return [cx, cy, w, h]

    def logit(p):
        return float(np.log(p / (1 - p)))

    # each case: class, list of (phrase or None, max prob, [cx, cy, w, h]) for up to NQ queries
    far = [0.5, 0.5, 0.1, 0.1]
    cases = {
        "mixed": (
            "bottle",
            [
                ("cracked large", 0.62, [0.30, 0.25, 0.10, 0.12]),
                ("dented small", 0.20, [0.70, 0.70, 0.10, 0.10]),  # below box_threshold
                ("leaking", 0.90, [0.50, 0.50, 0.90, 0.85]),  # area 0.765 >= 0.7
                ("small", 0.70, [0.80, 0.20, 0.05, 0.05]),  # phrase matches no description: kept, not converted
                ("unusual odor", 0.8437, [0.75, 0.80, 0.20, 0.15]),  # best number "0.84"
                ("damage", 0.45, [0.10, 0.90, 0.10, 0.10]),
            ],
        ),
        "tie": (
            "bottle",
            [
                ("missing cap", 0.8612, [0.20, 0.20, 0.10, 0.10]),
                ("deformed", 0.8671, [0.80, 0.80, 0.10, 0.10]),  # same str(...)[:4] "0.86": the later one wins (>=)
                ("broken", 0.8599, [0.50, 0.20, 0.10, 0.10]),  # "0.85"
            ],
        ),
        "fallback_none": (
            "bottle",
            [
                ("cracked small", 0.24, [0.30, 0.30, 0.10, 0.10]),
                ("defect", 0.21, [0.70, 0.30, 0.10, 0.10]),
            ],
        ),
        "fallback_large": (
            "bottle",
            [
                ("excessive condensation", 0.77, [0.45, 0.60, 0.88, 0.80]),  # area 0.704: filtered, then the argmax
                ("discolored", 0.22, [0.20, 0.20, 0.10, 0.10]),
            ],
        ),
        "no_description": (
            "bottle",
            [
                ("cap", 0.66, [0.20, 0.20, 0.10, 0.10]),
                ("large", 0.71, [0.80, 0.20, 0.10, 0.10]),
            ],
        ),
        "two_phrases_one_box": (
            "bottle",
            [
                ("dented large . leaking", 0.55, [0.60, 0.40, 0.10, 0.10]),
            ],
        ),
        "fallback_all_low": ("bottle", []),  # every query at LOW: argmax is query 0, number str(4.54e-05)[:4]
        "x172.0": ("bottle", [("cracked large", 0.6, box_at(172.0, 100.0))]),  # top left (bounds inclusive)
        "x172.3": ("bottle", [("cracked large", 0.6, box_at(172.3, 100.0))]),  # between cells: no position
        "x173.0": ("bottle", [("cracked large", 0.6, box_at(173.0, 100.0))]),  # top
        "xy172.5": ("bottle", [("cracked large", 0.6, box_at(172.5, 172.5))]),  # exactly 172.5: no position
        "x344.0_y344.0": ("bottle", [("cracked large", 0.6, box_at(344.0, 344.0))]),  # center
        "x344.6_y300.0": ("bottle", [("cracked large", 0.6, box_at(344.6, 300.0))]),  # between cells
        "x345.0_y517.0": ("bottle", [("cracked large", 0.6, box_at(345.0, 517.0))]),  # bottom right
        "x400.0_y517.4": ("bottle", [("cracked large", 0.6, box_at(400.0, 517.4))]),  # below the last row
        "visa_macaroni1": (
            "macaroni1",
            [
                ("uneven shape", 0.9, [0.30, 0.30, 0.10, 0.10]),  # description "uneven shape " (trailing space)
                ("unusual consistency", 0.8, [0.60, 0.30, 0.10, 0.10]),  # description "Unusual consistency"
                ("small scratches", 0.5, [0.80, 0.80, 0.10, 0.10]),
            ],
        ),
    }

    class FakeImage:
        def to(self, device):
            return self

        def __getitem__(self, idx):
            return self

    class FakeDetector:
        def __init__(self):
            self.tokenizer = tokenizer
            self.captions = []

        def to(self, device):
            return self

        def __call__(self, img, captions):
            self.captions.append(captions[0])
            return {"pred_logits": self.logits[None].clone(), "pred_boxes": self.boxes[None].clone()}

    model = FakeDetector()
    names = list(cases)
    all_logits, all_boxes, res = [], [], []
    for name in names:
        cls, queries = cases[name]
        lg = torch.full((NQ, 256), LOW, dtype=torch.float32)
        bx = torch.tensor([far] * NQ, dtype=torch.float32)
        for q, (phrase, prob, box) in enumerate(queries):
            for part in phrase.split(" . "):
                for i, pos in enumerate(positions_of(cls, part)):
                    lg[q, pos] = logit(prob - 0.05 * i)  # first token carries the max
            bx[q] = torch.tensor(box, dtype=torch.float32)
        model.logits, model.boxes = lg, bx
        all_logits.append(lg)
        all_boxes.append(bx)
        tns.update(
            model=model,
            cls_name=cls,
            image_path=f"{name}.png",
            load_image=lambda p: (None, FakeImage()),
            dataset_name="mvtec" if cls == "bottle" else "visa",
        )
        exec(grounding_code, tns)
        bf = tns["boxes_filt"]
        mb = tns["max_box"]
        res.append(
            {
                "boxes": bf.clone(),
                "phrases": list(tns["pred_phrases"]),
                "position": list(tns["position"]),
                "max_box": None if mb is None else mb.clone(),
                "center": [float(c) for c in tns["center"]],
                "caption": model.captions[-1],
            }
        )
    put("gd_case_names", np.array(names), np.str_)
    put("gd_case_class", np.array([cases[n][0] for n in names]), np.str_)
    put("gd_vocab", np.array(vocab), np.str_)
    put(
        "gd_captions",
        np.array([res[names.index("mixed")]["caption"], res[names.index("visa_macaroni1")]["caption"]]),
        np.str_,
    )
    put("gd_pred_logits", torch.stack(all_logits))
    put("gd_pred_boxes", torch.stack(all_boxes))
    put("gd_n_boxes", [len(r["boxes"]) for r in res], np.int64)
    put("gd_boxes", [r["boxes"].tolist() + [[np.nan] * 4] * (NQ - len(r["boxes"])) for r in res])
    put("gd_phrases", np.array([r["phrases"] + [""] * (NQ - len(r["phrases"])) for r in res]), np.str_)
    put("gd_position", np.array([r["position"][0] if r["position"] else "" for r in res]), np.str_)
    put("gd_n_position", [len(r["position"]) for r in res], np.int64)
    put("gd_max_box", [r["max_box"].tolist() if r["max_box"] is not None else [np.nan] * 4 for r in res])
    put("gd_center", [r["center"] for r in res], np.float64)
    put("gd_thresholds", [tns["box_threshold"], tns["text_threshold"], tns["area_threshold"]], np.float64)
    for n, r in zip(names, res):
        print(f"  {n}: phrases={r['phrases']} position={r['position']} center={r['center']}")
    return len(names)


if __name__ == "__main__":
    raise SystemExit(main())

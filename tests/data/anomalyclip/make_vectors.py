"""Regenerate `vectors.npz` by running the released AnomalyCLIP code on the tiny reference setting.

    python tests/data/anomalyclip/make_vectors.py /path/to/AnomalyCLIP [--out tests/data/anomalyclip/vectors.npz]

`/path/to/AnomalyCLIP` is a checkout of zqhang/AnomalyCLIP (45ed4dd); nothing of it is copied here: its modules
are imported from that path.  CPU, float32.  Three things are run:

1. the release's own modules step by step, as `train.py` / `test.py` chain them (model load through
   `AnomalyCLIP_lib.load`, `AnomalyCLIP_PromptLearner`, `DAPM_replace(20)`, `encode_image` / `encode_text_learn`,
   `compute_similarity`, `get_similarity_map`, `FocalLoss`, `BinaryDiceLoss`, Adam) -> every intermediate key;
2. the release's `train.train(args)` itself for 3 epochs of one 2-image batch (dataset, model path, `.cuda()` and the
   prompt-learner seed patched in this process only) -> its checkpoints must equal the step-by-step learnables;
3. the release's `test.test(args)` itself with batch 1 (same patches; metric functions replaced by a recorder) ->
   its smoothed maps and scores must equal the step-by-step ones.
Missing optional imports of the release (`thop`, `pkg_resources`, `skimage`) are replaced by empty stand-ins.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
HELPER = HERE.parents[1] / "baselines" / "anomalyclip_reference.py"
PROMPT_SEED = 111  # torch.manual_seed right before AnomalyCLIP_PromptLearner is built (its nn.init.normal_ draws)
DESIGN = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9, "learnabel_text_embedding_length": 4}
DPAM_LAYER = 20
LAM = 4
SIGMA = 4
ADAM = {"lr": 1e-3, "betas": (0.5, 0.999)}
STEPS = 3


def _load_helper():
    spec = importlib.util.spec_from_file_location("anomalyclip_reference", HELPER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _stub_missing_imports():
    """Empty stand-ins for imports the release makes but the run never uses (or uses only for a version check)."""
    try:
        import thop  # noqa: F401
    except ImportError:
        thop = types.ModuleType("thop")
        thop.profile = lambda *a, **k: (_ for _ in ()).throw(NotImplementedError("thop stub"))
        sys.modules["thop"] = thop
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import packaging.version

        pr = types.ModuleType("pkg_resources")
        pr.packaging = packaging
        sys.modules["pkg_resources"] = pr
    try:
        import skimage  # noqa: F401
    except ImportError:
        sk = types.ModuleType("skimage")
        sk.measure = types.ModuleType("skimage.measure")
        sys.modules["skimage"] = sk
        sys.modules["skimage.measure"] = sk.measure


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class _Items(torch.utils.data.Dataset):
    """Stands in for the release's `dataset.Dataset`: yields its item dict for the fixed reference batch."""

    def __init__(self, inputs, *args, **kwargs):
        self.inputs = inputs
        self.obj_list = ["object"]

    def __len__(self):
        return len(self.inputs["label"])

    def __getitem__(self, i):
        return {
            "img": self.inputs["image"][i],
            "img_mask": self.inputs["mask"][i][None],
            "cls_name": "object",
            "anomaly": int(self.inputs["label"][i]),
            "img_path": f"img{i}.png",
            "cls_id": 0,
        }


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref_dir", type=Path, help="checkout of zqhang/AnomalyCLIP")
    ap.add_argument("--out", type=Path, default=HERE / "vectors.npz")
    ap.add_argument("--skip-release-scripts", action="store_true", help="skip the train.train / test.test cross-checks")
    args = ap.parse_args(argv)

    torch.set_num_threads(min(2, torch.get_num_threads()))
    ref = _load_helper()
    ref_dir = args.ref_dir.resolve()
    _stub_missing_imports()
    sys.path.insert(0, str(ref_dir))
    import AnomalyCLIP_lib
    import torch.nn.functional as F
    from loss import BinaryDiceLoss, FocalLoss
    from prompt_ensemble import AnomalyCLIP_PromptLearner
    from scipy.ndimage import gaussian_filter

    out: dict[str, np.ndarray] = {}
    load_fn = AnomalyCLIP_lib.load  # the release's loader (model_load.load)

    def put(key, value, dtype=np.float32):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        out[key] = np.array(value, dtype=dtype, copy=True, order="C")  # a copy: parameters change in place later

    # ---- setting -------------------------------------------------------------------------------------------
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

    tmp = Path(tempfile.mkdtemp(prefix="anomalyclip_vectors_"))
    weights_path = tmp / "tiny_openai_state_dict.pt"
    torch.save(sd, weights_path)

    class _OpenAIArchive:
        """What `torch.jit.load` returns for the OpenAI ViT-L/14@336 file, reduced to what `load` uses of it."""

        def eval(self):
            return self

        def state_dict(self):
            return {k: v.clone() for k, v in sd.items()}

    def release_load(name="ViT-L/14@336px", device="cpu", design_details=None, **kw):
        # AnomalyCLIP_lib.load with the JIT-archive branch it takes for the OpenAI file (jit=False afterwards:
        # build_model from the archive's state_dict, then .float() on CPU); only the file read is replaced.
        with _patched(torch.jit, "load", lambda *a, **k: _OpenAIArchive()):
            return load_fn(str(weights_path), device="cpu", design_details=design_details)

    def load_model():
        model, _ = release_load(design_details=DESIGN)
        model.eval()
        return model

    def seeded_prompt_learner(model, design):
        torch.manual_seed(PROMPT_SEED)
        return AnomalyCLIP_PromptLearner(model.to("cpu"), design)

    # ---- model + prompt learner, as train.py / test.py build them ------------------------------------------
    model = load_model()
    pl = seeded_prompt_learner(model, DESIGN)
    model.visual.DAPM_replace(DPAM_layer=DPAM_LAYER)
    init_state = {k: v.detach().clone() for k, v in pl.state_dict().items()}

    def learnables(prefix):
        put(f"{prefix}ctx_pos", pl.ctx_pos.reshape(-1, pl.ctx_pos.shape[-1]))
        put(f"{prefix}ctx_neg", pl.ctx_neg.reshape(-1, pl.ctx_neg.shape[-1]))
        put(f"{prefix}compound", torch.stack(list(pl.compound_prompts_text)))

    learnables("init_")
    prompts, tokenized, compound = pl(cls_id=None)
    put("tokenized_prompts", tokenized, dtype=np.int64)
    put("eot_index", tokenized.argmax(dim=-1), dtype=np.int64)
    put("prompt_embeddings", prompts)  # [2, 77, 64]: prefix / ctx / suffix token embeddings fed to the text encoder

    def text_features(raw=False):
        p, t, c = pl(cls_id=None)
        tf = model.encode_text_learn(p, t, c).float()
        if raw:
            return tf
        tf = torch.stack(torch.chunk(tf, dim=0, chunks=2), dim=1)
        return tf / tf.norm(dim=-1, keepdim=True)  # [1, 2, D]

    with torch.no_grad():
        put("text_features_raw", text_features(raw=True))
        T = text_features()
        put("text_features", T[0])
        # the same with the release's `.half()` on the compound prompts made a no-op (this process only)
        with _patched(torch.Tensor, "half", lambda self: self):
            T_nohalf = text_features()
        put("text_features_nohalf", T_nohalf[0])

    # ---- image side: DPAM, features, logits, maps (batch of 2, as train.py runs it) -------------------------
    def image_side(feature_list, tfeat):
        with torch.no_grad():
            g_raw, patches = model.encode_image(image, feature_list, DPAM_layer=DPAM_LAYER)
            g = g_raw / g_raw.norm(dim=-1, keepdim=True)
            logits = (g.unsqueeze(1) @ tfeat.permute(0, 2, 1))[:, 0, ...] / 0.07
            per_layer = []
            for pf in patches:
                pf = pf / pf.norm(dim=-1, keepdim=True)
                sim, _ = AnomalyCLIP_lib.compute_similarity(pf, tfeat[0])
                sm = AnomalyCLIP_lib.get_similarity_map(sim[:, 1:, :], ref.IMAGE_SIZE)  # [B, 518, 518, 2]
                per_layer.append((pf[:, 1:, :], sim[:, 1:, :], sm))
            amap = torch.stack([(sm[..., 1] + 1 - sm[..., 0]) / 2.0 for _, _, sm in per_layer]).sum(dim=0)
            smooth = np.stack([gaussian_filter(a, sigma=SIGMA) for a in amap.numpy()])
        return g_raw, g, logits, per_layer, amap, smooth

    g_raw, g, logits, layers24, amap, smooth = image_side([24], T)
    put("visual_pos_embed_rows10", model.visual.positional_embedding[::10])  # resized in place to 37x37+1 rows
    put("image_global_raw", g_raw)
    put("image_global", g)
    put("image_logits", logits)
    probs = logits.softmax(-1)
    put("image_probs", probs)
    put("image_score", probs[:, 1])
    f24, s24, sm24 = layers24[0]
    put("patch_f24", f24)
    put("patch_probs_24", s24)
    put("map_prob_a_518_s7", sm24[:, ::7, ::7, 1])
    put("map_raw_s7", amap[:, ::7, ::7])
    put("map_raw_crop", amap[:, :40, :40])
    put("map_smooth_s7", smooth[:, ::7, ::7])
    put("map_smooth_crop", smooth[:, :40, :40])
    put("map_prob_a_37", s24[..., 1].reshape(2, ref.GRID, ref.GRID))

    _, g4, logits4, layers4, amap4, smooth4 = image_side([6, 12, 18, 24], T)
    assert torch.equal(logits4, logits), "the global path must not depend on features_list"
    for (f, s, _), lay in zip(layers4[:3], (6, 12, 18)):
        put(f"patch_probs_{lay}", s)
        put(f"patch_f{lay}_s7", f[:, ::7, :])
    assert torch.allclose(layers4[3][1], s24, atol=1e-6, rtol=0)
    put("ml_map_raw_s7", amap4[:, ::7, ::7])
    put("ml_map_smooth_s7", smooth4[:, ::7, ::7])

    # ---- training: the train.py step on the 2-image batch, 3 Adam steps -------------------------------------
    loss_focal, loss_dice = FocalLoss(), BinaryDiceLoss()
    gt = mask.clone()
    gt[gt > 0.5] = 1
    gt[gt <= 0.5] = 0

    def train_losses(feature_list):
        with torch.no_grad():
            gi, pfs = model.encode_image(image, feature_list, DPAM_layer=DPAM_LAYER)
            gi = gi / gi.norm(dim=-1, keepdim=True)
        tf = text_features()
        tp = (gi.unsqueeze(1) @ tf.permute(0, 2, 1))[:, 0, ...] / 0.07
        ce = F.cross_entropy(tp.squeeze(), label.long())
        terms = torch.zeros(3)
        loss = 0
        for pf in pfs:
            pf = pf / pf.norm(dim=-1, keepdim=True)
            sim, _ = AnomalyCLIP_lib.compute_similarity(pf, tf[0])
            smap = AnomalyCLIP_lib.get_similarity_map(sim[:, 1:, :], ref.IMAGE_SIZE).permute(0, 3, 1, 2)
            fo = loss_focal(smap, gt)
            da = loss_dice(smap[:, 1, :, :], gt)
            dn = loss_dice(smap[:, 0, :, :], 1 - gt)
            loss += fo
            loss += da
            loss += dn
            terms += torch.stack([fo.detach(), da.detach(), dn.detach()])
        loss = LAM * loss
        total = loss + ce
        row = [ce.item(), *terms.tolist(), total.item()]
        return total, row

    optimizer = torch.optim.Adam(list(pl.parameters()), **ADAM)
    rows = []
    for step in range(STEPS):
        total, row = train_losses([24])
        rows.append(row)
        optimizer.zero_grad()
        total.backward()
        if step == 0:
            put("step0_grad_ctx_pos", pl.ctx_pos.grad.reshape(-1, pl.ctx_pos.shape[-1]))
            put("step0_grad_ctx_neg", pl.ctx_neg.grad.reshape(-1, pl.ctx_neg.shape[-1]))
            put("step0_grad_compound", torch.stack([p.grad for p in pl.compound_prompts_text]))
        optimizer.step()
        if step == 0:
            learnables("step1_")
    with torch.no_grad():
        rows.append(train_losses([24])[1])
        learnables("step3_")
        put("step3_text_features", text_features()[0])
    put("train_loss_terms", np.array(rows, dtype=np.float64), dtype=np.float32)
    put("train_loss_terms_f64", np.array(rows, dtype=np.float64), dtype=np.float64)
    stepped = {k: v.detach().clone() for k, v in pl.state_dict().items()}

    pl.load_state_dict(init_state)
    with torch.no_grad():
        put("ml_train_loss_terms0", train_losses([6, 12, 18, 24])[1])

    # the step-0 gradient of the compound prompts with the `.half()` made a no-op (in the release the gradient of
    # each of the two prompts' copies is rounded to float16 on the way back through the cast, then the two are
    # summed in float32 by the expand's backward)
    pl.zero_grad()
    with _patched(torch.Tensor, "half", lambda self: self):
        train_losses([24])[0].backward()
    put("step0_grad_compound_nohalf", torch.stack([p.grad for p in pl.compound_prompts_text]))
    pl.zero_grad()
    grad_half = torch.from_numpy(out["step0_grad_compound"])
    grad_nohalf = torch.from_numpy(out["step0_grad_compound_nohalf"])

    # ---- diagnostics: the tiny weights give a non-trivial, DPAM-sensitive model -----------------------------
    plain = load_model()
    with torch.no_grad():
        _, ori_patches = plain.encode_image(image, [24], DPAM_layer=None)
    ori = ori_patches[0][:, 1:, :]
    ori = ori / ori.norm(dim=-1, keepdim=True)
    cos_vv_vs_qk = (ori * f24).sum(-1)
    diag = {
        "patch prob_a std over patches (per image)": s24[..., 1].std(dim=1).tolist(),
        "patch prob_a min/max": [s24[..., 1].min().item(), s24[..., 1].max().item()],
        "mean cos(V-V local, Q-K local) at layer 24": cos_vv_vs_qk.mean().item(),
        "layer-6 vs layer-24 patch_probs max |diff|": (layers4[0][1] - s24).abs().max().item(),
        "text half vs no-half max |diff|": (T - T_nohalf).abs().max().item(),
        "image_probs": probs.tolist(),
        "train total per step": [r[-1] for r in rows],
        "compound grad |half - nohalf| max / max|grad|": [
            (grad_half - grad_nohalf).abs().max().item(),
            grad_nohalf.abs().max().item(),
        ],
        "ctx grad max |.|": [out["step0_grad_ctx_pos"].__abs__().max(), out["step0_grad_ctx_neg"].__abs__().max()],
    }
    for k, v in diag.items():
        print(f"[diag] {k}: {v}")

    # ---- cross-check 1: the release's train.train(args) -----------------------------------------------------
    commit = _git_commit(ref_dir)
    if not args.skip_release_scripts:
        import test as rel_test
        import train as rel_train

        save = tmp / "train_ckpt"
        targs = argparse.Namespace(
            train_data_path="unused",
            save_path=str(save),
            dataset="unused",
            depth=9,
            n_ctx=12,
            t_n_ctx=4,
            feature_map_layer=[0, 1, 2, 3],
            features_list=[24],
            epoch=STEPS,
            learning_rate=1e-3,
            batch_size=8,
            image_size=ref.IMAGE_SIZE,
            print_freq=1,
            save_freq=1,
            seed=111,
        )
        with contextlib.ExitStack() as st:
            st.enter_context(_patched(rel_train, "Dataset", lambda *a, **k: _Items(inputs)))
            st.enter_context(_patched(rel_train.AnomalyCLIP_lib, "load", release_load))
            st.enter_context(_patched(rel_train, "AnomalyCLIP_PromptLearner", seeded_prompt_learner))
            st.enter_context(_patched(torch.Tensor, "cuda", lambda self, *a, **k: self))
            rel_train.train(targs)
        ck = torch.load(save / f"epoch_{STEPS}.pth", map_location="cpu")["prompt_learner"]
        worst = max((ck[k] - stepped[k]).abs().max().item() for k in ("ctx_pos", "ctx_neg"))
        worst = max(
            worst,
            *(
                (ck[f"compound_prompts_text.{i}"] - stepped[f"compound_prompts_text.{i}"]).abs().max().item()
                for i in range(8)
            ),
        )
        ck1 = torch.load(save / "epoch_1.pth", map_location="cpu")["prompt_learner"]
        worst1 = (ck1["ctx_pos"].reshape(-1, 64) - torch.from_numpy(out["step1_ctx_pos"])).abs().max().item()
        print(
            f"[check] train.train epoch_{STEPS} vs step-by-step learnables max |diff| = {worst:.3e}; "
            f"epoch_1 ctx_pos {worst1:.3e}"
        )
        assert worst < 1e-6 and worst1 < 1e-6

        # ---- cross-check 2: the release's test.test(args), batch 1 ------------------------------------------
        ck_path = tmp / "init.pth"
        torch.save({"prompt_learner": init_state}, ck_path)
        for feats, amap_key, score_ref in (([24], smooth, probs[:, 1]), ([6, 12, 18, 24], smooth4, probs[:, 1])):
            captured = {}

            def record(results, obj, metric, captured=captured):
                captured["results"] = results
                return 0.0

            sargs = argparse.Namespace(
                data_path="unused",
                save_path=str(tmp / "test_out"),
                checkpoint_path=str(ck_path),
                dataset="unused",
                features_list=feats,
                image_size=ref.IMAGE_SIZE,
                depth=9,
                n_ctx=12,
                t_n_ctx=4,
                feature_map_layer=[0, 1, 2, 3],
                metrics="image-pixel-level",
                seed=111,
                sigma=SIGMA,
            )
            with contextlib.ExitStack() as st:
                st.enter_context(_patched(rel_test, "Dataset", lambda *a, **k: _Items(inputs)))
                st.enter_context(_patched(rel_test.AnomalyCLIP_lib, "load", release_load))
                st.enter_context(_patched(rel_test, "image_level_metrics", record))
                st.enter_context(_patched(rel_test, "pixel_level_metrics", record))
                rel_test.test(sargs)
            res = captured["results"]["object"]
            maps = np.asarray(res["anomaly_maps"])
            scores = torch.stack(list(res["pr_sp"])).numpy()
            dm = np.abs(maps - amap_key).max()
            ds = np.abs(scores - score_ref.numpy()).max()
            print(f"[check] test.test features_list={feats}: smoothed map max |diff| = {dm:.3e}, score {ds:.3e}")
            assert dm < 1e-5 and ds < 1e-6
            if feats == [24]:
                put("test_map_smooth_s7", maps[:, ::7, ::7])
                put("test_image_score", scores)

    put("meta_commit", np.array(commit), dtype=np.str_)
    put("meta_seeds", [ref.WEIGHT_SEED, ref.INPUT_SEED, PROMPT_SEED], dtype=np.int64)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size / 1e6:.2f} MB, {len(out)} keys, reference commit {commit})")
    for k in sorted(out):
        print(f"  {k}: {out[k].dtype} {list(out[k].shape)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

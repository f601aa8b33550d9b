"""AnomalyCLIP as a suite method: the glue between config, data and engine and :mod:`.torch_model`.

- Backbone: the QuickGELU OpenAI ViT-L/14@336 (``openai-vit-l-14-336``) built at its native 336 px; images are run at
  ``image_size`` (518) with the release's run-time bilinear resize of the positional embedding (in the torch model).
- ``fit``: the engine hands the training set of the setting (uzad, pseudo or zad: the same code); the method never
  derives its own. The frozen features of every training image are computed once per fit (or read from the feature
  cache, keyed by image content), then ``epochs`` passes of Adam on the prompt learner's tensors only, batches drawn
  by a DataLoader shuffled with a ``torch.Generator`` seeded from the run seed.
- ``predict``: score softmax(⟨g, T⟩/τ)[anomaly]; map Σ_l S_l,a at the input size, scipy gaussian σ = ``sigma``.
- ``save`` / ``load``: the learnable tensors only.

Every paper-vs-code difference of the spec is a parameter whose default is the release's behaviour (see ``defaults``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from baselines.anomalyclip.torch_model import POS_RESIZE_MODES, AnomalyCLIPConfig, AnomalyCLIPModel, VisualFeatures
from siad.backbones import get_backbone_spec
from siad.backbones.cache import FeatureCache, backbone_namespace
from siad.backbones.registry import text_layers
from siad.errors import ConfigError, DataError, NumericalError
from siad.methods import METHODS, Batch, BlockList, Choice, Flag, Number, NumberList, ParamRule
from siad.methods.backbone_method import BACKBONE_DEFAULTS, BACKBONE_RULES, BackboneMethod, image_transform
from siad.methods.frozen import CACHE_DEFAULTS, CACHE_RULES, batch_content_keys, cached_rows, content_keys

__all__ = ["AnomalyCLIP", "BlockList"]


@METHODS.register("anomalyclip")
class AnomalyCLIP(BackboneMethod):
    """AnomalyCLIP as released: object-agnostic learnable prompts, DPAM, global + local losses."""

    training_free: ClassVar[bool] = False
    training_mask_resize: ClassVar[str] = "bilinear"  # the release: PIL bilinear resize to 518, then > 0.5
    # built at its native size; ``image_size`` is the run size, reached by the run-time positional resize
    backbone_overrides: ClassVar[tuple[str, ...]] = ("checkpoint", "checkpoint_format")
    defaults: ClassVar[dict[str, Any]] = {
        **BACKBONE_DEFAULTS,
        "backbone": "openai-vit-l-14-336",  # QuickGELU OpenAI ViT-L/14@336, built at its native 336 px
        "image_size": 518,  # run size (37x37 grid); the positional embedding is resized at run time
        # -- prompt learner (spec §1)
        "n_ctx": 12,
        "depth": 9,  # compound prompts before text blocks 1..depth-1
        "t_n_ctx": 4,
        "init_std": 0.02,
        "compound_fp16": True,  # as released: compound prompts rounded through float16 (.half())
        # -- vision
        "dpam_start": 6,  # first DPAM block, 1-indexed (DAPM_replace(20) on 24 blocks = blocks 6-24)
        "features": [24],  # 1-indexed feature layers (the .sh files' --features_list 24; paper: 6 12 18 24)
        "global_ln_post": False,  # as released: g = CLS @ proj without ln_post
        "pos_resize": "bilinear",  # as released, at run time | "bicubic" (open_clip's load-time resize)
        # -- heads, loss, inference
        "temperature": 0.07,
        "local_weight": 4.0,  # λ (the release's lam = 4)
        "sigma": 4.0,  # gaussian smoothing of the map at the input size
        # -- optimisation (train.py / train.sh)
        "lr": 1e-3,
        "betas": [0.5, 0.999],
        "batch_size": 8,
        "epochs": 15,
        # -- engineering (not in the release)
        **CACHE_DEFAULTS,
    }
    param_rules: ClassVar[Mapping[str, ParamRule]] = {
        **BACKBONE_RULES,
        "image_size": Number(low=16, integer=True),
        "n_ctx": Number(low=1, integer=True),
        "depth": Number(low=2, integer=True),
        "t_n_ctx": Number(low=1, integer=True),
        "init_std": Number(low=0, low_open=True),
        "compound_fp16": Flag(),
        "dpam_start": Number(low=1, integer=True),
        "features": BlockList(),
        "global_ln_post": Flag(),
        "pos_resize": Choice(POS_RESIZE_MODES),
        "temperature": Number(low=0, low_open=True),
        "local_weight": Number(low=0),
        "sigma": Number(low=0),
        "lr": Number(low=0, low_open=True),
        "betas": NumberList(2, Number(0.0, 1.0, high_open=True)),
        "batch_size": Number(low=1, integer=True),
        "epochs": Number(low=0, integer=True),
        **CACHE_RULES,
    }

    def __init__(self, params: Mapping[str, Any] | None = None, *, device: str = "cpu", seed: int = 0,
                 weights_seed: int | None = None) -> None:
        super().__init__(params, device=device, seed=seed, weights_seed=weights_seed)
        p = self.params
        spec = self.backbone.spec
        self._transform = image_transform(p["image_size"], spec.mean, spec.std)
        self.config = AnomalyCLIPConfig(
            n_ctx=p["n_ctx"], depth=p["depth"], t_n_ctx=p["t_n_ctx"], dpam_start=p["dpam_start"],
            features=tuple(p["features"]), temperature=float(p["temperature"]), local_weight=float(p["local_weight"]),
            image_size=p["image_size"], compound_fp16=p["compound_fp16"], global_ln_post=p["global_ln_post"],
            pos_resize=p["pos_resize"], init_std=float(p["init_std"]),
        )
        self.model = AnomalyCLIPModel(self.backbone.model, self.backbone.tokenizer, self.config, seed=self.seed)
        self.model.prompt_learner.to(self.device)
        self._text: Tensor | None = None
        self._cache: FeatureCache | None = None
        self.loss_history: list[dict[str, float]] = []

    # -- configuration ---------------------------------------------------------------------------------------

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        """The rules, then the block numbers against the backbone's vision and text towers (configs only)."""
        super().validate_params(params)
        spec = get_backbone_spec(params["backbone"])
        blocks = spec.n_blocks
        if params["dpam_start"] > blocks:
            raise cls.param_error("dpam_start", params["dpam_start"],
                                  f"use a 1-indexed block of the backbone's {blocks} blocks")
        if max(params["features"]) > blocks:
            raise cls.param_error("features", params["features"],
                                  f"use 1-indexed blocks of the backbone's {blocks} blocks (e.g. [{blocks}])")
        text_blocks = text_layers(spec.arch)
        if params["depth"] - 1 >= text_blocks:
            raise cls.param_error("depth", params["depth"], f"compound prompts go before text blocks 1..depth-1; the "
                                  f"backbone's text tower has {text_blocks} blocks: use depth ≤ {text_blocks}")

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """Resize((S, S)) bicubic → ToTensor → OpenAI mean/std (S = ``image_size``)."""
        return self._transform

    @property
    def input_size(self) -> int:
        return int(self.params["image_size"])

    # -- frozen features -------------------------------------------------------------------------------------

    def _store(self, features: VisualFeatures) -> VisualFeatures:
        """On the CPU in the storage dtype and back to float32: the same numbers with or without a cache."""
        dtype = getattr(torch, self.params["feature_cache_dtype"])
        return features.to("cpu").to(dtype).to(torch.float32)

    def _feature_cache(self) -> FeatureCache:
        if self._cache is None:
            c = self.config
            namespace = backbone_namespace(
                self.backbone.spec, taps=[f - 1 for f in c.features], seed=self.weights_seed,
                feature="anomalyclip_global_local", image_size=c.image_size, pos_resize=c.pos_resize,
                dpam_start=c.dpam_start, global_ln_post=c.global_ln_post,
                code_modules=(AnomalyCLIPModel.__module__, type(self).__module__),
            )
            dtype = getattr(torch, self.params["feature_cache_dtype"])
            self._cache = FeatureCache(Path(self.params["feature_cache"]), namespace, store_dtype=dtype)
        return self._cache

    def frozen_features(self, images: Tensor, keys: Sequence[str] | None = None) -> VisualFeatures:
        """g [B, E] and f [B, K, N, E] of images [B, 3, S, S] (float32, CPU), from the feature cache when one is
        configured and ``keys`` (content identities, e.g. ``sha256/<hex>``) are given."""
        if self.params["feature_cache"] is None or not keys:
            return self._store(self.model.encode_image(images.to(self.device)))

        def compute(positions: Sequence[int]) -> dict[str, Tensor]:
            out = self.model.encode_image(images[list(positions)].to(self.device))
            return {"global": out.global_features, "local": out.local_features}

        cached = cached_rows(self._feature_cache(), keys, compute)
        return VisualFeatures(cached["global"], cached["local"])

    # -- training --------------------------------------------------------------------------------------------

    def _training_features(self, train_data: torch.utils.data.Dataset) -> tuple[VisualFeatures, Tensor, Tensor, Tensor]:
        """One pass over the training set: frozen features, masks [N, S, S] bool, labels [N] and whether each mask is
        pixel truth [N] (the items' ``mask_valid``; True when a set does not say)."""
        size = self.input_size
        loader = torch.utils.data.DataLoader(train_data, batch_size=self.params["batch_size"], shuffle=False,
                                             collate_fn=_collate)
        globals_, locals_, masks, labels, valid = [], [], [], [], []
        bar = tqdm(loader, desc="anomalyclip features", unit="batch", disable=not self.params["progress"])
        for batch in bar:
            images = batch["image"]
            if tuple(images.shape[-2:]) != (size, size) or any(tuple(m.shape) != (size, size) for m in batch["mask"]):
                raise DataError(f"anomalyclip: training images and masks must be {size}x{size} (the method's input "
                                f"size); got images {tuple(images.shape)} for {batch['img_path'][:3]}")
            keys = content_keys(images, batch["image_sha256"]) if self.params["feature_cache"] else None
            feats = self.frozen_features(images, keys)
            globals_.append(feats.global_features)
            locals_.append(feats.local_features)
            masks.append(torch.stack([m.bool() for m in batch["mask"]]))
            labels.append(batch["label"])
            valid.append(batch["mask_valid"])
        if not globals_:
            raise DataError("anomalyclip: the training set is empty")
        features = VisualFeatures(torch.cat(globals_), torch.cat(locals_))
        return features, torch.cat(masks), torch.cat(labels), torch.cat(valid)

    def fit(self, train_data: torch.utils.data.Dataset, setting: str) -> None:
        """Train the prompt learner on the engine's training set of ``setting`` (uzad, pseudo and zad alike)."""
        p = self.params
        features, masks, labels, valid = self._training_features(train_data)
        learner = self.model.prompt_learner
        optimizer = torch.optim.Adam(learner.parameters(), lr=p["lr"], betas=tuple(p["betas"]))
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.utils.data.DataLoader(range(len(labels)), batch_size=p["batch_size"], shuffle=True,
                                            generator=generator)
        self._text = None
        self.loss_history = []
        learner.train()
        bar = tqdm(total=p["epochs"] * len(order), desc=f"train anomalyclip ({setting})", unit="step",
                   disable=not p["progress"])
        for _ in range(p["epochs"]):
            for index in order:
                batch = features[index].to(self.device)
                terms = self.model.loss(batch, masks[index].to(self.device), labels[index].to(self.device),
                                        mask_valid=valid[index])
                if not torch.isfinite(terms.total):
                    raise NumericalError(f"anomalyclip: the training loss became {float(terms.total)}; lower `lr`")
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                optimizer.step()
                self.loss_history.append(terms.as_floats())
                bar.update(1)
                bar.set_postfix(loss=f"{self.loss_history[-1]['total']:.3f}")
        bar.close()
        learner.eval()

    # -- inference -------------------------------------------------------------------------------------------

    def text_features(self) -> Tensor:
        """T [2, E] of the current learnables, computed once (the learnables change only in fit / load)."""
        if self._text is None:
            with torch.no_grad():
                self._text = self.model.text_features().detach()
        return self._text

    @torch.no_grad()
    def predict(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"]
        keys = batch_content_keys(batch) if self.params["feature_cache"] is not None else None
        features = self.frozen_features(images, keys).to(self.device)
        return self.model.predict(features, self.text_features(), float(self.params["sigma"]))

    # -- persistence -----------------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """The learnable tensors only (ctx_pos, ctx_neg, compound prompts); the frozen CLIP comes from its own file."""
        torch.save({k: v.detach().cpu() for k, v in self.model.prompt_learner.state_dict().items()}, path)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        learner = self.model.prompt_learner
        expected = learner.state_dict()
        shapes = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
        if shapes != {k: tuple(v.shape) for k, v in expected.items()}:
            raise ConfigError(
                f"{path}: trained AnomalyCLIP tensors {shapes} do not match this configuration "
                f"({ {k: tuple(v.shape) for k, v in expected.items()} }); was it trained with other n_ctx / depth / "
                "t_n_ctx or another backbone? Re-run the fit step"
            )
        learner.load_state_dict(state)
        self._text = None


def _collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Images stacked; masks as a list; labels; content identities (``image_sha256``, "" when absent)."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "mask": [torch.as_tensor(it["mask"]) for it in items],
        "label": torch.tensor([int(it["label"]) for it in items]),
        "img_path": [it.get("img_path", "") for it in items],
        "image_sha256": [it.get("image_sha256") or "" for it in items],
        "mask_valid": torch.tensor([bool(it.get("mask_valid", True)) for it in items]),
    }

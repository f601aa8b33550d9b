"""AA-CLIP as a suite method: the glue between config, data and engine and :mod:`.torch_model`.

- Backbone: the exact-GELU OpenAI ViT-L/14@336 built at 518 px (``openai-vit-l-14-336-518-gelu``: open_clip resizes
  the positional embedding bicubically at load, as the release's ``create_model(img_size=518)``).
- ``fit``: the engine's training set of the setting (uzad, pseudo or zad: the same code) feeds both stages.
  Stage 1 trains the text adapter against frozen surgery features (batches of ``stage1_batch_size``, the release's
  joint geometric augmentation, no colour jitter); stage 2 trains the image adapter with the class text features
  fixed (colour jitter + the joint geometric augmentation). Stage 2 stops after ``checkpoint_epoch`` (the release
  trains ``stage2_epochs`` and the authors test the epoch-15 checkpoint: later epochs are discarded, so they are not
  run). Data order and augmentation come from ``torch.Generator``\\ s seeded from the run seed.
- ``predict`` gives the raw score s and the summed logit map; ``postprocess_class`` applies the release's per-class
  min–max normalisation over *every* test image of the class and the domain's image score.
- ``save`` / ``load``: every adapter tensor (text + image + projections) in one state dict under the release's names.

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

from baselines.aaclip.class_names import class_info
from baselines.aaclip.torch_model import (
    DOMAINS,
    STAGE1_LOSS_LAYERS,
    SURGERY_ATTENTION,
    AACLIPConfig,
    AACLIPModel,
    colour_jitter,
    joint_geometric,
    normalize_class,
    stage1_features,
)
from siad.backbones import get_backbone_spec
from siad.backbones.cache import FeatureCache, backbone_namespace
from siad.backbones.registry import text_layers
from siad.errors import ConfigError, DataError, NumericalError
from siad.methods import METHODS, Batch, BlockList, Choice, Flag, Number, NumberList, ParamRule
from siad.methods.backbone_method import BACKBONE_DEFAULTS, BACKBONE_RULES, BackboneMethod
from siad.methods.frozen import CACHE_DEFAULTS, CACHE_RULES, ImageEmbeddings, cached_rows, content_keys
from siad.seeding import derived_seed

__all__ = ["AACLIP", "IterationList"]

DESCRIPTION_SOURCES: tuple[str, ...] = ("release", "class_name")


class IterationList(ParamRule):
    """A list of strictly increasing iteration numbers ≥ 1 (MultiStepLR milestones); may be empty."""

    def problem(self, value: Any) -> str | None:
        ok = (isinstance(value, (list, tuple))
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
              and list(value) == sorted(set(value)))
        return None if ok else "use a list of strictly increasing integers ≥ 1, e.g. [16000, 32000]"

    def coerce(self, value: Any) -> Any:
        each = Number(low=1, integer=True)
        return [each.coerce(v) for v in value] if isinstance(value, (list, tuple)) else value


@METHODS.register("aaclip")
class AACLIP(BackboneMethod):
    """AA-CLIP as released: two-stage text / image adapters on a frozen CLIP."""

    training_free: ClassVar[bool] = False
    training_mask_resize: ClassVar[str] = "nearest"  # the release: nearest resize to 518, then != 0
    per_class_postprocess: ClassVar[bool] = True  # metrics_eval's per-class min-max normalisation
    defaults: ClassVar[dict[str, Any]] = {
        **BACKBONE_DEFAULTS,
        "backbone": "openai-vit-l-14-336-518-gelu",  # exact GELU on OpenAI ViT-L/14@336 weights, built at 518
        # -- adapters (model/adapter.py)
        "text_adapter_blocks": 3,  # residual adapters after text blocks 1-3 (text_adapt_until)
        "image_adapter_blocks": 6,  # after vision blocks 1-6 (image_adapt_until)
        "text_adapt_weight": 0.1,
        "image_adapt_weight": 0.1,
        "features": [6, 12, 18, 24],  # 1-indexed feature layers (levels); the last one feeds the detection head
        "proj_relu": False,  # LeakyReLU after seg_proj / det_proj (--relu, off in the release's runs)
        # -- stage 1 (text adapter)
        "surgery_start": 6,  # first surgery block, 1-indexed (DAPM_replace(20) on 24 blocks = blocks 6-24)
        "surgery_attention": "batch",  # as released: V-V attention across the batch axis | "tokenwise"
        "stage1_loss_layers": "last",  # as released: only the last layer's loss survives the loop | "all" (paper)
        "orthogonality_weight": 0.1,  # text_norm_weight
        "stage1_lr": 1e-5,
        "stage1_batch_size": 16,
        "stage1_epochs": 5,
        "stage1_augment": True,  # as released: the text-stage dataset also applies the joint geometric transform
        # -- stage 2 (image adapter)
        "stage2_lr": 5e-4,
        "stage2_batch_size": 2,
        "stage2_epochs": 20,
        "checkpoint_epoch": 15,  # the stage-2 state kept (the authors' epoch 15); null = stage2_epochs
        "milestones": [16000, 32000],  # MultiStepLR, in iterations
        "gamma": 0.5,
        "betas": [0.5, 0.999],
        "augment": True,  # stage 2: colour jitter (p .7 each) + joint rotation / translation / flips
        # -- inference
        "industrial_blur": [7, 1.0],  # (kernel, sigma) of the Gaussian blur on the patch grid
        "medical_blur": [9, 1.5],
        "class_descriptions": "release",  # prompts from the REAL_NAMES table | "class_name" (the class key)
        "domain": None,  # None = per class from the table | "industrial" | "medical" for every class
        # -- engineering (not in the release)
        **CACHE_DEFAULTS,
    }
    param_rules: ClassVar[Mapping[str, ParamRule]] = {
        **BACKBONE_RULES,
        "text_adapter_blocks": Number(low=0, integer=True),
        "image_adapter_blocks": Number(low=0, integer=True),
        "text_adapt_weight": Number(0.0, 1.0),
        "image_adapt_weight": Number(0.0, 1.0),
        "features": BlockList(),
        "proj_relu": Flag(),
        "surgery_start": Number(low=1, integer=True),
        "surgery_attention": Choice(SURGERY_ATTENTION),
        "stage1_loss_layers": Choice(STAGE1_LOSS_LAYERS),
        "orthogonality_weight": Number(low=0),
        "stage1_lr": Number(low=0, low_open=True),
        "stage1_batch_size": Number(low=1, integer=True),
        "stage1_epochs": Number(low=0, integer=True),
        "stage1_augment": Flag(),
        "stage2_lr": Number(low=0, low_open=True),
        "stage2_batch_size": Number(low=1, integer=True),
        "stage2_epochs": Number(low=0, integer=True),
        "checkpoint_epoch": Number(low=0, integer=True, optional=True),
        "milestones": IterationList(),
        "gamma": Number(low=0, low_open=True),
        "betas": NumberList(2, Number(0.0, 1.0, high_open=True)),
        "augment": Flag(),
        "industrial_blur": NumberList(2, Number(low=0, low_open=True)),
        "medical_blur": NumberList(2, Number(low=0, low_open=True)),
        "class_descriptions": Choice(DESCRIPTION_SOURCES),
        "domain": Choice((None, *DOMAINS)),
        **CACHE_RULES,
    }

    def __init__(self, params: Mapping[str, Any] | None = None, *, device: str = "cpu", seed: int = 0,
                 weights_seed: int | None = None) -> None:
        super().__init__(params, device=device, seed=seed, weights_seed=weights_seed)
        p = self.params
        self.config = AACLIPConfig(
            text_adapter_blocks=p["text_adapter_blocks"], image_adapter_blocks=p["image_adapter_blocks"],
            text_adapt_weight=float(p["text_adapt_weight"]), image_adapt_weight=float(p["image_adapt_weight"]),
            features=tuple(p["features"]), surgery_start=p["surgery_start"], surgery_attention=p["surgery_attention"],
            stage1_loss_layers=p["stage1_loss_layers"], orthogonality_weight=float(p["orthogonality_weight"]),
            proj_relu=p["proj_relu"], industrial_blur=tuple(p["industrial_blur"]),
            medical_blur=tuple(p["medical_blur"]),
        )
        self.model = AACLIPModel(self.backbone.model, self.backbone.tokenizer, self.config, seed=self.seed)
        self._text: dict[str, Tensor] = {}
        self._caches: dict[str, FeatureCache] = {}
        # ĝ = L2 of the unmodified backbone's image embedding: the shared frozen pass, once per image content
        self.embeddings = ImageEmbeddings(self.backbone, self.weights_seed, p["feature_cache"],
                                          getattr(torch, p["feature_cache_dtype"]))
        self.loss_history: list[dict[str, float]] = []

    # -- configuration ---------------------------------------------------------------------------------------

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        """The rules, then block numbers against the backbone's towers and the blur kernels (configs only)."""
        super().validate_params(params)
        overrides = {"image_size": params["image_size"]} if params["image_size"] is not None else {}
        spec = get_backbone_spec(params["backbone"], overrides)
        blocks = spec.n_blocks
        if max(params["features"]) > blocks:
            raise cls.param_error("features", params["features"],
                                  f"use 1-indexed blocks of the backbone's {blocks} blocks (e.g. [{blocks}])")
        for key in ("surgery_start", "image_adapter_blocks"):
            if params[key] > blocks:
                raise cls.param_error(key, params[key], f"the backbone has {blocks} vision blocks: use at most "
                                                        f"{blocks}")
        text_blocks = text_layers(spec.arch)
        if params["text_adapter_blocks"] > text_blocks:
            raise cls.param_error("text_adapter_blocks", params["text_adapter_blocks"],
                                  f"the backbone's text tower has {text_blocks} blocks: use at most {text_blocks}")
        if params["checkpoint_epoch"] is not None and params["checkpoint_epoch"] > params["stage2_epochs"]:
            raise cls.param_error("checkpoint_epoch", params["checkpoint_epoch"],
                                  f"keep an epoch ≤ stage2_epochs ({params['stage2_epochs']}), or null for the last")
        for key in ("industrial_blur", "medical_blur"):
            kernel = params[key][0]
            if not float(kernel).is_integer() or kernel // 2 >= spec.grid:
                raise cls.param_error(key, params[key], f"use [kernel, sigma] with an integer kernel whose half is "
                                                        f"below the patch grid ({spec.grid}), e.g. [7, 1.0]")

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """Resize((S, S)) bicubic → ToTensor → OpenAI mean/std (S = the backbone's size, 518)."""
        return self._transform

    # -- classes ---------------------------------------------------------------------------------------------

    def description(self, cls_name: str) -> str:
        """The prompt words of a class: its REAL_NAMES entry, or the class key (``class_descriptions: class_name``)."""
        if self.params["class_descriptions"] == "class_name":
            return cls_name.replace("_", " ")
        return class_info(cls_name).description

    def domain(self, cls_name: str) -> str:
        """``industrial`` or ``medical``: the ``domain`` parameter, else the class table."""
        return self.params["domain"] or class_info(cls_name).domain

    def class_text(self, cls_name: str) -> Tensor:
        """T [2, E] of a class with the current adapters, computed once (no gradient; reset by fit and load)."""
        if cls_name not in self._text:
            with torch.no_grad():
                self._text[cls_name] = self.model.text_features(self.description(cls_name)).detach()
        return self._text[cls_name]

    # -- frozen stage-1 features -----------------------------------------------------------------------------

    def _cache(self, kind: str) -> FeatureCache:
        """The surgery-feature cache (token-wise surgery only; ĝ goes through :class:`ImageEmbeddings`)."""
        if kind not in self._caches:
            c = self.config
            namespace = backbone_namespace(
                self.backbone.spec, taps=[f - 1 for f in self.model.stage1_taps()], seed=self.weights_seed,
                feature="aaclip_surgery_patch", surgery_start=c.surgery_start, attention="tokenwise",
                code_modules=(AACLIPModel.__module__,))
            dtype = getattr(torch, self.params["feature_cache_dtype"])
            self._caches[kind] = FeatureCache(Path(self.params["feature_cache"]), namespace, store_dtype=dtype)
        return self._caches[kind]

    def _cached(self, kind: str, images: Tensor, keys: Sequence[str], compute: Callable[[Tensor], Tensor]) -> Tensor:
        rows = cached_rows(self._cache(kind), keys, lambda positions: {"x": compute(images[positions].to(self.device))})
        return rows["x"]

    def _store(self, x: Tensor) -> Tensor:
        """On the CPU in the cache's storage dtype and back: the same numbers with or without a cache."""
        return x.to("cpu").to(getattr(torch, self.params["feature_cache_dtype"])).to(torch.float32)

    def stage1_batch_features(self, images: Tensor, keys: Sequence[str] | None = None) -> Tensor:
        """f [B, K', N, E] of a stage-1 batch at :meth:`AACLIPModel.stage1_taps` (float32, on the device).

        ĝ is read from / written to the feature cache (namespace ``image_embedding``) and the surgery features too
        (token-wise surgery only) when ``feature_cache`` is set and ``keys`` are given: the features of an image then
        depend on that image alone. As released (augmented batches, attention across the batch axis) they depend on
        the batch and are computed for each step.
        """
        model, taps = self.model, self.model.stage1_taps()
        images = images.to(self.device)
        g = self.embeddings(images, keys if self.params["feature_cache"] is not None else None).to(self.device)
        if self.params["feature_cache"] is None or not keys:
            surgery = model.surgery_features(images, taps)
            if self.params["feature_cache_dtype"] != "float32":
                surgery = self._store(surgery).to(self.device)
        else:
            if self.config.surgery_attention == "tokenwise":
                surgery = self._cached("surgery", images, keys,
                                       lambda x: model.surgery_features(x, taps)).to(self.device)
            else:
                surgery = model.surgery_features(images, taps)
        return stage1_features(surgery, g)

    # -- training --------------------------------------------------------------------------------------------

    def _generator(self, *names: str) -> torch.Generator:
        return torch.Generator().manual_seed(derived_seed(self.seed, "aaclip", *names))

    def _loader(self, data: torch.utils.data.Dataset, batch_size: int, stage: str) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=_collate,
                                           generator=self._generator(stage, "order"))

    def _check_sizes(self, batch: Mapping[str, Any]) -> None:
        size = self.input_size
        if tuple(batch["image"].shape[-2:]) != (size, size) or tuple(batch["mask"].shape[-2:]) != (size, size):
            raise DataError(f"aaclip: training images and masks must be {size}x{size} (the method's input size); got "
                            f"images {tuple(batch['image'].shape)} for {batch['img_path'][:3]}")

    def augment_batch(self, images: Tensor, masks: Tensor, generator: torch.Generator, *, colour: bool
                      ) -> tuple[Tensor, Tensor]:
        """Per image (in batch order, from ``generator``): colour jitter (``colour``), then the joint geometric
        transform of image and mask."""
        spec = self.backbone.spec
        out_images, out_masks = [], []
        for image, mask in zip(images, masks, strict=True):
            if colour:
                image = colour_jitter(image, spec.mean, spec.std, generator)
            image, mask = joint_geometric(image, mask, generator)
            out_images.append(image)
            out_masks.append(mask)
        return torch.stack(out_images), torch.stack(out_masks)

    def _finite(self, loss: Tensor, stage: int) -> None:
        if not torch.isfinite(loss):
            raise NumericalError(f"aaclip: the stage-{stage} training loss became {float(loss)}; lower `stage"
                                 f"{stage}_lr`")

    def fit(self, train_data: torch.utils.data.Dataset, setting: str) -> None:
        """Stage 1 then stage 2 on the engine's training set of ``setting`` (uzad, pseudo and zad alike)."""
        if len(train_data) == 0:
            raise DataError("aaclip: the training set is empty")
        self.loss_history = []
        self._text = {}
        self.fit_text_adapter(train_data, setting)
        self.fit_image_adapter(train_data, setting)

    def fit_text_adapter(self, train_data: torch.utils.data.Dataset, setting: str) -> None:
        """Stage 1: Adam on the text adapter against frozen surgery features (the release's train_text_adapter)."""
        p, model = self.params, self.model
        if p["stage1_epochs"] == 0:  # the release then encodes text with the plain CLIP
            model.adapters.text_adapted.fill_(False)
            return
        optimizer = torch.optim.Adam(model.adapters.text_parameters(), lr=p["stage1_lr"], betas=tuple(p["betas"]))
        loader = self._loader(train_data, p["stage1_batch_size"], "stage1")
        augment = self._generator("stage1", "augment")
        cacheable = p["feature_cache"] is not None and not p["stage1_augment"]
        bar = tqdm(total=p["stage1_epochs"] * len(loader), desc=f"aaclip stage 1 ({setting})", unit="step",
                   disable=not p["progress"])
        model.adapters.train()
        for _ in range(p["stage1_epochs"]):
            for batch in loader:
                self._check_sizes(batch)
                images, masks = batch["image"], batch["mask"]
                if p["stage1_augment"]:
                    images, masks = self.augment_batch(images, masks, augment, colour=False)
                keys = content_keys(images, batch["image_sha256"]) if cacheable else None
                features = self.stage1_batch_features(images, keys)
                per_class = {c: model.text_features(self.description(c), adapted=True)
                             for c in dict.fromkeys(batch["cls_name"])}
                text = torch.stack([per_class[c] for c in batch["cls_name"]])
                terms = model.stage1_loss(features, text, masks.to(self.device), batch["mask_valid"])
                self._finite(terms.total, 1)
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                optimizer.step()
                self.loss_history.append({"stage": 1, **terms.as_floats()})
                bar.update(1)
                bar.set_postfix(loss=f"{self.loss_history[-1]['total']:.4f}")
        bar.close()
        model.adapters.eval()
        model.adapters.text_adapted.fill_(True)
        self._text = {}

    def stage2_epochs(self) -> int:
        """The stage-2 epochs run: up to the kept checkpoint (later ones would be discarded)."""
        keep = self.params["checkpoint_epoch"]
        return self.params["stage2_epochs"] if keep is None else keep

    def fit_image_adapter(self, train_data: torch.utils.data.Dataset, setting: str) -> None:
        """Stage 2: Adam + MultiStepLR on the image adapter, class text fixed (the release's train_image_adapter)."""
        p, model = self.params, self.model
        optimizer = torch.optim.Adam(model.adapters.image_parameters(), lr=p["stage2_lr"], betas=tuple(p["betas"]))
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(p["milestones"]),
                                                         gamma=p["gamma"])
        loader = self._loader(train_data, p["stage2_batch_size"], "stage2")
        augment = self._generator("stage2", "augment")
        epochs = self.stage2_epochs()
        bar = tqdm(total=epochs * len(loader), desc=f"aaclip stage 2 ({setting})", unit="step",
                   disable=not p["progress"])
        model.adapters.train()
        for _ in range(epochs):
            for batch in loader:
                self._check_sizes(batch)
                images, masks = batch["image"], batch["mask"]
                if p["augment"]:
                    images, masks = self.augment_batch(images, masks, augment, colour=True)
                text = torch.stack([self.class_text(c) for c in batch["cls_name"]])
                features = model.image_features(images.to(self.device))
                terms = model.stage2_loss(features, text, masks.to(self.device), batch["label"].to(self.device),
                                          batch["mask_valid"])
                self._finite(terms.total, 2)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                optimizer.step()
                scheduler.step()
                self.loss_history.append({"stage": 2, **terms.as_floats(), "lr": lr})
                bar.update(1)
                bar.set_postfix(loss=f"{self.loss_history[-1]['total']:.4f}")
        bar.close()
        model.adapters.eval()

    # -- inference -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw scores s = (det·t_a + 1)/2 [B] and summed logit maps [B, S, S]; normalised per class afterwards by
        :meth:`postprocess_class`."""
        names = list(batch["cls_name"])
        text = torch.stack([self.class_text(c) for c in names])
        return self.model.predict(batch["image"].to(self.device), text, [self.domain(c) for c in names])

    def postprocess_class(self, cls_name: str, scores: Tensor, maps: Tensor) -> tuple[Tensor, Tensor]:
        """The release's ``metrics_eval`` over every test image of the class: min–max normalised maps and scores,
        image score 0.5·max(map) + 0.5·s (industrial) or max(map) (medical)."""
        return normalize_class(scores, maps, self.domain(cls_name))

    # -- persistence -----------------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Every adapter tensor (text + image + projections, and whether the text adapter is in use)."""
        torch.save({k: v.detach().cpu() for k, v in self.model.adapters.state_dict().items()}, path)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        adapters = self.model.adapters
        expected = {k: tuple(v.shape) for k, v in adapters.state_dict().items()}
        shapes = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
        if shapes != expected:
            missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
            wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
            raise ConfigError(
                f"{path}: the saved AA-CLIP adapters do not match this configuration (missing {missing}, unexpected "
                f"{extra}, other shapes {wrong}); was it trained with other text/image_adapter_blocks, features, "
                "proj_relu or another backbone? Re-run the fit step with this configuration")
        adapters.load_state_dict(state)
        self._text = {}


def _collate(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Images and masks stacked; labels; class names; content identities (``image_sha256``, "" when absent)."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "mask": torch.stack([torch.as_tensor(it["mask"]).bool() for it in items]),
        "label": torch.tensor([int(it["label"]) for it in items]),
        "cls_name": [it["cls_name"] for it in items],
        "img_path": [it.get("img_path", "") for it in items],
        "image_sha256": [it.get("image_sha256") or "" for it in items],
        "mask_valid": torch.tensor([bool(it.get("mask_valid", True)) for it in items]),
    }

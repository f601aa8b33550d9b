"""AdaCLIP as a suite method: the glue between config, data and engine and :mod:`.torch_model`.

- Backbone: the exact-GELU OpenAI ViT-L/14@336 built at 518 (``openai-vit-l-14-336-518-gelu``: open_clip resizes
  the positional embedding at load, as the release does).
- ``fit``: the engine hands the training set of the setting (uzad, pseudo or zad: the same code). Batch 1 as
  released, ``epochs`` passes in an order drawn from a ``torch.Generator`` seeded from the run seed; on the datasets
  of ``mosaic_datasets`` (the release: MVTec) a drawn item is replaced with probability ``mosaic_rate`` by a 2×2
  mosaic of four random images of its class. AdamW on the learnables only; the release's CUDA fp16 autocast is
  ``amp`` (never on the CPU). Model selection: the last epoch (``selection: fixed``, the default: the release's
  pixel-F1 selection on a validation set without anomalies keeps epoch 1) or the best mean pixel F1-max on the
  training set's own (pseudo-)anomalies (``selection: pseudo_f1``).
- g₀, the unprompted image embedding the dynamic prompts start from, is computed once per image content through the
  feature cache (:class:`siad.methods.frozen.ImageEmbeddings`) and read again by every epoch, setting, seed and
  evaluation.
- ``predict``: P(anomalous) of the fused global feature; map = the test map smoothed by scipy's gaussian, σ = 4.
- ``save`` / ``load``: the learnable tensors under the release's parameter names.

Every paper-vs-code difference of the spec is a parameter whose default is the release's behaviour (``defaults``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from baselines.adaclip.torch_model import PROMPT_BRANCHES, PROMPT_TYPES, AdaCLIPConfig, AdaCLIPModel
from siad.backbones import get_backbone_spec
from siad.errors import ConfigError, DataError, NumericalError
from siad.methods import METHODS, Batch, BlockList, Choice, Flag, Number, NumberList, ParamRule
from siad.methods.backbone_method import BACKBONE_DEFAULTS, BACKBONE_RULES, BackboneMethod
from siad.methods.frozen import CACHE_DEFAULTS, CACHE_RULES, ImageEmbeddings, batch_content_keys, content_keys
from siad.methods.mosaic import MOSAIC_DEFAULTS, MOSAIC_RULES, MosaicDraw, items_by_class
from siad.methods.postprocess import smooth_maps
from siad.metrics import pixel_f1_max
from siad.seeding import derived_seed

__all__ = ["RELEASE_CLASS_NAMES", "AdaCLIP", "prompt_class_name"]

#: The release's class names where the suite's class keys differ (they enter the prompts): (dataset, class key) →
#: name. SDD is "SDD" (its ``sdd-pre.py``), the medical sets are named after the dataset (``headct``,
#: ``brain_mri``, ``br35h``); every other class key equals the release's.
RELEASE_CLASS_NAMES: Mapping[tuple[str, str], str] = {
    ("sdd", "electrical_commutators"): "SDD",
    ("brainmri", "brain"): "brain_mri",
    ("headct", "head"): "headct",
    ("br35h", "brain"): "br35h",
}
SELECTIONS: tuple[str, ...] = ("fixed", "pseudo_f1")
def prompt_class_name(dataset: str, cls_name: str) -> str:
    """The class name AdaCLIP's prompts use for a dataset's class key (the release's names)."""
    return RELEASE_CLASS_NAMES.get((dataset, cls_name), cls_name)


@METHODS.register("adaclip")
class AdaCLIP(BackboneMethod):
    """AdaCLIP as released: static + dynamic prompts in both branches, projection layers, hybrid semantic fusion."""

    training_free: ClassVar[bool] = False
    training_mask_resize: ClassVar[str] = "bilinear"  # the release: PIL bilinear resize to 518, then > 0.5
    defaults: ClassVar[dict[str, Any]] = {
        **BACKBONE_DEFAULTS,
        "backbone": "openai-vit-l-14-336-518-gelu-noantialias",  # exact GELU, OpenAI weights at 518 (37x37)
        # -- prompts and heads (spec §2)
        "features": [6, 12, 18, 24],  # 1-indexed (the release: n_layers // 4 · (1, 2, 3, 4))
        "prompt_depth": 4,
        "prompt_length": 5,
        "prompt_type": "SD",  # static + dynamic
        "prompt_branch": "VL",  # vision + language
        "prompt_fp16": True,  # as released: prompts rounded through float16 (.half()) before entering the streams
        "use_hsf": True,
        "k_clusters": 20,
        "hsf_alpha": 0.2,
        "hsf_random_state": 0,  # k-means seed (unseeded in the release): fixed, scores depend on the weights only
        "sigma": 4.0,  # gaussian smoothing of the test map at the input size
        "dice_per_row": True,  # as released: at batch 1 gt.squeeze() makes the dice per mask row
        # -- optimisation (train.py / trainer.py)
        "lr": 0.01,
        "betas": [0.5, 0.999],
        "weight_decay": 0.01,  # AdamW's default, which the release keeps
        "batch_size": 1,  # the release's text prompts broadcast only at batch 1; > 1 computes T per image
        "epochs": 5,
        **MOSAIC_DEFAULTS,  # MVTec 2×2 mosaic at 0.2, the replaced item's label (siad.methods.mosaic)
        "selection": "fixed",  # the last epoch | "pseudo_f1" (best pixel F1-max on the training set's anomalies)
        "amp": True,  # the release's fp16 autocast; CUDA only (never on the CPU)
        # -- engineering (not in the release)
        **CACHE_DEFAULTS,
    }
    param_rules: ClassVar[Mapping[str, ParamRule]] = {
        **BACKBONE_RULES,
        "features": BlockList(),
        "prompt_depth": Number(low=1, integer=True),
        "prompt_length": Number(low=1, integer=True),
        "prompt_type": Choice(PROMPT_TYPES),
        "prompt_branch": Choice(PROMPT_BRANCHES),
        "prompt_fp16": Flag(),
        "use_hsf": Flag(),
        "k_clusters": Number(low=1, integer=True),
        "hsf_alpha": Number(0.0, 1.0),
        "hsf_random_state": Number(0, 2**32 - 1, integer=True),
        "sigma": Number(low=0),
        "dice_per_row": Flag(),
        "lr": Number(low=0, low_open=True),
        "betas": NumberList(2, Number(0.0, 1.0, high_open=True)),
        "weight_decay": Number(low=0),
        "batch_size": Number(low=1, integer=True),
        "epochs": Number(low=1, integer=True),
        **MOSAIC_RULES,
        "selection": Choice(SELECTIONS),
        "amp": Flag(),
        **CACHE_RULES,
    }

    def __init__(self, params: Mapping[str, Any] | None = None, *, device: str = "cpu", seed: int = 0,
                 weights_seed: int | None = None) -> None:
        super().__init__(params, device=device, seed=seed, weights_seed=weights_seed)
        p = self.params
        self.config = AdaCLIPConfig(
            features=tuple(p["features"]), prompt_depth=p["prompt_depth"], prompt_length=p["prompt_length"],
            prompt_type=p["prompt_type"], prompt_branch=p["prompt_branch"], use_hsf=p["use_hsf"],
            k_clusters=p["k_clusters"], hsf_alpha=float(p["hsf_alpha"]),
            hsf_random_state=p["hsf_random_state"], dice_per_row=p["dice_per_row"], prompt_fp16=p["prompt_fp16"],
            image_size=self.input_size,
        )
        self.model = AdaCLIPModel(self.backbone.model, self.backbone.tokenizer, self.config, seed=self.seed)
        self.model.learnables.to(self.device)
        self.embeddings = ImageEmbeddings(self.backbone, self.weights_seed, p["feature_cache"],
                                          getattr(torch, p["feature_cache_dtype"]))
        self._mosaic = MosaicDraw(p)
        self.loss_history: list[dict[str, float]] = []
        self.selected_epoch: int | None = None

    # -- configuration ---------------------------------------------------------------------------------------

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        """The rules, then the layers and prompt depth against the backbone (its spec only: nothing built)."""
        super().validate_params(params)
        blocks = get_backbone_spec(params["backbone"]).n_blocks
        if max(params["features"]) > blocks:
            raise cls.param_error("features", params["features"],
                                  f"use 1-indexed blocks of the backbone's {blocks} blocks (e.g. [{blocks}])")
        if params["prompt_depth"] > blocks:
            raise cls.param_error("prompt_depth", params["prompt_depth"], f"use at most the backbone's {blocks} blocks")
        patches = get_backbone_spec(params["backbone"]).grid ** 2
        if params["use_hsf"] and min(patches, 5 * params["k_clusters"]) < params["k_clusters"]:
            raise cls.param_error("k_clusters", params["k_clusters"], f"the HSF clusters the top patches of the "
                                  f"{patches}-patch grid: use at most {patches}")

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The release's fp16 autocast, on CUDA only (``amp``)."""
        if self.params["amp"] and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    # -- training --------------------------------------------------------------------------------------------

    def _batch_tensors(self, items: Sequence[Mapping[str, Any]], dataset: str) -> dict[str, Any]:
        size = self.input_size
        images = torch.stack([it["image"] for it in items])
        masks = [torch.as_tensor(it["mask"]) for it in items]
        if tuple(images.shape[-2:]) != (size, size) or any(tuple(m.shape) != (size, size) for m in masks):
            raise DataError(f"adaclip: training images and masks must be {size}x{size} (the method's input size); "
                            f"got images {tuple(images.shape)} for {[it.get('img_path') for it in items][:3]}")
        keys = None
        if self.params["feature_cache"] is not None and not any(it.get("mosaic") for it in items):
            keys = content_keys(images, [it.get("image_sha256") or "" for it in items])
        return {
            "images": images, "masks": torch.stack([m.bool() for m in masks]),
            "labels": torch.tensor([int(it["label"]) for it in items]),
            "valid": torch.tensor([bool(it.get("mask_valid", True)) for it in items]),
            "names": [prompt_class_name(dataset, it["cls_name"]) for it in items],
            "g0": self.embeddings(images, keys),
        }

    def fit(self, train_data: torch.utils.data.Dataset, setting: str) -> None:
        """Train the learnables on the engine's training set of ``setting`` (uzad, pseudo and zad alike)."""
        p = self.params
        n = len(train_data)
        if n == 0:
            raise DataError("adaclip: the training set is empty")
        if p["selection"] == "pseudo_f1" and setting == "uzad":  # before an epoch is spent
            raise ConfigError("adaclip: selection 'pseudo_f1' needs anomalies with masks in the training set, which "
                              "the uzad setting has none of; use selection: fixed, or the pseudo / zad setting")
        dataset = getattr(train_data, "name", "")
        by_class = items_by_class(train_data)
        mosaic_on = self._mosaic.applies_to(dataset)
        learn = self.model.learnables
        optimizer = torch.optim.AdamW(learn.parameters(), lr=p["lr"], betas=tuple(p["betas"]),
                                      weight_decay=p["weight_decay"])
        order_gen = torch.Generator().manual_seed(derived_seed(self.seed, "adaclip", "order"))
        mosaic_gen = torch.Generator().manual_seed(derived_seed(self.seed, "adaclip", "mosaic"))
        self.loss_history = []
        best: tuple[float, int, dict[str, Tensor]] | None = None
        bar = tqdm(total=p["epochs"] * -(-n // p["batch_size"]), desc=f"train adaclip ({setting})", unit="step",
                   disable=not p["progress"])
        for epoch in range(1, p["epochs"] + 1):
            learn.train()
            order = torch.randperm(n, generator=order_gen).tolist()
            for start in range(0, n, p["batch_size"]):
                items = [self._mosaic(train_data, i, by_class, mosaic_on, mosaic_gen)
                         for i in order[start : start + p["batch_size"]]]
                self._step(optimizer, self._batch_tensors(items, dataset))
                bar.update(1)
                bar.set_postfix(loss=f"{self.loss_history[-1]['total']:.3f}")
            if p["selection"] == "pseudo_f1":
                score = self._validation_f1(train_data, dataset)
                if best is None or score > best[0]:
                    best = (score, epoch, {k: v.detach().clone() for k, v in learn.state_dict().items()})
        bar.close()
        learn.eval()
        self.selected_epoch = p["epochs"]
        if best is not None:
            learn.load_state_dict(best[2])
            self.selected_epoch = best[1]

    def _step(self, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any]) -> None:
        dev = self.device
        with self._autocast():
            terms = self.model.loss(batch["images"].to(dev), batch["names"], batch["masks"].to(dev),
                                    batch["labels"].to(dev), batch["valid"], batch["g0"].to(dev))
        if not torch.isfinite(terms.total):
            raise NumericalError(f"adaclip: the training loss became {float(terms.total)}; lower `lr`")
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        self.loss_history.append(terms.as_floats())

    @torch.no_grad()
    def _validation_f1(self, data: torch.utils.data.Dataset, dataset: str) -> float:
        """Mean over classes of the pixel F1-max of the test maps on the training set (``selection: pseudo_f1``)."""
        self.model.learnables.eval()
        masks_by_class: dict[str, list[np.ndarray]] = {}
        maps_by_class: dict[str, list[np.ndarray]] = {}
        for i in range(len(data)):
            item = data[i]
            if not item.get("mask_valid", True):
                continue
            batch = self._batch_tensors([item], dataset)
            _, maps = self._predict_tensors(batch["images"], batch["names"], batch["g0"])
            masks_by_class.setdefault(item["cls_name"], []).append(batch["masks"][0].numpy())
            maps_by_class.setdefault(item["cls_name"], []).append(maps[0].numpy())
        scores = [pixel_f1_max(np.stack(masks_by_class[c]), np.stack(maps_by_class[c])) for c in sorted(masks_by_class)]
        scores = [s for s in scores if s is not None]
        if not scores or not any(m.any() for ms in masks_by_class.values() for m in ms):
            raise ConfigError("adaclip: selection 'pseudo_f1' needs anomalies with masks in the training set; use the "
                              "pseudo or zad setting, or selection: fixed")
        self.model.learnables.train()
        return float(np.mean(scores))

    # -- inference -------------------------------------------------------------------------------------------

    def _predict_tensors(self, images: Tensor, names: Sequence[str], g0: Tensor) -> tuple[Tensor, Tensor]:
        with self._autocast():
            scores, maps = self.model.predict(images.to(self.device), names, g0.to(self.device))
        return scores.float().cpu(), smooth_maps(maps.float(), float(self.params["sigma"]))

    @torch.no_grad()
    def predict(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"]
        dataset = batch.get("dataset", "")
        names = [prompt_class_name(dataset, c) for c in batch["cls_name"]]
        keys = batch_content_keys(batch) if self.params["feature_cache"] is not None else None
        return self._predict_tensors(images, names, self.embeddings(images, keys))

    # -- persistence -----------------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """The learnable tensors only, under the release's names; the frozen CLIP comes from its own file."""
        torch.save({k: v.detach().cpu() for k, v in self.model.learnables.state_dict().items()}, path)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        expected = self.model.learnables.state_dict()
        shapes = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
        want = {k: tuple(v.shape) for k, v in expected.items()}
        if shapes != want:
            raise ConfigError(f"{path}: trained AdaCLIP tensors {shapes} do not match this configuration ({want}); "
                              "was it trained with other prompt / feature settings or another backbone? Re-run the "
                              "fit step")
        self.model.learnables.load_state_dict(state)

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """Resize((S, S)) bicubic → ToTensor → OpenAI mean/std (S = the backbone's 518)."""
        return self._transform

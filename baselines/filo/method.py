"""FiLo as a suite method: the glue between config, data and engine and :mod:`.torch_model` / :mod:`.hqloc`.

- Backbone: the exact-GELU OpenAI ViT-L/14@336 built at 518 (``openai-vit-l-14-336-518-gelu-noantialias``: the
  positional embedding resized bicubically without antialias, as the release's vendored open_clip does, which never
  passes its ``antialias`` argument on; AdaCLIP's entry).
- Descriptions (FG-Des): ``descriptions.yaml`` beside this module (the release's MVTec / VisA lists, the suite's for
  the other seven datasets); ``descriptions: generic`` keeps the 5 generic abnormal states only. As released, the
  classes that share a prompt name (VisA's pcb1–4 → "pcb", macaroni1/2 → "macaroni") share one prompt set, the last
  of the dataset's class order (``shared_prompts: last``; ``own`` gives each class its own list).
- ``fit``: the engine's training set of the setting (uzad, pseudo or zad: the same code). Stage 1, ``epochs`` passes
  at batch 1 over an order drawn from a seeded generator, with the MVTec 2×2 mosaic (:mod:`siad.methods.mosaic`),
  AdamW (0.5, 0.999) on the prompt learners (``lr``) and the heads (``decoder_lr``); stage 2, ``adapter_epochs``
  passes training the adapter only (``adapter_lr``), the prompt learners run without gradient on the adapted feature.
  The frozen image pass is computed once per image content (feature cache) and read by every epoch, setting, seed and
  evaluation.
- ``predict``: per image, Grounding DINO (:mod:`.grounding`) on the original image file with the class caption, the
  release's box logic (:mod:`.hqloc`): the 3×3 cell of the best box selects the abnormal prompts' position
  (``position_enhancement``) and map values outside the kept boxes are multiplied by ``outside_factor``
  (``grounding``); then the 7 maps, their blur and mean, and the image score ½(⟨A, Fa⟩ + max M). Detections are
  computed once per (image, caption, detector) in a process and reused by every setting and variant of a job.
- ``save`` / ``load``: the learnable tensors under the release's names (its ``filo`` checkpoint dict loads).

Every paper-vs-code difference is a parameter whose default is the release's behaviour (``defaults``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from baselines.filo import grounding, hqloc
from baselines.filo.torch_model import (
    KERNELS,
    FiLoConfig,
    FiLoLearnables,
    FrozenTaps,
    abnormal_prompt_texts,
    anomaly_maps,
    frozen_taps,
    image_score,
    normal_prompt_texts,
    position_rows,
    smoothed_map,
    stage1_terms,
    stage2_loss,
    tap_index,
    tap_layout,
    text_features,
)
from siad.backbones import get_backbone_spec
from siad.backbones.cache import FeatureCache, backbone_namespace
from siad.errors import ConfigError, DataError, NumericalError
from siad.methods import METHODS, Batch, BlockList, Choice, Flag, Number, NumberList, ParamRule, Text
from siad.methods.backbone_method import BACKBONE_DEFAULTS, BACKBONE_RULES, BackboneMethod
from siad.methods.frozen import CACHE_DEFAULTS, CACHE_RULES, batch_content_keys, cached_rows, content_keys
from siad.methods.mosaic import MOSAIC_DEFAULTS, MOSAIC_RULES, MosaicDraw, items_by_class
from siad.prompts.learnable import context_prompt_tokens
from siad.seeding import derived_seed

log = logging.getLogger(__name__)

__all__ = ["DESCRIPTIONS_FILE", "FiLo", "class_descriptions", "load_descriptions", "prompt_word", "stage_optimizers"]

DESCRIPTIONS_FILE = Path(__file__).with_name("descriptions.yaml")
TRAINED_ON_KEY = "meta.trained_on"  # the training set's name in the saved weights (UTF-8 bytes as uint8)
DESCRIPTION_MODES: tuple[str, ...] = ("fine", "generic")
SHARED_PROMPTS: tuple[str, ...] = ("last", "own")
#: The release's prompt-name merges (``cls_map``): VisA's four PCBs and two macaroni share one name.
RELEASE_NAME_MERGES: Mapping[str, str] = {"pcb1": "pcb", "pcb2": "pcb", "pcb3": "pcb", "pcb4": "pcb",
                                          "macaroni1": "macaroni", "macaroni2": "macaroni"}


class KernelList(ParamRule):
    """A non-empty list of distinct MMCI kernel names (``1x1``, ``3x3``, ``5x5``, ``7x7``, ``1x5``, ``5x1``)."""

    def problem(self, value: Any) -> str | None:
        ok = (isinstance(value, (list, tuple)) and value and len(set(value)) == len(value)
              and all(v in KERNELS for v in value))
        return None if ok else f"use a non-empty list of distinct kernel names of {list(KERNELS)}"


#: Detectors and HQ-Loc results of this process, shared by every method object (setting, variant) of a job:
#: (kind, spec) → (model, tokenizer); (detector, image content, caption, sizes, thresholds) → result.
_DETECTORS: dict[tuple, tuple[Any, Any]] = {}
_LOCALIZATIONS: dict[tuple, hqloc.HqLocResult] = {}


def stage_optimizers(learnables: FiLoLearnables, params: Mapping[str, Any]
                     ) -> tuple[torch.optim.AdamW, torch.optim.AdamW]:
    """train.py's two AdamW optimisers (betas and weight decay from ``params``): stage 1 over the heads (``decoder_lr``;
    MMCI then the linear heads) and the prompt learners (``lr``; normal then abnormal); stage 2 over the adapter."""
    betas, wd = tuple(params["betas"]), params["weight_decay"]
    main = torch.optim.AdamW([
        {"params": list(learnables.decoder_cov.parameters()), "lr": params["decoder_lr"]},
        {"params": list(learnables.decoder_linear.parameters()), "lr": params["decoder_lr"]},
        {"params": list(learnables.normal_prompt_learner.parameters()), "lr": params["lr"]},
        {"params": list(learnables.abnormal_prompt_learner.parameters()), "lr": params["lr"]},
    ], betas=betas, weight_decay=wd)
    adapter = torch.optim.AdamW(learnables.adapter.parameters(), lr=params["adapter_lr"], betas=betas,
                                weight_decay=wd)
    return main, adapter


@functools.cache
def description_words() -> tuple[str, ...]:
    """Every description of the descriptions file (the tiny detector's vocabulary covers all captions)."""
    data = load_descriptions()
    return tuple(sorted({d for ds in data["datasets"].values() for v in ds["classes"].values() for d in v}))


def random_grounding_dino(seed: int, words: Sequence[str]) -> tuple[Any, Any]:
    """The paper's detector architecture (transformers' default GroundingDinoConfig: Swin-T, BERT-base text, 900
    queries, 6 + 6 layers) with random weights and the tiny vocabulary: it times like the real one (speed table)."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

    tokenizer = grounding.tiny_tokenizer(words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(GroundingDinoConfig())
    return model.eval().requires_grad_(False), tokenizer


def position_cells(size: int) -> hqloc.Cells:
    """The 3×3 cells of the best box's centre at input size ``size``: the release's fixed 518-px table
    ([0, 172], [173, 344], [345, 517]) as is at 518, its bounds scaled by size/518 otherwise (a [choice]: the release
    runs at 518 only); a centre between two cells keeps no position, as released."""
    if size == hqloc.RELEASE_SIZE:
        return hqloc.RELEASE_CELLS
    f = size / hqloc.RELEASE_SIZE
    return tuple((name, (x0 * f, y0 * f), (x1 * f, y1 * f)) for name, (x0, y0), (x1, y1) in hqloc.RELEASE_CELLS)


def default_centre(size: int) -> tuple[float, float]:
    """The centre used when no box is kept: the release's (259, 259) at 518, scaled like :func:`position_cells`."""
    f = size / hqloc.RELEASE_SIZE
    x, y = hqloc.RELEASE_DEFAULT_CENTRE
    return (x, y) if size == hqloc.RELEASE_SIZE else (x * f, y * f)


@functools.cache
def load_descriptions(path: Path = DESCRIPTIONS_FILE) -> dict[str, Any]:
    """The descriptions file, checked: ``datasets.<name>.classes.<key>`` lists of phrases."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{path}: cannot read FiLo's descriptions ({err}); restore the file from the repository"
                        ) from err
    ok = (isinstance(data, dict) and isinstance(data.get("datasets"), dict)
          and all(isinstance(d.get("classes"), dict) and all(isinstance(v, list) and v and
                                                             all(isinstance(x, str) for x in v)
                                                             for v in d["classes"].values())
                  for d in data["datasets"].values()))
    if not ok:
        raise DataError(f"{path}: expected `datasets: {{name: {{classes: {{key: [phrases]}}}}}}` (lists of phrases); "
                        "restore the file from the repository or fix its layout")
    return data


def prompt_word(cls_name: str) -> str:
    """The class word of the prompts as the release makes it: ``_`` → space, the PCBs / macaroni merged."""
    return RELEASE_NAME_MERGES.get(cls_name, cls_name).replace("_", " ")


def class_descriptions(dataset: str, cls_name: str, path: Path = DESCRIPTIONS_FILE) -> list[str]:
    """The descriptions of one class (the Grounding DINO caption and phrase filter use these)."""
    classes = load_descriptions(path)["datasets"].get(dataset, {}).get("classes", {})
    if cls_name not in classes:
        raise ConfigError(f"{path}: FiLo has no descriptions for class {cls_name!r} of dataset {dataset!r} (its "
                          "prompts and its Grounding DINO caption use them); add "
                          f"`datasets/{dataset}/classes/{cls_name}: [phrases]` there")
    return list(classes[cls_name])


def prompt_descriptions(dataset: str, cls_name: str, shared: str, path: Path = DESCRIPTIONS_FILE) -> list[str]:
    """The descriptions in a class's prompts: its own, or (``shared: last``, as released) those of the last class of
    the dataset's class order with the same prompt word (the release keys its prompt table by the merged name)."""
    if shared == "own":
        return class_descriptions(dataset, cls_name, path)
    from siad.data.registry import DATASETS, get_dataset

    order = list(get_dataset(dataset).classes) if dataset in DATASETS else [cls_name]
    same = [c for c in order if prompt_word(c) == prompt_word(cls_name)] or [cls_name]
    return class_descriptions(dataset, same[-1], path)


@METHODS.register("filo")
class FiLo(BackboneMethod):
    """FiLo as released: FG-Des (CoCoOp prompts with fine-grained descriptions) and HQ-Loc (Grounding DINO boxes,
    position-enhanced prompts, MMCI), trained in two stages."""

    training_free: ClassVar[bool] = False
    training_mask_resize: ClassVar[str] = "bilinear"  # the release: PIL bilinear resize to 518, then > 0.5
    #: HQ-Loc's detector, box logic and test-time scoring: variants differing only here share one trained model
    #: (FiLo Table 4's grounding / position rows train the same 1x1-MMCI model).
    evaluation_params: ClassVar[frozenset[str]] = frozenset({
        "grounding", "position_enhancement", "detector", "detector_checkpoint", "detector_dir", "detector_size",
        "box_threshold", "text_threshold", "area_threshold", "outside_factor", "blur_kernel", "blur_sigma",
        "score_form"})
    defaults: ClassVar[dict[str, Any]] = {
        **BACKBONE_DEFAULTS,
        "backbone": "openai-vit-l-14-336-518-gelu-noantialias",  # exact GELU, OpenAI weights at 518 (37x37)
        # -- image pass and heads (spec §2)
        "features": [6, 12, 18, 24],  # 1-indexed taps (--features_list)
        "vv_start": 7,  # first V-V dual-path block, 1-indexed (range(1, 19) on 24 blocks)
        "aliased_taps": True,  # as released: the taps its in-place updates leave (torch_model docstring)
        "kernels": list(KERNELS),  # MMCI: multi-scale 3x3/5x5/7x7 + multi-shape 1x5/5x1 + 1x1
        # -- FG-Des
        "n_ctx": 12,
        "descriptions": "fine",  # the per-class descriptions | "generic" (5 generic abnormal states only)
        "shared_prompts": "last",  # as released: classes with one prompt name share the last one's list | "own"
        "joint_norm": True,  # as released: [Fn, Fa] divided by its Frobenius norm (√2)
        # -- HQ-Loc (test.py)
        "grounding": True,  # multiply map values outside the kept boxes by outside_factor
        "position_enhancement": True,  # the abnormal prompts of the best box's 3x3 cell only
        "detector": "filo-finetuned",  # FiLo's fine-tuned Grounding DINO | "base" (public weights) | "tiny-random"
        "detector_checkpoint": None,  # local file of the fine-tuned weights (None: download from Hugging Face)
        "detector_dir": None,  # Hugging Face cache folder of the detector (None: the default)
        "detector_size": 518,  # Grounding DINO input: shorter side (longer side at most 1333)
        "box_threshold": 0.25,
        "text_threshold": None,  # None = box_threshold, as released (its text threshold is set from the box one)
        "area_threshold": 0.7,  # boxes covering at least this fraction of the image are dropped
        "outside_factor": 0.7,  # λ
        # -- scoring
        "blur_kernel": 3,
        "blur_sigma": 4.0,
        "score_form": "code",  # ½(⟨A, Fa⟩ + max M) as coded | "paper": softmax form
        # -- optimisation (train.py)
        "lr": 1e-3,  # prompt learners
        "decoder_lr": 1e-4,  # linear heads and MMCI
        "adapter_lr": 1e-5,
        "betas": [0.5, 0.999],
        "weight_decay": 0.01,  # AdamW's default, which the release keeps
        "epochs": 15,
        "adapter_epochs": 5,
        "batch_size": 1,
        "temperature": 0.07,
        "dice_per_row": True,  # as released: at batch 1 gt.squeeze() makes the dice per mask row
        **MOSAIC_DEFAULTS,
        # -- engineering (not in the release)
        **CACHE_DEFAULTS,
    }
    param_rules: ClassVar[Mapping[str, ParamRule]] = {
        **BACKBONE_RULES,
        "features": BlockList(),
        "vv_start": Number(low=1, integer=True),
        "aliased_taps": Flag(),
        "kernels": KernelList(),
        "n_ctx": Number(low=1, integer=True),
        "descriptions": Choice(DESCRIPTION_MODES),
        "shared_prompts": Choice(SHARED_PROMPTS),
        "joint_norm": Flag(),
        "grounding": Flag(),
        "position_enhancement": Flag(),
        "detector": Choice(("filo-finetuned", "base", "tiny-random")),
        "detector_checkpoint": Text(),
        "detector_dir": Text(),
        "detector_size": Number(low=32, integer=True),
        "box_threshold": Number(0.0, 1.0),
        "text_threshold": Number(0.0, 1.0, optional=True),
        "area_threshold": Number(0.0, 1.0, low_open=True),
        "outside_factor": Number(0.0, 1.0),
        "blur_kernel": Number(low=1, integer=True),
        "blur_sigma": Number(low=0, low_open=True),
        "score_form": Choice(("code", "paper")),
        "lr": Number(low=0, low_open=True),
        "decoder_lr": Number(low=0, low_open=True),
        "adapter_lr": Number(low=0, low_open=True),
        "betas": NumberList(2, Number(0.0, 1.0, high_open=True)),
        "weight_decay": Number(low=0),
        "epochs": Number(low=0, integer=True),
        "adapter_epochs": Number(low=0, integer=True),
        "batch_size": Number(low=1, integer=True),
        "temperature": Number(low=0, low_open=True),
        "dice_per_row": Flag(),
        **MOSAIC_RULES,
        **CACHE_RULES,
    }

    def __init__(self, params: Mapping[str, Any] | None = None, *, device: str = "cpu", seed: int = 0,
                 weights_seed: int | None = None) -> None:
        super().__init__(params, device=device, seed=seed, weights_seed=weights_seed)
        p = self.params
        clip = self.backbone.model
        self.config = FiLoConfig(
            features=tuple(p["features"]), vv_start=p["vv_start"], aliased_taps=p["aliased_taps"], n_ctx=p["n_ctx"],
            kernels=tuple(p["kernels"]), image_size=self.input_size, joint_norm=p["joint_norm"],
            blur_kernel=p["blur_kernel"], blur_sigma=float(p["blur_sigma"]), score_form=p["score_form"],
            dice_per_row=p["dice_per_row"], temperature=float(p["temperature"]),
        )
        self.learnables = FiLoLearnables(
            self.config, embed_dim=clip.text_projection.shape[1], vision_width=clip.visual.conv1.out_channels,
            text_width=clip.token_embedding.embedding_dim, seed=self.seed).to(self.device)
        self._mosaic = MosaicDraw(p)
        self.trained_on = ""  # the training set's dataset (chooses the fine-tuned detector); saved with the weights
        self._cache: FeatureCache | None = None
        self._prompt_ids: dict[tuple[str, tuple[str, ...]], tuple[Tensor, Tensor]] = {}
        self.loss_history: list[dict[str, float]] = []
        self.last_localizations: list[hqloc.HqLocResult | None] = []

    # -- configuration ---------------------------------------------------------------------------------------

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        """The rules, then the taps against the backbone and the HQ-Loc switches' combination (nothing built)."""
        super().validate_params(params)
        blocks = get_backbone_spec(params["backbone"]).n_blocks
        for key in ("features", "vv_start"):
            value = params[key]
            if (max(value) if key == "features" else value) > blocks:
                raise cls.param_error(key, value, f"use 1-indexed blocks of the backbone's {blocks} blocks")
        if params["position_enhancement"] and not params["grounding"]:
            raise cls.param_error("position_enhancement", True, "the position comes from Grounding DINO's best box: "
                                  "set grounding: true, or position_enhancement: false")
        if params["detector_checkpoint"] is not None and params["detector"] != "filo-finetuned":
            raise cls.param_error("detector_checkpoint", params["detector_checkpoint"],
                                  "a fine-tuned checkpoint is read with detector: filo-finetuned only; remove it")
        if params["blur_kernel"] % 2 == 0:
            raise cls.param_error("blur_kernel", params["blur_kernel"], "use an odd kernel size (torchvision's blur)")

    @property
    def uses_detector(self) -> bool:
        return bool(self.params["grounding"] or self.params["position_enhancement"])

    # -- frozen pass -----------------------------------------------------------------------------------------

    def _feature_cache(self) -> FeatureCache:
        if self._cache is None:
            c = self.config
            layout = tap_layout(c.features, c.vv_start)
            namespace = backbone_namespace(
                self.backbone.spec, taps=[b - 1 for b, _ in layout], seed=self.weights_seed, feature="filo_taps",
                vv_start=c.vv_start, aliased_taps=c.aliased_taps, code_modules=(frozen_taps.__module__,))
            dtype = getattr(torch, self.params["feature_cache_dtype"])
            self._cache = FeatureCache(Path(self.params["feature_cache"]), namespace, store_dtype=dtype)
        return self._cache

    def frozen(self, images: Tensor, keys: Sequence[str] | None = None) -> FrozenTaps:
        """The frozen pass of images [B, 3, S, S] (float32, CPU, in the storage dtype's values), cached by content."""
        dtype = getattr(torch, self.params["feature_cache_dtype"])

        def compute(positions: Sequence[int]) -> dict[str, Tensor]:
            out = frozen_taps(self.backbone.model, images[list(positions)].to(self.device), self.config)
            return {"global": out.global_features.cpu(), "tokens": out.tokens.cpu()}

        if self.params["feature_cache"] is None or not keys:
            rows = {k: v.to(dtype).float() for k, v in compute(range(len(images))).items()}
        else:
            rows = cached_rows(self._feature_cache(), keys, compute)
        index = tap_index(self.config, len(self.backbone.model.visual.transformer.resblocks))
        return FrozenTaps(rows["global"], rows["tokens"], index)

    # -- text ------------------------------------------------------------------------------------------------

    def _descriptions(self, dataset: str, cls_name: str) -> list[str]:
        if self.params["descriptions"] == "generic":
            return []
        return prompt_descriptions(dataset, cls_name, self.params["shared_prompts"])

    def prompt_ids(self, dataset: str, cls_name: str) -> tuple[Tensor, Tensor]:
        """Token ids of the class's normal [7, 77] and abnormal [n_states · 9, 77] prompts (cached)."""
        word = prompt_word(cls_name)
        descriptions = tuple(self._descriptions(dataset, cls_name))
        key = (word, descriptions)
        if key not in self._prompt_ids:
            tok, n_ctx = self.backbone.tokenizer, self.config.n_ctx
            self._prompt_ids[key] = (context_prompt_tokens(tok, normal_prompt_texts(word), n_ctx).to(self.device),
                                     context_prompt_tokens(tok, abnormal_prompt_texts(word, descriptions), n_ctx
                                                           ).to(self.device))
        return self._prompt_ids[key]

    def _text(self, datasets: Sequence[str], classes: Sequence[str], unit_global: Tensor,
              positions: Sequence[Sequence[str] | None]) -> Tensor:
        """F [B, 2, E] per image (its class, its L2 global feature, its positions)."""
        out = []
        for i, (dataset, cls_name) in enumerate(zip(datasets, classes, strict=True)):
            normal_ids, abnormal_ids = self.prompt_ids(dataset, cls_name)
            rows = position_rows(len(abnormal_ids), positions[i])
            out.append(text_features(self.backbone.model, self.learnables, normal_ids, abnormal_ids[rows],
                                     unit_global[i : i + 1], joint_norm=self.config.joint_norm))
        return torch.cat(out)

    # -- training --------------------------------------------------------------------------------------------

    def _training_batch(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        size = self.input_size
        images = torch.stack([it["image"] for it in items])
        masks = [torch.as_tensor(it["mask"]) for it in items]
        if tuple(images.shape[-2:]) != (size, size) or any(tuple(m.shape) != (size, size) for m in masks):
            raise DataError(f"filo: training images and masks must be {size}x{size} (the method's input size); got "
                            f"images {tuple(images.shape)} for {[it.get('img_path') for it in items][:3]}")
        keys = None
        if self.params["feature_cache"] is not None and not any(it.get("mosaic") for it in items):
            keys = content_keys(images, [it.get("image_sha256") or "" for it in items])
        return {"taps": self.frozen(images, keys), "masks": torch.stack([m.bool() for m in masks]),
                "labels": torch.tensor([int(it["label"]) for it in items]),
                "valid": torch.tensor([bool(it.get("mask_valid", True)) for it in items]),
                "classes": [it["cls_name"] for it in items]}

    def _epochs(self, train_data: torch.utils.data.Dataset, epochs: int, stage: int, step: Callable) -> None:
        p = self.params
        n = len(train_data)
        dataset = getattr(train_data, "name", "")
        by_class = items_by_class(train_data)
        mosaic_on = self._mosaic.applies_to(dataset)
        order_gen = torch.Generator().manual_seed(derived_seed(self.seed, "filo", "order", stage))
        mosaic_gen = torch.Generator().manual_seed(derived_seed(self.seed, "filo", "mosaic", stage))
        bar = tqdm(total=epochs * -(-n // p["batch_size"]), desc=f"train filo stage {stage}", unit="step",
                   disable=not p["progress"])
        for _ in range(epochs):
            order = torch.randperm(n, generator=order_gen).tolist()
            for start in range(0, n, p["batch_size"]):
                items = [self._mosaic(train_data, i, by_class, mosaic_on, mosaic_gen)
                         for i in order[start : start + p["batch_size"]]]
                losses = step(self._training_batch(items), dataset)
                if not np.isfinite(losses["total"]):
                    raise NumericalError(f"filo: the stage-{stage} loss became {losses['total']}; lower the learning "
                                         "rates")
                self.loss_history.append({"stage": stage, **losses})
                bar.update(1)
                bar.set_postfix(loss=f"{losses['total']:.3f}")
        bar.close()

    def fit(self, train_data: torch.utils.data.Dataset, setting: str) -> None:
        """Stage 1 (prompt learners + heads, pixel loss) then stage 2 (adapter, CE on the image label)."""
        p = self.params
        if len(train_data) == 0:
            raise DataError("filo: the training set is empty")
        self.trained_on = getattr(train_data, "name", "")
        learn = self.learnables
        main, adapter = stage_optimizers(learn, p)
        self.loss_history = []
        learn.train()
        self._epochs(train_data, p["epochs"], 1, lambda b, d: self._stage1_step(main, b, d))
        self._epochs(train_data, p["adapter_epochs"], 2, lambda b, d: self._stage2_step(adapter, b, d))
        learn.eval()

    def _stage1_step(self, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any], dataset: str
                     ) -> dict[str, float]:
        dev = self.device
        taps = batch["taps"]
        unit = F.normalize(taps.global_features.to(dev), dim=-1)  # stage 1: the meta-net sees the unadapted feature
        text = self._text([dataset] * len(unit), batch["classes"], unit, [None] * len(unit))
        taps_dev = FrozenTaps(taps.global_features.to(dev), taps.tokens.to(dev), taps.index)
        maps = anomaly_maps(self.learnables, taps_dev, text, self.config)
        terms = stage1_terms(maps, batch["masks"].to(dev), batch["valid"], dice_per_row=self.config.dice_per_row)
        if terms.focal is None:  # no pixel truth in this batch (zad without masks): nothing to learn from it
            return {**terms.as_floats(), "skipped": 1.0}
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        return {k: float(v) for k, v in terms.as_floats().items()}

    def _stage2_step(self, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any], dataset: str
                     ) -> dict[str, float]:
        dev = self.device
        adapted = self.learnables.adapter(batch["taps"].global_features.to(dev))
        unit = F.normalize(adapted, dim=-1)
        with torch.no_grad():
            text = self._text([dataset] * len(unit), batch["classes"], unit.detach(), [None] * len(unit))
        loss = stage2_loss(adapted, text, batch["labels"].to(dev), self.config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"ce": float(loss.detach()), "total": float(loss.detach())}

    # -- inference -------------------------------------------------------------------------------------------

    def detector_spec(self) -> grounding.GroundingSpec:
        """Which Grounding DINO predicts: the demo's tiny random one; ``detector_checkpoint`` when given; else the
        release's fine-tuned weights of the training source (``grounding_train_on_{mvtec,visa}.pth``, as released:
        MVTec is tested with the VisA-trained file); for a source without released weights (logged), and for
        ``detector: base``, the public pretrained Swin-T.

        Raises:
            ConfigError: ``filo-finetuned`` without a checkpoint for a model whose training source is unknown (loaded
                from the release's own checkpoint file, or never trained).
        """
        p = self.params
        cache = None if p["detector_dir"] is None else Path(p["detector_dir"])
        if p["detector"] == "tiny-random":
            return grounding.GroundingSpec(kind="tiny-random", seed=self.weights_seed, tiny_words=description_words())
        if p["detector"] == "base":
            return grounding.GroundingSpec(kind="base", cache_dir=cache)
        if p["detector_checkpoint"] is not None:
            return grounding.GroundingSpec(kind="filo-finetuned", checkpoint=Path(p["detector_checkpoint"]),
                                           cache_dir=cache)
        if self.trained_on in grounding.FILO_GROUNDING_FILES:
            return grounding.filo_grounding_spec(self.trained_on, cache_dir=cache)
        if not self.trained_on:
            raise ConfigError("methods/filo/params/detector: 'filo-finetuned' picks the released Grounding DINO of "
                              "the model's training source, which this model does not record (loaded from the "
                              "release's checkpoint file?); set detector_checkpoint to the fine-tuned file, or "
                              "detector: base")
        log.warning("filo: no released fine-tuned Grounding DINO for the training source %r (only %s); using the "
                    "public weights (detector: base)", self.trained_on, sorted(grounding.FILO_GROUNDING_FILES))
        return grounding.GroundingSpec(kind="base", cache_dir=cache)

    def _detector(self) -> tuple[tuple, Any, Any]:
        """(cache key, model, tokenizer), loaded once per process, spec and device; with ``random_init`` (the speed
        benchmark) the real architecture (Swin-T + BERT-base, 900 queries) with random weights, or the tiny one."""
        spec = self.detector_spec() if not self.params["random_init"] else None
        if spec is None or spec.kind == "tiny-random":
            tiny = self.params["detector"] == "tiny-random"
            spec = grounding.GroundingSpec(kind="tiny-random", seed=self.weights_seed, tiny_words=description_words())
            key = ("tiny-random" if tiny else "random-swin-t", spec, str(self.device))
        else:
            key = (spec.kind, spec, str(self.device))
        if key not in _DETECTORS:
            if key[0] == "random-swin-t":
                model, tokenizer = random_grounding_dino(self.weights_seed, description_words())
            else:
                model, tokenizer = grounding.load_grounding_dino(spec)
                log.info("filo: Grounding DINO %s%s", spec.kind, "" if spec.kind == "tiny-random" else
                         f" ({spec.checkpoint or spec.filo_file if spec.kind == 'filo-finetuned' else spec.base_repo}"
                         f", layout {getattr(model, 'filo_checkpoint_layout', 'transformers')})")
            _DETECTORS[key] = (model.to(self.device), tokenizer)
        return (key, *_DETECTORS[key])

    def localize(self, image: np.ndarray, dataset: str, cls_name: str, key: str) -> hqloc.HqLocResult:
        """HQ-Loc's detector step for one image (uint8 H×W×3, the original): boxes in input-size pixels and the
        position of the best box. Computed once per (detector, image content, caption, thresholds) in a process:
        every setting and variant of a job reuses it (the detector is frozen)."""
        p = self.params
        descriptions = class_descriptions(dataset, cls_name)
        generic = list(hqloc.GENERIC_WORDS)
        caption = hqloc.grounding_caption(generic, descriptions)
        detector, model, tokenizer = self._detector()
        cache_key = (detector, key, caption, self.input_size, p["detector_size"], p["box_threshold"],
                     p["text_threshold"], p["area_threshold"])
        if cache_key not in _LOCALIZATIONS:
            detection = grounding.detect(model, tokenizer, image, caption, size=p["detector_size"])
            _LOCALIZATIONS[cache_key] = grounding.localise(
                detection, tokenizer, descriptions + generic, box_threshold=p["box_threshold"],
                text_threshold=p["text_threshold"], area_threshold=p["area_threshold"], size=self.input_size,
                cells=position_cells(self.input_size), default_centre=default_centre(self.input_size))
        return _LOCALIZATIONS[cache_key]

    def _original_images(self, batch: Batch) -> list[np.ndarray]:
        """The original images the detector reads: the files when the engine gave them, else the input tensors
        un-normalised (tests, the speed benchmark)."""
        files = batch.get("image_file")
        if files:
            return [np.asarray(Image.open(f).convert("RGB")) for f in files]
        spec = self.backbone.spec
        mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]
        pixels = ((batch["image"].cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        return [img.permute(1, 2, 0).numpy() for img in pixels]

    @torch.no_grad()
    def predict(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["image"]
        n = len(images)
        dataset = batch.get("dataset", "")
        classes = list(batch["cls_name"])
        keys = batch_content_keys(batch)
        taps = self.frozen(images, keys if self.params["feature_cache"] is not None else None)
        localizations: list[hqloc.HqLocResult | None] = [None] * n
        if self.uses_detector:
            originals = self._original_images(batch)
            origin = "file" if batch.get("image_file") else "tensor"  # the detector reads the file or the tensor
            localizations = [self.localize(originals[i], dataset, classes[i], f"{origin}:{keys[i]}")
                             for i in range(n)]
        self.last_localizations = localizations
        use_positions = self.params["position_enhancement"]
        positions = [loc.positions if (use_positions and loc is not None) else None for loc in localizations]
        dev = self.device
        adapted = self.learnables.adapter(taps.global_features.to(dev))
        text = self._text([dataset] * n, classes, F.normalize(adapted, dim=-1), positions)
        taps_dev = FrozenTaps(taps.global_features.to(dev), taps.tokens.to(dev), taps.index)
        maps = smoothed_map(anomaly_maps(self.learnables, taps_dev, text, self.config), self.config)
        scores = image_score(adapted, text, maps, self.config)
        if self.params["grounding"]:
            lam = float(self.params["outside_factor"])
            maps = torch.stack([hqloc.suppress_outside(m, loc.mask().to(m.device), lam)
                                for m, loc in zip(maps, localizations, strict=True)])
        return scores.float().cpu(), maps.float().cpu()

    # -- persistence -----------------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """The learnable tensors only, under the release's names; the frozen CLIP and detector come from their files."""
        state = {k: v.detach().cpu() for k, v in self.learnables.state_dict().items()}
        state[TRAINED_ON_KEY] = torch.tensor(list(self.trained_on.encode()), dtype=torch.uint8)
        torch.save(state, path)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        if isinstance(state, dict) and TRAINED_ON_KEY in state:
            self.trained_on = bytes(state.pop(TRAINED_ON_KEY).tolist()).decode()
        if isinstance(state, dict) and isinstance(state.get("filo"), dict):  # the release's checkpoint layout
            state = {k: v for k, v in state["filo"].items() if k.split(".")[0] in
                     FiLoLearnables.STAGE1 + FiLoLearnables.STAGE2}
        expected = {k: tuple(v.shape) for k, v in self.learnables.state_dict().items()}
        shapes = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
        if shapes != expected:
            missing = sorted(set(expected) - set(shapes))[:5]
            unexpected = sorted(set(shapes) - set(expected))[:5]
            raise ConfigError(f"{path}: trained FiLo tensors do not match this configuration (missing {missing}, "
                              f"unexpected {unexpected}, or other shapes); was it trained with other kernels, "
                              "features or another backbone? Re-run the fit step")
        self.learnables.load_state_dict(state)



"""The machinery AnomalyGPT and SIAD-LLM share: frozen ImageBind features, stage maps, the LLM judgement
and the pseudo-anomaly training loop.

:class:`LlmDetector` is AnomalyGPT as released (spec ``baselines_llm_filo_anovl.md`` §1): the frozen
ImageBind-Huge image tower gives four stage token sets (blocks 8/16/24/32) and the image embedding; the
trainable :class:`~siad.methods.llm_components.StageDecoder` projects each stage into the text space, where
the cosine to the (normal, abnormal) ensemble features gives per-stage probability maps; their mean is the
anomaly map M, the image score is max(M). The trainable
:class:`~siad.methods.llm_components.ConvPromptLearner` turns M into 18 LLM prompt embeddings, which follow
the projected image embedding in the conversation; the frozen LLM answers "Is there any anomaly in the
image?". Training sees only normal images of the auxiliary dataset and NSA-style pseudo-anomalies made from
them; loss = CE on the answer + Σ_stages (focal + dice). The target answer counts and places the anomalies by
pasted patch, as released (``answer_regions``; :meth:`LlmDetector.target_answers`).

Every parameter is checked by :meth:`LlmDetector.validate_params` (the rules of :data:`LLM_RULES` and the
combinations) when the config is validated at start-up, before any weights are loaded.

SIAD-LLM (:mod:`siad.methods.siad_llm`) subclasses it and overrides the hooks :meth:`LlmDetector.text_features`,
:meth:`LlmDetector.visual_tokens`, :meth:`LlmDetector.prompt_embeddings` and the two-pass forward.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from siad.backbones import get_backbone_spec, stage_features
from siad.backbones.cache import FeatureCache, backbone_namespace, file_fingerprint
from siad.data.imageio import read_image
from siad.data.pseudo import Box, CutPastePoisson, PatchParams, anomalygpt_params
from siad.errors import ConfigError, DataError, NumericalError
from siad.llm import (
    UNLOCATED_YES,
    ConversationBatch,
    GenerationConfig,
    LlmSpec,
    LoadedLlm,
    build_conversation,
    load_llm,
    patch_answer,
    target_answer,
    tiny_llm_spec,
    user_text,
    vicuna_pandagpt_spec,
)
from siad.llm.generation import generate_judgements
from siad.llm.loader import checkpointing_active
from siad.methods.backbone_method import BACKBONE_DEFAULTS, BACKBONE_RULES, BackboneMethod
from siad.methods.base import Batch, Choice, Flag, MethodOutput, Number, NumberList, ParamRule, Registered, Text
from siad.methods.llm_components import (
    ConvPromptLearner,
    StageDecoder,
    combine_stage_maps,
    stage_anomaly_maps,
)
from siad.methods.losses import dice_loss, focal_loss
from siad.prompts import ENSEMBLES, encode_class_text

__all__ = ["LLM_DEFAULTS", "LLM_RULES", "LlmDetector", "PassOutput", "count_parameters", "warmup_decay_factor"]

log = logging.getLogger("siad")

LLM_KINDS = ("vicuna-pandagpt", "tiny-random")
ANSWER_REGIONS = ("patches", "patches_union_box", "components")
"""How AnomalyGPT's target answer counts and places anomalies (``answer_regions``, siad.llm.answers): by pasted
patch in paste order, each from its own box (default, the release's reading) or the 2nd centre from the running
union box (the release's bug), or by 8-connected region of the binarised label (the suite's earlier reading)."""
RELEASED_TEST_WORDS: dict[str, str] = {
    "capsules": "capsule", "pipe_fryum": "fryum", "chewinggum": "object", "macaroni1": "macaroni",
    "macaroni2": "macaroni", "pcb1": "pcb", "pcb2": "pcb", "pcb3": "pcb", "pcb4": "pcb",
}
"""The object word AnomalyGPT's test scripts use: the first of its class names found as a substring of the class
description, so VisA's capsules → capsule, pipe_fryum → fryum, macaroni1/2 → macaroni, pcb1–4 → pcb, and
chewinggum → object (its description misspells "chewinggom"). Training uses the class names themselves."""
SIAD_DESCRIPTIONS = Path(__file__).resolve().parents[1] / "llm" / "descriptions" / "siad_tables_8_16.json"
"""SIAD-LLM Tables 8–16, verbatim (typos included; MVTec/VisA rows are AnomalyGPT's released descriptions):
keyed by the suite's class names (SDD's row under electrical_commutators, HeadCT's "brain" row under head)."""
_SHARED_LLM: dict[str, Any] = {}  # {"spec": LlmSpec, "llm": LoadedLlm}: see LlmDetector.load_llm

LLM_DEFAULTS: dict[str, Any] = {
    **BACKBONE_DEFAULTS,
    "backbone": "imagebind-huge",  # open_clip ViT-H-14 laion2b = ImageBind-Huge's towers (spec [choice])
    # -- the LLM (siad/llm/loader.py lists the files of the paper profile)
    "llm": "vicuna-pandagpt",  # "vicuna-pandagpt" (paper) | "tiny-random" (demo, tests)
    "vicuna_dir": None,
    "pandagpt_delta": None,
    "llm_dtype": "float16",  # paper profile only; the tiny LM is float32
    # memory switches of the frozen LLM (docs/scale.md; the cost table names them where a job needs them): recompute
    # each decoder layer in the backward pass (same numbers, less activation memory, ~1/3 more LLM time), and int8
    # LLM weights (LLM.int8() via bitsandbytes, CUDA only; the answers change slightly)
    "llm_gradient_checkpointing": False,
    "llm_load_in_8bit": False,
    # -- maps
    "test_class_names": "released",  # object words at test: "released" (see RELEASED_TEST_WORDS) | "class"
    "ensemble": "anomalygpt",  # Appendix D compositional ensemble (7 normal × 5 abnormal states × 2 templates)
    "map_reduce": "mean",  # "mean" as released | "sum" as the AnomalyGPT paper writes
    "map_size": 224,  # stage maps are upsampled to 224 (the prompt learner's input), as released
    "logit_scale": 100.0,
    # -- the conversation
    "descriptions": "siad_tables",  # SIAD Tables 8–16 (bundled) | a JSON {class: description} file | None (fallback)
    "answer_style": "anomalygpt",  # target answers: "anomalygpt" (released wording) | "siad" (Appendix F)
    "answer_regions": "patches",  # anomalygpt wording: one anomaly per pasted patch (released) | see ANSWER_REGIONS
    "max_new_tokens": 64,
    "do_sample": False,  # greedy by default (reproducible); True = AnomalyGPT's nucleus sampling
    "top_p": 0.1,
    "temperature": 1.0,
    # -- training (released schedule: 50 epochs, batch 16 = 8 normal + 8 pseudo, Adam(W) 1e-3, warm-up)
    "epochs": 50,
    "batch_size": 8,  # normal images per step; each brings its pseudo-anomalous twin (16 images a step)
    "lr": 1e-3,
    "betas": [0.9, 0.95],
    "weight_decay": 1e-3,
    "warmup": "log",  # DeepSpeed WarmupDecayLR's default warm-up shape | "linear" | "constant" (no schedule)
    "warmup_min_steps": 10,  # warm-up = max(10, 0.1 · total steps), as released
    "warmup_fraction": 0.1,
    "grad_clip": 1.0,
    "pseudo_label": "logistic",  # AnomalyGPT's soft label binarised at label_threshold | "binary"
    "label_threshold": 0.3,
    "sft_data": None,  # PandaGPT instruction data (JSON) interleaved with the AD batches; unavailable offline
    "sft_image_dir": None,
    "train_memory_prompt_p": 0.5,  # released: in half the steps the prompt learner gets the memory map instead
    "few_shot_k": 0,  # >0: the release's k-normal-shot memory map (k normal train images of each target class)
    "feature_cache": None,  # folder of the frozen-feature cache for evaluation (None: always run the backbone)
    "feature_cache_dtype": "float16",
    "progress": True,
}
UNIT = Number(0.0, 1.0)
LLM_RULES: dict[str, ParamRule] = {
    **BACKBONE_RULES,
    "llm": Choice(LLM_KINDS),
    "vicuna_dir": Text(),
    "pandagpt_delta": Text(),
    "llm_dtype": Choice(("float16", "bfloat16", "float32")),
    "llm_gradient_checkpointing": Flag(),
    "llm_load_in_8bit": Flag(),
    "test_class_names": Choice(("released", "class")),
    "ensemble": Registered(ENSEMBLES),
    "map_reduce": Choice(("mean", "sum")),
    "map_size": Number(low=16, integer=True),
    "logit_scale": Number(low=0, low_open=True),
    "descriptions": Text(),
    "answer_style": Choice(("anomalygpt", "siad")),
    "answer_regions": Choice(ANSWER_REGIONS),
    "max_new_tokens": Number(low=1, integer=True),
    "do_sample": Flag(),
    "top_p": Number(0.0, 1.0, low_open=True),
    "temperature": Number(low=0, low_open=True),
    "epochs": Number(low=1, integer=True),
    "batch_size": Number(low=1, integer=True),
    "lr": Number(low=0, low_open=True),
    "betas": NumberList(2, Number(0.0, 1.0, high_open=True)),
    "weight_decay": Number(low=0),
    "warmup": Choice(("log", "linear", "constant")),
    "warmup_min_steps": Number(low=0, integer=True),
    "warmup_fraction": UNIT,
    "grad_clip": Number(low=0, optional=True),  # 0 / null: no clipping
    "pseudo_label": Choice(("logistic", "binary")),
    "label_threshold": Number(0.0, 1.0, high_open=True),
    "sft_data": Text(),
    "sft_image_dir": Text(),
    "train_memory_prompt_p": UNIT,
    "few_shot_k": Number(low=0, integer=True),
    "feature_cache": Text(),
    "feature_cache_dtype": Choice(("float16", "bfloat16", "float32")),
    "progress": Flag(),
}
"""What each parameter of :data:`LLM_DEFAULTS` may hold, checked at start-up (:meth:`LlmDetector.validate_params`)."""


@dataclass
class PassOutput:
    """One pass of the detector: per-stage probabilities [B,K,2,S,S], the anomaly map [B,S,S], the LLM prompt
    embeddings [B,P,D_llm] and the text features used [B,K,2,D]."""

    probs: Tensor
    anomaly_map: Tensor
    prompts: Tensor
    text: Tensor


def warmup_decay_factor(step: int, warmup: int, total: int, shape: str = "log") -> float:
    """Learning-rate factor of DeepSpeed's ``WarmupDecayLR`` (warmup_min_lr 0) at optimiser step ``step`` (0-based).

    Warm-up: ``log(step + 1) / log(warmup)`` ("log", DeepSpeed's default) or ``step / warmup`` ("linear");
    then a linear decay to 0 at ``total``. ``shape="constant"`` keeps the factor at 1 (no schedule).
    """
    if shape == "constant":
        return 1.0
    if step < warmup:
        if shape == "log":
            return math.log(step + 1) / math.log(warmup) if warmup > 1 else 1.0
        return step / warmup
    return max(0.0, (total - step) / max(1.0, total - warmup))



class LlmDetector(BackboneMethod):
    """AnomalyGPT as released; the shared base of SIAD-LLM (see the module docstring)."""

    training_free: ClassVar[bool] = False
    defaults: ClassVar[Mapping[str, Any]] = LLM_DEFAULTS
    param_rules: ClassVar[Mapping[str, ParamRule]] = LLM_RULES

    def __init__(self, params: Mapping[str, Any] | None = None, *, device: str = "cpu", seed: int = 0,
                 weights_seed: int | None = None) -> None:
        super().__init__(params, device=device, seed=seed, weights_seed=weights_seed)
        visual = self.backbone.model.visual
        self.width = int(visual.transformer.width)
        self.embed_dim = int(visual.output_dim)
        self.taps = tuple(self.backbone.spec.taps)
        self.llm: LoadedLlm = self.load_llm()
        self.llm.model.to(self.device).eval()
        self.llm.image_proj.to(self.device)
        for module in (self.llm.model, self.llm.image_proj):
            module.requires_grad_(False)
        self.llm_dim = int(self.llm.model.config.hidden_size)
        self.ensemble = ENSEMBLES.get(self.params["ensemble"])
        self.descriptions = self._read_descriptions()
        self._static_text: dict[str, Tensor] = {}
        self._cache: FeatureCache | None = None
        self._generators: dict[tuple[str, str], CutPastePoisson] = {}
        self._memory: dict[str, list[Tensor]] = {}
        self._train_memory: dict[str, list[Tensor]] = {}
        self.loss_history: list[float] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.trainable = nn.ModuleDict(self.build_trainable()).to(self.device)

    # -- configuration -----------------------------------------------------------------------------

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> None:
        """The rules of :data:`LLM_RULES`, then what they cannot say: the backbone's 4 stage taps, the files of the
        paper LLM, the instruction images, and the conv prompt learner's fixed 224² input."""
        super().validate_params(params)
        taps = get_backbone_spec(params["backbone"]).taps
        if len(taps) != 4:
            raise cls.param_error("backbone", params["backbone"],
                                  f"use a backbone with 4 stage taps (blocks 8/16/24/32); this one has {list(taps)}")
        missing = next((k for k in ("vicuna_dir", "pandagpt_delta") if not params[k]), None)
        if params["llm"] == "vicuna-pandagpt" and missing:
            raise cls.param_error(
                missing, params[missing],
                "llm 'vicuna-pandagpt' needs `vicuna_dir` (Vicuna-7B v0, Hugging Face format) and `pandagpt_delta` "
                "(pytorch_model.pt of openllmplayground/pandagpt_7b_max_len_1024); see siad/llm/loader.py for how to "
                "obtain them, or use `llm: tiny-random` for the offline demo",
            )
        if params["sft_data"] is not None and params["sft_image_dir"] is None:
            raise cls.param_error("sft_image_dir", None, "sft_data is set: give the folder of the instruction images")
        if cls.uses_conv_prompt_learner(params) and params["map_size"] != 224:
            raise cls.param_error("map_size", params["map_size"],
                                  "the convolutional prompt learner takes 224×224 maps, as released: use 224")

    @classmethod
    def uses_conv_prompt_learner(cls, params: Mapping[str, Any]) -> bool:
        """Whether these parameters build AnomalyGPT's :class:`ConvPromptLearner` (always, for AnomalyGPT)."""
        return True

    def load_llm(self) -> LoadedLlm:
        """The frozen LLM of :meth:`llm_spec` (a hook: the speed benchmark injects a random-weight 7B).

        The last loaded LLM is kept per process and shared by later instances with the same spec: it is frozen,
        so the ablation variants of one workflow job load the 7B weights once, not once per variant."""
        spec = self.llm_spec()
        if _SHARED_LLM.get("spec") != spec:
            _SHARED_LLM.clear()  # one LLM at a time: never two 7B models in memory
            _SHARED_LLM.update(spec=spec, llm=load_llm(spec))
        return _SHARED_LLM["llm"]

    def llm_spec(self) -> LlmSpec:
        """The LLM to load: the paper's Vicuna-7B v0 + PandaGPT, or the tiny random demo LM, with the memory
        switches ``llm_gradient_checkpointing`` and ``llm_load_in_8bit``."""
        if self.params["llm"] == "tiny-random":
            spec = tiny_llm_spec(seed=self.weights_seed, image_dim=self.backbone.model.visual.output_dim)
        else:
            spec = vicuna_pandagpt_spec(self.params["vicuna_dir"], self.params["pandagpt_delta"],
                                        self.params["llm_dtype"])
        return replace(spec, gradient_checkpointing=bool(self.params["llm_gradient_checkpointing"]),
                       load_in_8bit=bool(self.params["llm_load_in_8bit"]))

    def _read_descriptions(self) -> dict[str, str]:
        """Class → description for the human turn; classes missing from it get the Appendix F fallback sentence."""
        path = self.params["descriptions"]
        if path is None:
            return {}
        if path == "siad_tables":
            path = SIAD_DESCRIPTIONS
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(
                f"descriptions file {path}: {err}; give a JSON object {{class name: description}}"
            ) from err
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ConfigError(f"descriptions file {path}: expected a JSON object {{class name: description}}")
        return data

    def build_trainable(self) -> dict[str, nn.Module]:
        """The trainable modules (AnomalyGPT: decoder 5.25M + conv prompt learner 107.4M at paper size)."""
        modules: dict[str, nn.Module] = {"decoder": StageDecoder(self.width, self.embed_dim, len(self.taps))}
        if self.uses_conv_prompt_learner(self.params):
            modules["prompt_learner"] = ConvPromptLearner(self.llm_dim, seed=self.seed)
        return modules

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimiser updates (the backbone and the LLM stay frozen)."""
        return [p for p in self.trainable.parameters() if p.requires_grad]

    # -- frozen features ---------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """Raw stage tokens (4 × [B, N, width], CLS dropped) and the unit image embedding [B, D]."""
        out = stage_features(self.backbone.model.visual, images.to(self.device), self.taps)
        return list(out.taps.patch), F.normalize(out.image_embedding.float(), dim=-1)

    def frozen_features(self, images: Tensor, files: Sequence[str] | None = None) -> tuple[list[Tensor], Tensor]:
        """:meth:`encode_images`, read from the feature cache when configured and the files are known (every
        ablation variant shares one backbone pass per image)."""
        if self.params["feature_cache"] is None or not files:
            return self.encode_images(images)
        if self._cache is None:
            namespace = backbone_namespace(self.backbone.spec, taps=self.taps, seed=self.weights_seed,
                                           feature="llm_stages",
                                           code_modules=(type(self).encode_images.__module__,))
            dtype = getattr(torch, str(self.params["feature_cache_dtype"]))
            self._cache = FeatureCache(Path(self.params["feature_cache"]), namespace, store_dtype=dtype)

        def compute(positions: Sequence[int]) -> dict[str, Tensor]:
            stages, embedding = self.encode_images(images[list(positions)])
            return {"stages": torch.stack(stages, dim=1), "embedding": embedding}

        # content, not size and mtime: an image edited in place must never be served its old features
        fingerprints = [file_fingerprint(f, content=True) for f in files]
        cached = self._cache.get_or_compute(list(files), compute, fingerprints=fingerprints)
        stages = cached["stages"].to(self.device, torch.float32)
        return list(stages.unbind(dim=1)), cached["embedding"].to(self.device, torch.float32)

    # -- hooks SIAD-LLM overrides -------------------------------------------------------------------

    @torch.no_grad()
    def static_text(self, cls_name: str) -> Tensor:
        """(normal, abnormal) ensemble features [2, D] of a class (frozen text tower), cached."""
        if cls_name not in self._static_text:
            feats = encode_class_text(self.backbone.model, self.backbone.tokenizer, self.ensemble, cls_name).features
            self._static_text[cls_name] = feats.float().to(self.device)
        return self._static_text[cls_name]

    def text_features(self, cls_names: Sequence[str], *, test: bool = False) -> Tensor:
        """Per-image, per-stage text features [B, K, 2, D] (AnomalyGPT: the class ensemble for every stage).

        ``test``: a test batch, whose object words follow ``test_class_names`` (released: RELEASED_TEST_WORDS)."""
        if test and self.params["test_class_names"] == "released":
            cls_names = [RELEASED_TEST_WORDS.get(c, c) for c in cls_names]
        text = torch.stack([self.static_text(c) for c in cls_names])
        return text.unsqueeze(1).expand(-1, len(self.taps), -1, -1)

    def visual_tokens(self, stages: Sequence[Tensor]) -> list[Tensor]:
        """Unit patch tokens in the text space per stage (AnomalyGPT: the decoder's linear projections)."""
        return self.trainable["decoder"](stages, has_cls=False)

    def prompt_embeddings(self, probs: Tensor, anomaly_map: Tensor) -> Tensor:
        """LLM prompt embeddings [B, 18, D_llm] from the map (AnomalyGPT: conv prompt learner on M)."""
        return self.trainable["prompt_learner"](anomaly_map.unsqueeze(1))

    # -- one pass -----------------------------------------------------------------------------------

    def stage_probs(self, tokens: Sequence[Tensor], text: Tensor) -> Tensor:
        """Per-stage (normal, abnormal) probabilities [B, K, 2, S, S], each stage against its own text pair."""
        p = self.params
        maps = [
            stage_anomaly_maps([tok], text[:, k], logit_scale=p["logit_scale"], size=p["map_size"])[:, 0]
            for k, tok in enumerate(tokens)
        ]
        return torch.stack(maps, dim=1)

    def forward_pass(self, tokens: Sequence[Tensor], text: Tensor) -> PassOutput:
        """Maps and prompt embeddings from projected tokens and text features."""
        probs = self.stage_probs(tokens, text)
        anomaly_map = combine_stage_maps(probs, self.params["map_reduce"])
        return PassOutput(probs, anomaly_map, self.prompt_embeddings(probs, anomaly_map), text)

    # -- the LLM ------------------------------------------------------------------------------------

    def question(self, cls_name: str) -> str:
        """The human turn: the class description (or the Appendix F fallback) and the question."""
        return user_text(cls_name, self.descriptions.get(cls_name))

    def conversation(
        self, embedding: Tensor, prompts: Tensor, cls_names: Sequence[str], answers: Sequence[str] | None = None,
        questions: Sequence[str] | None = None,
    ) -> ConversationBatch:
        """The AnomalyGPT conversation of a batch (labels when ``answers`` are given); ``questions`` replace the
        anomaly question (instruction data)."""
        image_embeds = self.llm.image_proj(embedding.to(self.llm.image_proj.weight.dtype)).unsqueeze(1)
        texts = list(questions) if questions is not None else [self.question(c) for c in cls_names]
        return build_conversation(self.llm.embed_tokens, self.llm.tokenizer, image_embeds, prompts, texts, answers)

    def answer_loss(
        self, embedding: Tensor, prompts: Tensor, cls_names: Sequence[str], answers: Sequence[str],
        questions: Sequence[str] | None = None,
    ) -> Tensor:
        """Cross-entropy of the LLM on the target answers (prompt positions masked with -100)."""
        batch = self.conversation(embedding, prompts, cls_names, answers, questions)
        with checkpointing_active(self.llm):  # llm_gradient_checkpointing: this forward is checkpointed
            out = self.llm.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                 labels=batch.labels, use_cache=False)
        return out.loss.float()

    def generation_config(self) -> GenerationConfig:
        p = self.params
        return GenerationConfig(max_new_tokens=p["max_new_tokens"], do_sample=p["do_sample"], top_p=p["top_p"],
                                temperature=p["temperature"], seed=self.seed)

    @torch.no_grad()
    def judge(self, embedding: Tensor, prompts: Tensor, cls_names: Sequence[str]) -> tuple[list[str], Tensor]:
        """Generated answers and P("Yes") for a batch, from one batched generation."""
        batch = self.conversation(embedding, prompts, cls_names)
        return generate_judgements(self.llm.model, self.llm.tokenizer, batch, self.generation_config())

    # -- inference ----------------------------------------------------------------------------------

    @torch.no_grad()
    def first_pass(self, batch: Batch) -> tuple[PassOutput, Tensor, list[Tensor]]:
        """The first pass on a test batch: (pass output, image embedding, projected tokens).

        With ``few_shot_k`` > 0 the map is the memory map of :meth:`memory_map` (the text map is discarded and
        the memory map feeds the prompt learner, as the release's few-shot test)."""
        stages, embedding = self.frozen_features(batch["image"], batch.get("image_file"))
        tokens = self.visual_tokens(stages)
        out = self.forward_pass(tokens, self.text_features(batch["cls_name"], test=True))
        if self.params["few_shot_k"]:
            memory = self.memory_map(stages, batch["cls_name"])
            out = PassOutput(out.probs, memory, self.prompt_embeddings(out.probs, memory), out.text)
        return out, embedding, tokens

    # -- few-shot memory (option) -------------------------------------------------------------------

    @property
    def references_needed(self) -> int:
        """Normal train images per target class the engine must hand to :meth:`set_references` (0: none)."""
        return int(self.params["few_shot_k"])

    @torch.no_grad()
    def memory_tokens(self, references: Mapping[str, Tensor]) -> dict[str, list[Tensor]]:
        """Per class, the unit raw stage tokens of its reference images ([k, 3, H, W] each), flattened per stage."""
        memory = {}
        for cls_name, images in references.items():
            stages, _ = self.encode_images(images)
            memory[cls_name] = [F.normalize(s.reshape(-1, s.shape[-1]).float(), dim=-1) for s in stages]
        return memory

    def set_references(self, references: Mapping[str, Tensor]) -> None:
        """Store the raw stage tokens of k normal images per class ([k, 3, H, W] transformed images each)."""
        self._memory = self.memory_tokens(references)

    def memory_map(
        self, stages: Sequence[Tensor], cls_names: Sequence[str], memory: Mapping[str, list[Tensor]] | None = None
    ) -> Tensor:
        """1 − (mean over stages of each patch's max cosine to the class's reference patches), upsampled
        bilinearly (align_corners=True) to the map size: AnomalyGPT's few-shot map on raw stage tokens.
        ``memory`` defaults to the references given by :meth:`set_references`."""
        memory = self._memory if memory is None else memory
        missing = sorted({c for c in cls_names if c not in memory})
        if missing:
            raise ConfigError(f"few_shot_k={self.params['few_shot_k']}: no reference images for classes {missing}; "
                              "the evaluation must pass the target's normal train images (set_references)")
        rows = []
        for i, cls_name in enumerate(cls_names):
            sims = [(F.normalize(s[i].float(), dim=-1) @ m.T).max(dim=1).values
                    for s, m in zip(stages, memory[cls_name], strict=True)]
            rows.append(1.0 - torch.stack(sims).mean(dim=0))
        side = round(rows[0].numel() ** 0.5)
        grid = torch.stack(rows).reshape(-1, 1, side, side)
        size = self.params["map_size"]
        return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)[:, 0]

    @torch.no_grad()
    def predict_batch(self, batch: Batch) -> MethodOutput:
        self.trainable.eval()
        first, embedding, _ = self.first_pass(batch)
        answers, p_yes = self.judge(embedding, first.prompts, batch["cls_name"])
        return self._output(first.anomaly_map, answers, p_yes)

    def _output(self, anomaly_map: Tensor, answers: list[str], p_yes: Tensor) -> MethodOutput:
        scores = anomaly_map.flatten(1).max(dim=1).values
        return MethodOutput(scores=scores.float().cpu(), maps=anomaly_map.float().cpu(), answers=answers,
                            p_yes=p_yes.float().cpu())

    def predict(self, batch: Batch) -> tuple[Tensor, Tensor]:
        out = self.predict_batch(batch)
        return out.scores, out.maps

    # -- training -----------------------------------------------------------------------------------

    def pseudo_generator(self, dataset_name: str, cls_name: str) -> CutPastePoisson:
        """NSA generator with AnomalyGPT's per-class settings (generic ones outside MVTec AD / VisA)."""
        key = (dataset_name, cls_name)
        if key not in self._generators:
            params = anomalygpt_params(dataset_name, cls_name) if dataset_name else PatchParams()
            self._generators[key] = CutPastePoisson(params, label=self.params["pseudo_label"])
        return self._generators[key]

    def _raw_image(self, root: Path, record: Mapping[str, Any]) -> np.ndarray:
        size = self.input_size
        image = read_image(root / record["img_path"]).resize((size, size), Image.BICUBIC)
        return np.asarray(image, dtype=np.uint8)

    def _normalise(self, images: np.ndarray) -> Tensor:
        """uint8 images [B, H, W, 3] at the input size → the backbone's normalised input (as the transform)."""
        x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div(255.0)
        return TF.normalize(x, self.backbone.spec.mean, self.backbone.spec.std).to(self.device)

    def training_batch(
        self, root: Path, records: Sequence[Mapping[str, Any]], dataset_name: str, rng: np.random.Generator
    ) -> dict[str, Any]:
        """``[normal || pseudo-anomalous]``: images [2B,3,H,W], masks [2B,S,S] at map size, classes, answers.

        Each pseudo-anomaly takes its patch from the previous image of the batch (AnomalyGPT pastes from the
        previously fetched image, which may be of another class).
        """
        normal = np.stack([self._raw_image(root, r) for r in records])
        donors = np.roll(normal, 1, axis=0)
        pseudo = [self.pseudo_generator(dataset_name, record["cls_name"]).generate(image, donor, rng)
                  for image, donor, record in zip(normal, donors, records, strict=True)]
        images = np.concatenate([normal, np.stack([p.image for p in pseudo])])
        soft = np.concatenate([np.zeros((len(records), *pseudo[0].mask.shape), np.float32),
                               np.stack([p.mask for p in pseudo])])
        target = torch.from_numpy(soft > self.params["label_threshold"]).float()
        size = self.params["map_size"]
        target = F.interpolate(target[:, None], size=(size, size), mode="nearest")[:, 0].to(self.device)
        cls_names = [r["cls_name"] for r in records] * 2
        boxes = [()] * len(records) + [p.boxes for p in pseudo]
        answers = self.target_answers(target.cpu(), boxes, normal.shape[1:3])
        memory_prompt = bool(self._train_memory) and rng.random() < self.params["train_memory_prompt_p"]
        return {"image": self._normalise(images), "mask": target, "cls_name": cls_names, "answers": answers,
                "memory_prompt": memory_prompt}

    def target_answers(self, masks: Tensor, boxes: Sequence[Sequence[Box]], shape: tuple[int, int]) -> list[str]:
        """Training answers for binarised masks [N, S, S] and the boxes of the patches pasted into each image (in
        paste order, pixels of images of ``shape`` (H, W); none for a normal image).

        AnomalyGPT's wording with ``answer_regions: patches`` (default) is the release's: one anomaly per pasted
        patch in paste order, whatever the binarised label shows (a faint paste the 0.3 threshold empties is still
        "Yes"; a patch the threshold splits is still one anomaly); ``patches_union_box`` takes the 2nd centre from
        the union box as the release computes it; ``components`` reads the 8-connected regions of the mask. SIAD's
        wording lists every grid cell the mask touches.
        """
        p = self.params
        if p["answer_style"] == "siad" or p["answer_regions"] == "components":
            return [target_answer(m, style=p["answer_style"]) for m in masks]
        union = p["answer_regions"] == "patches_union_box"
        return [patch_answer(b, shape, union_box=union) for b in boxes]

    def train_memory(self, root: Path, records: Sequence[Mapping[str, Any]]) -> dict[str, list[Tensor]]:
        """The released training memory: per class, its first normal training image (path order; anomalous records,
        present under ``zad``, are skipped) and its
        rot90 copies (0°, 90°, 180°, 270°) as reference patches for the memory-map prompts."""
        first: dict[str, Mapping[str, Any]] = {}
        for record in sorted((r for r in records if not r["anomaly"]), key=lambda r: r["img_path"]):
            first.setdefault(record["cls_name"], record)  # normal images only: under zad the records hold anomalies
        references = {}
        for cls_name, record in first.items():
            image = self._normalise(self._raw_image(root, record)[None])
            references[cls_name] = torch.cat([torch.rot90(image, k, dims=(-2, -1)) for k in range(4)])
        return self.memory_tokens(references)

    def batch_pixel_losses(self, probs: Tensor, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """:meth:`pixel_losses` over the batch's images whose mask is pixel truth (``batch["mask_valid"]``; all when
        absent); (0, 0) when none is."""
        valid = batch.get("mask_valid")
        if valid is None:
            return self.pixel_losses(probs, batch["mask"])
        keep = torch.as_tensor(valid, dtype=torch.bool, device=probs.device)
        if not keep.any():
            zero = probs.sum() * 0.0
            return zero, zero
        return self.pixel_losses(probs[keep], batch["mask"][keep])

    def pixel_losses(self, probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(focal, dice) summed over the stages against the binarised pseudo mask, as released."""
        focal = sum(focal_loss(probs[:, k], target) for k in range(probs.shape[1]))
        dice = sum(dice_loss(probs[:, k, 1], target) for k in range(probs.shape[1]))
        return focal, dice

    def training_loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """AnomalyGPT's loss on one ``[normal || pseudo]`` batch: CE(answer) + Σ_stages (focal + dice)."""
        stages, embedding = self.encode_images(batch["image"])
        out = self.forward_pass(self.visual_tokens(stages), self.text_features(batch["cls_name"]))
        focal, dice = self.batch_pixel_losses(out.probs, batch)  # always on the text map, as released
        prompts = out.prompts
        if batch.get("memory_prompt"):
            memory = self.memory_map(stages, batch["cls_name"], self._train_memory)
            prompts = self.prompt_embeddings(out.probs, memory)
        ce = self.answer_loss(embedding, prompts, batch["cls_name"], batch["answers"])
        parts = {"ce": float(ce.detach()), "focal": float(focal.detach()), "dice": float(dice.detach())}
        return ce + focal + dice, parts

    # -- PandaGPT instruction data (optional) -------------------------------------------------------

    def instruction_data(self) -> list[tuple[Path, str, str]]:
        """(image, instruction, answer) triples of ``sft_data``: PandaGPT's ``pandagpt4_visual_instruction_data.json``
        format (a list of ``{"image_name", "conversation": [{"from": "human"|"gpt", "value"}, ...]}``), first
        human/gpt exchange of each conversation. Empty when ``sft_data`` is unset."""
        path = self.params["sft_data"]
        if path is None:
            return []
        try:
            entries = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"sft_data {path}: {err}; give PandaGPT's instruction JSON or unset sft_data") from err
        image_dir = Path(self.params["sft_image_dir"])
        triples = []
        for i, entry in enumerate(entries):
            turns = entry.get("conversation", []) if isinstance(entry, dict) else []
            human = next((t["value"] for t in turns if t.get("from") == "human"), None)
            answer = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
            if "image_name" not in entry or human is None or answer is None:
                raise DataError(f"sft_data {path}, entry {i}: needs image_name and a human and a gpt turn")
            triples.append((image_dir / entry["image_name"], human.replace("<image>", "").strip(), answer))
        if not triples:
            raise DataError(f"sft_data {path} holds no conversations")
        return triples

    def instruction_loss(self, triples: Sequence[tuple[Path, str, str]]) -> Tensor:
        """AnomalyGPT's instruction batch: class 'object', the map still feeds the prompts, CE only (no pixel loss)."""
        images = np.stack([self._raw_image(f.parent, {"img_path": f.name}) for f, _, _ in triples])
        stages, embedding = self.encode_images(self._normalise(images))
        cls_names = ["object"] * len(triples)
        out = self.forward_pass(self.visual_tokens(stages), self.text_features(cls_names))
        return self.answer_loss(embedding, out.prompts, cls_names, [a for _, _, a in triples],
                                questions=[q for _, q, _ in triples])

    def labelled_batch(self, items: Sequence[Mapping[str, Any]], rng: np.random.Generator) -> dict[str, Any]:
        """A training batch of items whose labels and masks the setting gives (``pseudo``: the suite's pseudo-anomalies,
        ``zad``: the source's real anomalies): images as given, masks at map size, answers read from the masks (the
        ``components`` reading: no pasted patches to count). An anomalous image without pixel truth (a dataset
        without masks) answers "Yes" without a position and is left out of the pixel losses (``mask_valid``)."""
        size = self.params["map_size"]
        masks = torch.stack([torch.as_tensor(item["mask"]) for item in items]).float()
        target = F.interpolate(masks[:, None], size=(size, size), mode="nearest")[:, 0]
        labels = [bool(item["label"]) for item in items]
        valid = [bool(item.get("mask_valid", True)) for item in items]
        answers = [target_answer(m if label else torch.zeros_like(m), style=self.params["answer_style"])
                   if ok or not label else UNLOCATED_YES for m, label, ok in zip(target, labels, valid)]
        memory_prompt = bool(self._train_memory) and rng.random() < self.params["train_memory_prompt_p"]
        return {"image": torch.stack([item["image"] for item in items]).to(self.device), "mask": target.to(self.device),
                "cls_name": [item["cls_name"] for item in items], "answers": answers, "memory_prompt": memory_prompt,
                "mask_valid": valid}

    def fit(self, train_data: torch.utils.data.Dataset, setting: str) -> None:
        """Train the trainable modules (released schedule).

        ``uzad``: the auxiliary normal images, each step ``batch_size`` of them with their own NSA pseudo-anomalous
        twins, as released (the method's design: it never sees a real anomaly). ``pseudo`` and ``zad``: the set's
        images with the labels and masks the engine gives them (:mod:`siad.engine.settings`), ``2 × batch_size``
        of them a step, so a step sees as many images as under ``uzad``; no twins are made.
        """
        records = list(getattr(train_data, "records", []))
        root = getattr(train_data, "root", None)
        if not records or root is None:
            raise DataError("LLM detectors train from an AnomalyDataset index (records + root); got an empty dataset")
        p = self.params
        twins = setting == "uzad"
        per_step = p["batch_size"] if twins else 2 * p["batch_size"]
        n_units = len(records) if twins else len(train_data)
        total = p["epochs"] * math.ceil(n_units / per_step)
        warmup = max(p["warmup_min_steps"], int(p["warmup_fraction"] * total))
        params = self.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=p["lr"], betas=tuple(p["betas"]), weight_decay=p["weight_decay"])
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_decay_factor(step, warmup, total, p["warmup"])
        )
        rng = np.random.default_rng(self.seed)
        order_gen = torch.Generator().manual_seed(self.seed)
        instructions = self.instruction_data()
        self._train_memory = self.train_memory(Path(root), records) if p["train_memory_prompt_p"] > 0 else {}
        dataset_name = str(getattr(train_data, "name", "") or "")

        def batch(chosen: list[int]) -> dict[str, Any]:
            if twins:
                return self.training_batch(Path(root), [records[i] for i in chosen], dataset_name, rng)
            return self.labelled_batch([train_data[i] for i in chosen], rng)

        self.trainable.train()
        self.loss_history = []
        bar = tqdm(total=total, desc=f"train {type(self).__name__}", unit="step", disable=not p["progress"])
        for _ in range(p["epochs"]):
            order = torch.randperm(n_units, generator=order_gen).tolist()
            for start in range(0, len(order), per_step):
                chosen = order[start : start + per_step]
                loss, parts = self.training_loss(batch(chosen))
                if instructions:  # each step: one anomaly batch + one instruction batch, as released
                    count = len(chosen) if twins else max(1, len(chosen) // 2)  # one per normal image of the step
                    picks = torch.randint(len(instructions), (count,), generator=order_gen).tolist()
                    sft = self.instruction_loss([instructions[i] for i in picks])
                    loss, parts = loss + sft, {**parts, "sft": float(sft.detach())}
                self.optimizer_step(loss, optimizer, params)
                schedule.step()
                self.loss_history.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{self.loss_history[-1]:.3f}", **{k: f"{v:.3f}" for k, v in parts.items()})
        bar.close()
        self.trainable.eval()

    def optimizer_step(self, loss: Tensor, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        """One update with gradient clipping; a non-finite loss stops training with a clear error."""
        if not torch.isfinite(loss):
            raise NumericalError(f"{type(self).__name__}: the training loss became {float(loss)}; lower `lr`")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.params["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(params, self.params["grad_clip"])
        optimizer.step()

    # -- persistence --------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Only the trainable modules (the frozen backbone and LLM come from their own files)."""
        torch.save(self.trainable.state_dict(), path)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        missing, unexpected = self.trainable.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{path}: trained weights do not match this {type(self).__name__} variant (missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}); was it trained with other module switches? Re-run the fit step"
            )


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


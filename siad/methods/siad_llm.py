"""SIAD-LLM: self-improvement anomaly detection with an LLM (the paper this suite reproduces).

Built on AnomalyGPT's machinery (:class:`~siad.methods.llm_detector.LlmDetector`: frozen ImageBind-Huge,
stage decoder, frozen Vicuna-7B + PandaGPT, NSA pseudo-anomalies) and adding, per the spec
``specs/siad_llm.md``:

- stage prompts (Sec. 3.3): learnable context + stage words per stage (cases 1–3), :class:`StagePromptLearner`;
- the adapter (Eq. 5–6) with coefficient λ on the projected stage tokens, :class:`StageAdapter`;
- SEM (Eq. 7), the final stage's map added to every stage, :class:`StageEnhancement`;
- PEM (Eq. 8–11), the four stage maps as LLM prompt embeddings, :class:`PatchPromptEmbedder`;
- self-improvement (Algorithm 1): the LLM's answer R to the first map becomes the context-aware prompt pair
  (R + "without damaged", R + "with damaged"), which refines the text features for a second pass.

Every ablation is a parameter: ``self_improvement`` (w/o SI), ``stage_prompts`` (w/o SP), ``sem``/``pem``
(w/o SEM, w/o PEM, both: w/o EM), ``adapter_lambda: 0`` (w/o Adapter), ``stage_case``. A module switched
off is not built: its parameters are absent from the model and its weights file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siad.errors import ConfigError
from siad.methods.base import METHODS, Batch, MethodOutput
from siad.methods.llm_components import ConvPromptLearner, dice_loss, focal_loss
from siad.methods.llm_detector import LLM_DEFAULTS, LlmDetector, PassOutput
from siad.methods.siad_components import (
    STAGE_CASES,
    PatchPromptEmbedder,
    StageAdapter,
    StageEnhancement,
    StagePromptLearner,
    refine_text_features,
    response_text_features,
)

__all__ = ["SIAD_DEFAULTS", "SiadLlm"]

SIAD_DEFAULTS: dict[str, Any] = {
    **LLM_DEFAULTS,
    # -- modules (each False / 0 removes the module: the ablations of Tables 3a/3b/4/5)
    "self_improvement": True,
    "stage_prompts": True,
    "stage_case": 3,  # Table 6 case 3: local / regional / regional / global feature of
    "learnable_context": True,  # False (with stage_prompts False) = AnomalyGPT's static ensemble text
    "n_ctx": 12,  # learnable words per state, shared across stages ([choice])
    "adapter_lambda": 0.1,  # Eq. 6; 0 = "w/o Adapter"
    "sem": True,
    "pem": True,
    "pem_hidden": None,  # PEM MLP width (None = the LLM width)
    # -- self-improvement
    "train_response": "target",  # step 7 while training: teacher-forced target answer | "generated"
    # -- losses: L = α·focal + β·dice + γ·CE (Sec. 4.1: all 1)
    "alpha": 1.0,
    "beta": 1.0,
    "gamma": 1.0,
    "pixel_loss_on": "map",  # focal + dice on the anomaly map (spec) | "stages" (AnomalyGPT, per stage)
    # -- training (Sec. 4.1 / Appendix B: one epoch, batch 8, AdamW 1e-3; the rest is the [choice] below)
    "epochs": 1,
    "batch_size": 8,
    "betas": [0.9, 0.999],  # AdamW defaults: the paper names AdamW and nothing else
    "weight_decay": 0.01,
    "warmup": "constant",  # the paper gives no schedule
    "answer_style": "siad",  # Appendix F answers ("No, there are no anomalies in the image." / positions)
    "pseudo_label": "binary",  # Eq. 1–2: the pasted region is the mask
    "label_threshold": 0.5,
    "test_class_names": "class",  # SIAD-LLM has no released code: the class names at training and test alike
    "train_memory_prompt_p": 0.0,  # AnomalyGPT's memory-map prompts while training are not part of SIAD-LLM
}


@METHODS.register("siad_llm")
class SiadLlm(LlmDetector):
    """SIAD-LLM with every module switchable (see the module docstring)."""

    defaults: ClassVar[Mapping[str, Any]] = SIAD_DEFAULTS

    def __init__(self, params: Mapping[str, Any] | None = None, *, device: str = "cpu", seed: int = 0) -> None:
        self._eval_text: dict[str, Tensor] = {}
        super().__init__(params, device=device, seed=seed)

    def check_params(self) -> None:
        super().check_params()
        p = self.params
        if p["stage_case"] not in STAGE_CASES:
            raise ConfigError(f"stage_case={p['stage_case']!r}: SIAD-LLM Table 6 defines cases {sorted(STAGE_CASES)}")
        if not (isinstance(p["adapter_lambda"], (int, float)) and 0.0 <= p["adapter_lambda"] <= 1.0):
            raise ConfigError(f"adapter_lambda={p['adapter_lambda']!r}: use a value in [0, 1] (0 = w/o Adapter)")
        if not p["learnable_context"] and p["stage_prompts"]:
            raise ConfigError("learnable_context: false is only defined without stage prompts (stage_prompts: false)")
        if p["learnable_context"] and not (isinstance(p["n_ctx"], int) and p["n_ctx"] >= 1):
            raise ConfigError(f"n_ctx={p['n_ctx']!r}: use a positive integer (or learnable_context: false)")
        if p["few_shot_k"]:
            raise ConfigError("few_shot_k is AnomalyGPT's memory-map option; SIAD-LLM is zero-shot (few_shot_k: 0)")
        self.check_choice("train_response", ("target", "generated"))
        self.check_choice("pixel_loss_on", ("map", "stages"))

    def build_trainable(self) -> dict[str, nn.Module]:
        """Decoder, then only the switched-on modules (a removed module has no parameters at all)."""
        p = self.params
        modules = super().build_trainable()
        del modules["prompt_learner"]
        if p["learnable_context"]:
            modules["stage_prompts"] = StagePromptLearner(
                self.backbone.tokenizer, int(self.backbone.model.token_embedding.weight.shape[1]),
                stage_case=p["stage_case"], stage_prompts=p["stage_prompts"], n_ctx=p["n_ctx"],
                ensemble=self.ensemble, seed=self.seed,
            )
        if p["adapter_lambda"] > 0:
            modules["adapter"] = StageAdapter(self.embed_dim, len(self.taps), lam=float(p["adapter_lambda"]),
                                              seed=self.seed)
        if p["sem"]:
            modules["sem"] = StageEnhancement(self.embed_dim, len(self.taps), seed=self.seed)
        if p["pem"]:
            modules["pem"] = PatchPromptEmbedder(self.llm_dim, in_channels=len(self.taps), image_size=p["map_size"],
                                                 hidden=p["pem_hidden"], seed=self.seed)
        else:
            modules["prompt_learner"] = ConvPromptLearner(self.llm_dim, seed=self.seed)
        return modules

    # -- hooks --------------------------------------------------------------------------------------

    def text_features(self, cls_names: Sequence[str], *, test: bool = False) -> Tensor:
        """Stage text features [B, K, 2, D]: learnable stage prompts (cached per class outside training)."""
        if "stage_prompts" not in self.trainable:
            return super().text_features(cls_names, test=test)
        learner = self.trainable["stage_prompts"]
        if learner.training:
            self._eval_text.clear()
            return learner(self.backbone.model, list(cls_names))
        missing = [c for c in dict.fromkeys(cls_names) if c not in self._eval_text]
        if missing:
            with torch.no_grad():
                for name, feats in zip(missing, learner(self.backbone.model, missing), strict=True):
                    self._eval_text[name] = feats
        return torch.stack([self._eval_text[c] for c in cls_names])

    def visual_tokens(self, stages: Sequence[Tensor]) -> list[Tensor]:
        """Decoder projection (unit tokens) → adapter (λ) → SEM → L2-normalisation (cosines with the text)."""
        tokens = super().visual_tokens(stages)
        if "adapter" not in self.trainable and "sem" not in self.trainable:
            return tokens
        if "adapter" in self.trainable:
            tokens = self.trainable["adapter"](tokens)
        if "sem" in self.trainable:
            tokens = self.trainable["sem"](tokens)
        return [F.normalize(t, dim=-1) for t in tokens]

    def prompt_embeddings(self, probs: Tensor, anomaly_map: Tensor) -> Tensor:
        """PEM on the four stage maps, or (w/o PEM) AnomalyGPT's conv prompt learner on the combined map."""
        if "pem" in self.trainable:
            return self.trainable["pem"](probs[:, :, 1])
        return super().prompt_embeddings(probs, anomaly_map)

    # -- self-improvement ---------------------------------------------------------------------------

    def response_features(self, responses: Sequence[str]) -> Tensor:
        """T_res [B, 2, D] of the answers (frozen text tower)."""
        return response_text_features(self.backbone.model, self.backbone.tokenizer, list(responses)).to(self.device)

    def refined_pass(self, tokens: Sequence[Tensor], first: PassOutput, responses: Sequence[str]) -> PassOutput:
        """Algorithm 1, steps 8–11: the answers refine the text features; maps and prompts are recomputed."""
        refined = refine_text_features(first.text, self.response_features(responses))
        return self.forward_pass(tokens, refined)

    @torch.no_grad()
    def predict_batch(self, batch: Batch) -> MethodOutput:
        """R', S', M' of Algorithm 1 (or R, S, M without self-improvement)."""
        self.trainable.eval()
        first, embedding, tokens = self.first_pass(batch)
        answers, p_yes = self.judge(embedding, first.prompts, batch["cls_name"])
        if not self.params["self_improvement"]:
            return self._output(first.anomaly_map, answers, p_yes)
        second = self.refined_pass(tokens, first, answers)
        answers, p_yes = self.judge(embedding, second.prompts, batch["cls_name"])
        return self._output(second.anomaly_map, answers, p_yes)

    # -- training -----------------------------------------------------------------------------------

    def pixel_losses(self, probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(focal, dice) on the anomaly map (mean of the stage probabilities), or per stage as AnomalyGPT."""
        if self.params["pixel_loss_on"] == "stages":
            return super().pixel_losses(probs, target)
        combined = probs.mean(dim=1)  # [B, 2, S, S], still a distribution over (normal, abnormal)
        return focal_loss(combined, target), dice_loss(combined[:, 1], target)

    def training_loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """α·focal + β·dice on the first (and refined) map + γ·CE on the final pass's answer."""
        p = self.params
        stages, embedding = self.encode_images(batch["image"])
        tokens = self.visual_tokens(stages)
        final = self.forward_pass(tokens, self.text_features(batch["cls_name"]))
        focal, dice = self.pixel_losses(final.probs, batch["mask"])
        if p["self_improvement"]:
            responses = batch["answers"]
            if p["train_response"] == "generated":
                responses, _ = self.judge(embedding, final.prompts.detach(), batch["cls_name"])
            final = self.refined_pass(tokens, final, responses)
            focal2, dice2 = self.pixel_losses(final.probs, batch["mask"])
            focal, dice = focal + focal2, dice + dice2
        ce = self.answer_loss(embedding, final.prompts, batch["cls_name"], batch["answers"])
        loss = p["alpha"] * focal + p["beta"] * dice + p["gamma"] * ce
        return loss, {"ce": float(ce.detach()), "focal": float(focal.detach()), "dice": float(dice.detach())}

    def fit(self, train_data: torch.utils.data.Dataset, setting: str) -> None:
        self._eval_text.clear()
        super().fit(train_data, setting)
        self._eval_text.clear()

    def load(self, path) -> None:
        super().load(path)
        self._eval_text.clear()


"""Compositional prompt ensembles (state words × templates) and their text features.

The SIAD-LLM paper (Appendix D) and AnomalyGPT build the initial normal/abnormal text features from
the same ensemble: every state phrase is put into every template, each sentence is encoded and
L2-normalised, the sentences of one state are averaged and the mean is normalised again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from siad.registry import Registry


@dataclass(frozen=True)
class PromptEnsemble:
    """State phrases (``{}`` = object name) and templates (``{}`` = state phrase)."""

    normal_states: tuple[str, ...]
    abnormal_states: tuple[str, ...]
    templates: tuple[str, ...]

    def sentences(self, object_name: str) -> tuple[list[str], list[str]]:
        """All (normal, abnormal) sentences for ``object_name``, state-major order."""
        return self._fill(self.normal_states, object_name), self._fill(self.abnormal_states, object_name)

    def _fill(self, states: Sequence[str], object_name: str) -> list[str]:
        return [template.format(state.format(object_name)) for state in states for template in self.templates]


ENSEMBLES: Registry[PromptEnsemble] = Registry("prompt ensemble")

# SIAD-LLM Appendix D, Figure 5 (identical to AnomalyGPT's lists).
ENSEMBLES.add(
    "siad_appendix_d",
    PromptEnsemble(
        normal_states=(
            "{}",
            "flawless {}",
            "perfect {}",
            "unblemished {}",
            "{} without flaw",
            "{} without defect",
            "{} without damage",
        ),
        abnormal_states=("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"),
        templates=("a photo of a {}.", "a photo of the {}."),
    ),
)

# The two-sentence "CLIP" baseline of the AnomalyCLIP / FiLo comparison tables
# ("A photo of a normal [cls]." vs "A photo of an anomalous [cls]."); selectable with
# ``methods.clip.params.ensemble`` to compare with those papers' CLIP rows.
ENSEMBLES.add(
    "anomalyclip_two_sentences",
    PromptEnsemble(normal_states=("a normal {}",), abnormal_states=("an anomalous {}",), templates=("A photo of {}.",)),
)


def object_name(cls_name: str) -> str:
    """The object word(s) used in prompts for a dataset class key (``metal_nut`` → ``metal nut``)."""
    return cls_name.replace("_", " ")


def mean_text_feature(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of the L2-normalised sentence embeddings ``features`` [S, D] → [D]."""
    return F.normalize(F.normalize(features, dim=-1).mean(dim=0), dim=-1)


@torch.no_grad()
def encode_state_features(model: torch.nn.Module, tokenizer, ensemble: PromptEnsemble, cls_name: str) -> torch.Tensor:
    """Text features [2, D] = (normal, abnormal) of ``cls_name`` with an open_clip ``model``."""
    device = next(model.parameters()).device
    rows = []
    for sentences in ensemble.sentences(object_name(cls_name)):
        embeddings = model.encode_text(tokenizer(sentences).to(device))
        rows.append(mean_text_feature(embeddings.float()))
    return torch.stack(rows)

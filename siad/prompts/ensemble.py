"""Compositional prompt ensembles (state words × templates × domains) and their text features.

An ensemble puts every state phrase (``{}`` = object word) into every template (``{}`` = state
phrase); a domain-aware ensemble (AnoVL) first rewrites each template for each domain phrase of the
class's domain group (objects or textures). Each method's lists live in :mod:`siad.prompts.templates`
and are registered here by name.

Two class-feature conventions exist and are chosen explicitly (``aggregate``):

- ``normalize_then_mean``: L2-normalise each sentence embedding, average, normalise again
  (SIAD-LLM Appendix D, AnomalyGPT, AdaCLIP, FiLo, AA-CLIP);
- ``mean_then_normalize``: average the *un-normalised* sentence embeddings, then normalise
  (AnoVL's released code, spec §6; WinCLIP's V1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import torch
import torch.nn.functional as F

from siad.errors import ConfigError
from siad.prompts import templates as vocab
from siad.prompts.learnable import encode_sentences
from siad.registry import Registry

Aggregate = Literal["normalize_then_mean", "mean_then_normalize"]
Order = Literal["state_major", "template_major"]
AGGREGATES: tuple[str, ...] = ("normalize_then_mean", "mean_then_normalize")
ORDERS: tuple[str, ...] = ("state_major", "template_major")


@dataclass(frozen=True)
class ClassNaming:
    """How a dataset class key becomes the object word of the prompts.

    ``aliases`` is applied first (AnoVL: ``macaroni1`` → ``macaroni``), then each ``(old, new)`` of
    ``replacements`` (default: ``_`` → space, so ``metal_nut`` → ``metal nut``; AnoVL keeps raw keys).
    """

    aliases: Mapping[str, str] = field(default_factory=dict)
    replacements: tuple[tuple[str, str], ...] = (("_", " "),)

    def word(self, cls_name: str) -> str:
        """The object word for ``cls_name``."""
        word = self.aliases.get(cls_name, cls_name)
        for old, new in self.replacements:
            word = word.replace(old, new)
        return word


@dataclass(frozen=True)
class DomainSet:
    """Domain phrases per class group and the class-key → group lookup (AnoVL's domain-aware prompts).

    Attributes:
        phrases: group name → domain phrases (each replaces "photo" in every base template).
        class_groups: dataset class key → group; a class not listed belongs to ``default_group``.
            This is the texture lookup: pass your own mapping to treat other classes as textures.
        default_group: the group of unlisted classes.
    """

    phrases: Mapping[str, tuple[str, ...]]
    class_groups: Mapping[str, str]
    default_group: str

    def __post_init__(self) -> None:
        groups = {self.default_group, *self.class_groups.values()}
        missing = sorted(groups - set(self.phrases))
        if missing:
            raise ConfigError(
                f"domain set: group(s) {missing} have no domain phrases; known groups {sorted(self.phrases)}. "
                "Add the phrases or map those classes to a known group"
            )

    def group_of(self, cls_name: str) -> str:
        """The domain group of a dataset class key."""
        return self.class_groups.get(cls_name, self.default_group)


@dataclass(frozen=True)
class PromptEnsemble:
    """State phrases (``{}`` = object word) × templates (``{}`` = state phrase) [× domains].

    Attributes:
        normal_states, abnormal_states: state phrases with one ``{}`` each.
        templates: base templates with one ``{}`` each.
        domains: if set, every template is rewritten for each domain phrase of the class's group
            (:func:`siad.prompts.templates.domain_template`), domain-major.
        order: sentence order within a state: ``state_major`` (all templates of state 1 first) or
            ``template_major`` (all states of template 1 first, AnoVL's released order).
        naming: class key → object word.
        aggregate: this method's class-feature convention (see the module docstring).
    """

    normal_states: tuple[str, ...]
    abnormal_states: tuple[str, ...]
    templates: tuple[str, ...]
    domains: DomainSet | None = None
    order: Order = "state_major"
    naming: ClassNaming = field(default_factory=ClassNaming)
    aggregate: Aggregate = "normalize_then_mean"

    def __post_init__(self) -> None:
        for kind, phrases in (("state", self.normal_states + self.abnormal_states), ("template", self.templates)):
            for phrase in phrases:
                if phrase.count("{}") != 1:
                    raise ConfigError(f"prompt ensemble: {kind} {phrase!r} must contain exactly one '{{}}' slot")
        if not (self.normal_states and self.abnormal_states and self.templates):
            raise ConfigError("prompt ensemble: normal states, abnormal states and templates must all be non-empty")
        _check_choice("order", self.order, ORDERS)
        _check_choice("aggregate", self.aggregate, AGGREGATES)
        if self.domains is not None:  # fail at definition, not at the first encode
            for group in self.domains.phrases:
                self.templates_for(group)

    def templates_for(self, domain_group: str | None = None) -> tuple[str, ...]:
        """The templates sentences are built from: the base ones, or their domain rewrites for a group."""
        if self.domains is None:
            return self.templates
        group = self.domains.default_group if domain_group is None else domain_group
        if group not in self.domains.phrases:
            raise ConfigError(f"prompt ensemble: unknown domain group {group!r}; known: {sorted(self.domains.phrases)}")
        return vocab.domain_templates(self.templates, self.domains.phrases[group])

    def sentences(self, object_name: str, domain_group: str | None = None) -> tuple[list[str], list[str]]:
        """All (normal, abnormal) sentences for an object word (already converted from the class key)."""
        templates = self.templates_for(domain_group)
        return self._fill(self.normal_states, object_name, templates), self._fill(
            self.abnormal_states, object_name, templates
        )

    def class_sentences(self, cls_name: str, domain_group: str | None = None) -> tuple[list[str], list[str]]:
        """All (normal, abnormal) sentences for a dataset class key: its object word and its domain group."""
        if domain_group is None and self.domains is not None:
            domain_group = self.domains.group_of(cls_name)
        return self.sentences(self.naming.word(cls_name), domain_group)

    def _fill(self, states: Sequence[str], word: str, templates: Sequence[str]) -> list[str]:
        phrases = [state.replace("{}", word) for state in states]
        if self.order == "state_major":
            return [template.replace("{}", phrase) for phrase in phrases for template in templates]
        return [template.replace("{}", phrase) for template in templates for phrase in phrases]


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"prompt ensemble: unknown {name} {value!r}; choose one of {list(allowed)}")


ENSEMBLES: Registry[PromptEnsemble] = Registry("prompt ensemble")

# SIAD-LLM Appendix D, Figure 5 (identical to AnomalyGPT's lists, spec §1).
ENSEMBLES.add(
    "siad_appendix_d",
    PromptEnsemble(
        normal_states=vocab.WINCLIP_NORMAL_STATES,
        abnormal_states=vocab.GENERIC_ABNORMAL_STATES,
        templates=("a photo of a {}.", "a photo of the {}."),
    ),
)
ENSEMBLES.add("anomalygpt", ENSEMBLES.get("siad_appendix_d"))

# The two-sentence "CLIP" baseline of the AnomalyCLIP / FiLo comparison tables
# ("A photo of a normal [cls]." vs "A photo of an anomalous [cls]."); selectable with
# ``methods.clip.params.ensemble`` to compare with those papers' CLIP rows.
ENSEMBLES.add(
    "anomalyclip_two_sentences",
    PromptEnsemble(normal_states=("a normal {}",), abnormal_states=("an anomalous {}",), templates=("A photo of {}.",)),
)

# AnoVL (seed 002) and the rows of its Table 4. All three use the released code's conventions: raw
# class keys (macaroni1/2 → macaroni), template-major sentence order, mean-then-normalise.
ANOVL_NAMING = ClassNaming(aliases=MappingProxyType(dict(vocab.ANOVL_CLASS_ALIASES)), replacements=())
ANOVL_DOMAINS = DomainSet(
    phrases=MappingProxyType({"object": vocab.ANOVL_OBJECT_DOMAINS, "texture": vocab.ANOVL_TEXTURE_DOMAINS}),
    class_groups=MappingProxyType(dict.fromkeys(sorted(vocab.MVTEC_TEXTURE_CLASSES), "texture")),
    default_group="object",
)
_ANOVL_COMMON = dict(order="template_major", naming=ANOVL_NAMING, aggregate="mean_then_normalize")
ENSEMBLES.add(
    "anovl_base",  # Table 4 "Base": 22 base templates × ("normal [c]" vs "abnormal [c]")
    PromptEnsemble(
        vocab.ANOVL_TABLE4_BASE_NORMAL, vocab.ANOVL_TABLE4_BASE_ABNORMAL, vocab.ANOVL_BASE_TEMPLATES, **_ANOVL_COMMON
    ),
)
ENSEMBLES.add(
    "anovl_cs",  # Table 4 "+CS Prompt": 7 contrastive state pairs, no domains (154 per state)
    PromptEnsemble(vocab.ANOVL_NORMAL_STATES, vocab.ANOVL_ABNORMAL_STATES, vocab.ANOVL_BASE_TEMPLATES, **_ANOVL_COMMON),
)
ENSEMBLES.add(
    "anovl",  # Table 4 "+DA Prompt" = full AnoVL: 3 domains × 22 templates × 7 states (462 per state)
    PromptEnsemble(
        vocab.ANOVL_NORMAL_STATES,
        vocab.ANOVL_ABNORMAL_STATES,
        vocab.ANOVL_BASE_TEMPLATES,
        domains=ANOVL_DOMAINS,
        **_ANOVL_COMMON,
    ),
)
# Row label of AnoVL Table 4 → registered ensemble.
ANOVL_TABLE4_VARIANTS: Mapping[str, str] = MappingProxyType(
    {"Base": "anovl_base", "+CS Prompt": "anovl_cs", "+DA Prompt": "anovl"}
)

# AdaCLIP's class-aware sentences (28 / 20): "-" → space, underscores kept (spec clip_family §2).
ENSEMBLES.add(
    "adaclip",
    PromptEnsemble(
        vocab.WINCLIP_NORMAL_STATES,
        vocab.GENERIC_ABNORMAL_STATES,
        vocab.ADACLIP_TEMPLATES,
        naming=ClassNaming(replacements=(("-", " "),)),
    ),
)
# AA-CLIP (6 / 10 sentences). Its class words are descriptions (REAL_NAMES, e.g. "dark bottle"): the
# baseline passes those words to ``sentences``; ``class_sentences`` falls back to ``_`` → space.
ENSEMBLES.add(
    "aa_clip", PromptEnsemble(vocab.AACLIP_NORMAL_STATES, vocab.AACLIP_ABNORMAL_STATES, vocab.AACLIP_TEMPLATES)
)


def object_name(cls_name: str) -> str:
    """The object word(s) used in prompts for a dataset class key (``metal_nut`` → ``metal nut``)."""
    return cls_name.replace("_", " ")


def aggregate_text_features(features: torch.Tensor, aggregate: Aggregate = "normalize_then_mean") -> torch.Tensor:
    """One unit-norm class feature [D] from sentence embeddings ``features`` [S, D] (see module docstring)."""
    _check_choice("aggregate", aggregate, AGGREGATES)
    if aggregate == "normalize_then_mean":
        features = F.normalize(features, dim=-1)
    return F.normalize(features.mean(dim=0), dim=-1)


def mean_text_feature(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of the L2-normalised sentence embeddings ``features`` [S, D] → [D]."""
    return aggregate_text_features(features, "normalize_then_mean")


@dataclass(frozen=True)
class ClassTextFeatures:
    """The encoded ensemble of one class.

    Attributes:
        features: [2, D] unit-norm (normal, abnormal) class features.
        sentence_features: [2N, D] L2-normalised sentence embeddings, the N normal ones first, then the
            abnormal ones in the same order (AnoVL's T: rows i and i+N are a contrastive pair when the
            ensemble has as many normal as abnormal states).
        sentences: the (normal, abnormal) sentences that were encoded.
    """

    features: torch.Tensor
    sentence_features: torch.Tensor
    sentences: tuple[list[str], list[str]]


@torch.no_grad()
def encode_class_text(
    model: torch.nn.Module,
    tokenizer,
    ensemble: PromptEnsemble,
    cls_name: str,
    *,
    aggregate: Aggregate | None = None,
    domain_group: str | None = None,
    batch_size: int = 256,
) -> ClassTextFeatures:
    """Encode ``ensemble``'s sentences for ``cls_name`` with an open_clip ``model`` (batched).

    ``aggregate`` defaults to the ensemble's own convention; ``domain_group`` overrides the class's
    domain group (e.g. to treat a class as a texture).
    """
    normal, abnormal = ensemble.class_sentences(cls_name, domain_group)
    embeddings = encode_sentences(model, tokenizer, normal + abnormal, batch_size=batch_size).float()
    how = ensemble.aggregate if aggregate is None else aggregate
    per_state = (embeddings[: len(normal)], embeddings[len(normal) :])
    features = torch.stack([aggregate_text_features(rows, how) for rows in per_state])
    return ClassTextFeatures(features, F.normalize(embeddings, dim=-1), (normal, abnormal))


@torch.no_grad()
def encode_state_features(
    model: torch.nn.Module, tokenizer, ensemble: PromptEnsemble, cls_name: str, *, aggregate: Aggregate | None = None
) -> torch.Tensor:
    """Text features [2, D] = (normal, abnormal) of ``cls_name`` with an open_clip ``model``.

    Aggregated with the ensemble's own convention unless ``aggregate`` is given.
    """
    return encode_class_text(model, tokenizer, ensemble, cls_name, aggregate=aggregate).features

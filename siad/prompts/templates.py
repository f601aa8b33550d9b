"""Prompt vocabularies of the methods (state phrases, templates, domain phrases) and the domain rewrite.

Plain data plus one string rule, kept apart from the ensemble mechanics in :mod:`siad.prompts.ensemble`.
Every list names its source; ``{}`` is the slot (object word in a state phrase, state phrase in a
template). Lists were written from the specs (``../shared/specs/``) and the papers, checked against
the released code where the specs say so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from siad.errors import ConfigError

# --- WinCLIP (Jeong et al., CVPR'23, Fig. 6c): the 22 template-level prompts, in the paper's order. ---
WINCLIP_TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

# WinCLIP's seven normal state phrases (shared by AnomalyGPT, AdaCLIP, FiLo and SIAD-LLM Appendix D).
WINCLIP_NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
# The five generic abnormal phrases of AnomalyGPT / AdaCLIP / FiLo (WinCLIP's four plus "broken").
GENERIC_ABNORMAL_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

# --- AnoVL (Deng et al., seed 002; spec §3 Prompts; released prompt_ensemble.py). ---
# The 22 base templates are WinCLIP's (the paper calls them "collected from CLIP"), written without
# the final period as in the released code.
ANOVL_BASE_TEMPLATES: tuple[str, ...] = tuple(t.removesuffix(".") for t in WINCLIP_TEMPLATES)
# Seven contrastive pairs: normal phrase i is the antonym of abnormal phrase i (the TTA pairs t_i, t_{i+N}).
# (WinCLIP's seven normal phrases with the bare "{}" made explicit as "normal {}").
ANOVL_NORMAL_STATES: tuple[str, ...] = ("normal {}", *WINCLIP_NORMAL_STATES[1:])
ANOVL_ABNORMAL_STATES: tuple[str, ...] = (
    "damaged {}",
    "abnormal {}",
    "imperfect {}",
    "blemished {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
# Table 4 "Base": the base templates with one state pair, "normal [class]" vs "abnormal [class]".
ANOVL_TABLE4_BASE_NORMAL: tuple[str, ...] = ("normal {}",)
ANOVL_TABLE4_BASE_ABNORMAL: tuple[str, ...] = ("abnormal {}",)
# Domain phrases, each replacing "photo" in every base template (3 × 22 = 66 templates per class).
ANOVL_OBJECT_DOMAINS: tuple[str, ...] = ("industrial photo", "industrial image", "manufacturing image")
ANOVL_TEXTURE_DOMAINS: tuple[str, ...] = ("industrial photo", "textural photo", "surface picture")
# Dataset class keys AnoVL treats as textures (its released ``texture_list``: the MVTecAD textures).
MVTEC_TEXTURE_CLASSES: frozenset[str] = frozenset({"carpet", "grid", "leather", "tile", "wood"})
# AnoVL keeps raw class keys ("metal_nut") except VisA's two macaroni classes.
ANOVL_CLASS_ALIASES: dict[str, str] = {"macaroni1": "macaroni", "macaroni2": "macaroni"}

# --- AdaCLIP (spec baselines_clip_family.md §2 Text): 7 / 5 states × 4 templates. ---
ADACLIP_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
)

# --- AA-CLIP (spec baselines_clip_family.md §3 Prompts): 3 / 5 states × 2 templates. ---
AACLIP_NORMAL_STATES: tuple[str, ...] = ("{}", "a {}", "the {}")
AACLIP_ABNORMAL_STATES: tuple[str, ...] = (
    "a damaged {}",
    "a broken {}",
    "a {} with flaw",
    "a {} with defect",
    "a {} with damage",
)
AACLIP_TEMPLATES: tuple[str, ...] = ("{}.", "a photo of {}.")

_PHOTO = re.compile(r"\bphoto\b")
_LEADING_A = re.compile(r"^a (?=[aeiou])")


def domain_template(template: str, domain: str) -> str:
    """Rewrite a base template for one domain phrase: "photo" → ``domain``, with the article fixed.

    "a cropped photo of a {}" + "industrial photo" → "a cropped industrial photo of a {}";
    "a photo of the {}" + "industrial image" → "an industrial image of the {}" (the leading "a"
    becomes "an" before a vowel, as in AnoVL's lists).

    Raises:
        ConfigError: the template has no word "photo" to replace.
    """
    if not _PHOTO.search(template):
        raise ConfigError(
            f"template {template!r} has no word 'photo' for the domain phrase {domain!r} to replace; "
            "use templates of the form '... photo of ... {}' for a domain-aware ensemble"
        )
    rewritten = _PHOTO.sub(domain, template, count=1)
    return _LEADING_A.sub("an ", rewritten)


def domain_templates(templates: Iterable[str], domains: Iterable[str]) -> tuple[str, ...]:
    """Every template rewritten for every domain, domain-major (all templates of domain 1 first)."""
    base = tuple(templates)
    return tuple(domain_template(template, domain) for domain in domains for template in base)

"""Text prompts: ensembles of state words × templates × domains, their encoded features, and learnable context."""

from siad.prompts.ensemble import (
    AGGREGATES,
    ANOVL_TABLE4_VARIANTS,
    ENSEMBLES,
    ClassNaming,
    ClassTextFeatures,
    DomainSet,
    PromptEnsemble,
    aggregate_text_features,
    encode_class_text,
    encode_state_features,
    mean_text_feature,
    object_name,
)
from siad.prompts.learnable import (
    ContextVectors,
    DeepTextPrompts,
    MetaNetContext,
    context_prompt_tokens,
    encode_sentences,
    encode_text_with_context,
    inject_context,
    text_hidden_states,
)
from siad.prompts.templates import domain_template, domain_templates

__all__ = [
    "AGGREGATES",
    "ANOVL_TABLE4_VARIANTS",
    "ENSEMBLES",
    "ClassNaming",
    "ClassTextFeatures",
    "ContextVectors",
    "DeepTextPrompts",
    "DomainSet",
    "MetaNetContext",
    "PromptEnsemble",
    "aggregate_text_features",
    "context_prompt_tokens",
    "domain_template",
    "domain_templates",
    "encode_class_text",
    "encode_sentences",
    "encode_state_features",
    "encode_text_with_context",
    "inject_context",
    "mean_text_feature",
    "object_name",
    "text_hidden_states",
]

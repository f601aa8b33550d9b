"""Text prompts: ensembles of state words and templates, and their encoded features."""

from siad.prompts.ensemble import ENSEMBLES, PromptEnsemble, encode_state_features, mean_text_feature, object_name

__all__ = ["ENSEMBLES", "PromptEnsemble", "encode_state_features", "mean_text_feature", "object_name"]

"""SIAD-LLM benchmark suite: data, backbones, metrics, methods and reports."""

__version__ = "0.1.0"

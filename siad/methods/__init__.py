"""Methods: the common interface, the registry, and SIAD-LLM itself."""

from siad.methods.base import METHODS, Batch, Method, build_method, get_method_class

__all__ = ["METHODS", "Batch", "Method", "build_method", "get_method_class"]

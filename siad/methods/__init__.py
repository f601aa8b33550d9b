"""Methods: the common interface, the registry, and SIAD-LLM itself."""

from siad.methods.base import (
    METHODS,
    Batch,
    BlockList,
    Choice,
    Flag,
    Method,
    Number,
    NumberList,
    ParamRule,
    Registered,
    Text,
    build_method,
    get_method_class,
)

__all__ = [
    "METHODS", "Batch", "BlockList", "Choice", "Flag", "Method", "Number", "NumberList", "ParamRule", "Registered",
    "Text", "build_method", "get_method_class",
]

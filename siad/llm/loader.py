"""Load the causal LM of AnomalyGPT / SIAD-LLM: the paper's Vicuna-7B v0 + PandaGPT delta, or a tiny demo LM.

Paper profile (``kind="vicuna-pandagpt"``) — the files a user needs, all placed by hand (offline suite):

1. ``<vicuna_dir>/``: **Vicuna-7B v0** in Hugging Face format (``config.json``, ``tokenizer.model``,
   ``tokenizer_config.json``, ``special_tokens_map.json`` and the weight shards ``*.safetensors`` or
   ``pytorch_model*.bin``). Vicuna v0 is distributed only as a delta: obtain the LLaMA-1 7B weights
   (Meta's request form; convert with transformers' ``convert_llama_weights_to_hf.py``), then run FastChat
   ``python -m fastchat.model.apply_delta --base-model-path <llama-7b-hf> --target-model-path <vicuna_dir>
   --delta-path lmsys/vicuna-7b-delta-v0``. (v1.1/v1.3 are different models; PandaGPT was trained on v0.)
2. ``<pandagpt_delta>``: ``pytorch_model.pt`` from the Hugging Face repo
   ``openllmplayground/pandagpt_7b_max_len_1024``. It holds ``llama_proj`` (Linear 1024 → 4096, the
   image token projection) and the LoRA (r = 32, α = 32, dropout 0.1) of q/k/v/o_proj of all 32 layers.

The LoRA is merged into the base weights (W += (α/r)·B·A; α/r = 1 here) rather than wrapped with peft:
it is frozen in AnomalyGPT, so merging is exact and removes the peft dependency. The loader *asserts*
that all 32 × 4 × 2 = 256 LoRA tensors and the projection were found — the reference code loads both
checkpoints with ``strict=False``, where a peft key spelling mismatch (``lora_A.weight`` vs
``lora_A.default.weight``) silently leaves the LoRA out.

Demo profile (``kind="tiny-random"``): a seeded random-init ``LlamaForCausalLM`` (hidden 64, 2 layers,
4 heads) with the committed byte-level tokenizer (:mod:`siad.llm.tiny_tokenizer`) and a seeded random
projection; it exercises every code path in seconds but its answers are noise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from siad.errors import ConfigError, MissingWeightsError

__all__ = [
    "LORA_MODULES",
    "LlmSpec",
    "LoadedLlm",
    "PANDAGPT_DELTA_REPO",
    "apply_memory_switches",
    "checkpointing_active",
    "apply_pandagpt_delta",
    "check_lora_complete",
    "collect_lora_pairs",
    "load_llm",
    "merge_lora",
    "tiny_llm_spec",
    "vicuna_pandagpt_spec",
]

LORA_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
PANDAGPT_DELTA_REPO = "openllmplayground/pandagpt_7b_max_len_1024"
_LORA_KEY = re.compile(
    r"layers\.(?P<layer>\d+)\.self_attn\.(?P<module>[qkvo]_proj)\.lora_(?P<side>[AB])(?:\.default)?\.weight$"
)
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


@dataclass(frozen=True)
class LlmSpec:
    """What to load. ``kind`` picks the profile; the other fields apply to the profile that reads them."""

    kind: Literal["tiny-random", "vicuna-pandagpt"]
    image_dim: int = 1024
    seed: int = 0
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    vicuna_dir: Path | None = None
    pandagpt_delta: Path | None = None
    lora_r: int = 32
    lora_alpha: int = 32
    lora_modules: tuple[str, ...] = LORA_MODULES
    dtype: str = "float32"
    # memory switches (off by default; docs/scale.md): recompute each decoder layer in the backward pass instead of
    # keeping its activations (the gradient still reaches the prompts through the frozen LLM), and int8 weights
    gradient_checkpointing: bool = False
    load_in_8bit: bool = False


@dataclass
class LoadedLlm:
    """The frozen LM, its tokenizer and the image projection (image feature → one LM token embedding)."""

    model: nn.Module
    tokenizer: Any
    image_proj: nn.Linear
    spec: LlmSpec
    merged_lora_keys: list[str] = field(default_factory=list)

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The LM's token embedding table (the conversation embeds its text pieces with it)."""
        return self.model.get_input_embeddings()


def tiny_llm_spec(seed: int = 0, image_dim: int = 1024) -> LlmSpec:
    """The demo/test profile: seeded random tiny LLaMA with the committed tokenizer."""
    return LlmSpec(kind="tiny-random", seed=seed, image_dim=image_dim)


def vicuna_pandagpt_spec(vicuna_dir: str | Path, pandagpt_delta: str | Path, dtype: str = "float16") -> LlmSpec:
    """The paper profile: Vicuna-7B v0 + PandaGPT delta (see the module docstring for the files)."""
    return LlmSpec(
        kind="vicuna-pandagpt", vicuna_dir=Path(vicuna_dir), pandagpt_delta=Path(pandagpt_delta), dtype=dtype
    )


def collect_lora_pairs(lora_state: Mapping[str, torch.Tensor]) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Group LoRA tensors by (layer, module) → {"A": tensor, "B": tensor}; both peft key spellings accepted."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in lora_state.items():
        match = _LORA_KEY.search(key)
        if match is None:
            continue
        slot = pairs.setdefault((int(match["layer"]), match["module"]), {})
        if match["side"] in slot:
            raise ConfigError(f"LoRA state has two tensors for {key!r} (both peft spellings?); keep one.")
        slot[match["side"]] = tensor
    return pairs


def check_lora_complete(
    pairs: Mapping[tuple[int, str], Mapping[str, torch.Tensor]],
    num_layers: int,
    modules: Iterable[str] = LORA_MODULES,
    source: str = "the LoRA state",
) -> None:
    """Raise MissingWeightsError naming every (layer, module, A/B) of the target set absent from ``pairs``."""
    missing = [
        f"layers.{layer}.self_attn.{module}.lora_{side}"
        for layer in range(num_layers)
        for module in modules
        for side in ("A", "B")
        if side not in pairs.get((layer, module), {})
    ]
    if missing:
        shown = ", ".join(missing[:12]) + (f" … ({len(missing)} in all)" if len(missing) > 12 else "")
        raise MissingWeightsError(
            f"{source} lacks LoRA tensors: {shown}. Expected lora_A/lora_B (peft spelling with or without "
            f"'.default') for {sorted(set(modules))} of all {num_layers} layers; use the full "
            f"{PANDAGPT_DELTA_REPO} pytorch_model.pt."
        )


def merge_lora(
    base_state: Mapping[str, torch.Tensor],
    lora_state: Mapping[str, torch.Tensor],
    r: int,
    alpha: float,
) -> list[str]:
    """Merge LoRA into the base weights **in place**: W ← W + (α/r)·B·A for every pair found.

    ``base_state`` uses transformers' LLaMA names (``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``);
    pass ``model.state_dict()`` to update the model's parameters (the tensors share storage). The product is
    computed in float32 and cast back. Returns the base keys updated. Raises MissingWeightsError when a pair
    is incomplete or its base weight is absent, ConfigError on a shape mismatch.
    """
    scale = float(alpha) / float(r)
    merged: list[str] = []
    for (layer, module), slot in sorted(collect_lora_pairs(lora_state).items()):
        if set(slot) != {"A", "B"}:
            raise MissingWeightsError(f"LoRA of layers.{layer}.self_attn.{module} has only lora_{''.join(slot)}.")
        key = f"model.layers.{layer}.self_attn.{module}.weight"
        if key not in base_state:
            raise MissingWeightsError(f"LoRA targets {key}, which the base model does not have (wrong base model?).")
        weight, lora_a, lora_b = base_state[key], slot["A"], slot["B"]
        if lora_a.shape[0] != r or lora_b.shape[1] != r or (lora_b.shape[0], lora_a.shape[1]) != tuple(weight.shape):
            raise ConfigError(
                f"LoRA shapes A{tuple(lora_a.shape)} B{tuple(lora_b.shape)} do not fit {key} "
                f"{tuple(weight.shape)} with r={r}."
            )
        delta = scale * (lora_b.float().to(weight.device) @ lora_a.float().to(weight.device))
        with torch.no_grad():
            weight.copy_((weight.float() + delta).to(weight.dtype))
        merged.append(key)
    return merged


def load_llm(spec: LlmSpec) -> LoadedLlm:
    """Load the LM, tokenizer and image projection of ``spec``, frozen and in eval mode."""
    if spec.kind == "tiny-random":
        loaded = _load_tiny(spec)
    elif spec.kind == "vicuna-pandagpt":
        loaded = _load_vicuna_pandagpt(spec)
    else:
        raise ConfigError(f"unknown LLM kind {spec.kind!r}; use 'tiny-random' or 'vicuna-pandagpt'.")
    for module in (loaded.model, loaded.image_proj):
        module.eval().requires_grad_(False)
    apply_memory_switches(loaded)
    return loaded


def apply_memory_switches(loaded: LoadedLlm) -> None:
    """Apply ``loaded.spec``'s memory switches to the loaded (frozen, eval-mode) LLM, in place.

    ``gradient_checkpointing``: transformers' checkpointing of every decoder layer (non-reentrant, so the gradient
    reaches inputs_embeds while no weight requires one). transformers checkpoints a layer only in training mode, and
    a layer in training mode drops the KV cache (generation would then see one token at a time), so the layers stay
    in eval mode here: a training forward runs inside :func:`checkpointing_active`, which puts them in training mode
    for that forward alone; a LLaMA layer has no dropout (``attention_dropout`` must be 0, checked), so its outputs
    are unchanged. ``load_in_8bit``: every linear layer but ``lm_head`` becomes a bitsandbytes
    ``Linear8bitLt`` (LLM.int8(), CUDA only); without the package a ConfigError says what to install.
    """
    spec = loaded.spec
    if spec.load_in_8bit:
        _quantize_8bit(loaded.model)
    if spec.gradient_checkpointing:
        model = loaded.model
        if float(getattr(model.config, "attention_dropout", 0.0) or 0.0) != 0.0:
            raise ConfigError("llm gradient_checkpointing: the LLM has attention dropout; checkpointing needs its "
                              "layers in training mode, which would change its outputs")
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x (the old name is deprecated)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.eval()


@contextmanager
def checkpointing_active(loaded: LoadedLlm) -> Iterator[None]:
    """Inside the block, a forward through ``loaded``'s LLM is gradient-checkpointed when its spec says so and
    gradients are on: the decoder layers are in training mode for the block (transformers checkpoints only then)
    and back in their mode after it. Without the switch, or under ``torch.no_grad()``, nothing changes."""
    if not loaded.spec.gradient_checkpointing or not torch.is_grad_enabled():
        yield
        return
    layers = list(loaded.model.model.layers)
    modes = [layer.training for layer in layers]
    for layer in layers:
        layer.train()
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.train(mode)


def _quantize_8bit(model: nn.Module) -> None:
    """Swap every ``nn.Linear`` of ``model`` except ``lm_head`` for a bitsandbytes int8 layer (weights quantised when
    the model moves to CUDA)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("llm load_in_8bit: the bitsandbytes package is not installed; `pip install bitsandbytes` "
                          "(needs a CUDA GPU), or switch load_in_8bit off")
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or name == "lm_head":
                continue
            layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(child.weight.data.to(torch.float16), requires_grad=False,
                                             has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data.to(torch.float16), requires_grad=False)
            setattr(parent, name, layer)


def _load_tiny(spec: LlmSpec) -> LoadedLlm:
    from transformers import LlamaConfig, LlamaForCausalLM

    from siad.llm.tiny_tokenizer import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
        image_proj = nn.Linear(spec.image_dim, spec.hidden_size)
    return LoadedLlm(model=model.to(getattr(torch, spec.dtype)), tokenizer=tokenizer, image_proj=image_proj, spec=spec)


def _required_files_error(spec: LlmSpec) -> None:
    """Raise one MissingWeightsError listing every paper-profile file that is absent, with source and place."""
    problems: list[str] = []
    vicuna = spec.vicuna_dir
    if vicuna is None or not vicuna.is_dir():
        problems.append(f"Vicuna-7B v0 folder {vicuna} (LLaMA-1 7B + FastChat apply_delta lmsys/vicuna-7b-delta-v0)")
    else:
        for name in ("config.json", "tokenizer.model"):
            if not (vicuna / name).is_file():
                problems.append(f"{vicuna / name} (part of the Vicuna-7B v0 HF folder made by FastChat apply_delta)")
        if not any(any(vicuna.glob(g)) for g in _WEIGHT_GLOBS):
            problems.append(f"{vicuna}/*.safetensors or pytorch_model*.bin (Vicuna-7B v0 weight shards)")
    delta = spec.pandagpt_delta
    if delta is None or not delta.is_file():
        problems.append(f"{delta} (pytorch_model.pt of Hugging Face {PANDAGPT_DELTA_REPO})")
    if problems:
        raise MissingWeightsError(
            "the vicuna-pandagpt LLM profile needs files that are missing:\n  - "
            + "\n  - ".join(problems)
            + "\nPut them at the paths above (or point vicuna_dir / pandagpt_delta at them); see siad/llm/loader.py."
        )


def _load_projection(delta: Mapping[str, torch.Tensor], spec: LlmSpec, hidden: int, source: str) -> nn.Linear:
    weight = next((v for k, v in delta.items() if k.endswith("llama_proj.weight")), None)
    bias = next((v for k, v in delta.items() if k.endswith("llama_proj.bias")), None)
    if weight is None or bias is None:
        raise MissingWeightsError(
            f"{source} has no llama_proj.weight/bias; use the {PANDAGPT_DELTA_REPO} pytorch_model.pt."
        )
    if tuple(weight.shape) != (hidden, spec.image_dim):
        raise ConfigError(f"llama_proj is {tuple(weight.shape)}, expected ({hidden}, {spec.image_dim}).")
    proj = nn.Linear(spec.image_dim, hidden)
    with torch.no_grad():
        proj.weight.copy_(weight.float())
        proj.bias.copy_(bias.float())
    return proj.to(getattr(torch, spec.dtype))


def _load_vicuna_pandagpt(spec: LlmSpec) -> LoadedLlm:
    from transformers import AutoTokenizer, LlamaForCausalLM

    _required_files_error(spec)
    dtype = getattr(torch, spec.dtype)
    model = LlamaForCausalLM.from_pretrained(str(spec.vicuna_dir), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(spec.vicuna_dir))
    tokenizer.pad_token = tokenizer.eos_token  # AnomalyGPT: pad = eos, right padding
    tokenizer.padding_side = "right"
    delta = torch.load(str(spec.pandagpt_delta), map_location="cpu", weights_only=True)
    merged, image_proj = apply_pandagpt_delta(model, delta, spec)
    return LoadedLlm(model=model, tokenizer=tokenizer, image_proj=image_proj, spec=spec, merged_lora_keys=merged)


def apply_pandagpt_delta(
    model: nn.Module, delta: Mapping[str, torch.Tensor], spec: LlmSpec
) -> tuple[list[str], nn.Linear]:
    """Merge the delta's LoRA into ``model`` and build ``llama_proj``, asserting nothing was left out.

    Every (layer, module) of ``spec.lora_modules`` over all layers must have both LoRA tensors, and the
    projection must be present, else MissingWeightsError names what is absent (no silent partial load).
    """
    source = str(spec.pandagpt_delta or "the PandaGPT delta")
    num_layers = model.config.num_hidden_layers
    check_lora_complete(collect_lora_pairs(delta), num_layers, spec.lora_modules, source=source)
    merged = merge_lora(model.state_dict(), delta, spec.lora_r, spec.lora_alpha)
    expected = {f"model.layers.{i}.self_attn.{m}.weight" for i in range(num_layers) for m in spec.lora_modules}
    if not expected <= set(merged):
        raise MissingWeightsError(f"{source}: LoRA not merged into {sorted(expected - set(merged))[:8]}.")
    return merged, _load_projection(delta, spec, model.config.hidden_size, source)

"""Inference speed per image with random weights, as a ratio to a bare backbone forward (the speed table).

Random weights run exactly as fast as trained ones, so every row is timed at the architecture it names
without weight files, on the CPU and, when one is visible, a GPU. The table has two comparison groups,
each with its own reference, the bare image-encoder forward (``encode_image``) of its backbone:

- the CLIP/AnoVL group (``speed.backbone``; AnoVL Table 7): one image at a time after warm-up, text features
  already computed (every method caches them per class), the paper's milliseconds shown beside;
- the LLM group (``speed.llm``; issue 4): AnomalyGPT and SIAD-LLM inference against a bare ViT-H/14
  (ImageBind-Huge) forward, at batch size 1 and at larger batch sizes (the LLM cost is SIAD-LLM's stated
  weakness, and generation is batched), per image, with a breakdown — image pass (backbone + stage maps +
  LLM prompts, ``first_pass``), LLM generation (one batched generation giving the answers and P(Yes),
  ``judge``), second pass (SIAD-LLM's ``refined_pass`` and its second generation) — and peak memory.

A random LLM never emits the stop separator, so a generation would always run to ``max_new_tokens``; the
number of new tokens is instead fixed to the token length of a typical target answer (one anomalous region,
plus the separator) and the number of decoding steps actually run is measured and shown. The paper LLM kind
``vicuna-7b-arch`` is a random-weight LLaMA at Vicuna-7B dimensions in float16 (about 13.5 GB): it is
timed only on a GPU; on the CPU its rows say so instead of allocating it.

Method (issue 12): on a shared machine the same call can swing several-fold from one moment to the next, so
the rows of a group are not timed one after another but interleaved, round by round
(:func:`interleaved_rounds`): round ``r`` calls every row once (the bare forward included), in the cyclic order
that starts at row ``r mod n`` (:func:`round_order`), so each row takes every position equally often and a slow
spell hits the rows of a round alike. Each row reports the median and the minimum of its per-image times; its
ratio to the bare forward is taken within each round (this row's time over the bare forward's time in the same
round) and summarised by the median over rounds, beside the ratio of the two minima (:func:`round_stats`). All
rows of a group are built before the rounds; warm-up calls run on separate images, never timed; peak memory is
measured on one more untimed call per row after the rounds, so its bookkeeping never touches a timed call.
"""

from __future__ import annotations

import ctypes
import gc
import re
import statistics
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from siad.backbones import get_backbone_spec, load_openclip
from siad.errors import ConfigError
from siad.methods import Method, build_method, get_method_class

__all__ = [
    "BARE",
    "LLM_KINDS",
    "PHASES",
    "VICUNA_7B_DIMS",
    "PeakMemory",
    "PhaseClock",
    "Timing",
    "answer_token_count",
    "interleaved_rounds",
    "build_llm_method",
    "build_random_llama",
    "fixed_new_tokens",
    "llm_group_label",
    "llm_notes",
    "measure_llm_speed",
    "measure_speed",
    "method_call",
    "render_speed",
    "round_order",
    "round_stats",
    "run_speed",
    "time_batches",
]

BARE = "bare forward"
PHASES = ("image pass", "LLM generation", "second pass")
LLM_KINDS = ("vicuna-7b-arch", "tiny-random")
# Vicuna-7B v0 = LLaMA-1 7B: the transformers LlamaConfig fields of its config.json.
VICUNA_7B_DIMS: dict[str, int] = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
}
GPU_ONLY_NOTE = "not timed: needs a GPU (vicuna-7b-arch is ~13.5 GB of float16 weights)"
BARE_SKIPPED_NOTE = "not timed: the group's LLM rows need a GPU (a ViT-H forward alone takes seconds on a CPU)"
DEMO_LLM_NOTE = "demo stand-in LLM"


@dataclass(frozen=True)
class Timing:
    """One row: milliseconds per image over the interleaved rounds, and its ratio to the bare forward.

    ``median_ms`` / ``min_ms``: median and minimum over the ``rounds`` timed calls (per image: call time / batch
    size). ``ratio``: the median over rounds of (this row's time / the bare forward's time in the same round), for
    the bare forward of the same group, device and batch size; ``min_ratio``: ``min_ms`` over the bare forward's
    ``min_ms``. ``phases`` holds the per-image milliseconds of :data:`PHASES` (LLM rows only; the median over
    rounds of each phase); ``tokens`` the (prompt, generated) token counts of the first generation as measured;
    ``peak_mib`` the peak working memory of one untimed call, measured as ``memory_measure`` says. A row that was
    not timed has ``median_ms`` None and its reason in ``note``.
    """

    name: str
    device: str
    median_ms: float | None
    min_ms: float | None
    ratio: float | None = None
    min_ratio: float | None = None
    group: str = ""
    batch_size: int = 1
    rounds: int = 0
    phases: Mapping[str, float] = field(default_factory=dict)
    tokens: tuple[int, int] | None = None
    peak_mib: float | None = None
    memory_measure: str = ""
    note: str = ""


def _clock() -> float:
    """Seconds of the timing clock (``time.perf_counter``); one indirection so tests can drive a fake clock."""
    return time.perf_counter()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    """Release what the previous row left behind, so each row's peak memory is its own."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# -- memory ------------------------------------------------------------------------------------------

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so memory freed by earlier calls that the
    allocator still holds does not hide the next calls' working memory from the RSS; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux ≥ 4.0); False where impossible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Peak memory (MiB) of the code run inside ``with``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset — everything allocated on the GPU, the weights
    included; with ``growth=True`` minus what was allocated on entry (the working memory of the calls, the
    resident weights excluded: the speed table, whose rows are all resident at once). CPU: growth of the
    process's peak resident set (VmHWM, reset on entry) over its resident set on entry, after freed heap memory
    was returned to the OS — the working memory of the calls (activations, KV cache), the resident weights
    excluded. ``peak_mib`` stays None where the CPU measure is unavailable (not Linux).
    """

    def __init__(self, device: str, *, growth: bool = False) -> None:
        self.device = device
        self.cuda = device.startswith("cuda")
        self.growth = growth
        if self.cuda:
            self.measure = "CUDA peak-allocated growth" if growth else "CUDA max allocated"
        else:
            self.measure = "CPU peak-RSS growth"
        self.peak_mib: float | None = None
        self._base_kib: int | None = None
        self._base_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base_bytes = torch.cuda.memory_allocated() if self.growth else 0
        else:
            gc.collect()
            _trim_heap()
            self._base_kib = _status_kib("VmRSS") if _reset_peak_rss() else None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self._base_bytes) / 2**20
            return
        peak = _status_kib("VmHWM")
        if self._base_kib is not None and peak is not None:
            self.peak_mib = max(0, peak - self._base_kib) / 1024


# -- timing loops ------------------------------------------------------------------------------------


def time_batches(
    call: Callable[[torch.Tensor], Any],
    images: torch.Tensor,
    *,
    n_batches: int,
    warmup: int,
    device: str,
    after_warmup: Callable[[], None] | None = None,
) -> list[float]:
    """Milliseconds per image of ``call`` on the whole batch ``images``, ``n_batches`` times after ``warmup``.

    ``after_warmup`` runs between the warm-up and the timed calls (e.g. to reset phase clocks).
    """
    for _ in range(warmup):
        call(images)
    _sync(device)
    if after_warmup is not None:
        after_warmup()
    times = []
    for _ in range(n_batches):
        start = time.perf_counter()
        call(images)
        _sync(device)
        times.append(1000.0 * (time.perf_counter() - start) / len(images))
    return times


def round_order(n_calls: int, round_index: int) -> list[int]:
    """The order of the calls in round ``round_index``: cyclic, starting at call ``round_index mod n_calls``.

    Over ``n_calls`` consecutive rounds every call takes every position once, so what a position brings (caches
    warmed or evicted by the call before, a clock ramping up) is spread evenly over the rows; the order is fixed
    by the round index, so a run is reproducible and testable.
    """
    first = round_index % n_calls
    return [(first + j) % n_calls for j in range(n_calls)]


def interleaved_rounds(
    calls: Sequence[tuple[Hashable, Callable[[int], Any]]],
    n_rounds: int,
    *,
    device: str,
    clock: Callable[[], float] | None = None,
) -> dict[Hashable, list[float]]:
    """Milliseconds of every call in each of ``n_rounds`` rounds: round ``r`` runs each ``(key, call)`` once as
    ``call(r)``, in :func:`round_order`. Returns key → the ``n_rounds`` times in round order (``clock`` in seconds,
    default :func:`_clock`; the device is synchronised around each call)."""
    clock = clock or _clock
    if not calls or n_rounds < 1:
        raise ConfigError(f"interleaved timing needs calls and at least one round (got {len(calls)} calls, "
                          f"{n_rounds} rounds)")
    times: dict[Hashable, list[float]] = {key: [] for key, _ in calls}
    for round_index in range(n_rounds):
        for position in round_order(len(calls), round_index):
            key, call = calls[position]
            _sync(device)
            start = clock()
            call(round_index)
            _sync(device)
            times[key].append(1000.0 * (clock() - start))
    return times


def round_stats(times: Sequence[float], bare: Sequence[float]) -> tuple[float, float, float, float]:
    """(median, minimum, median of the per-round ratios ``times[r] / bare[r]``, ratio of the minima) of one row's
    per-round times against its group's bare forward timed in the same rounds."""
    if len(times) != len(bare) or not times:
        raise ValueError(f"{len(times)} row times against {len(bare)} bare-forward times: one each per round")
    ratios = [t / b for t, b in zip(times, bare, strict=True)]
    return statistics.median(times), min(times), statistics.median(ratios), min(times) / min(bare)


def _peak_memory(call: Callable[[], Any], device: str) -> tuple[float | None, str]:
    """Peak working memory (MiB) of one untimed ``call`` and how it was measured (:class:`PeakMemory`, growth)."""
    with PeakMemory(device, growth=True) as memory:
        call()
    return memory.peak_mib, memory.measure


def _bare_backbone(backbone: str, image_size: int, device: str, seed: int) -> Any:
    spec = get_backbone_spec(backbone, {"pretrained": None, "checkpoint": None, "image_size": image_size})
    return load_openclip(spec, device=device, seed=seed)


# -- the CLIP / AnoVL group --------------------------------------------------------------------------


def method_call(method: Method, cls_name: str, dataset: str = "mvtec") -> Callable[[torch.Tensor], Any]:
    """Predict one image of class ``cls_name`` of ``dataset`` (text features are computed on the first call)."""

    def call(image: torch.Tensor) -> Any:
        return method.predict({"image": image, "cls_name": [cls_name], "img_path": ["speed"], "dataset": dataset})

    return call


def measure_speed(
    entries: Mapping[str, tuple[str, Mapping[str, Any]]],
    *,
    backbone: str,
    image_size: int,
    device: str = "cpu",
    n_images: int = 10,
    warmup: int = 2,
    seed: int = 0,
    cls_name: str = "bottle",
    group: str = "",
) -> list[Timing]:
    """Time the bare forward of ``backbone`` and each entry (display name → (method, params)), batch 1, in
    ``n_images`` interleaved rounds (round ``r`` predicts image ``r`` with every row; module docstring).

    Every method is built with ``backbone`` at ``image_size`` and random weights (``random_init``); all rows are
    built first, then each is warmed up ``warmup`` times on other images (never timed; they keep per-image caches
    out of the timed calls), then the rounds run.
    """
    group = group or f"{backbone} @ {image_size} px"
    torch.manual_seed(seed)
    images = torch.randn(n_images, 3, image_size, image_size, device=device)
    extra = torch.randn(max(warmup, 1), 3, image_size, image_size, device=device)  # warm-up images, never timed
    bare = _bare_backbone(backbone, image_size, device, seed)
    rows: list[tuple[str, Callable[[torch.Tensor], Any]]] = [(BARE, torch.no_grad()(bare.model.encode_image))]
    for name, (method_name, params) in entries.items():
        overrides = {"backbone": backbone, "image_size": image_size, "random_init": True}
        if "feature_cache" in get_method_class(method_name).defaults:  # every timed call computes its frozen pass
            overrides["feature_cache"] = None
        method = build_method(method_name, {**params, **overrides}, device=device, seed=seed)
        rows.append((name, method_call(method, cls_name)))
    for _, call in rows:
        for i in range(warmup):
            call(extra[i % len(extra)][None])
    times = interleaved_rounds([(name, lambda r, call=call: call(images[r][None])) for name, call in rows],
                               n_images, device=device)
    timings = []
    for name, call in rows:
        peak, measure = _peak_memory(lambda call=call: call(extra[:1]), device)
        timings.append(Timing(name, device, *round_stats(times[name], times[BARE]), group=group, rounds=n_images,
                              peak_mib=peak, memory_measure=measure))
    del rows, bare
    _free(device)
    return timings


# -- the LLM group -----------------------------------------------------------------------------------


def fixed_new_tokens(entries: Mapping[str, tuple[str, Mapping[str, Any]]], tokenizer: Any) -> dict[str, int]:
    """Row name → the number of new tokens its generations are fixed to (:func:`answer_token_count` in the
    answer wording of the row's method and parameters)."""
    return {name: answer_token_count(tokenizer, get_method_class(method).resolve_params(params)["answer_style"])
            for name, (method, params) in entries.items()}


def answer_token_count(tokenizer: Any, style: str, size: int = 224) -> int:
    """Tokens of a typical target answer: one anomalous region (centre cell) in ``style``'s wording + "\\n###".

    This is what a trained model generates before it stops, so the timed generations are fixed to it.
    """
    from siad.llm import target_answer
    from siad.llm.conversation import ANSWER_END

    mask = torch.zeros(size, size)
    mask[size * 2 // 5 : size * 3 // 5, size * 2 // 5 : size * 3 // 5] = 1.0
    return len(tokenizer(target_answer(mask, style=style) + ANSWER_END, add_special_tokens=False)["input_ids"])


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random_llama(
    dims: Mapping[str, int], image_dim: int, *, device: str = "cpu", dtype: torch.dtype = torch.float16, seed: int = 0
) -> Any:
    """A frozen random-weight LLaMA of ``dims`` (LlamaConfig fields), built directly on ``device`` in ``dtype``,
    with the committed tiny tokenizer and a random image projection ``image_dim`` → hidden: a
    :class:`siad.llm.LoadedLlm` that times like the real LLM of those dimensions (e.g. :data:`VICUNA_7B_DIMS`).

    The LLaMA tokenizer is not available offline; token ids only need to lie in the vocabulary, and the
    tiny tokenizer's ids do (its vocabulary is smaller than any LLaMA's).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from siad.llm import LlmSpec, LoadedLlm
    from siad.llm.tiny_tokenizer import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer()
    if dims["vocab_size"] < len(tokenizer):
        raise ConfigError(f"random LLaMA vocab_size {dims['vocab_size']} is smaller than the tiny tokenizer's "
                          f"{len(tokenizer)} tokens; use vocab_size >= {len(tokenizer)}")
    config = LlamaConfig(
        **dims,
        num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    target = torch.device(device)
    with torch.random.fork_rng(devices=[target] if target.type == "cuda" else []), target, _default_dtype(dtype):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        image_proj = nn.Linear(image_dim, dims["hidden_size"])
    for module in (model, image_proj):
        module.eval().requires_grad_(False)
    spec = LlmSpec(kind="tiny-random", image_dim=image_dim, seed=seed, hidden_size=dims["hidden_size"],
                   num_layers=dims["num_hidden_layers"], num_heads=dims["num_attention_heads"],
                   dtype=str(dtype).removeprefix("torch."))
    return LoadedLlm(model=model, tokenizer=tokenizer, image_proj=image_proj, spec=spec)


def build_llm_method(
    method_name: str, params: Mapping[str, Any], *, device: str, seed: int, llm: Any | None = None
) -> Method:
    """Build an LLM method; with ``llm`` (a LoadedLlm) given, the method uses it instead of loading its own.

    The injection goes through the method's ``load_llm()`` hook (LlmDetector builds its LLM by calling it):
    a subclass returning ``llm`` is instantiated, so no weight files are read and one 7B LLM serves every row.
    """
    if llm is None:
        return build_method(method_name, params, device=device, seed=seed)
    cls = get_method_class(method_name)
    if not callable(getattr(cls, "load_llm", None)):
        raise ConfigError(
            f"speed/llm: method {method_name!r} has no load_llm() hook, so the random-weight vicuna-7b-arch LLM "
            "cannot be given to it; add `def load_llm(self)` to LlmDetector (called by __init__) or use "
            "`speed.llm.kind: tiny-random`"
        )
    injected = type(f"{cls.__name__}WithGivenLlm", (cls,), {"load_llm": lambda self: llm})
    return injected(params, device=device, seed=seed)


class PhaseClock:
    """Splits the time of ``predict_batch`` into :data:`PHASES` by wrapping the method instance's hooks.

    ``first_pass`` is the image pass; the first ``judge`` of a prediction is the LLM generation; a
    ``refined_pass`` and every later ``judge`` belong to the second pass (SIAD-LLM's self-improvement). A
    forward pre-hook on the LLM counts the decoding steps (= generated tokens) and the prompt length of
    the first generation. Call :meth:`start` before each prediction and :meth:`reset` after the warm-up;
    ``totals`` sums the phases since the reset, ``last`` holds the phases of the latest prediction alone.
    """

    def __init__(self, method: Any, device: str) -> None:
        self.method = method
        self.device = device
        self._judged = 0
        self._lengths: list[int] = []
        self.reset()
        originals = {name: getattr(method, name) for name in ("first_pass", "judge", "refined_pass")
                     if hasattr(method, name)}
        self._originals = originals
        for name, fn in originals.items():
            setattr(method, name, self._wrap(name, fn))
        self._hook = method.llm.model.register_forward_pre_hook(self._count_step, with_kwargs=True)

    def reset(self) -> None:
        """Zero the phase totals and the token counts (after the warm-up)."""
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.last = dict.fromkeys(PHASES, 0.0)
        self.tokens: tuple[int, int] | None = None

    def start(self) -> None:
        """Mark the start of one prediction (its first ``judge`` is the LLM generation)."""
        self._judged = 0
        self.last = dict.fromkeys(PHASES, 0.0)

    def close(self) -> None:
        """Restore the method's own hooks and remove the step counter."""
        for name in self._originals:
            delattr(self.method, name)
        self._hook.remove()

    def _count_step(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = kwargs.get("inputs_embeds")
        if inputs is None:
            inputs = kwargs.get("input_ids", args[0] if args else None)
        self._lengths.append(int(inputs.shape[1]) if inputs is not None else 0)

    def _phase(self, name: str) -> str:
        if name == "first_pass":
            return PHASES[0]
        if name == "judge" and self._judged == 0:
            return PHASES[1]
        return PHASES[2]

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            phase = self._phase(name)
            steps_before = len(self._lengths)
            _sync(self.device)
            start = _clock()
            result = fn(*args, **kwargs)
            _sync(self.device)
            elapsed = 1000.0 * (_clock() - start)
            self.totals[phase] += elapsed
            self.last[phase] += elapsed
            if name == "judge":
                if self._judged == 0 and len(self._lengths) > steps_before:
                    steps = self._lengths[steps_before:]
                    self.tokens = (steps[0], len(steps))
                self._judged += 1
            return result

        return timed


_CallRecord = tuple[dict[str, float], "tuple[int, int] | None"]


def _llm_call(method: Any, clock: PhaseClock, images: torch.Tensor, size: int, cls_name: str,
              record: list[_CallRecord] | None) -> Callable[[int], Any]:
    """A call of round ``r``: ``predict_batch`` on the first ``size`` images of ``images[r]`` (``[R, B, 3, S, S]``),
    appending (per-image phases, (prompt, generated) tokens) of that prediction to ``record`` (None: warm-up or
    memory call, nothing recorded)."""

    def call(round_index: int) -> Any:
        clock.start()
        out = method.predict_batch({"image": images[round_index][:size], "cls_name": [cls_name] * size})
        if record is not None:
            record.append(({phase: ms / size for phase, ms in clock.last.items()}, clock.tokens))
        return out

    return call


def _llm_group(methods: Mapping[str, Any], bare_call: Callable[[torch.Tensor], Any], batch_sizes: Sequence[int], *,
               group: str, image_size: int, n_batches: int, warmup: int, device: str, cls_name: str,
               note: str) -> list[Timing]:
    """The LLM group's cells (row × batch size), bare forward included, timed in ``n_batches`` interleaved rounds:
    whole prediction per image, per-image phases (median over rounds), tokens and peak working memory."""
    largest = max(batch_sizes)
    images = torch.randn(n_batches, largest, 3, image_size, image_size, device=device)
    extra = torch.randn(1, largest, 3, image_size, image_size, device=device)  # warm-up and memory, never timed
    clocks = {name: PhaseClock(method, device) for name, method in methods.items()}
    try:
        calls: list[tuple[Hashable, Callable[[int], Any]]] = []
        spare: dict[Hashable, Callable[[int], Any]] = {}
        records: dict[Hashable, list[_CallRecord]] = {}
        for size in batch_sizes:
            calls.append(((BARE, size), lambda r, size=size: bare_call(images[r][:size])))
            spare[(BARE, size)] = lambda r, size=size: bare_call(extra[r][:size])
            for name, method in methods.items():
                records[(name, size)] = []
                calls.append(((name, size), _llm_call(method, clocks[name], images, size, cls_name,
                                                      records[(name, size)])))
                spare[(name, size)] = _llm_call(method, clocks[name], extra, size, cls_name, None)
        for key, _ in calls:
            for _ in range(warmup):
                spare[key](0)
        for clock in clocks.values():
            clock.reset()
        times = interleaved_rounds(calls, n_batches, device=device)
        timings = []
        for (name, size), _ in calls:
            per_image = [t / size for t in times[(name, size)]]
            bare = [t / size for t in times[(BARE, size)]]
            peak, measure = _peak_memory(lambda key=(name, size): spare[key](0), device)
            phases: dict[str, float] = {}
            tokens = None
            if name != BARE:
                record = records[(name, size)]
                phases = {p: statistics.median(r[p] for r, _ in record) for p in PHASES}
                if all(r[PHASES[2]] == 0.0 for r, _ in record):  # no second pass (AnomalyGPT, SIAD-LLM w/o SI)
                    phases.pop(PHASES[2])
                tokens = record[0][1]
            timings.append(Timing(name, device, *round_stats(per_image, bare), group=group, batch_size=size,
                                  rounds=n_batches, phases=phases, tokens=tokens, peak_mib=peak,
                                  memory_measure=measure, note=note if name != BARE else ""))
    finally:
        for clock in clocks.values():
            clock.close()
    order = [BARE, *methods]
    return sorted(timings, key=lambda t: (order.index(t.name), batch_sizes.index(t.batch_size)))


def llm_group_label(backbone: str, image_size: int, kind: str) -> str:
    """The group column of the LLM rows: the reference backbone and the LLM they are timed with."""
    return f"{backbone} @ {image_size} px + {kind} LLM"


def measure_llm_speed(
    entries: Mapping[str, tuple[str, Mapping[str, Any]]],
    *,
    backbone: str,
    image_size: int,
    kind: str,
    batch_sizes: Sequence[int] = (1, 8),
    n_batches: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    seed: int = 0,
    cls_name: str = "bottle",
) -> list[Timing]:
    """Time the bare forward of ``backbone`` and each LLM entry (display name → (method, params)) per image at
    every batch size, all cells interleaved in ``n_batches`` rounds (round ``r``: batch ``r`` of fresh images, its
    first ``b`` images at batch size ``b``); see the module docstring. ``kind`` is the LLM: ``vicuna-7b-arch``
    (random LLaMA at Vicuna-7B dimensions, float16, GPU only: on the CPU its rows carry a note and are not timed) or
    ``tiny-random`` (the demo's 2-layer LLM; the rows say they are stand-ins). On the CPU the
    ``vicuna-7b-arch`` group is not timed at all: every row, the bare forward included, says why.
    """
    if kind not in LLM_KINDS:
        raise ConfigError(f"speed/llm/kind: {kind!r} is not one of {list(LLM_KINDS)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"speed/llm/batch_sizes: {list(batch_sizes)}; give positive batch sizes")
    group = llm_group_label(backbone, image_size, kind)
    if kind == "vicuna-7b-arch" and not device.startswith("cuda"):
        return [Timing(name, device, None, None, group=group, batch_size=size,
                       note=GPU_ONLY_NOTE if name != BARE else BARE_SKIPPED_NOTE)
                for name in (BARE, *entries) for size in batch_sizes]
    from siad.llm.tiny_tokenizer import load_tiny_tokenizer

    torch.manual_seed(seed)
    bare = _bare_backbone(backbone, image_size, device, seed)
    image_dim = int(bare.model.visual.output_dim)
    llm = build_random_llama(VICUNA_7B_DIMS, image_dim, device=device, seed=seed) if kind == "vicuna-7b-arch" else None
    tokenizer = llm.tokenizer if llm is not None else load_tiny_tokenizer()
    note = DEMO_LLM_NOTE if kind == "tiny-random" else ""
    new_tokens = fixed_new_tokens(entries, tokenizer)
    methods = {}
    for name, (method_name, params) in entries.items():
        overrides = {"backbone": backbone, "image_size": image_size, "random_init": True, "llm": "tiny-random",
                     "feature_cache": None, "max_new_tokens": new_tokens[name]}
        methods[name] = build_llm_method(method_name, {**params, **overrides}, device=device, seed=seed, llm=llm)
    with torch.no_grad():
        timings = _llm_group(methods, bare.model.encode_image, list(batch_sizes), group=group, image_size=image_size,
                             n_batches=n_batches, warmup=warmup, device=device, cls_name=cls_name, note=note)
    del methods, bare, llm
    _free(device)
    return timings


# -- the table ---------------------------------------------------------------------------------------

_COLUMNS = ("group (reference: its bare forward)", "method", "device", "batch", "ms / image (median)",
            "ms / image (min)", "× bare forward (median of rounds)", "× bare forward (of minima)", "rounds",
            *PHASES, "tokens in → out", "peak MiB", "paper ms (RTX 3090)", "note")
_ALIGN = ("---", "---", "---", *["---:"] * (len(_COLUMNS) - 4), "---")
_CSV_COLUMNS = ("group", "method", "device", "batch_size", "median_ms", "min_ms", "ratio_median_of_rounds",
                "ratio_of_minima", "rounds", "image_pass_ms", "generation_ms", "second_pass_ms", "prompt_tokens",
                "generated_tokens", "peak_mem_mib", "peak_mem_measure", "paper_ms", "paper_ms_std", "note")
_MEMORY_SHORT = {"CUDA max allocated": "CUDA alloc.", "CUDA peak-allocated growth": "CUDA alloc. growth",
                 "CPU peak-RSS growth": "RSS growth"}


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _csv_num(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _csv_text(value: str) -> str:
    if "," in value or '"' in value:
        return '"' + value.replace('"', '""') + '"'
    return value


def _markdown_row(t: Timing, paper: tuple[float, float] | None) -> str:
    tokens = f"{t.tokens[0]} → {t.tokens[1]}" if t.tokens else "–"
    peak = "–" if t.peak_mib is None else f"{t.peak_mib:,.0f} ({_MEMORY_SHORT.get(t.memory_measure, t.memory_measure)})"
    cells = [t.group, t.name, t.device, str(t.batch_size), _num(t.median_ms), _num(t.min_ms), _num(t.ratio, 2),
             _num(t.min_ratio, 2), str(t.rounds) if t.median_ms is not None else "–",
             *[_num(t.phases.get(p)) for p in PHASES], tokens, peak,
             f"{paper[0]:.1f} ± {paper[1]:.1f}" if paper else "n/a", t.note]
    return "| " + " | ".join(cells) + " |"


def _csv_row(t: Timing, paper: tuple[float, float] | None) -> str:
    cells = [_csv_text(t.group), _csv_text(t.name), t.device, str(t.batch_size), _csv_num(t.median_ms),
             _csv_num(t.min_ms), _csv_num(t.ratio, 4), _csv_num(t.min_ratio, 4),
             _csv_num(t.rounds if t.median_ms is not None else None),
             *[_csv_num(t.phases.get(p)) for p in PHASES],
             _csv_num(t.tokens[0] if t.tokens else None), _csv_num(t.tokens[1] if t.tokens else None),
             _csv_num(t.peak_mib, 1), t.memory_measure if t.peak_mib is not None else "",
             _csv_num(paper[0] if paper else None, 1), _csv_num(paper[1] if paper else None, 1), _csv_text(t.note)]
    return ",".join(cells)


def render_speed(timings: Sequence[Timing], claimed: Mapping[str, tuple[float, float]], *, header: str,
                 notes: Sequence[str] = ()) -> tuple[str, str]:
    """(Markdown, CSV) of the speed table: one row per timing, ``claimed`` maps a row name of the first group
    (the CLIP/AnoVL one) to the paper's (ms, ms std); ``notes`` are printed under the table."""
    first_group = timings[0].group if timings else ""
    lines = [header, "", "### Inference time per image (random weights, after warm-up; rows interleaved round by "
             "round)", "",
             "| " + " | ".join(_COLUMNS) + " |", "|" + "|".join(_ALIGN) + "|"]
    csv = [",".join(_CSV_COLUMNS)]
    for t in timings:
        paper = claimed.get(t.name) if t.group == first_group else None
        lines.append(_markdown_row(t, paper))
        csv.append(_csv_row(t, paper))
    lines += ["", *[f"_{note}_" for note in notes]]
    csv_header = [f"# {header.lstrip('> ').strip('*')}"] if header else []
    return "\n".join(lines).rstrip() + "\n", "\n".join(csv_header + csv) + "\n"


DEMO_HEADER = ("> **DEMO OUTPUT: timings of random-initialised models on this machine (the CLIP/AnoVL rows at the "
               "paper architecture, the LLM rows with tiny demo stand-ins); the synthetic data play no part here, "
               "and these are not the paper's GPU timings.**")

SPEED_METHOD_NOTE = ("Method: the rows of a group (its bare forward included) are timed interleaved, round by "
                     "round: round r calls every row once, in cyclic order starting at row r mod n (each row takes "
                     "every position equally often). ms / image: median and minimum over the rounds. × bare "
                     "forward: the ratio to the bare forward timed in the same round, median over rounds; beside "
                     "it the ratio of the two minima. Warm-up calls run on other images and are not timed.")
ANOVL_NOTE = ("The paper times a GPU; its ratios are relative to its CLIP row (TFA 7.6/6.2 = 1.23×, TTA "
              "20.1/6.2 = 3.2×). Here each ratio is relative to the bare forward of the same group, device and "
              "batch size. AnoVL rows marked 'fused' run the V-V dual path in its fused fast mode "
              "(fused_dual_pass: one ln_1 and QKV projection per block for both streams; equal to the reference "
              "mode within float rounding, not bit-identical).")
MEMORY_NOTE = ("Peak MiB: the working memory of one untimed call per row after the rounds (every row of a group is "
               "resident during the rounds, so the resident weights are excluded): on a GPU "
               "torch.cuda.max_memory_allocated over the call minus what was allocated before it; on the CPU the "
               "growth of the process's peak resident set (VmHWM, reset before the call) over its resident set "
               "before it.")


def llm_notes(kind: str, tokens: Mapping[str, int]) -> list[str]:
    """The notes under the table that explain the LLM rows (``tokens``: row name → fixed new tokens)."""
    fixed = ", ".join(f"{name} {n}" for name, n in tokens.items())
    notes = [
        "LLM rows: ms / image is the whole predict_batch divided by the batch size; image pass = backbone, stage "
        "maps and LLM prompts; LLM generation = one batched greedy generation with KV cache (answers and "
        "P(Yes)); second pass = SIAD-LLM's refined pass and its second generation (each phase: median over the "
        "rounds). Every (row, batch size) cell, bare forward included, is interleaved in the rounds; round r "
        "uses fresh images, the first b of them at batch size b.",
        "A random LLM never emits the stop separator, so new tokens are fixed to the token length of a typical "
        f"target answer (one region + \"\\n###\"): {fixed}; 'tokens in → out' is the measured prompt length and "
        "decoding steps of the first generation.",
    ]
    if kind == "vicuna-7b-arch":
        notes.append("LLM: random-weight LLaMA at the Vicuna-7B architecture (hidden 4096, 32 layers, 32 heads, MLP "
                     "11008, vocab 32000) in float16, on a GPU only. The LLaMA tokenizer is not available offline: "
                     "token ids come from the committed tiny tokenizer, so prompt lengths are that tokenizer's.")
    else:
        notes.append("LLM rows are DEMO STAND-INS: a 2-layer, 64-wide random LLaMA with the committed tiny "
                     "tokenizer, not Vicuna-7B; their generation cost says nothing about the paper's.")
    return notes


def _entries(config: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, dict]]:
    """Row name → (method, parameters): the variant's parameters with the row's own ``params`` on top (speed-only
    settings such as AnoVL's ``fused_dual_pass``, checked against the method's rules here)."""
    from siad.config import method_params

    entries = {}
    for name, row in rows.items():
        params = {**method_params(config, row["method"], row.get("variant", "default")), **row.get("params", {})}
        cls = get_method_class(row["method"])
        unknown = sorted(set(row.get("params", {})) - set(cls.defaults))
        if unknown:
            raise ConfigError(f"speed rows/{name}/params: unknown parameter(s) {unknown} of {row['method']!r}; "
                              f"accepted: {sorted(cls.defaults)}")
        cls.resolve_params(params)
        entries[name] = (row["method"], params)
    return entries


def run_speed(config: Mapping[str, Any], claimed_csv: str | None = None) -> tuple[str, str]:
    """The speed table of ``config['speed']`` (both groups) on the CPU and, when one is visible, a GPU."""
    import pandas as pd

    from siad.llm.tiny_tokenizer import load_tiny_tokenizer

    section = config["speed"]
    seed = int(config["seed"])
    entries = _entries(config, section["rows"])
    claimed: dict[str, tuple[float, float]] = {}
    if claimed_csv:
        frame = pd.read_csv(claimed_csv, comment="#")
        claimed = {str(r.method): (float(r.time_ms), float(r.time_ms_std)) for r in frame.itertuples()}
    claimed = {name: claimed[name] for name in entries if name in claimed}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    timings = [
        t
        for device in devices
        for t in measure_speed(entries, backbone=section["backbone"], image_size=section["image_size"],
                               device=device, n_images=section.get("n_images", 10),
                               warmup=section.get("warmup", 2), seed=seed)
    ]
    for label, group in section.get("groups", {}).items():  # further CLIP-family groups (FiLo at ViT-L/14@518)
        group_entries = _entries(config, group["rows"])
        for device in devices:
            timings += measure_speed(group_entries, backbone=group["backbone"], image_size=group["image_size"],
                                     device=device, n_images=group.get("n_images", section.get("n_images", 10)),
                                     warmup=group.get("warmup", section.get("warmup", 2)), seed=seed, group=label)
    notes = [SPEED_METHOD_NOTE, ANOVL_NOTE]
    llm = section.get("llm")
    if llm:
        llm_entries = _entries(config, llm["rows"])
        for device in devices:
            timings += measure_llm_speed(llm_entries, backbone=llm["backbone"], image_size=llm["image_size"],
                                         kind=llm["kind"], batch_sizes=llm.get("batch_sizes", [1, 8]),
                                         n_batches=llm.get("n_batches", 3), warmup=llm.get("warmup", 1),
                                         device=device, seed=seed)
        notes += llm_notes(llm["kind"], fixed_new_tokens(llm_entries, load_tiny_tokenizer()))
    notes.append(MEMORY_NOTE)
    header = DEMO_HEADER if config["demo"] else ""
    return render_speed(timings, claimed, header=header, notes=notes)

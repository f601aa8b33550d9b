"""A paper-scale dry run: what the paper profile's run jobs will cost, measured before spending it (issue 12).

This module measures and extrapolates; it never sees the workflow plan. The job list (:class:`JobWork`, one per
method × training seed × source of the paper profile, cut by the tables that read them) is made by
:mod:`siad.scale` (above the plan, which builds it) and handed to :func:`cost_jobs`. Each *kind* of training —
(method, variant, setting), whose cost does not depend on the seed or the source — is measured once through the
real code paths:

- the method is built from the paper params with random weights (``random_init``), the LLM methods with a
  random LLaMA at the Vicuna-7B architecture in float16 (:func:`siad.engine.speed.build_random_llama`);
- ``Method.fit`` runs on a synthetic training set written to disk in the index format and built by the engine's
  own :func:`~siad.engine.settings.build_training_set` (pseudo-anomalies, LLM twins and all), with every training
  stage capped to two epochs of ``steps_per_epoch`` steps; a global optimiser-step hook timestamps the steps, and
  the time per step is the median interval between consecutive steps of the *second* epoch (the paper's steady
  state: a method with a feature cache reads it there);
- :func:`~siad.engine.evaluate.predict_dataset` predicts ``eval_batches`` batches of the paper's evaluation batch
  size; the first batch (text features, warm-up) is not timed; the LLM methods' generation is split out with
  :class:`siad.engine.speed.PhaseClock`;
- a bare forward of the method's backbone per image is the feature-extraction stage (what a feature cache stores
  once per training image).

Peak memory is measured with :class:`siad.engine.speed.PeakMemory` (CUDA max allocated, weights included; on the
CPU the growth of the peak resident set, labelled as such). The extrapolation multiplies each measured unit time
by the full run's units: optimiser steps = epochs × ⌈training images / images per step⌉ per training stage (the
method's schedule, :data:`TRAINING_SCHEDULES`), test images per target, training images per feature extraction.

Whether a job fits the card (``gpu_memory_gib``, default 24 GB: SIAD-LLM trains on one RTX 4090) is decided on an
estimate at the paper architecture (:class:`MemoryEstimate`): weights from parameter counts (built on the meta
device, no memory), optimiser state of the trainable parameters, activations measured (GPU) or scaled from the
measurement (CPU), and for the LLM methods the LLaMA's activations computed analytically from the measured
sequence length. Where it does not fit, the switches of :data:`SWITCHES` are tried in order (gradient
checkpointing of the LLM, 8-bit LLM weights, a smaller batch) and the first set that fits is named.

Modes: ``gpu`` (the paper architectures, CUDA), ``cpu_scaled`` (every architecture replaced by the tiny one of
``scale.cpu_params_from``, measurement images of ``image_size.cpu_scaled`` px: its hours are CPU-scaled hours,
never GPU numbers) and ``auto``. :mod:`siad.scale` runs it; :mod:`siad.report.cost` renders.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from siad.errors import ConfigError
from siad.registry import Registry

__all__ = [
    "MODES",
    "SWITCHES",
    "TRAINING_SCHEDULES",
    "JobCost",
    "JobWork",
    "KindCost",
    "MemoryEstimate",
    "ScaleRun",
    "StageCost",
    "Switch",
    "TrainingStage",
    "choose_switches",
    "llm_activation_bytes",
    "measure_kind",
    "resolve_mode",
    "cost_jobs",
    "steps_for",
    "test_images",
    "training_images",
]

MODES = ("auto", "gpu", "cpu_scaled")
GIB = 2**30
#: Bytes a trainable fp32 parameter holds during training: the weight, its gradient and Adam(W)'s two moments.
TRAINABLE_BYTES = 16
#: Params that set a training schedule: the cpu_scaled mode keeps the paper's, never the tiny profile's.
SCHEDULE_KEYS = ("epochs", "batch_size", "stage1_epochs", "stage1_batch_size", "stage2_epochs", "stage2_batch_size",
                 "checkpoint_epoch", "adapter_epochs")


# -- the work of a job -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingStage:
    """One training stage of a method's schedule: ``epochs`` passes, ``images_per_step`` training images a step.

    ``batch_param`` is the method param that sets the batch (the "smaller batch" switch names it);
    ``epoch_param`` the one that sets the epochs (capped for the measurement).
    """

    label: str
    epochs: int
    images_per_step: int
    batch_param: str
    epoch_param: str


Schedule = Callable[[Mapping[str, Any], str], tuple[TrainingStage, ...]]
#: method → (resolved params, setting) → its training stages, as the method's ``fit`` runs them. A method not
#: registered here is training-free (its jobs have no training stage).
TRAINING_SCHEDULES: Registry[Schedule] = Registry("training schedule")


def _one_stage(params: Mapping[str, Any], setting: str) -> tuple[TrainingStage, ...]:
    return (TrainingStage("training", int(params["epochs"]), int(params["batch_size"]), "batch_size", "epochs"),)


def _aaclip(params: Mapping[str, Any], setting: str) -> tuple[TrainingStage, ...]:
    return (TrainingStage("training 1 (text adapter)", int(params["stage1_epochs"]), int(params["stage1_batch_size"]),
                          "stage1_batch_size", "stage1_epochs"),
            TrainingStage("training 2 (image adapter)", int(params["stage2_epochs"]),
                          int(params["stage2_batch_size"]), "stage2_batch_size", "stage2_epochs"))


def _filo(params: Mapping[str, Any], setting: str) -> tuple[TrainingStage, ...]:
    return (TrainingStage("training 1 (prompts, heads)", int(params["epochs"]), int(params["batch_size"]),
                          "batch_size", "epochs"),
            TrainingStage("training 2 (adapter)", int(params["adapter_epochs"]), int(params["batch_size"]),
                          "batch_size", "adapter_epochs"))


def _llm_detector(params: Mapping[str, Any], setting: str) -> tuple[TrainingStage, ...]:
    # LlmDetector.fit: under uzad a step takes batch_size normal images (and makes their NSA twins); under pseudo and
    # zad 2 × batch_size images of the set, so that a step sees as many images
    per_step = int(params["batch_size"]) * (1 if setting == "uzad" else 2)
    return (TrainingStage("training", int(params["epochs"]), per_step, "batch_size", "epochs"),)


for _name, _schedule in {"anomalyclip": _one_stage, "adaclip": _one_stage, "aaclip": _aaclip, "filo": _filo,
                         "anomalygpt": _llm_detector, "siad_llm": _llm_detector}.items():
    TRAINING_SCHEDULES.add(_name, _schedule)


def steps_for(stage: TrainingStage, n_images: int) -> int:
    """Optimiser steps of ``stage`` on ``n_images`` training images: epochs × ⌈images / images per step⌉."""
    if n_images <= 0:
        return 0
    return stage.epochs * math.ceil(n_images / stage.images_per_step)


def test_images(config: Mapping[str, Any], dataset: str) -> int:
    """Test images (normal + anomalous, every class) of ``dataset`` under the configured protocol options: the
    published counts of the dataset registry."""
    from siad.data.registry import get_dataset

    spec = get_dataset(dataset)
    counts = spec.expected_test_counts[spec.protocol(config["data"].get("options"))]
    classes = config["datasets"].get(dataset, {}).get("classes")
    return sum(n + a for cls, (n, a) in counts.items() if not classes or cls in classes)


def _test_normals(config: Mapping[str, Any], dataset: str) -> int:
    from siad.data.registry import get_dataset

    spec = get_dataset(dataset)
    return sum(n for n, _ in spec.expected_test_counts[spec.protocol(config["data"].get("options"))].values())


def training_images(config: Mapping[str, Any], train_counts: Mapping[str, int], source: str, setting: str) -> int:
    """Training images of ``source`` under ``setting``: ``zad`` trains on the test split; ``uzad`` and ``pseudo`` on
    the normal images (``training.normal_images`` of the source: the train split, or ``all`` = train + test
    normals, the medical sets' case)."""
    from siad.config import training_normal_images

    if setting == "zad":
        return test_images(config, source)
    if source not in train_counts:
        raise ConfigError(f"scale/train_images: no training image count for source {source!r}; add "
                          f"`{source}: <normal train images>` (the normal train-split images of its real dataset)")
    normals = int(train_counts[source])
    if training_normal_images(config, source) == "all":
        normals += _test_normals(config, source)
    return normals


@dataclass(frozen=True)
class JobWork:
    """What one paper run job does: its trainings (one per distinct training specification: variants that differ
    only in evaluation params share one, as the job does) with their training images, and its evaluations."""

    rule: str
    method: str
    seed: int
    source: str
    n_runs: int
    trainings: tuple[tuple[tuple[str, str], int], ...]  # ((variant, setting), training images)
    evaluations: tuple[tuple[tuple[str, str], int], ...]  # ((variant, setting), test images), one per run


# -- measuring one kind of training ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KindCost:
    """The measured cost of one (method, variant, setting) in one mode.

    ``step_seconds``: per training stage (same order as its schedule); ``None`` where fewer than two steps of the
    second epoch were seen. ``feature_seconds``: bare backbone forward per image; ``feature_cached``: whether the
    method's training wrote its frozen features to a cache (then the feature extraction runs once per training
    image, else it is inside every step). ``eval_seconds`` per test image (all of ``predict_batch``),
    ``generation_seconds`` the LLM generations' share of it. Peaks in MiB as ``memory_measure`` says;
    ``static_mib``: memory allocated before training (CUDA: the weights; CPU: None). ``trainable_params``: what
    the optimisers stepped, at the measured architecture; ``llm_tokens``: the longest (batch, sequence) the LLM
    saw in a training forward.
    """

    method: str
    variant: str
    setting: str
    step_seconds: tuple[float | None, ...]
    feature_seconds: float
    feature_cached: bool
    eval_seconds: float
    generation_seconds: float | None
    train_peak_mib: float | None
    eval_peak_mib: float | None
    static_mib: float | None
    memory_measure: str
    trainable_params: int
    llm_tokens: tuple[int, int] | None = None
    notes: tuple[str, ...] = ()


class StepClock:
    """Timestamps every optimiser step (a global post-step hook) while active; ``intervals(first, count)`` gives the
    seconds between consecutive steps ``first .. first + count - 1`` (0-indexed, over the whole fit)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stamps: list[float] = []
        self.params: dict[int, int] = {}  # id → numel of every parameter an optimiser stepped
        self._handle: Any = None

    def __enter__(self) -> StepClock:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(self._stamp)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _stamp(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        for group in optimizer.param_groups:
            self.params.update({id(p): p.numel() for p in group["params"]})

    def median_interval(self, first: int, count: int) -> float | None:
        """Median seconds between consecutive stamps of steps ``first .. first + count - 1``; None if unseen."""
        window = self.stamps[first : first + count]
        gaps = [b - a for a, b in zip(window, window[1:])]
        return statistics.median(gaps) if gaps else None


def _write_image(path: Path, rng: np.random.Generator, size: int, square: tuple[int, int, int] | None = None) -> None:
    from PIL import Image

    low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC)).copy()
    if square is not None:
        y, x, s = square
        image[y : y + s, x : x + s] = 255 - image[y : y + s, x : x + s]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_measurement_set(root: Path, *, dataset: str, n_train: int, n_test: int, size: int, seed: int = 0
                          ) -> dict[str, Any]:
    """Synthetic images of ``size`` px in ``root`` and their index (``meta.json`` format, fingerprinted as the
    preparation does): ``n_train`` normal training images, ``n_test`` test images (every other one anomalous with a
    square mask), all of ``dataset``'s first class (its real name: the class prompts and descriptions exist)."""
    from PIL import Image

    from siad.data.prepare import fingerprint_records
    from siad.data.records import build_meta, make_record
    from siad.data.registry import get_dataset

    spec = get_dataset(dataset)
    cls = spec.classes[0]
    rng = np.random.default_rng(seed)
    train, test = [], []
    for i in range(n_train):
        _write_image(root / cls / "train" / "good" / f"{i:03d}.png", rng, size)
        train.append(make_record(f"{cls}/train/good/{i:03d}.png", cls, "good", False))
    side = max(4, size // 4)
    for i in range(n_test):
        anomalous = i % 2 == 1
        folder = "defect" if anomalous else "good"
        image = f"{cls}/test/{folder}/{i:03d}.png"
        square = (size // 3, size // 3, side) if anomalous else None
        _write_image(root / image, rng, size, square)
        mask = ""
        if anomalous:
            mask = f"{cls}/ground_truth/defect/{i:03d}_mask.png"
            canvas = np.zeros((size, size), np.uint8)
            canvas[size // 3 : size // 3 + side, size // 3 : size // 3 + side] = 255
            (root / mask).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(canvas).save(root / mask)
        test.append(make_record(image, cls, folder, anomalous, mask))
    meta = build_meta(train, test)
    fingerprint_records(spec, meta, root)
    return meta


def _capped_params(params: Mapping[str, Any], stages: Sequence[TrainingStage], cache: Path | None
                   ) -> dict[str, Any]:
    """Two epochs per training stage (AA-CLIP's checkpoint epoch within them); the feature cache in ``cache``."""
    capped = {**params, **{stage.epoch_param: 2 for stage in stages}}
    if "progress" in params:
        capped["progress"] = False
    if "checkpoint_epoch" in params:
        capped["checkpoint_epoch"] = 2
    if "feature_cache" in params:  # the paper's cache, if it sets one, in a temporary folder
        capped["feature_cache"] = str(cache) if cache is not None and params.get("feature_cache") else None
    return capped


@contextmanager
def _llm_token_counter(method: Any) -> Iterator[list[tuple[int, int]]]:
    """(batch, sequence) of every forward of the method's LLM inside the block (nothing for non-LLM methods)."""
    shapes: list[tuple[int, int]] = []
    llm = getattr(method, "llm", None)
    handle = None
    if llm is not None:
        def count(module: Any, args: tuple, kwargs: dict) -> None:
            inputs = kwargs.get("inputs_embeds")
            if inputs is None:
                inputs = kwargs.get("input_ids", args[0] if args else None)
            if inputs is not None:
                shapes.append((int(inputs.shape[0]), int(inputs.shape[1])))
        handle = llm.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield shapes
    finally:
        if handle is not None:
            handle.remove()


def _build(method_name: str, params: Mapping[str, Any], *, device: str, seed: int, llm: Any | None) -> Any:
    from siad.engine.speed import build_llm_method

    return build_llm_method(method_name, params, device=device, seed=seed, llm=llm)


def _feature_seconds(backbone: str, image_size: int, batch: int, device: str, seed: int, repeats: int = 2
                     ) -> tuple[float, int]:
    """Seconds per image of a bare forward of ``backbone`` at ``image_size`` (batch ``batch``), and its embedding
    width (the LLM's image input)."""
    from siad.engine.speed import _bare_backbone, _free, time_batches

    bare = _bare_backbone(backbone, image_size, device, seed)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    with torch.no_grad():
        times = time_batches(bare.model.encode_image, images, n_batches=repeats, warmup=1, device=device)
    dim = int(bare.model.visual.output_dim)
    del bare
    _free(device)
    return statistics.median(times) / 1000.0, dim


def measure_kind(
    method_name: str,
    variant: str,
    setting: str,
    params: Mapping[str, Any],
    *,
    device: str,
    workdir: Path,
    image_size: int,
    steps_per_epoch: int,
    eval_batch_size: int,
    eval_batches: int,
    seed: int = 0,
    llm_dims: Mapping[str, int] | None = None,
    setting_options: Mapping[str, Any] | None = None,
    eval_size: int = 256,
) -> KindCost:
    """Measure one (method, variant, setting) with ``params`` (the resolved params to build it with: random
    weights, already at the mode's architecture) on ``device``; see the module docstring.

    ``llm_dims``: build a random LLaMA of these dimensions (float16) and give it to an LLM method (gpu mode);
    None: the method loads its own LLM (``llm: tiny-random`` in cpu_scaled mode).
    """
    from siad.data.loading import AnomalyDataset
    from siad.engine.settings import TrainingSetRequest, build_training_set
    from siad.engine.speed import PeakMemory, _free, build_random_llama, fixed_new_tokens
    from siad.llm.tiny_tokenizer import load_tiny_tokenizer
    from siad.methods import get_method_class
    from siad.seeding import seed_everything

    cls = get_method_class(method_name)
    resolved = cls.resolve_params({**params, "random_init": True})
    stages = TRAINING_SCHEDULES.get(method_name)(resolved, setting) if method_name in TRAINING_SCHEDULES else ()
    notes: list[str] = []
    is_llm = "llm" in resolved
    image_input = _input_size(resolved)
    feature_seconds, image_dim = _feature_seconds(resolved["backbone"], image_input, eval_batch_size, device, seed)
    llm = None
    overrides: dict[str, Any] = {"random_init": True}
    if is_llm:
        tokenizer = load_tiny_tokenizer()
        overrides["max_new_tokens"] = fixed_new_tokens({"row": (method_name, resolved)}, tokenizer)["row"]
        if llm_dims is not None:
            llm = build_random_llama(llm_dims, image_dim, device=device, seed=seed)
            overrides["llm"] = "tiny-random"  # the given LLM replaces it (build_llm_method); no weight files read
    cache = workdir / "feature_cache"
    per_step = max((stage.images_per_step for stage in stages), default=1)
    n_train = per_step * steps_per_epoch if stages else 0
    n_test = eval_batch_size * eval_batches
    data_root = workdir / f"{method_name}-{variant}-{setting}"
    meta = write_measurement_set(data_root / "test", dataset="mvtec", n_train=0, n_test=n_test, size=image_size,
                                 seed=seed)
    train_root = data_root / "train"  # zad trains on the test split: its own set of n_train images
    train_meta = write_measurement_set(train_root, dataset="mvtec", n_train=n_train if setting != "zad" else 0,
                                       n_test=n_train if setting == "zad" else 0, size=image_size, seed=seed + 1)
    seed_everything(seed)
    build_params = {**_capped_params(resolved, stages, cache), **overrides}
    method = _build(method_name, build_params, device=device, seed=seed, llm=llm)
    trainable = 0
    steps: tuple[float | None, ...] = ()
    train_peak = static = None
    tokens = None
    cache_files_before = _count_files(cache)
    if stages:
        dataset = build_training_set(TrainingSetRequest(
            setting=setting, name="mvtec", root=train_root, meta=train_meta, classes=None,
            normal_images="train", transform=method.transform, input_size=method.input_size, seed=seed,
            options=setting_options or {}, mask_resize=method.training_mask_resize))
        if len(dataset) < n_train:
            notes.append(f"{len(dataset)} training images for {n_train} wanted")
        static = torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda") else None
        with _llm_token_counter(method) as shapes, StepClock(device) as clock, PeakMemory(device) as memory:
            method.fit(dataset, setting)
        train_peak = memory.peak_mib
        trainable = sum(clock.params.values())
        tokens = max(shapes, key=lambda s: s[0] * s[1]) if shapes else None
        timed, first = [], 0
        for stage in stages:
            per_epoch = math.ceil(len(dataset) / stage.images_per_step)
            timed.append(clock.median_interval(first + per_epoch, per_epoch))
            first += 2 * per_epoch
        if len(clock.stamps) != first:
            notes.append(f"{len(clock.stamps)} optimiser steps seen, {first} expected from the schedule")
        steps = tuple(timed)
    feature_cached = _count_files(cache) > cache_files_before
    test = AnomalyDataset(data_root / "test", meta, split="test", transform=method.transform,
                          mask_size=(eval_size, eval_size), name="mvtec")
    eval_seconds, generation, eval_peak = _time_predictions(method, test, eval_batch_size, device, is_llm)
    measure = PeakMemory(device).measure
    del method, llm
    _free(device)
    return KindCost(method_name, variant, setting, steps, feature_seconds, feature_cached, eval_seconds, generation,
                    train_peak, eval_peak, static, measure, trainable, tokens, tuple(notes))


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _input_size(resolved: Mapping[str, Any]) -> int:
    """The method's input side: its ``image_size`` param, else its backbone's registry size."""
    from siad.backbones import get_backbone_spec

    if resolved.get("image_size"):
        return int(resolved["image_size"])
    return int(get_backbone_spec(resolved["backbone"], {"pretrained": None, "checkpoint": None}).image_size)


def _time_predictions(method: Any, dataset: Any, batch_size: int, device: str, is_llm: bool
                      ) -> tuple[float, float | None, float | None]:
    """(seconds per test image of predict_batch, LLM generation seconds per image or None, peak MiB) over
    :func:`siad.engine.evaluate.predict_dataset`; the first batch is warm-up (text features, lazy set-up) and not
    timed. LLM generation = the generations of :class:`siad.engine.speed.PhaseClock` (the refined pass included)."""
    from siad.engine.evaluate import predict_dataset
    from siad.engine.speed import PHASES, PeakMemory, PhaseClock

    calls: list[tuple[float, int]] = []
    original = method.predict_batch
    clock = PhaseClock(method, device) if is_llm else None

    def timed(batch: Mapping[str, Any]) -> Any:
        if clock is not None:
            if len(calls) == 1:
                clock.reset()
            clock.start()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = original(batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        calls.append((time.perf_counter() - start, len(batch["img_path"])))
        return out

    method.predict_batch = timed
    try:
        with torch.no_grad(), PeakMemory(device) as memory:
            predict_dataset(method, dataset, batch_size=batch_size, num_workers=0, progress=False)
    finally:
        del method.predict_batch
        if clock is not None:
            clock.close()
    timed_calls = calls[1:] or calls
    images = sum(n for _, n in timed_calls)
    seconds = sum(t for t, _ in timed_calls) / images
    generation = None
    if clock is not None:
        generation = (clock.totals[PHASES[1]] + clock.totals.get(PHASES[2], 0.0)) / 1000.0 / images
    return seconds, generation, memory.peak_mib


# -- memory at the paper architecture ----------------------------------------------------------------------------


def llm_activation_bytes(dims: Mapping[str, int], batch: int, seq: int, *, checkpointing: bool,
                         bytes_per_value: int = 2) -> float:
    """Activation memory of one training forward/backward through a LLaMA of ``dims`` (Korthikanti et al. 2022,
    per layer s·b·h·(34 + 5·a·s/h) values of 2 bytes; with gradient checkpointing each layer keeps only its input,
    s·b·h values, plus one layer's full activations during the recomputation). The LLM is frozen: its weights need
    no gradient, but the gradient flows through it to the trainable prompts."""
    h, layers, heads = dims["hidden_size"], dims["num_hidden_layers"], dims["num_attention_heads"]
    per_layer = seq * batch * h * (34 + 5 * heads * seq / h) * bytes_per_value / 2
    if checkpointing:
        return layers * seq * batch * h * bytes_per_value + per_layer
    return layers * per_layer


def _param_count_on_meta(build: Callable[[], torch.nn.Module]) -> int:
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def backbone_params(backbone: str, image_size: int | None) -> int:
    """Parameters of ``backbone``'s open_clip architecture (built on the meta device: no memory, no time)."""
    import open_clip

    from siad.backbones import get_backbone_spec

    spec = get_backbone_spec(backbone, {"pretrained": None, "checkpoint": None,
                                        **({"image_size": image_size} if image_size else {})})
    # device="meta": open_clip moves the model to its device (default the CPU), which a meta tensor cannot do
    return _param_count_on_meta(lambda: open_clip.create_model(spec.arch, pretrained=None, device="meta",
                                                               force_image_size=spec.image_size))


def llama_params(dims: Mapping[str, int]) -> int:
    """Parameters of a LLaMA of ``dims`` (LlamaConfig fields), counted on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**dims, num_key_value_heads=dims["num_attention_heads"])
    return _param_count_on_meta(lambda: LlamaForCausalLM(config))


@dataclass(frozen=True)
class MemoryEstimate:
    """GiB of one training job at the paper architecture: frozen weights (backbone; the LLM apart), the trainable
    parameters' fp32 weight + gradient + Adam moments, activations of the trainable path (all but the LLM's), and
    the LLM's activations (analytic). ``basis`` says how the activations were obtained."""

    weights: float
    llm_weights: float
    trainable: float
    activations: float
    llm_activations: float
    batch: int
    basis: str

    @property
    def total(self) -> float:
        return self.weights + self.llm_weights + self.trainable + self.activations + self.llm_activations


@dataclass(frozen=True)
class Switch:
    """A change that lowers a job's memory: the method param a user sets (``methods/<m>/params/<param>``; the LLM
    methods accept both switches), when it applies, and what it does to the estimate."""

    name: str
    param: str
    applies: Callable[[MemoryEstimate, bool], bool]  # (estimate, is LLM method) → meaningful here
    apply: Callable[[MemoryEstimate, Mapping[str, Any]], MemoryEstimate]


def _checkpointing(est: MemoryEstimate, ctx: Mapping[str, Any]) -> MemoryEstimate:
    full = llm_activation_bytes(ctx["llm_dims"], est.batch, ctx["seq"], checkpointing=False)
    kept = llm_activation_bytes(ctx["llm_dims"], est.batch, ctx["seq"], checkpointing=True)
    return replace(est, llm_activations=est.llm_activations * kept / full if full else est.llm_activations)


def _eight_bit(est: MemoryEstimate, ctx: Mapping[str, Any]) -> MemoryEstimate:
    return replace(est, llm_weights=est.llm_weights / 2)


#: The switches tried, in this order, on a job that does not fit (the "smaller batch" switch is searched apart).
SWITCHES: Registry[Switch] = Registry("memory switch")
SWITCHES.add("llm_gradient_checkpointing", Switch(
    "LLM gradient checkpointing", "llm_gradient_checkpointing", lambda est, llm: llm and est.llm_activations > 0,
    _checkpointing))
SWITCHES.add("llm_load_in_8bit", Switch(
    "8-bit LLM weights", "llm_load_in_8bit", lambda est, llm: llm and est.llm_weights > 0, _eight_bit))


def _with_batch(est: MemoryEstimate, batch: int) -> MemoryEstimate:
    ratio = batch / est.batch
    return replace(est, activations=est.activations * ratio, llm_activations=est.llm_activations * ratio, batch=batch)


def choose_switches(est: MemoryEstimate, budget_gib: float, *, is_llm: bool, ctx: Mapping[str, Any],
                    batch_param: str, method: str | None = None) -> tuple[bool, list[str], MemoryEstimate]:
    """(fits as configured, the switches to set where it does not, the estimate with them).

    The switches of :data:`SWITCHES` that apply are added one at a time, in order, until the estimate fits; if
    they are not enough, the largest smaller batch that fits is named (``<batch_param>: n``). A job that fits
    with none gets ``[]``; one that fits with nothing gets the whole list ending in "does not fit". With
    ``method``, each switch is named by its config key, ``methods/<method>/params/<param>: value``.
    """
    if est.total <= budget_gib:
        return True, [], est
    key = (lambda param: f"methods/{method}/params/{param}") if method else (lambda param: param)
    chosen: list[str] = []
    current = est
    for name in SWITCHES.names():
        switch = SWITCHES.get(name)
        if not switch.applies(current, is_llm):
            continue
        current = switch.apply(current, ctx)
        chosen.append(f"{key(switch.param)}: true")
        if current.total <= budget_gib:
            return False, chosen, current
    for batch in range(current.batch - 1, 0, -1):
        smaller = _with_batch(current, batch)
        if smaller.total <= budget_gib:
            return False, [*chosen, f"{key(batch_param)}: {batch}"], smaller
    smallest = _with_batch(current, 1)
    return False, [*chosen, f"{key(batch_param)}: 1", "still does not fit"], smallest


# -- the whole dry run -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageCost:
    """One stage of one job: ``units`` of ``unit`` (steps or images), ``seconds`` per unit (None: not measured),
    ``hours`` = units × seconds / 3600 (None when not measured). ``in_total``: False for a breakdown row (LLM
    generation is part of evaluation)."""

    stage: str
    unit: str
    units: int
    seconds: float | None
    peak_mib: float | None = None
    in_total: bool = True

    @property
    def hours(self) -> float | None:
        return None if self.seconds is None else self.units * self.seconds / 3600.0


@dataclass(frozen=True)
class JobCost:
    """A job of the paper profile with its stage costs, memory estimate and fit decision."""

    work: JobWork
    stages: tuple[StageCost, ...]
    memory: MemoryEstimate | None
    fits: bool | None
    switches: tuple[str, ...]
    peak_mib: float | None
    undecided: bool = False  # a CPU-scaled lower bound under the card: whether it fits is not known

    @property
    def hours(self) -> float:
        return sum(s.hours or 0.0 for s in self.stages if s.in_total)


@dataclass(frozen=True)
class ScaleRun:
    """The dry run's result: the mode, device, what was measured, the jobs and the notes the table prints."""

    mode: str
    device: str
    memory_measure: str
    budget_gib: float
    gpu_memory_gib: float
    jobs: tuple[JobCost, ...]
    kinds: tuple[KindCost, ...]
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    paper_config: str = ""


def resolve_mode(mode: str) -> str:
    """``gpu`` or ``cpu_scaled`` for the configured ``scale.mode`` (``auto``: gpu when CUDA is available)."""
    if mode not in MODES:
        raise ConfigError(f"scale/mode: {mode!r}; choose one of {list(MODES)}")
    if mode == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu_scaled"
    if mode == "gpu" and not torch.cuda.is_available():
        raise ConfigError("scale/mode: gpu, but no CUDA device is visible; use mode: cpu_scaled (or auto) on this "
                          "machine, or run on a GPU machine")
    return mode


def _kind_params(paper: Mapping[str, Any], cpu: Mapping[str, Any] | None, method: str, variant: str) -> dict:
    """The params a kind is built with: the paper's (variant applied); in cpu_scaled mode the tiny profile's
    architecture params on top (its backbone, LLM, taps), the paper's schedule kept."""
    from siad.config import method_params

    params = dict(method_params(paper, method, variant))
    if cpu is not None:
        tiny = {k: v for k, v in cpu["methods"][method].get("params", {}).items()
                if k not in SCHEDULE_KEYS and k != "feature_cache"}
        params.update(tiny)
    return params


def _memory(kind: KindCost, stages: Sequence[TrainingStage], resolved_paper: Mapping[str, Any], mode: str,
            llm_dims: Mapping[str, int] | None, resolved_measured: Mapping[str, Any]) -> MemoryEstimate | None:
    """The paper-architecture memory estimate of a training kind (None for training-free kinds)."""
    if not stages:
        return None
    batch = max(stage.images_per_step for stage in stages)
    image_size = resolved_paper.get("image_size")
    llm_weights = llama_params(llm_dims) * 2 / GIB if llm_dims is not None else 0.0
    if mode == "gpu" and kind.static_mib is not None:  # everything allocated before training: backbone, detector, LLM
        weights = max(0.0, kind.static_mib / 1024 - llm_weights)
    else:  # the paper backbone's parameters in fp32 (the detector of FiLo not counted: said in the notes)
        weights = backbone_params(resolved_paper["backbone"], image_size) * 4 / GIB
    llm_act = 0.0
    if llm_dims is not None and kind.llm_tokens is not None:
        llm_act = llm_activation_bytes(llm_dims, kind.llm_tokens[0], kind.llm_tokens[1], checkpointing=False) / GIB
    trainable = kind.trainable_params * TRAINABLE_BYTES / GIB
    if mode == "gpu" and kind.train_peak_mib is not None and kind.static_mib is not None:
        measured = max(0.0, (kind.train_peak_mib - kind.static_mib) / 1024)
        activations = max(0.0, measured - llm_act - trainable)
        basis = "measured (CUDA peak − weights)"
    else:  # the CPU's resident-memory growth of a tiny model says nothing of a GPU's activations: left out, so the
        # estimate is a lower bound (LOWER_BOUND_BASIS) and only "does not fit" can be decided from it
        activations = 0.0
        basis = LOWER_BOUND_BASIS
    return MemoryEstimate(weights, llm_weights, trainable, activations, llm_act, batch, basis)


#: The basis of a CPU-scaled memory estimate: what it counts, and that it is a lower bound.
LOWER_BOUND_BASIS = ("lower bound: the paper architecture's weights, the optimiser state of the measured trainable "
                     "parameters and the LLM's analytic activations; the image tower's activations are not measured "
                     "on a CPU")


def cost_jobs(works: Sequence[JobWork], *, paper: Mapping[str, Any], cpu: Mapping[str, Any] | None,
              section: Mapping[str, Any], mode: str, paper_config: str = "",
              log: Callable[[str], None] = print) -> ScaleRun:
    """Measure every (method, variant, setting) that ``works`` train or evaluate, then cost every job.

    ``paper``: the validated paper config (params, schedules, evaluation batch); ``cpu``: the validated config whose
    tiny architectures replace the paper's in ``cpu_scaled`` mode (None in ``gpu`` mode); ``section``: the
    ``scale`` config section; ``mode``: ``gpu`` or ``cpu_scaled`` (:func:`resolve_mode`).
    """
    from siad.engine.speed import VICUNA_7B_DIMS
    from siad.methods import get_method_class

    started = time.perf_counter()
    device = "cuda" if mode == "gpu" else "cpu"
    per_variant = section.get("measure_variants", {}).get(mode, "all" if mode == "gpu" else "default") == "all"
    kinds_needed = list(dict.fromkeys((w.method, kind if per_variant else ("default", kind[1]))
                                      for w in works for kind, _ in (*w.trainings, *w.evaluations)))
    eval_batch = int(paper["evaluation"]["batch_size"])
    eval_size = 256 if paper["evaluation"]["size"] == "original" else int(paper["evaluation"]["size"])
    image_size = int(section.get("image_size", {}).get(mode, 1024 if mode == "gpu" else 128))
    measured: dict[tuple[str, str, str], KindCost] = {}
    resolved: dict[tuple[str, str, str], tuple[dict, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="siad-scale-") as tmp:
        for method, (variant, setting) in kinds_needed:
            cls = get_method_class(method)
            params = _kind_params(paper, cpu, method, variant)
            is_llm = "llm" in cls.resolve_params(params)
            llm_dims = VICUNA_7B_DIMS if (mode == "gpu" and is_llm) else None
            log(f"scale: measuring {method}/{variant} under {setting} ({mode})")
            kind = measure_kind(
                method, variant, setting, params, device=device, workdir=Path(tmp), image_size=image_size,
                steps_per_epoch=int(section.get("steps_per_epoch", 3)), eval_batch_size=eval_batch,
                eval_batches=int(section.get("eval_batches", 3)), seed=int(paper["seed"]), llm_dims=llm_dims,
                setting_options=(paper.get("training", {}).get("pseudo", {}) if setting == "pseudo" else {}),
                eval_size=eval_size)
            measured[(method, variant, setting)] = kind
            resolved[(method, variant, setting)] = (
                cls.resolve_params({**method_params_of(paper, method, variant), "random_init": True}),
                cls.resolve_params({**params, "random_init": True}))
    budget = float(section.get("gpu_memory_gib", 24)) * float(section.get("usable_fraction", 0.92))
    if not per_variant:  # every variant costed with its method's default measurement
        for w in works:
            for variant, setting in {kind for kind, _ in (*w.trainings, *w.evaluations)}:
                measured.setdefault((w.method, variant, setting), measured[(w.method, "default", setting)])
                resolved.setdefault((w.method, variant, setting), resolved[(w.method, "default", setting)])
    jobs = tuple(_job_cost(w, measured, resolved, mode, budget, VICUNA_7B_DIMS) for w in works)
    kinds = tuple(dict.fromkeys(measured.values()))
    memory_measure = kinds[0].memory_measure if kinds else ""
    notes = _notes(mode, kinds)
    if not per_variant:
        notes.insert(0, "variants are costed with their method's default-variant measurement "
                        f"(scale.measure_variants.{mode}: default)")
    return ScaleRun(mode, device, memory_measure, budget, float(section.get("gpu_memory_gib", 24)), jobs, kinds,
                    time.perf_counter() - started, tuple(notes), paper_config)


def method_params_of(config: Mapping[str, Any], method: str, variant: str) -> dict[str, Any]:
    """The paper params of (method, variant) (:func:`siad.config.method_params`)."""
    from siad.config import method_params

    return dict(method_params(config, method, variant))


def _job_cost(work: JobWork, measured: Mapping[tuple[str, str, str], KindCost],
              resolved: Mapping[tuple[str, str, str], tuple[dict, dict]], mode: str, budget: float,
              llm_dims: Mapping[str, int]) -> JobCost:
    stages: list[StageCost] = []
    peaks: list[float] = []
    memories: list[tuple[MemoryEstimate, bool, dict, str]] = []
    features = 0
    feature_seconds = None
    train: dict[str, list[float]] = {}
    for (variant, setting), n_images in work.trainings:
        kind = measured[(work.method, variant, setting)]
        paper_params, measured_params = resolved[(work.method, variant, setting)]
        schedule = TRAINING_SCHEDULES.get(work.method)(paper_params, setting)
        if kind.feature_cached:
            features += n_images
            feature_seconds = kind.feature_seconds
        for stage, seconds in zip(schedule, kind.step_seconds):
            units_seconds = train.setdefault(stage.label, [0, 0.0, 0])
            steps = steps_for(stage, n_images)
            units_seconds[0] += steps
            units_seconds[1] += steps * (seconds or 0.0)
            units_seconds[2] += 0 if seconds is not None else 1
        peaks += [p for p in (kind.train_peak_mib,) if p is not None]
        is_llm = "llm" in paper_params
        est = _memory(kind, schedule, paper_params, mode, llm_dims if is_llm else None, measured_params)
        if est is not None:
            ctx = {"llm_dims": llm_dims, "seq": kind.llm_tokens[1] if kind.llm_tokens else 1}
            memories.append((est, is_llm, ctx, max(schedule, key=lambda s: s.images_per_step).batch_param))
    if features:
        stages.append(StageCost("feature extraction", "image", features, feature_seconds))
    for label, (steps, seconds, unmeasured) in train.items():
        stages.append(StageCost(label, "step", int(steps), None if unmeasured or not steps else seconds / steps))
    evaluations = [(measured[(work.method, v, s)], n) for (v, s), n in work.evaluations]
    n_eval = sum(n for _, n in evaluations)
    eval_seconds = sum(k.eval_seconds * n for k, n in evaluations)
    stages.append(StageCost("evaluation", "image", n_eval, eval_seconds / n_eval if n_eval else None,
                            max((k.eval_peak_mib or 0.0 for k, _ in evaluations), default=None)))
    generation = [(k.generation_seconds, n) for k, n in evaluations if k.generation_seconds is not None]
    if generation:
        n_gen = sum(n for _, n in generation)
        stages.append(StageCost("LLM generation (in evaluation)", "image", n_gen,
                                sum(g * n for g, n in generation) / n_gen, in_total=False))
    peaks += [k.eval_peak_mib for k, _ in evaluations if k.eval_peak_mib is not None]
    if not memories:
        return JobCost(work, tuple(stages), None, None, (), max(peaks, default=None))
    est, is_llm, ctx, batch_param = max(memories, key=lambda m: m[0].total)
    fits, switches, _ = choose_switches(est, budget, is_llm=is_llm, ctx=ctx, batch_param=batch_param,
                                        method=work.method)
    undecided = est.basis == LOWER_BOUND_BASIS and est.total <= budget  # a lower bound under the card decides nothing
    return JobCost(work, tuple(stages), est, None if undecided else fits, () if undecided else tuple(switches),
                   max(peaks, default=None), undecided)


def _notes(mode: str, kinds: Sequence[KindCost]) -> list[str]:
    notes = [note for kind in kinds for note in (f"{kind.method}/{kind.variant}/{kind.setting}: {n}"
                                                  for n in kind.notes)]
    return notes

"""The speed table: interleaved rounds and within-round ratios, the CLIP/AnoVL group and the LLM group (breakdown,
batch sizes, memory, GPU-only skip)."""

from __future__ import annotations

import copy
import io
import statistics
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from siad.config import validate_config
from siad.engine import speed
from siad.engine.speed import (
    BARE,
    PHASES,
    VICUNA_7B_DIMS,
    PeakMemory,
    answer_token_count,
    build_llm_method,
    build_random_llama,
    measure_llm_speed,
    render_speed,
    run_speed,
)
from siad.errors import ConfigError
from siad.llm.tiny_tokenizer import load_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
BATCHES = (1, 2)


def demo_config() -> dict:
    return yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())


@pytest.fixture(scope="module")
def llm_timings(tiny_llm_params) -> list[speed.Timing]:
    """The LLM group on the tiny stand-ins, timed once for the module (AnomalyGPT and full SIAD-LLM)."""
    entries = {"AnomalyGPT": ("anomalygpt", dict(tiny_llm_params)), "SIAD-LLM": ("siad_llm", dict(tiny_llm_params))}
    return measure_llm_speed(entries, backbone="tiny-vit-h14-demo", image_size=112, kind="tiny-random",
                             batch_sizes=BATCHES, n_batches=1, warmup=0)


def row(timings, name, batch):
    return next(t for t in timings if t.name == name and t.batch_size == batch)


def test_llm_rows_have_positive_timings_and_the_breakdown(llm_timings):
    assert [(t.name, t.batch_size) for t in llm_timings] == [
        (name, b) for name in (BARE, "AnomalyGPT", "SIAD-LLM") for b in BATCHES
    ]
    tokenizer = load_tiny_tokenizer()
    for batch in BATCHES:
        bare, gpt, siad = (row(llm_timings, name, batch) for name in (BARE, "AnomalyGPT", "SIAD-LLM"))
        assert bare.median_ms > 0 and bare.ratio == pytest.approx(1.0) and bare.min_ratio == pytest.approx(1.0)
        assert set(gpt.phases) == set(PHASES[:2])  # AnomalyGPT has no second pass
        assert set(siad.phases) == set(PHASES)
        for timing in (gpt, siad):
            assert timing.median_ms > 0 and timing.min_ms == timing.median_ms and timing.rounds == 1  # one round
            assert all(ms > 0 for ms in timing.phases.values())
            assert sum(timing.phases.values()) <= timing.median_ms * 1.001  # phases are parts of the whole call
            assert timing.ratio == pytest.approx(timing.median_ms / bare.median_ms)
            assert timing.note == speed.DEMO_LLM_NOTE and timing.memory_measure == "CPU peak-RSS growth"
        # generation ran exactly the fixed number of new tokens, from a prompt longer than the 18 prompt slots
        assert gpt.tokens[1] == answer_token_count(tokenizer, "anomalygpt")
        assert siad.tokens[1] == answer_token_count(tokenizer, "siad")
        assert gpt.tokens[0] > 18


def test_rendered_table_has_groups_and_breakdown_columns(llm_timings):
    anovl = [speed.Timing(BARE, "cpu", 10.0, 9.0, 1.0, 1.0, group="B16+ @ 240 px", rounds=5),
             speed.Timing("AnoVL-TFA", "cpu", 12.0, 10.5, 1.21, 1.1667, group="B16+ @ 240 px", rounds=5)]
    markdown, csv = render_speed(anovl + llm_timings, {"AnoVL-TFA": (7.6, 0.1), "AnomalyGPT": (1.0, 0.1)},
                                 header="> **head**", notes=speed.llm_notes("tiny-random", {"SIAD-LLM": 19}))
    lines = markdown.splitlines()
    assert lines[0] == "> **head**"
    assert "| AnoVL-TFA | cpu | 1 | 12.0 | 10.5 | 1.21 | 1.17 | 5 |" in markdown and "7.6 ± 0.1" in markdown
    siad_row = next(line for line in lines if "| SIAD-LLM | cpu |" in line and "| 2 |" in line)
    cells = [c.strip() for c in siad_row.strip("|").split("|")]
    header = [c.strip() for c in next(line for line in lines if line.startswith("| group")).strip("|").split("|")]
    values = dict(zip(header, cells, strict=True))
    for phase in PHASES:
        float(values[phase])  # numbers, not dashes
    assert values["paper ms (RTX 3090)"] == "n/a"  # claimed numbers belong to the first group only
    assert "DEMO STAND-INS" in markdown and "19" in markdown

    frame = pd.read_csv(io.StringIO(csv), comment="#")
    assert frame["group"].nunique() == 2
    llm = frame[frame["method"].isin(["AnomalyGPT", "SIAD-LLM"])]
    assert len(llm) == 4 and (llm["median_ms"] > 0).all() and (llm["image_pass_ms"] > 0).all()
    assert (llm["min_ms"] <= llm["median_ms"]).all() and (llm["ratio_of_minima"] > 0).all()
    anovl_csv = frame[frame["method"] == "AnoVL-TFA"].iloc[0]
    assert (anovl_csv["ratio_median_of_rounds"], anovl_csv["ratio_of_minima"], anovl_csv["rounds"]) == (1.21, 1.1667, 5)
    assert llm.loc[llm["method"] == "SIAD-LLM", "second_pass_ms"].gt(0).all()
    assert llm.loc[llm["method"] == "AnomalyGPT", "second_pass_ms"].isna().all()
    assert set(llm["batch_size"]) == set(BATCHES)


def test_paper_llm_rows_are_noted_not_built_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the 7B LLM (or a ViT-H) was built without a GPU")

    monkeypatch.setattr(speed, "build_random_llama", must_not_run)
    monkeypatch.setattr(speed, "_bare_backbone", must_not_run)
    config = demo_config()
    config["speed"] = {"backbone": "tiny-vit-demo", "image_size": 64, "n_images": 1, "warmup": 0,
                       "rows": {"CLIP": {"method": "clip"}},
                       "llm": {"backbone": "imagebind-huge", "image_size": 224, "kind": "vicuna-7b-arch",
                               "batch_sizes": [1, 8], "rows": {"AnomalyGPT": {"method": "anomalygpt"},
                                                               "SIAD-LLM": {"method": "siad_llm"}}}}
    validate_config(config)
    monkeypatch.setattr(speed, "measure_speed", lambda *args, **kwargs: [])  # only the LLM group here
    markdown, csv = run_speed(config)
    for name in ("AnomalyGPT", "SIAD-LLM"):
        rows = [line for line in markdown.splitlines() if f"| {name} | cpu |" in line]
        assert len(rows) == 2 and all("needs a GPU" in line and "| – |" in line for line in rows)
    assert "Vicuna-7B architecture" in markdown
    frame = pd.read_csv(io.StringIO(csv), comment="#")
    skipped = frame[frame["group"].str.contains("vicuna-7b-arch")]
    assert len(skipped) == 6 and skipped["median_ms"].isna().all() and skipped["note"].str.contains("GPU").all()


def test_random_llama_builds_the_7b_architecture_without_weights():
    llm = build_random_llama(VICUNA_7B_DIMS, 1024, device="meta")  # shapes only: no memory allocated
    assert sum(p.numel() for p in llm.model.parameters()) == 6_738_415_616  # LLaMA-7B
    assert llm.model.dtype == torch.float16 and tuple(llm.image_proj.weight.shape) == (4096, 1024)


def test_random_llama_is_seeded_and_frozen():
    dims = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "vocab_size": 700}
    first, again, other = (build_random_llama(dims, 16, dtype=torch.float32, seed=s) for s in (0, 0, 1))
    weight = first.model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(weight, again.model.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(weight, other.model.model.layers[0].mlp.up_proj.weight)
    assert not any(p.requires_grad for p in first.model.parameters()) and not first.model.training
    with pytest.raises(ConfigError, match="vocab_size"):
        build_random_llama({**dims, "vocab_size": 100}, 16, dtype=torch.float32)


class _DetectorDouble:
    """Stands in for an LLM detector whose ``__init__`` builds its LLM through the ``load_llm()`` hook."""

    def __init__(self, params, *, device="cpu", seed=0):
        self.params = params
        self.llm = self.load_llm()

    def load_llm(self):
        return "own LLM"


def test_build_llm_method_injects_the_given_llm_through_the_hook(monkeypatch):
    monkeypatch.setattr(speed, "get_method_class", lambda name: _DetectorDouble)
    method = build_llm_method("double", {"a": 1}, device="cpu", seed=0, llm="given 7B")
    assert method.llm == "given 7B" and method.params == {"a": 1} and isinstance(method, _DetectorDouble)

    class NoHook:
        def __init__(self, params, *, device="cpu", seed=0):
            pass

    monkeypatch.setattr(speed, "get_method_class", lambda name: NoHook)
    with pytest.raises(ConfigError, match="load_llm"):
        build_llm_method("nohook", {}, device="cpu", seed=0, llm="given 7B")


def test_peak_memory_on_the_cpu_sees_an_allocation():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS reset needs Linux /proc/self/clear_refs")
    with PeakMemory("cpu") as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
        del block
    assert memory.measure == "CPU peak-RSS growth" and memory.peak_mib >= 60


def broken(mutate) -> dict:
    config = copy.deepcopy(demo_config())
    mutate(config["speed"]["llm"])
    return config


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda llm: llm.update(kind="gpt-4"), "speed/llm/kind"),
        (lambda llm: llm.update(batch_sizes=[1, 0]), "speed/llm/batch_sizes"),
        (lambda llm: llm.update(batch_sizes=[]), "speed/llm/batch_sizes"),
        (lambda llm: llm.update(n_batches=0), "speed/llm/n_batches"),
        (lambda llm: llm.pop("rows"), "rows"),
        (lambda llm: llm.update(max_tokens=20), "max_tokens"),
        (lambda llm: llm.update(backbone="vit-z"), "vit-z"),
        (lambda llm: llm["rows"].update(GPT4={"method": "gpt4"}), "speed/llm/rows/GPT4"),
        (lambda llm: llm["rows"].update(CLIP={"method": "clip"}), "not an LLM method"),
        (lambda llm: llm["rows"].update(X={"method": "siad_llm", "variant": "wo_magic"}), "wo_magic"),
    ],
)
def test_malformed_speed_configs_are_refused(mutate, expected):
    with pytest.raises(ConfigError, match=expected):
        validate_config(broken(mutate))


def test_both_profiles_configure_the_llm_group():
    for name, kind in (("config.yaml", "vicuna-7b-arch"), ("demo.yaml", "tiny-random")):
        config = validate_config(yaml.safe_load((ROOT / "config" / name).read_text()))
        llm = config["speed"]["llm"]
        assert llm["kind"] == kind and set(llm["rows"]) == {"AnomalyGPT", "SIAD-LLM"} and max(llm["batch_sizes"]) > 1


# --- the method: interleaved rounds, within-round ratios (fake calls on a fake clock) --------------------------


class FakeClock:
    """Seconds that advance only when a fake call says so: call durations are exactly what a test sets."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += ms / 1000.0


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(speed, "_clock", fake)
    return fake


def test_round_order_rotates_so_every_row_takes_every_position():
    orders = [speed.round_order(3, r) for r in range(4)]
    assert orders == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    for position in range(3):
        assert sorted(order[position] for order in orders[:3]) == [0, 1, 2]


def test_interleaved_rounds_run_every_call_once_per_round_in_rotated_order(clock):
    log = []
    durations = {"a": [5.0, 6.0, 7.0], "b": [1.0, 2.0, 3.0], "c": [10.0, 10.0, 40.0]}

    def make(key):
        def call(r):
            log.append((r, key))
            clock.advance(durations[key][r])
        return call

    times = speed.interleaved_rounds([(k, make(k)) for k in durations], 3, device="cpu")
    assert log == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"), (2, "c"), (2, "a"), (2, "b")]
    for key, expected in durations.items():  # each time is its own call's, whatever ran before it
        assert times[key] == pytest.approx(expected)
    with pytest.raises(ConfigError):
        speed.interleaved_rounds([], 3, device="cpu")


def test_round_stats_take_the_ratio_within_each_round():
    bare = [10.0, 40.0, 20.0, 50.0]  # a slow spell in rounds 1 and 3 hits both rows
    row = [11.0, 48.0, 23.0, 55.0]  # ratios 1.1, 1.2, 1.15, 1.1
    median, minimum, ratio, min_ratio = speed.round_stats(row, bare)
    assert (median, minimum) == (35.5, 11.0)
    assert ratio == pytest.approx(1.125)  # the median of the per-round ratios ...
    assert ratio != pytest.approx(median / statistics.median(bare))  # ... not a ratio of medians (35.5 / 30)
    assert min_ratio == pytest.approx(1.1)
    with pytest.raises(ValueError):
        speed.round_stats(row, bare[:3])


class _FakeMethod:
    """Stands in for a built method: each predict records its image and advances the fake clock."""

    defaults: dict = {}

    def __init__(self, name, clock, log, durations):
        self.name, self.clock, self.log, self.durations = name, clock, log, durations
        self.round = 0

    def predict(self, batch):
        image = batch["image"]
        self.log.append((self.name, float(image.flatten()[0])))
        self.clock.advance(self.durations[self.name](float(image.flatten()[0])))
        return None


def test_measure_speed_warms_up_on_other_images_then_interleaves_rows_and_ratios_per_round(monkeypatch, clock):
    torch.manual_seed(0)
    n_images, size = 3, 8
    images = torch.randn(n_images, 3, size, size)
    timed_marks = [float(x.flatten()[0]) for x in images]  # measure_speed draws the same images from the seed
    # per-round durations: the machine is twice as slow in round 1, for every row alike
    slow = {mark: (2.0 if i == 1 else 1.0) for i, mark in enumerate(timed_marks)}
    durations = {BARE: lambda m: 10.0 * slow.get(m, 1.0), "X": lambda m: 12.0 * slow.get(m, 1.0) + (1.0 if m ==
                 timed_marks[2] else 0.0)}
    log = []

    class Bare:
        class model:  # noqa: N801 - mimics LoadedBackbone.model
            @staticmethod
            def encode_image(x):
                return _FakeMethod(BARE, clock, log, durations).predict({"image": x})

    monkeypatch.setattr(speed, "_bare_backbone", lambda *args: Bare)
    monkeypatch.setattr(speed, "get_method_class", lambda name: _FakeMethod)
    monkeypatch.setattr(speed, "build_method", lambda name, params, **kw: _FakeMethod("X", clock, log, durations))
    timings = speed.measure_speed({"X": ("fake", {})}, backbone="b", image_size=size, n_images=n_images, warmup=2,
                                  seed=0, group="g")
    marks = [m for _, m in log]
    warm, rounds, memory = log[:4], log[4:10], log[10:]
    assert [name for name, _ in warm] == [BARE, BARE, "X", "X"]
    assert not set(m for _, m in warm) & set(timed_marks)  # warm-up never on a timed image
    assert rounds == [(BARE, timed_marks[0]), ("X", timed_marks[0]), ("X", timed_marks[1]), (BARE, timed_marks[1]),
                      (BARE, timed_marks[2]), ("X", timed_marks[2])]
    assert [name for name, _ in memory] == [BARE, "X"] and len(marks) == 12
    bare, row = timings
    assert (bare.name, bare.rounds, bare.ratio) == (BARE, 3, 1.0)
    assert (bare.median_ms, bare.min_ms) == pytest.approx((10.0, 10.0))
    assert (row.median_ms, row.min_ms) == pytest.approx((13.0, 12.0))  # 12, 24, 13
    assert row.ratio == pytest.approx(1.2) and row.min_ratio == pytest.approx(1.2)  # ratios 1.2, 1.2, 1.3
    assert row.group == "g" and row.memory_measure == "CPU peak-RSS growth"


class _FakeLlmMethod:
    """An LLM method double with the hooks PhaseClock wraps: image pass 2 ms, generation 3 ms, on the fake clock."""

    def __init__(self, clock, second_pass):
        self.clock, self.second_pass = clock, second_pass
        self.llm = type("Llm", (), {"model": torch.nn.Identity()})()
        self.batches = []

    def first_pass(self, images):
        self.clock.advance(2.0 * len(images))

    def judge(self, images):
        self.clock.advance(3.0)

    def refined_pass(self, images):
        self.clock.advance(1.0 * len(images))

    def predict_batch(self, batch):
        images = batch["image"]
        self.batches.append(len(images))
        self.first_pass(images)
        self.judge(images)
        if self.second_pass:
            self.refined_pass(images)
            self.judge(images)


def test_llm_group_interleaves_every_cell_and_takes_ratios_within_rounds(clock):
    methods = {"A": _FakeLlmMethod(clock, second_pass=False), "S": _FakeLlmMethod(clock, second_pass=True)}
    bare_calls = []

    def bare(images):
        bare_calls.append(len(images))
        clock.advance(1.0 * len(images))

    timings = speed._llm_group(methods, bare, [1, 4], group="g", image_size=8, n_batches=2, warmup=1,
                               device="cpu", cls_name="bottle", note="n")
    # warm-up: one call per cell, then two rounds of all six cells, then one memory call per cell
    assert methods["A"].batches == [1, 4] * 4  # warm-up, round 0, round 1 (rotated: still 1 before 4), memory
    assert bare_calls.count(1) == bare_calls.count(4) == 1 + 2 + 1
    by = {(t.name, t.batch_size): t for t in timings}
    assert [(t.name, t.batch_size) for t in timings] == [(BARE, 1), (BARE, 4), ("A", 1), ("A", 4), ("S", 1),
                                                         ("S", 4)]
    assert by[("A", 1)].median_ms == pytest.approx(5.0) and by[("A", 4)].median_ms == pytest.approx(11.0 / 4)
    assert by[("S", 4)].median_ms == pytest.approx((8 + 3 + 4 + 3) / 4)
    assert by[("A", 4)].ratio == pytest.approx(11.0 / 4) and by[("S", 1)].ratio == pytest.approx(9.0)
    assert by[("A", 1)].phases == pytest.approx({PHASES[0]: 2.0, PHASES[1]: 3.0})  # no second pass shown
    assert by[("S", 4)].phases == pytest.approx({PHASES[0]: 2.0, PHASES[1]: 0.75, PHASES[2]: (4 + 3) / 4})
    assert by[("A", 1)].note == "n" and by[(BARE, 1)].note == "" and by[(BARE, 1)].rounds == 2


def test_speed_rows_take_their_own_params_on_top_of_the_variant():
    config = validate_config(demo_config())
    entries = speed._entries(config, config["speed"]["rows"])
    assert entries["AnoVL-TFA fused"][1]["fused_dual_pass"] is True and entries["AnoVL-TFA fused"][1]["tta"] == "none"
    assert not entries["AnoVL-TFA"][1].get("fused_dual_pass", False)
    with pytest.raises(ConfigError, match="unknown parameter"):
        speed._entries(config, {"X": {"method": "anovl", "params": {"fused": True}}})
    with pytest.raises(ConfigError, match="fused_dual_pass"):
        speed._entries(config, {"X": {"method": "anovl", "params": {"fused_dual_pass": "yes"}}})

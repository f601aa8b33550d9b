"""The speed table: the CLIP/AnoVL group and the LLM group (breakdown, batch sizes, memory, GPU-only skip)."""

from __future__ import annotations

import copy
import io
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
        assert bare.mean_ms > 0 and bare.ratio == pytest.approx(1.0)
        assert set(gpt.phases) == set(PHASES[:2])  # AnomalyGPT has no second pass
        assert set(siad.phases) == set(PHASES)
        for timing in (gpt, siad):
            assert timing.mean_ms > 0 and timing.std_ms >= 0
            assert all(ms > 0 for ms in timing.phases.values())
            assert sum(timing.phases.values()) <= timing.mean_ms * 1.001  # phases are parts of the whole call
            assert timing.ratio == pytest.approx(timing.mean_ms / bare.mean_ms)
            assert timing.note == speed.DEMO_LLM_NOTE and timing.memory_measure == "CPU peak-RSS growth"
        # generation ran exactly the fixed number of new tokens, from a prompt longer than the 18 prompt slots
        assert gpt.tokens[1] == answer_token_count(tokenizer, "anomalygpt")
        assert siad.tokens[1] == answer_token_count(tokenizer, "siad")
        assert gpt.tokens[0] > 18


def test_rendered_table_has_groups_and_breakdown_columns(llm_timings):
    anovl = [speed.Timing(BARE, "cpu", 10.0, 1.0, 1.0, group="B16+ @ 240 px"),
             speed.Timing("AnoVL-TFA", "cpu", 12.0, 1.0, 1.2, group="B16+ @ 240 px")]
    markdown, csv = render_speed(anovl + llm_timings, {"AnoVL-TFA": (7.6, 0.1), "AnomalyGPT": (1.0, 0.1)},
                                 header="> **head**", notes=speed.llm_notes("tiny-random", {"SIAD-LLM": 19}))
    lines = markdown.splitlines()
    assert lines[0] == "> **head**"
    assert "| AnoVL-TFA | cpu | 12.0 ± 1.0 | 1.20 | 1 |" in markdown and "7.6 ± 0.1" in markdown
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
    assert len(llm) == 4 and (llm["mean_ms"] > 0).all() and (llm["image_pass_ms"] > 0).all()
    assert llm.loc[llm["method"] == "SIAD-LLM", "second_pass_ms"].gt(0).all()
    assert llm.loc[llm["method"] == "AnomalyGPT", "second_pass_ms"].isna().all()
    assert set(llm["batch_size"]) == set(BATCHES)


def test_paper_llm_rows_are_noted_not_built_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the 7B LLM (or a ViT-H) was built without a GPU")

    monkeypatch.setattr(speed, "build_random_llama", must_not_run)
    monkeypatch.setattr(speed, "_bare_rows", must_not_run)
    config = demo_config()
    config["speed"] = {"backbone": "tiny-vit-demo", "image_size": 64, "n_images": 1, "warmup": 0,
                       "rows": {"CLIP": {"method": "clip"}},
                       "llm": {"backbone": "imagebind-huge", "image_size": 224, "kind": "vicuna-7b-arch",
                               "batch_sizes": [1, 8], "rows": {"AnomalyGPT": {"method": "anomalygpt"},
                                                               "SIAD-LLM": {"method": "siad_llm"}}}}
    validate_config(config)
    markdown, csv = run_speed(config)
    for name in ("AnomalyGPT", "SIAD-LLM"):
        rows = [line for line in markdown.splitlines() if f"| {name} | cpu |" in line]
        assert len(rows) == 2 and all("needs a GPU" in line and "| – |" in line for line in rows)
    assert "| CLIP | cpu |" in markdown and "Vicuna-7B architecture" in markdown
    frame = pd.read_csv(io.StringIO(csv), comment="#")
    skipped = frame[frame["group"].str.contains("vicuna-7b-arch")]
    assert len(skipped) == 6 and skipped["mean_ms"].isna().all() and skipped["note"].str.contains("GPU").all()


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

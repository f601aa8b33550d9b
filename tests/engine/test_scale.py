"""The paper-scale dry run: step arithmetic, job work from the plan, memory fit and switches, a tiny CPU run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from siad.engine import scale
from siad.engine.scale import MemoryEstimate, TrainingStage
from siad.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_steps_are_epochs_times_batches_rounded_up():
    stage = TrainingStage("training", epochs=15, images_per_step=8, batch_param="batch_size", epoch_param="epochs")
    assert scale.steps_for(stage, 1725) == 15 * 216  # MVTec AD test split (467 + 1258) under zad
    assert scale.steps_for(stage, 8) == 15
    assert scale.steps_for(stage, 0) == 0


def test_llm_schedule_takes_twice_the_images_outside_uzad():
    params = {"epochs": 50, "batch_size": 8}
    (uzad,) = scale.TRAINING_SCHEDULES.get("anomalygpt")(params, "uzad")
    (zad,) = scale.TRAINING_SCHEDULES.get("anomalygpt")(params, "zad")
    assert (uzad.images_per_step, zad.images_per_step) == (8, 16)


def test_aaclip_has_two_stages_with_their_own_batch():
    params = {"stage1_epochs": 5, "stage1_batch_size": 16, "stage2_epochs": 20, "stage2_batch_size": 2}
    stages = scale.TRAINING_SCHEDULES.get("aaclip")(params, "uzad")
    assert [(s.epochs, s.images_per_step, s.batch_param) for s in stages] == [
        (5, 16, "stage1_batch_size"), (20, 2, "stage2_batch_size")]


def test_training_images_per_setting():
    config = {"data": {"options": {"medical_protocol": "all_test"}}, "datasets": {"mvtec": {}, "br35h": {}},
              "training": {"normal_images": "train", "normal_images_per_dataset": {"br35h": "all"}}}
    counts = {"mvtec": 3629, "br35h": 0}
    assert scale.training_images(config, counts, "mvtec", "uzad") == 3629
    assert scale.training_images(config, counts, "mvtec", "zad") == 467 + 1258
    assert scale.training_images(config, counts, "br35h", "uzad") == 1500  # its normal test images (all)
    with pytest.raises(ConfigError, match="train_images"):
        scale.training_images(config, {}, "mvtec", "pseudo")


def test_job_work_follows_the_paper_plan():
    from siad.plan import build_plan
    from siad.scale import job_work, load_config

    paper = load_config(REPO / "config" / "config.yaml")
    plan = build_plan(paper)
    works = job_work(plan, {"mvtec": 3629, "visa": 8659, "br35h": 0, "brainmri": 0})
    assert [w.rule for w in works] == [g.rule_name for g in plan.groups]
    clip = next(w for w in works if w.method == "clip")
    assert clip.trainings == () and sum(n for _, n in clip.evaluations) == sum(
        scale.test_images(paper, k.target) for k in plan.groups[[w.rule for w in works].index(clip.rule)].keys)
    filo = [w for w in works if w.method == "filo" and any(v.startswith("hq_") for (v, _), _ in w.evaluations)]
    assert filo and all(len(w.trainings) < len({v for (v, _), _ in w.evaluations}) for w in filo)  # shared training


def _estimate(**kw):
    base = dict(weights=2.0, llm_weights=12.6, trainable=0.5, activations=1.0, llm_activations=20.0, batch=8,
                basis="test")
    return MemoryEstimate(**{**base, **kw})


def test_fit_needs_no_switch_under_budget():
    fits, switches, _ = scale.choose_switches(_estimate(llm_activations=1.0), 22.0, is_llm=True,
                                              ctx={"llm_dims": {}, "seq": 1}, batch_param="batch_size")
    assert fits and switches == []


def test_checkpointing_is_tried_first_and_enough_for_llm_activations():
    dims = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32}
    full = scale.llm_activation_bytes(dims, 16, 300, checkpointing=False) / scale.GIB
    est = _estimate(llm_activations=full)
    fits, switches, after = scale.choose_switches(est, 22.0, is_llm=True, ctx={"llm_dims": dims, "seq": 300},
                                                  batch_param="batch_size")
    assert not fits and switches == ["llm_gradient_checkpointing: true"]
    assert after.total <= 22.0 < est.total


def test_switches_are_named_by_their_config_keys_for_a_method():
    dims = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32}
    full = scale.llm_activation_bytes(dims, 16, 300, checkpointing=False) / scale.GIB
    est = _estimate(llm_activations=full, llm_weights=30.0)  # checkpointing alone is not enough: 8-bit too
    _, switches, _ = scale.choose_switches(est, 22.0, is_llm=True, ctx={"llm_dims": dims, "seq": 300},
                                           batch_param="batch_size", method="siad_llm")
    assert switches == ["methods/siad_llm/params/llm_gradient_checkpointing: true",
                        "methods/siad_llm/params/llm_load_in_8bit: true"]
    _, switches, _ = scale.choose_switches(_estimate(llm_weights=0.0, llm_activations=0.0, activations=40.0), 22.0,
                                           is_llm=False, ctx={}, batch_param="stage2_batch_size", method="aaclip")
    assert switches == ["methods/aaclip/params/stage2_batch_size: 3"]


def test_smaller_batch_is_the_largest_that_fits():
    est = _estimate(llm_weights=0.0, llm_activations=0.0, activations=40.0)  # 5 GiB per image of the batch
    fits, switches, after = scale.choose_switches(est, 22.0, is_llm=False, ctx={}, batch_param="stage2_batch_size")
    assert not fits and switches == ["stage2_batch_size: 3"]  # 2.5 + 3 × 5 = 17.5; 4 × 5 would be 22.5
    assert math.isclose(after.activations, 15.0)


def test_llm_activation_formula_and_checkpointing_saving():
    dims = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    full = scale.llm_activation_bytes(dims, 2, 10, checkpointing=False)
    # Korthikanti et al.: s·b·h·(34 + 5·a·s/h) bytes per layer in 16-bit values, here 2 layers
    assert full == 2 * (10 * 2 * 64 * (34 + 5 * 4 * 10 / 64))
    assert scale.llm_activation_bytes(dims, 2, 10, checkpointing=True) < full


def test_mode_gpu_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert scale.resolve_mode("auto") == "cpu_scaled"
    with pytest.raises(ConfigError, match="no CUDA"):
        scale.resolve_mode("gpu")
    with pytest.raises(ConfigError, match="mode"):
        scale.resolve_mode("fast")


def test_tiny_cpu_measurement_of_a_trained_method(tmp_path):
    """End to end on the CPU: AnomalyCLIP at the demo's tiny architecture, 2 + 2 capped steps, 2 eval batches."""
    from siad.scale import load_config

    demo = load_config(REPO / "config" / "demo.yaml")
    paper = load_config(REPO / "config" / "config.yaml")
    params = scale._kind_params(paper, demo, "anomalyclip", "default")
    # the tiny architecture, the paper's schedule (the demo's 2 epochs dropped: the class default 15 applies)
    assert params["backbone"] == demo["methods"]["anomalyclip"]["params"]["backbone"] and "epochs" not in params
    kind = scale.measure_kind("anomalyclip", "default", "uzad", {**params, "batch_size": 2}, device="cpu",
                              workdir=tmp_path, image_size=32, steps_per_epoch=2, eval_batch_size=2, eval_batches=2,
                              eval_size=32)
    assert len(kind.step_seconds) == 1 and kind.step_seconds[0] > 0
    assert kind.eval_seconds > 0 and kind.feature_seconds > 0 and kind.trainable_params > 0
    assert kind.feature_cached  # the paper params set a feature cache: training reads it
    assert kind.memory_measure == "CPU peak-RSS growth" and kind.notes == ()
    # the CPU-scaled paper-architecture estimate: a lower bound without the image tower's activations
    from siad.methods import get_method_class

    paper_params = get_method_class("anomalyclip").resolve_params(scale._kind_params(paper, None, "anomalyclip",
                                                                                     "default"))
    schedule = scale.TRAINING_SCHEDULES.get("anomalyclip")(paper_params, "uzad")
    est = scale._memory(kind, schedule, paper_params, "cpu_scaled", None, params)
    assert est.activations == 0.0 and est.basis == scale.LOWER_BOUND_BASIS
    assert est.weights == pytest.approx(scale.backbone_params(paper_params["backbone"],
                                                              paper_params.get("image_size")) * 4 / scale.GIB)


def test_a_cpu_scaled_lower_bound_decides_only_what_does_not_fit():
    from siad.report.cost import _fit

    bound = scale.MemoryEstimate(1.0, 0.0, 0.5, 0.0, 0.0, 8, scale.LOWER_BOUND_BASIS)
    work = scale.JobWork("run_x", "anomalyclip", 0, "mvtec", 1, (), ())
    under = scale.JobCost(work, (), bound, None, (), None, undecided=True)
    assert _fit(under).startswith("unknown")
    over = scale.JobCost(work, (), bound, False, ("methods/anomalyclip/params/batch_size: 4",), None)
    assert _fit(over) == "no: methods/anomalyclip/params/batch_size: 4"

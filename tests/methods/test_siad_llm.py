"""Tests of SIAD-LLM (siad/methods/siad_llm.py): equivalence with AnomalyGPT, self-improvement, every ablation."""

from __future__ import annotations

import pytest
import torch

from siad.errors import ConfigError
from siad.methods import build_method

ALL_OFF = {"self_improvement": False, "stage_prompts": False, "learnable_context": False, "adapter_lambda": 0.0,
           "sem": False, "pem": False, "test_class_names": "released"}

# The ablation variants of config/config.yaml (Tables 3a, 3b, 4, 5) and the modules each one must have.
VARIANTS = {
    "default": ({}, {"decoder", "stage_prompts", "adapter", "sem", "pem"}),
    "wo_si": ({"self_improvement": False}, {"decoder", "stage_prompts", "adapter", "sem", "pem"}),
    "wo_sp": ({"stage_prompts": False}, {"decoder", "stage_prompts", "adapter", "sem", "pem"}),
    "wo_em": ({"sem": False, "pem": False}, {"decoder", "stage_prompts", "adapter", "prompt_learner"}),
    "wo_sem": ({"sem": False}, {"decoder", "stage_prompts", "adapter", "pem"}),
    "wo_pem": ({"pem": False}, {"decoder", "stage_prompts", "adapter", "sem", "prompt_learner"}),
    "wo_pem_strict": ({"pem": False, "pem_substitute": "none"}, {"decoder", "stage_prompts", "adapter", "sem",
                                                                 "base_prompts"}),
    "wo_em_strict": ({"sem": False, "pem": False, "pem_substitute": "none"}, {"decoder", "stage_prompts", "adapter",
                                                                              "base_prompts"}),
    "si_teacher_forced": ({"train_response": "teacher"}, {"decoder", "stage_prompts", "adapter", "sem", "pem"}),
    "wo_adapter": ({"adapter_lambda": 0.0}, {"decoder", "stage_prompts", "sem", "pem"}),
    "lambda05": ({"adapter_lambda": 0.5}, {"decoder", "stage_prompts", "adapter", "sem", "pem"}),
    "case1": ({"stage_case": 1}, {"decoder", "stage_prompts", "adapter", "sem", "pem"}),
}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())






@pytest.fixture(scope="module")
def full(tiny_llm_params):
    return build_method("siad_llm", tiny_llm_params, seed=0)


def test_all_modules_off_first_pass_equals_anomalygpt(tiny_llm_params, llm_batches):
    agpt = build_method("anomalygpt", tiny_llm_params, seed=0)
    siad = build_method("siad_llm", {**tiny_llm_params, **ALL_OFF}, seed=0)
    # same weights: the trainable modules of AnomalyGPT copied into SIAD-LLM (same names, same shapes)
    siad.trainable.load_state_dict(agpt.trainable.state_dict())
    with torch.no_grad():
        torch.nn.init.normal_(agpt.trainable["decoder"].fc[0].weight)  # make sure the copy is what is compared
        siad.trainable.load_state_dict(agpt.trainable.state_dict())
    batch = llm_batches.test(agpt)
    a, _, _ = agpt.first_pass(batch)
    s, _, _ = siad.first_pass(batch)
    assert torch.equal(a.anomaly_map, s.anomaly_map) and torch.equal(a.prompts, s.prompts)
    out_a, out_s = agpt.predict_batch(batch), siad.predict_batch(batch)
    assert torch.equal(out_a.scores, out_s.scores) and out_a.answers == out_s.answers


def test_full_model_differs_from_anomalygpt_map(tiny_llm_params, full, llm_batches):
    agpt = build_method("anomalygpt", tiny_llm_params, seed=0)
    batch = llm_batches.test(full)
    assert not torch.allclose(agpt.first_pass(batch)[0].anomaly_map, full.first_pass(batch)[0].anomaly_map)


def test_self_improvement_refines_text_with_the_answer(full, llm_batches):
    batch = llm_batches.test(full, n=2)
    with torch.no_grad():
        first, _, tokens = full.first_pass(batch)
        yes = full.refined_pass(tokens, first, ["Yes, there is an anomaly in the image, at the top of the image."] * 2)
        no = full.refined_pass(tokens, first, ["No, there are no anomalies in the image."] * 2)
    assert not torch.allclose(yes.text, first.text)
    assert not torch.allclose(yes.text, no.text)
    assert not torch.allclose(yes.anomaly_map, no.anomaly_map)


def test_prediction_without_si_is_the_first_pass(tiny_llm_params, llm_batches):
    method = build_method("siad_llm", {**tiny_llm_params, "self_improvement": False}, seed=0)
    batch = llm_batches.test(method, n=2)
    out = method.predict_batch(batch)
    assert torch.equal(out.maps, method.first_pass(batch)[0].anomaly_map)


def test_prediction_with_si_is_the_refined_pass(full, llm_batches):
    batch = llm_batches.test(full, n=2)
    out = full.predict_batch(batch)
    first, embedding, tokens = full.first_pass(batch)
    answers, _ = full.judge(embedding, first.prompts, batch["cls_name"])
    assert torch.equal(out.maps, full.refined_pass(tokens, first, answers).anomaly_map)
    assert not torch.equal(out.maps, first.anomaly_map)






@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_builds_trains_a_step_and_predicts(variant, tiny_llm_params, full, llm_batches):
    overrides, modules = VARIANTS[variant]
    method = full if variant == "default" else build_method("siad_llm", {**tiny_llm_params, **overrides}, seed=0)
    assert set(method.trainable) == modules
    method.trainable.train()
    params = method.trainable_parameters()
    loss, _ = method.training_loss(llm_batches.train(method))
    method.optimizer_step(loss, torch.optim.AdamW(params, lr=1e-4), params)
    out = method.predict_batch(llm_batches.test(method, n=2))
    assert out.maps.shape == (2, 224, 224) and torch.isfinite(out.maps).all() and len(out.answers) == 2


def test_parameter_counts_drop_by_exactly_the_removed_module(tiny_llm_params, full):
    total = _count(full.trainable)
    sizes = {name: _count(module) for name, module in full.trainable.items()}
    wo_adapter = build_method("siad_llm", {**tiny_llm_params, "adapter_lambda": 0.0}, seed=0)
    assert _count(wo_adapter.trainable) == total - sizes["adapter"]
    wo_sem = build_method("siad_llm", {**tiny_llm_params, "sem": False}, seed=0)
    assert _count(wo_sem.trainable) == total - sizes["sem"]
    wo_pem = build_method("siad_llm", {**tiny_llm_params, "pem": False}, seed=0)
    assert _count(wo_pem.trainable) == total - sizes["pem"] + _count(wo_pem.trainable["prompt_learner"])
    strict = build_method("siad_llm", {**tiny_llm_params, "pem": False, "pem_substitute": "none"}, seed=0)
    assert _count(strict.trainable) == total - sizes["pem"] + 9 * strict.llm_dim  # the base prompts stay
    # λ and the stage words change no parameter count; w/o SP keeps the (shared) context vectors
    for overrides in ({"adapter_lambda": 0.5}, {"stage_case": 1}, {"stage_prompts": False}):
        assert _count(build_method("siad_llm", {**tiny_llm_params, **overrides}, seed=0).trainable) == total


def test_weights_of_another_variant_are_refused(tiny_llm_params, full, tmp_path):
    full.save(tmp_path / "full.pt")
    wo_sem = build_method("siad_llm", {**tiny_llm_params, "sem": False}, seed=0)
    with pytest.raises(ConfigError, match="other module switches"):
        wo_sem.load(tmp_path / "full.pt")


def test_bad_ablation_parameters_are_refused(tiny_llm_params):
    with pytest.raises(ConfigError, match="stage_case"):
        build_method("siad_llm", {**tiny_llm_params, "stage_case": 4})
    with pytest.raises(ConfigError, match="adapter_lambda"):
        build_method("siad_llm", {**tiny_llm_params, "adapter_lambda": 1.5})
    with pytest.raises(ConfigError, match="learnable_context"):
        build_method("siad_llm", {**tiny_llm_params, "learnable_context": False})
    with pytest.raises(ConfigError, match="few_shot_k"):
        build_method("siad_llm", {**tiny_llm_params, "few_shot_k": 1})
    with pytest.raises(ConfigError, match="pem_substitute"):
        build_method("siad_llm", {**tiny_llm_params, "pem_substitute": "none"})  # PEM is on: nothing to replace
    with pytest.raises(ConfigError, match="pass_weights"):
        build_method("siad_llm", {**tiny_llm_params, "self_improvement": False, "pass_weights": [0.0, 1.0]})


# -- training: the response fed back (Algorithm 1) and the loss weights ---------------------------------


@pytest.fixture
def refined_spy(monkeypatch):
    """Wraps ``method.refined_pass`` to record the responses and the first pass it is given."""

    def spy(method) -> dict:
        seen: dict = {}
        original = method.refined_pass

        def refined_pass(tokens, first, responses):
            seen.update(responses=list(responses), first=first)
            return original(tokens, first, responses)

        monkeypatch.setattr(method, "refined_pass", refined_pass)
        return seen

    return spy


def test_training_feeds_back_the_answer_generated_from_the_first_pass(full, llm_batches, refined_spy):
    assert full.params["train_response"] == "generated"  # Algorithm 1 is the default
    batch = llm_batches.train(full)
    seen = refined_spy(full)
    full.trainable.train()
    full.training_loss(batch)
    embedding = full.encode_images(batch["image"])[1]
    generated, _ = full.judge(embedding, seen["first"].prompts.detach(), batch["cls_name"])
    assert seen["responses"] == generated  # greedy: the same generation again
    assert seen["responses"] != batch["answers"]  # the random LLM does not say the target answers


def test_the_generation_in_training_gets_no_gradient(full, llm_batches, monkeypatch):
    given = {}

    def judge(embedding, prompts, cls_names):
        given.update(requires_grad=prompts.requires_grad, grad_enabled=torch.is_grad_enabled())
        return ["No, there are no anomalies in the image."] * len(cls_names), torch.full((len(cls_names),), 0.5)

    monkeypatch.setattr(full, "judge", judge)
    full.trainable.train()
    full.training_loss(llm_batches.train(full))
    assert given == {"requires_grad": False, "grad_enabled": True}  # detached prompts (judge adds no_grad itself)


def test_teacher_forcing_feeds_back_the_target_answer(tiny_llm_params, llm_batches, refined_spy, monkeypatch):
    method = build_method("siad_llm", {**tiny_llm_params, "train_response": "teacher"}, seed=0)
    monkeypatch.setattr(method, "judge", lambda *args: pytest.fail("teacher forcing generates nothing in training"))
    batch = llm_batches.train(method)
    seen = refined_spy(method)
    method.trainable.train()
    method.training_loss(batch)
    assert seen["responses"] == batch["answers"]


@pytest.mark.parametrize(("weights", "focal", "dice"), [([0.5, 0.5], 2.0, 20.0), ([0.25, 0.75], 2.5, 25.0)])
def test_pass_weights_split_the_pixel_loss_and_removing_si_keeps_its_total(
    weights, focal, dice, tiny_llm_params, llm_batches, monkeypatch
):
    """First pass focal 1 / dice 10, refined pass 3 / 30: with SI the pixel terms are the weighted mean of the passes;
    w/o SI the first pass alone, with the same total weight α, β (the ablation removes only the refined pass)."""
    for si in (True, False):
        method = build_method("siad_llm", {**tiny_llm_params, "self_improvement": si, "pass_weights": weights,
                                           "train_response": "teacher"}, seed=0)
        values = iter([(torch.tensor(1.0), torch.tensor(10.0)), (torch.tensor(3.0), torch.tensor(30.0))])
        monkeypatch.setattr(method, "pixel_losses", lambda probs, target, values=values: next(values))
        method.trainable.train()
        loss, parts = method.training_loss(llm_batches.train(method))
        expected = (focal, dice) if si else (1.0, 10.0)
        assert (parts["focal"], parts["dice"]) == pytest.approx(expected)
        assert float(loss.detach()) == pytest.approx(expected[0] + expected[1] + parts["ce"], rel=1e-5)


def test_without_si_the_loss_is_the_full_loss_minus_the_refined_pass(tiny_llm_params, full, llm_batches, monkeypatch):
    """A refined pass that changes nothing: the full model's loss must then equal the w/o SI model's (before the
    per-pass weights it counted focal and dice twice)."""
    wo_si = build_method("siad_llm", {**tiny_llm_params, "self_improvement": False}, seed=0)
    wo_si.trainable.load_state_dict(full.trainable.state_dict())
    monkeypatch.setattr(full, "refined_pass", lambda tokens, first, responses: first)
    monkeypatch.setattr(full, "judge", lambda e, p, c: (["R"] * len(c), None))
    batch = llm_batches.train(full)
    full.trainable.train()
    wo_si.trainable.train()
    (loss_full, parts_full), (loss_wo, parts_wo) = full.training_loss(batch), wo_si.training_loss(batch)
    assert parts_full == pytest.approx(parts_wo) and float(loss_full.detach()) == pytest.approx(float(loss_wo.detach()))


def test_strict_wo_pem_prompts_are_the_base_prompts_whatever_the_map(tiny_llm_params, llm_batches):
    method = build_method("siad_llm", {**tiny_llm_params, "pem": False, "pem_substitute": "none"}, seed=0)
    probs = torch.rand(2, 4, 2, 224, 224)
    a = method.prompt_embeddings(probs, probs[:, :, 1].mean(1))
    b = method.prompt_embeddings(1 - probs, (1 - probs[:, :, 1]).mean(1))
    assert a.shape == (2, 9, method.llm_dim) and torch.equal(a, b)
    assert torch.equal(a[0], method.trainable["base_prompts"].base_prompts)
    out = method.predict_batch(llm_batches.test(method, n=2))
    assert len(out.answers) == 2 and torch.isfinite(out.maps).all()

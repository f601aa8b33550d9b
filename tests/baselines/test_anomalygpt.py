"""Tests of the AnomalyGPT baseline and the shared LLM-detector machinery (siad/methods/llm_detector.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from siad.data.loading import AnomalyDataset
from siad.data.pseudo import CutPastePoisson, PseudoAnomaly
from siad.errors import ConfigError, DataError, MissingWeightsError
from siad.llm import parse_answer, patch_answer, patch_words
from siad.methods import build_method
from siad.methods.llm_detector import warmup_decay_factor


@pytest.fixture(scope="module")
def agpt(tiny_llm_params):
    return build_method("anomalygpt", tiny_llm_params, seed=0)






def test_prediction_has_map_max_score_answers_and_p_yes(agpt, llm_batches):
    out = agpt.predict_batch(llm_batches.test(agpt))
    assert out.maps.shape == (4, 224, 224)
    assert torch.allclose(out.scores, out.maps.flatten(1).max(dim=1).values)
    assert out.maps.min() >= 0 and out.maps.max() <= 1  # mean of softmax probabilities
    assert len(out.answers) == 4 and all(isinstance(a, str) for a in out.answers)
    assert out.p_yes.shape == (4,) and bool(((out.p_yes > 0) & (out.p_yes < 1)).all())


def test_prediction_is_deterministic(agpt, llm_batches):
    batch = llm_batches.test(agpt)
    a, b = agpt.predict_batch(batch), agpt.predict_batch(batch)
    assert torch.equal(a.maps, b.maps) and a.answers == b.answers and torch.equal(a.p_yes, b.p_yes)


def test_training_batch_is_normal_then_pseudo_with_answers_from_the_pasted_patches(agpt, llm_batches, monkeypatch):
    made = []
    original = CutPastePoisson.generate

    def recording(self, *args):
        made.append(original(self, *args))
        return made[-1]

    monkeypatch.setattr(CutPastePoisson, "generate", recording)
    batch = llm_batches.train(agpt, n=3)
    assert batch["image"].shape == (6, 3, 112, 112) and batch["mask"].shape == (6, 224, 224)
    # normal half empty; AnomalyGPT's soft label binarised at 0.3 may leave a faint paste with few or no pixels
    assert batch["mask"][:3].sum() == 0 and batch["mask"][3:].sum() > 0
    assert batch["answers"][:3] == ["No, there is no anomaly in the image."] * 3  # released wording
    assert len(made) == 3
    for answer, pseudo in zip(batch["answers"][3:], made, strict=True):
        # released reading: one anomaly per pasted patch, in paste order, whatever the binarised label shows
        assert pseudo.boxes and answer == patch_answer(pseudo.boxes, (112, 112))
        parsed = parse_answer(answer)
        assert parsed.verdict == "yes"
        assert parsed.positions == list(dict.fromkeys(patch_words(pseudo.boxes, (112, 112))))


def _one_patch_split_in_two(self, image, source, rng):
    """A pasted patch (rows 40–60, columns 10–90 of 112) whose label crosses the threshold in two separate places."""
    mask = np.zeros(image.shape[:2], np.float32)
    mask[40:60, 10:30] = mask[40:60, 70:90] = 0.9
    return PseudoAnomaly(image.copy(), mask, ((40, 60, 10, 90),))


def test_a_patch_split_by_the_label_threshold_is_one_anomaly_as_released(tiny_llm_params, llm_batches, monkeypatch):
    monkeypatch.setattr(CutPastePoisson, "generate", _one_patch_split_in_two)
    released = build_method("anomalygpt", tiny_llm_params, seed=0)
    assert released.params["answer_regions"] == "patches"  # the default
    assert llm_batches.train(released, n=2)["answers"][2:] == [
        "Yes, there is an anomaly in the image, at the center of the image."] * 2
    regions = build_method("anomalygpt", {**tiny_llm_params, "answer_regions": "components"}, seed=0)
    assert llm_batches.train(regions, n=2)["answers"][2:] == [
        "Yes, there are 2 anomalies in the image, they are at the left and right of the image."] * 2


def test_fit_save_load_round_trip(tiny_llm_params, mvtec_uzad_train, tmp_path, llm_batches):
    root, meta = mvtec_uzad_train
    method = build_method("anomalygpt", tiny_llm_params, seed=0)
    data = AnomalyDataset(root, meta, split="train", transform=method.transform, name="mvtec")
    before = {k: v.clone() for k, v in method.trainable.state_dict().items()}
    method.fit(data, "uzad")
    assert len(method.loss_history) == math.ceil(len(data) / tiny_llm_params["batch_size"])
    after = method.trainable.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    method.save(tmp_path / "model.pt")
    reloaded = build_method("anomalygpt", tiny_llm_params, seed=0)
    reloaded.load(tmp_path / "model.pt")
    batch = llm_batches.test(method, n=2)
    assert torch.equal(method.predict_batch(batch).maps, reloaded.predict_batch(batch).maps)


def test_paper_size_trainable_parameters_match_the_release():
    from siad.methods.llm_components import ConvPromptLearner, StageDecoder

    decoder = sum(p.numel() for p in StageDecoder(1280, 1024, 4).parameters())
    learner = sum(p.numel() for p in ConvPromptLearner(4096).parameters())
    assert decoder == 5_246_976 and learner == 107_416_504


def test_warmup_decay_schedule():
    assert warmup_decay_factor(0, 10, 100, "log") == 0.0
    assert warmup_decay_factor(9, 10, 100, "log") == pytest.approx(1.0)
    assert warmup_decay_factor(5, 10, 100, "linear") == pytest.approx(0.5)
    assert warmup_decay_factor(55, 10, 100) == pytest.approx(0.5)
    assert warmup_decay_factor(100, 10, 100) == 0.0
    assert warmup_decay_factor(3, 10, 100, "constant") == 1.0


def test_paper_llm_without_files_is_a_clear_error(tiny_llm_params, tmp_path):
    with pytest.raises(ConfigError, match="vicuna_dir"):
        build_method("anomalygpt", {**tiny_llm_params, "llm": "vicuna-pandagpt"})
    params = {**tiny_llm_params, "llm": "vicuna-pandagpt", "vicuna_dir": str(tmp_path / "vicuna"),
              "pandagpt_delta": str(tmp_path / "pytorch_model.pt")}
    with pytest.raises(MissingWeightsError, match="vicuna"):
        build_method("anomalygpt", params)


def test_paper_backbone_without_weights_offline_is_a_clear_error(tiny_llm_params, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    params = {**tiny_llm_params, "backbone": "imagebind-huge", "weights_dir": str(tmp_path)}
    with pytest.raises(MissingWeightsError, match="ViT-H-14"):
        build_method("anomalygpt", params)


def test_bad_parameters_are_refused(tiny_llm_params):
    with pytest.raises(ConfigError, match="map_reduce"):
        build_method("anomalygpt", {**tiny_llm_params, "map_reduce": "max"})
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_method("anomalygpt", {**tiny_llm_params, "adapter_lambda": 0.1})


def test_instruction_data_is_read_and_adds_a_ce_only_batch(tiny_llm_params, mvtec_uzad_train, tmp_path):
    root, meta = mvtec_uzad_train
    record = next(iter(meta["train"].values()))[0]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes((root / record["img_path"]).read_bytes())
    data = [{"image_name": "a.png", "conversation": [{"from": "human", "value": "<image>\nWhat is this?"},
                                                      {"from": "gpt", "value": "A bottle."}]}]
    (tmp_path / "sft.json").write_text(json.dumps(data))
    params = {**tiny_llm_params, "sft_data": str(tmp_path / "sft.json"), "sft_image_dir": str(tmp_path / "images")}
    method = build_method("anomalygpt", params, seed=0)
    triples = method.instruction_data()
    assert triples == [(tmp_path / "images" / "a.png", "What is this?", "A bottle.")]
    loss = method.instruction_loss(triples)
    assert loss.ndim == 0 and float(loss.detach()) > 0
    loss.backward()
    assert method.trainable["prompt_learner"].base_prompts.grad is not None
    (tmp_path / "bad.json").write_text(json.dumps([{"image_name": "a.png", "conversation": []}]))
    with pytest.raises(DataError, match="entry 0"):
        build_method("anomalygpt", {**params, "sft_data": str(tmp_path / "bad.json")}).instruction_data()


def test_few_shot_memory_map_is_zero_on_the_reference_image(tiny_llm_params, llm_batches):
    method = build_method("anomalygpt", {**tiny_llm_params, "few_shot_k": 1}, seed=0)
    assert method.references_needed == 1
    batch = llm_batches.test(method, n=2)
    with pytest.raises(ConfigError, match="reference images"):
        method.predict_batch(batch)
    method.set_references({c: batch["image"][i : i + 1] for i, c in enumerate(batch["cls_name"])})
    out = method.predict_batch(batch)
    assert out.maps.shape == (2, 224, 224)
    assert float(out.maps.abs().max()) < 1e-4  # every patch finds itself among the reference patches
    other = {"image": batch["image"].flip(-1), "cls_name": batch["cls_name"]}
    assert float(method.predict_batch(other).scores.min()) > 1e-3


def test_instances_with_the_same_llm_spec_share_the_frozen_llm(tiny_llm_params):
    a = build_method("anomalygpt", tiny_llm_params, seed=0)
    b = build_method("siad_llm", tiny_llm_params, seed=0)
    assert a.llm is b.llm  # variants of one job load the LLM once
    other = build_method("anomalygpt", tiny_llm_params, seed=3)
    assert other.llm is not a.llm
    assert not torch.equal(other.llm.image_proj.weight, a.llm.image_proj.weight)


def test_training_is_deterministic(tiny_llm_params, mvtec_uzad_train):
    root, meta = mvtec_uzad_train
    states = []
    for _ in range(2):
        torch.manual_seed(123)  # global state must not matter: the method seeds its own generators
        method = build_method("siad_llm", {**tiny_llm_params, "batch_size": 4}, seed=0)
        method.fit(AnomalyDataset(root, meta, split="train", transform=method.transform, name="mvtec"), "uzad")
        states.append((method.trainable.state_dict(), method.loss_history))
    assert states[0][1] == states[1][1]
    assert all(torch.equal(states[0][0][k], states[1][0][k]) for k in states[0][0])


def test_every_dataset_class_has_its_siad_table_description(agpt, tiny_llm_params):
    from siad.data.registry import DATASETS, get_dataset

    for dataset in DATASETS.names():
        for cls_name in get_dataset(dataset).classes:
            assert agpt.descriptions[cls_name].startswith("This is a photo of"), (dataset, cls_name)
    assert agpt.question("bottle") == ("This is a photo of a bottle for anomaly detection, which should be round, "
                                       "without any damage, flaw, defect, scratch, hole or broken part. "
                                       "Is there any anomaly in the image?")
    fallback = build_method("anomalygpt", {**tiny_llm_params, "descriptions": None})
    assert "which should be without any damage" in fallback.question("bottle")


def test_test_time_object_words_follow_the_release(agpt, tiny_llm_params):
    assert torch.equal(agpt.text_features(["pcb1"], test=True), agpt.text_features(["pcb"]))
    assert torch.equal(agpt.text_features(["chewinggum"], test=True), agpt.text_features(["object"]))
    assert not torch.equal(agpt.text_features(["pcb1"], test=True), agpt.text_features(["pcb1"]))  # training
    assert torch.equal(agpt.text_features(["bottle"], test=True), agpt.text_features(["bottle"]))
    plain = build_method("anomalygpt", {**tiny_llm_params, "test_class_names": "class"})
    assert torch.equal(plain.text_features(["pcb1"], test=True), plain.text_features(["pcb1"]))


def test_released_memory_map_prompts_while_training(tiny_llm_params, mvtec_uzad_train, llm_batches):
    root, meta = mvtec_uzad_train
    records = [r for rs in meta["train"].values() for r in rs]
    method = build_method("anomalygpt", {**tiny_llm_params, "train_memory_prompt_p": 1.0}, seed=0)
    method._train_memory = method.train_memory(root, records)
    assert sorted(method._train_memory) == sorted(meta["train"])
    assert method._train_memory["bottle"][0].shape[0] == 4 * 64  # first image + 3 rotations, 8x8 patches each
    batch = llm_batches.train(method)
    assert batch["memory_prompt"] is True
    loss_memory, parts_memory = method.training_loss(batch)
    loss_text, parts_text = method.training_loss({**batch, "memory_prompt": False})
    assert parts_memory["focal"] == parts_text["focal"] and parts_memory["dice"] == parts_text["dice"]
    assert parts_memory["ce"] != parts_text["ce"]  # the prompts came from the memory map
    first = sorted(meta["train"]["bottle"], key=lambda r: r["img_path"])[0]
    image = method._normalise(method._raw_image(root, first)[None])
    stages, _ = method.encode_images(image)
    assert float(method.memory_map(stages, ["bottle"], method._train_memory).abs().max()) < 1e-4

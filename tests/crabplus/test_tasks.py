"""The AV-UIE v2 registry: subsets, families, the authors' instructions and per-subset facts."""

import pytest
from crabplus import metrics
from crabplus.tasks import EMOTION_SUBSETS, FAMILIES, SUBSETS, TASKS, get_task, subsets_of

ALL = {"a2v", "v2a", "ks", "ucf", "meld", "mer24", "cremad", "mafw", "dfew", "avqa", "avqa_thu", "ave", "unav", "avvp"}
ALL |= {"avcap", "s4", "ms3", "ref_avs", "arig"}


def test_nineteen_subsets_in_seven_families():
    assert len(SUBSETS) == 19 and set(SUBSETS) == ALL
    assert len(FAMILIES) == 7
    assert {spec.family for spec in TASKS.values()} == set(FAMILIES)
    assert set(subsets_of("action_recognition")) == {"ks", "ucf"}
    assert set(subsets_of("emotion_recognition")) == {"meld", "mer24", "cremad", "mafw", "dfew"}
    assert set(subsets_of("cross_modal_matching")) == {"a2v", "v2a"}
    assert set(subsets_of("temporal_localization")) == {"ave", "unav", "avvp"}
    assert set(subsets_of("segmentation_grounding")) == {"s4", "ms3", "ref_avs", "arig"}
    assert set(subsets_of("captioning")) == {"avcap"}
    assert set(subsets_of("question_answering")) == {"avqa", "avqa_thu"}


def test_authors_instructions():
    assert TASKS["a2v"].instruction == (
        "Please listen to the audio and indicate which of the two videos matches what you hear."
    )
    for name in ("ks", "ucf"):
        assert TASKS[name].instruction == "Please identify the action taking place in the video."
    for name in EMOTION_SUBSETS:
        assert TASKS[name].instruction == "Please judge the person's emotion at the moment."


def test_frames_modalities_targets_and_test_files():
    for name, spec in TASKS.items():
        expected = 1 if spec.uses_image else 4 if name in EMOTION_SUBSETS else 10
        assert spec.num_frames == expected, name
        assert "audio" in spec.modalities and spec.instruction
        assert spec.has_test == (name not in ("mer24", "unav", "avcap")), name
    assert TASKS["a2v"].modalities == ("audio", "video", "video")
    assert TASKS["v2a"].modalities == ("video", "audio", "audio")
    assert TASKS["s4"].modalities == ("image", "audio")
    assert TASKS["ucf"].target_field == "new_label"
    assert TASKS["ref_avs"].target_field == "output"
    assert TASKS["ave"].target_field == "label_content"
    assert TASKS["ks"].target_field == "label"


def test_every_metric_name_is_scored():
    known = {"accuracy", "bleu4", "cider", "rouge_l", "mask_j", "mask_f", "s_metric", "avvp_segment", "avvp_event"}
    for spec in TASKS.values():
        assert spec.metrics
        assert set(spec.metrics) <= known | set(metrics._SIMPLE), spec.name


def test_instruction_placeholders():
    assert TASKS["avqa"].format_instruction({"question": "Who plays?"}) == "Please answer this question: Who plays?"
    ref = TASKS["ref_avs"].format_instruction({"description": "The LOUD dog"})
    assert "<des>the loud dog</des>" in ref
    assert "question" in TASKS["avqa"].required_fields
    with pytest.raises(KeyError, match="question_text"):
        TASKS["avqa_thu"].format_instruction({"multi_choice": ["a"]})


def test_unknown_names_are_named():
    with pytest.raises(KeyError, match=r"nope.*known: a2v"):
        get_task("nope")
    with pytest.raises(KeyError, match="unknown task family"):
        subsets_of("dancing")


def test_prompt_media_follow_the_authors_loader():
    # omni_dataset.py: a2v lists audio, video1, video2 and keeps the last video placeholder; v2a lists video, audio1,
    # audio2 and keeps the last audio placeholder; every other subset lists its visual input, then its audio.
    assert get_task("a2v").prompt_media == ("audio", "visual")
    assert get_task("v2a").prompt_media == ("visual", "audio")
    assert {get_task(s).prompt_media for s in SUBSETS if s not in ("a2v", "v2a")} == {("visual", "audio")}

"""Majority-class and chance baselines: chance over the task's answer space, not the classes a test set happens to
hold."""

from __future__ import annotations

import json

import pytest
from crabplus.baselines import BASELINE_NOTE, answer_space_sizes, baselines, label_space
from crabplus.evaluate import format_table
from crabplus.interface import Prediction as P
from crabplus.sample import Sample


def _write(root, subset: str, split: str, records: list[dict]) -> str:
    path = root / subset / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return str(path)


def _samples(subset: str, refs: list[P], file: str = "") -> list[Sample]:
    return [Sample(subset, "", "", None, meta={"reference": r, "file": file, "index": i}) for i, r in enumerate(refs)]


def test_chance_is_over_the_task_classes_not_those_of_the_test_set(tmp_path):
    # ks has four actions in its data; the test set happens to hold two of them.
    actions = ["playing drum", "playing flute", "playing bell", "Playing Violin"]
    _write(tmp_path, "ks", "train", [{"action": a} for a in actions * 3])
    refs = [P(label="playing drum")] * 3 + [P(label="playing flute")]
    _write(tmp_path, "ks", "test", [{"action": r.label} for r in refs])
    sizes = answer_space_sizes(tmp_path, "ks", _samples("ks", refs))
    assert sizes == [4] * 4
    assert baselines("ks", refs, sizes) == pytest.approx({"accuracy_majority": 0.75, "accuracy_chance": 0.25})


def test_the_label_space_joins_train_test_and_references(tmp_path):
    _write(tmp_path, "meld", "train", [{"Emotion": "happy"}, {"Emotion": "Sad "}, {"other": 1}])
    _write(tmp_path, "meld", "test", [{"Emotion": "angry"}])
    assert label_space(tmp_path, "meld", [P(label="neutral"), P(label="sad")]) == {"happy", "sad", "angry", "neutral"}


@pytest.mark.parametrize(
    ("subset", "refs", "want"),
    [
        ("a2v", [P(choice=2), P(choice=2), P(choice=2), P(choice=1)],
         {"accuracy_majority": 0.75, "accuracy_chance": 0.5}),
        ("v2a", [P(choice=1)] * 3, {"accuracy_majority": 1.0, "accuracy_chance": 0.5}),
        ("ref_avs", [P(exists=False), P(exists=True, box=(1, 1, 2, 2))],
         {"exist_accuracy_majority": 0.5, "exist_accuracy_chance": 0.5}),
        ("ave", [P(events=(("dog", 0, 1),))], {}),
    ],
)  # fmt: skip
def test_registry_fixed_answer_spaces(tmp_path, subset, refs, want):
    assert baselines(subset, refs, answer_space_sizes(tmp_path, subset, _samples(subset, refs))) == pytest.approx(want)


def test_multiple_choice_chance_is_per_question(tmp_path):
    records = [
        {"answer": "drum", "multi_choice": ["drum", "bell", "flute", "violin"]},
        {"answer": "bell", "multi_choice": ["drum", "bell"]},
        {"answer": "flute", "multi_choice": "not a list"},  # falls back to the label space: drum, bell, flute
    ]
    file = _write(tmp_path, "avqa_thu", "test", records)
    refs = [P(label=r["answer"]) for r in records]
    sizes = answer_space_sizes(tmp_path, "avqa_thu", _samples("avqa_thu", refs, file))
    assert sizes == [4, 2, 3]
    assert baselines("avqa_thu", refs, sizes)["accuracy_chance"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 3) / 3)


def test_sizes_must_match_and_be_positive():
    with pytest.raises(ValueError, match="answer-space sizes"):
        baselines("ks", [P(label="a")], [0])
    with pytest.raises(ValueError, match="answer-space sizes"):
        baselines("ks", [P(label="a")], [2, 2])


def test_the_table_header_says_what_the_baselines_are():
    scores = {"ks": {"n": 4.0, "parse_error_rate": 0.0, "accuracy": 0.5, "accuracy_majority": 0.75,
                     "accuracy_chance": 0.25}}  # fmt: skip
    header = format_table(scores, {}).splitlines()[0]
    assert BASELINE_NOTE in header and "chance" in header and "answer space" in header

"""What an accuracy has to beat: the majority-class and chance rates of a subset's class accuracy on its test set.

- majority: the rate of always giving the commonest reference answer of this test set.
- chance: the expected rate of a uniform guess over the task's answer space, ``mean(1 / size)`` over the samples.
  The space is the registry's wherever it fixes one (matching: ``MATCH_CHOICES``; Ref-AVS existence: true / false;
  a multiple-choice question: its record's ``options_field`` list), else the data's: the distinct values of the
  subset's label field (``TaskSpec.label_fields``) over its ``train.json`` and ``test.json`` and the test references,
  e.g. every action class of ks, every emotion of meld, every object category of s4, not only the classes that
  happen to occur in a small test set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crabplus.data.avuie import get_field, read_records
from crabplus.interface import Prediction
from crabplus.metrics import normalize
from crabplus.sample import Sample
from crabplus.tasks import MATCH_CHOICES, get_task

#: What the header of a results table says the two rates are.
BASELINE_NOTE = (
    "majority: always the commonest reference answer of the test set; chance: a uniform guess over the task's "
    "answer space (its classes over train and test, or the options of each question)"
)

# The class accuracy of each answer kind that has one, and what a reference's class is.
_CLASS_OF = {
    "answer": ("accuracy", lambda r: normalize(r.label)),
    "match": ("accuracy", lambda r: r.choice),
    "ref": ("exist_accuracy", lambda r: r.exists),
    "box_points": ("label_accuracy", lambda r: normalize(r.label)),
    "grounding": ("label_accuracy", lambda r: normalize(r.label)),
}
_FIXED = {"match": len(MATCH_CHOICES), "ref": 2}


def label_space(root: str | Path, subset: str, refs: Sequence[Prediction] = ()) -> set[str]:
    """The distinct normalized values of ``subset``'s label field over ``<root>/<subset>/{train,test}.json`` and the
    class of each of ``refs``; empty when the subset has no label field and no reference holds one."""
    spec = get_task(subset)
    labels = {normalize(r.label) for r in refs if r.label}
    for split in ("train", "test"):
        path = Path(root) / subset / f"{split}.json"
        if not spec.label_fields or not path.is_file():
            continue
        for _, record in read_records(path)[0]:
            try:
                labels.add(normalize(str(get_field(record, spec.label_fields[0]))))
            except (KeyError, TypeError):
                continue
    return labels - {""}


def answer_space_sizes(root: str | Path, subset: str, samples: Sequence[Sample]) -> list[int]:
    """The size of each test sample's answer space (see the module docstring). A multiple-choice record whose
    options are not a list falls back to the label space."""
    kind = get_task(subset).answer_kind
    if kind in _FIXED:
        return [_FIXED[kind]] * len(samples)
    refs = [s.meta["reference"] for s in samples]
    labels = len(label_space(root, subset, refs))
    field = get_task(subset).options_field
    if field is None:
        return [labels] * len(samples)
    records: dict[str, dict[int, object]] = {}
    sizes = []
    for sample in samples:
        file = str(sample.meta.get("file"))
        if file not in records:
            records[file] = dict(read_records(file)[0]) if Path(file).is_file() else {}
        record = records[file].get(sample.meta.get("index"))
        options = record.get(field) if isinstance(record, dict) else None
        sizes.append(len(options) if isinstance(options, list) and options else labels)
    return sizes


def baselines(subset: str, refs: Sequence[Prediction], sizes: Sequence[int]) -> dict[str, float]:
    """``{"<metric>_majority": ..., "<metric>_chance": ...}`` for ``subset``'s class accuracy over ``refs``, given
    the answer-space size of each (``answer_space_sizes``); empty for subsets without a class accuracy. Raises
    ``ValueError`` when the sizes do not match the references or a space is empty."""
    spec = get_task(subset)
    if spec.answer_kind not in _CLASS_OF or not refs:
        return {}
    metric, key = _CLASS_OF[spec.answer_kind]
    if metric not in spec.metrics:
        return {}
    if len(sizes) != len(refs) or min(sizes) < 1:
        raise ValueError(f"{subset}: answer-space sizes {list(sizes)} for {len(refs)} references")
    counts = Counter(key(r) for r in refs)
    return {
        f"{metric}_majority": max(counts.values()) / len(refs),
        f"{metric}_chance": float(np.mean([1 / n for n in sizes])),
    }

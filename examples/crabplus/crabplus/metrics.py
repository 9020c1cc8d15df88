"""Per-task metrics of AV-UIE v2, driven by the registry's metric names through ``score``.

What is implemented (each averaged over samples unless said otherwise):

- ``accuracy``: class / emotion / QA answers (case- and spacing-insensitive), matching choice; ``label_accuracy``:
  the object category of AVS and ARIG answers; ``exist_accuracy``: Ref-AVS true/false.
- ``ave_accuracy``: AVE's per-segment accuracy: each of the 10 one-second segments is labelled with the event whose
  range covers its centre, or background, and compared with the reference (an unreadable answer scores 0).
  ``tiou``: for each reference event, the best temporal IoU with a predicted event of the same label (0 if none),
  averaged over events, then samples.
- AVVP (``avvp_segment``, ``avvp_event``), as the benchmark's evaluation but on parsed text: per video and class, binary
  audio / visual segment vectors (audio-visual = both); segment-level F1 = 2TP / (2TP + FP + FN) over segments,
  event-level F1 over runs of segments (a predicted run matching some reference run with IoU >= 0.5 is a TP, a
  reference run matching none a FN). F1 is averaged over the classes active in prediction or reference, then over
  videos; a video where no class is active in a modality scores 1.0 there, as the authors' ``avvp_eval_metrics.py``
  (the LLP evaluation). ``type`` = mean of audio, visual and audio-visual; ``event`` pools audio and visual counts
  per class.
- ``bleu4``, ``cider``, ``rouge_l`` through pycocoevalcap (lower-cased, punctuation-stripped tokens, since the PTB
  tokenizer needs Java); METEOR only with ``meteor=True`` (needs Java, takes seconds).
- ``box_iou``: IoU of ``[x1,y1,x2,y2]`` boxes of inclusive pixel indices (area ``(x2-x1+1)*(y2-y1+1)``, the
  convention of ``crabplus.tasks``) on samples whose reference has a box.
- ``mask_j`` (IoU) and ``mask_f`` (F-beta, beta^2 = 0.3) on masks, region-based as in AVSBench and the authors'
  evaluation (not a boundary F); both count an empty prediction of an empty mask as 1. ``s_metric``: Ref-AVS null
  split, sqrt(foreground / background) of the predicted mask (lower is better). Mask metrics need ``pred_masks`` and
  ``gt_masks`` and come twice (``mask_scores``): over the answers the authors keep (valid SAM2 prompts) and over all
  samples (``_all``), with the count excluded; Ref-AVS per split (J, F on ``test_s``/``test_u``, S on ``test_n``).

A prediction that does not parse is read as the empty answer (no label, choice, event, box or mask): it scores 0
wherever the reference holds something to find, and as right where the reference is empty too. The one partial
credit, the same in every task, is the class part ``crabplus.interface.parse`` keeps beside a malformed answer (the
object's name in s4, ms3, ARIG and Ref-AVS; Ref-AVS's true / false): ``label_accuracy`` and ``exist_accuracy`` score
it, while the answer still counts in ``parse_error_rate`` and its box scores 0. So, as in the
authors' ``avvp_eval_metrics.py``, an unparsable AVVP answer scores 1.0 on a modality (or the audio-visual overlap)
with no active class in reference; and in the all-samples mask means an empty mask of an empty reference has J = F = 1.
``parse_error_rate`` counts the unparsable. Nothing here raises on model output.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from crabplus.interface import Box, Event, Prediction, parse
from crabplus.tasks import NUM_SEGMENTS, get_task

PredictionLike = str | Prediction


def normalize(text: str | None) -> str:
    """Lower-cased, single-spaced text without edge punctuation, for comparing labels."""
    return " ".join((text or "").casefold().split()).strip(" .,;:!?\"'")


def _as_prediction(subset: str, item: object) -> Prediction:
    return item if isinstance(item, Prediction) else parse(subset, item)


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------------- accuracies


def label_accuracy(preds: Sequence[Prediction], refs: Sequence[Prediction]) -> float:
    # A label read beside an unreadable box still scores (``parse`` keeps it in every box task alike).
    return _mean([float(normalize(p.label) == normalize(r.label) != "") for p, r in zip(preds, refs)])


def choice_accuracy(preds: Sequence[Prediction], refs: Sequence[Prediction]) -> float:
    return _mean([float(p.ok and p.choice == r.choice) for p, r in zip(preds, refs)])


def exist_accuracy(preds: Sequence[Prediction], refs: Sequence[Prediction]) -> float:
    return _mean([float(p.exists is not None and p.exists == r.exists) for p, r in zip(preds, refs)])


# ------------------------------------------------------------------------------------------------------ temporal


def temporal_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """IoU of two ``(start, end)`` intervals; 0 when both are empty."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0]) if inter > 0 else (a[1] - a[0]) + (b[1] - b[0])
    return inter / union if union > 0 else 0.0


def segment_labels(events: Sequence[Event], num_segments: int = NUM_SEGMENTS) -> list[str]:
    """The label of each unit segment: the event covering its centre, else "" (background)."""
    labels = [""] * num_segments
    for label, start, end in events:
        for i in range(num_segments):
            if start <= i + 0.5 < end:
                labels[i] = normalize(label)
    return labels


def ave_accuracy(preds: Sequence[Prediction], refs: Sequence[Prediction]) -> float:
    scores = []
    for p, r in zip(preds, refs):
        # An unreadable answer is wrong everywhere, not "all background" (which would earn the background segments).
        want, got = segment_labels(r.events), segment_labels(p.events)
        scores.append(float(np.mean([a == b for a, b in zip(want, got)])) if p.ok else 0.0)
    return _mean(scores)


def mean_tiou(preds: Sequence[Prediction], refs: Sequence[Prediction]) -> float:
    scores = []
    for p, r in zip(preds, refs):
        got = p.events if p.ok else ()
        per_event = [
            max((temporal_iou((s, e), (ps, pe)) for pl, ps, pe in got if normalize(pl) == normalize(label)), default=0)
            for label, s, e in r.events
        ]
        scores.append(_mean(per_event))
    return _mean(scores)


# ---------------------------------------------------------------------------------------------------------- AVVP


def _avvp_class(label: str) -> str:
    """LLP class names spell spaces as underscores (``Violin_fiddle``); either spelling names the same class."""
    return normalize(label.replace("_", " "))


def _rows(events: Sequence[Event], classes: list[str]) -> np.ndarray:
    rows = np.zeros((len(classes), NUM_SEGMENTS), bool)
    for label, start, end in events:
        for i in range(NUM_SEGMENTS):
            if start <= i + 0.5 < end:
                rows[classes.index(_avvp_class(label)), i] = True
    return rows


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], row.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _counts(pred: np.ndarray, gt: np.ndarray, level: str) -> tuple[int, int, int]:
    """(TP, FP, FN) of one class row at segment or event level."""
    if level == "segment":
        return int((pred & gt).sum()), int((pred & ~gt).sum()), int((~pred & gt).sum())
    # event_wise_metric: a predicted run counts TP if it matches any reference run (IoU >= 0.5), else FP; a reference
    # run no prediction matches counts FN.
    pred_runs, gt_runs = _runs(pred), _runs(gt)
    tp = sum(any(temporal_iou(p, g) >= 0.5 for g in gt_runs) for p in pred_runs)
    fn = sum(not any(temporal_iou(g, p) >= 0.5 for p in pred_runs) for g in gt_runs)
    return tp, len(pred_runs) - tp, fn


def _f1(counts: Sequence[tuple[int, int, int]]) -> float:
    """Mean over classes with any activity of 2TP / (2TP + FP + FN); 1.0 when no class is active ("all true
    negatives", as ``segment_level`` / ``event_level`` of the authors' ``utils/avvp_eval_metrics.py``)."""
    active = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in counts if tp + fp + fn]
    return float(np.mean(active)) if active else 1.0


def avvp_scores(preds: Sequence[Prediction], refs: Sequence[Prediction], level: str) -> dict[str, float]:
    """AVVP F1 at ``level`` ("segment" or "event"): audio, visual, audio-visual, type and event averages."""
    per_video: dict[str, list[float]] = {"audio": [], "visual": [], "av": [], "event": []}
    for p, r in zip(preds, refs):
        p_audio, p_visual = (p.audio_events, p.visual_events) if p.ok else ((), ())
        classes = sorted({_avvp_class(e[0]) for e in (*p_audio, *p_visual, *r.audio_events, *r.visual_events)})
        pa, pv, ga, gv = (_rows(x, classes) for x in (p_audio, p_visual, r.audio_events, r.visual_events))
        audio = [_counts(pa[c], ga[c], level) for c in range(len(classes))]
        visual = [_counts(pv[c], gv[c], level) for c in range(len(classes))]
        per_video["audio"].append(_f1(audio))
        per_video["visual"].append(_f1(visual))
        per_video["av"].append(_f1([_counts(pa[c] & pv[c], ga[c] & gv[c], level) for c in range(len(classes))]))
        per_video["event"].append(_f1([tuple(np.add(a, v)) for a, v in zip(audio, visual)]))
    out = {f"avvp_{level}_{k}": _mean(v) for k, v in per_video.items()}
    out[f"avvp_{level}_type"] = _mean([out[f"avvp_{level}_{k}"] for k in ("audio", "visual", "av")])
    return out


# ------------------------------------------------------------------------------------------------------ captions


def _tokens(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", (text or "").lower()))


def caption_scores(preds: Sequence[Prediction], refs: Sequence[Prediction], meteor: bool = False) -> dict[str, float]:
    """BLEU-4, CIDEr(-D) and ROUGE-L (and METEOR if asked) through pycocoevalcap."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [_tokens(r.caption)] for i, r in enumerate(refs)}
    # An empty hypothesis breaks BLEU's length ratio; one unknown token scores as wrong all the same.
    res = {i: [_tokens(p.caption if p.ok else "") or "<unk>"] for i, p in enumerate(preds)}
    out = {
        "bleu4": float(Bleu(4).compute_score(gts, res, verbose=0)[0][3]),
        "cider": float(Cider().compute_score(gts, res)[0]),
        "rouge_l": float(Rouge().compute_score(gts, res)[0]),
    }
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        out["meteor"] = float(Meteor().compute_score(gts, res)[0])
    return out


# ----------------------------------------------------------------------------------------------- boxes and masks


def box_iou(a: Box | None, b: Box | None) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes of inclusive pixel indices (``crabplus.tasks``: a box covers
    ``(x2 - x1 + 1) * (y2 - y1 + 1)`` pixels); 0 if either is missing or inverted (``x2 < x1`` or ``y2 < y1``)."""
    if a is None or b is None or a[2] < a[0] or a[3] < a[1] or b[2] < b[0] or b[3] < b[1]:
        return 0.0
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(0, w) * max(0, h)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def mean_box_iou(preds: Sequence[Prediction], refs: Sequence[Prediction]) -> float:
    return _mean([box_iou(p.box if p.ok else None, r.box) for p, r in zip(preds, refs) if r.box is not None])


def mask_j(pred: np.ndarray, gt: np.ndarray) -> float:
    """Region IoU of two binary masks; 1 when both are empty."""
    pred, gt = _masks(pred, gt)
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def mask_f(pred: np.ndarray, gt: np.ndarray, beta2: float = 0.3) -> float:
    """Region F-beta of two binary masks (precision and recall over pixels); 1 when both are empty."""
    pred, gt = _masks(pred, gt)
    tp = np.logical_and(pred, gt).sum()
    precision = tp / pred.sum() if pred.sum() else float(tp == 0)
    recall = tp / gt.sum() if gt.sum() else float(tp == 0)
    if precision + recall == 0:
        return 0.0
    return float((1 + beta2) * precision * recall / (beta2 * precision + recall))


def s_metric(pred: np.ndarray) -> float:
    """Ref-AVS null-split S: sqrt(foreground / background) of the predicted mask (0 for an empty mask)."""
    pred = np.asarray(pred).astype(bool)
    background = (~pred).sum()
    return float(np.sqrt(pred.sum() / background)) if background else float("inf")


def _masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"predicted mask {pred.shape} and reference mask {gt.shape} differ in shape")
    return pred, gt


# ---------------------------------------------------------------------------------------------------------- score


def score(
    subset: str,
    predictions: Sequence[PredictionLike],
    references: Sequence[PredictionLike],
    *,
    pred_masks: Sequence[np.ndarray] | None = None,
    gt_masks: Sequence[np.ndarray] | None = None,
    splits: Sequence[str | None] | None = None,
    meteor: bool = False,
) -> dict[str, float]:
    """The registry's metrics of ``subset`` for model texts (or parsed ``Prediction``s) against references.

    Also reports ``n`` and ``parse_error_rate``. Mask metrics are computed only when both mask lists are given
    (``mask_scores``; ``splits`` names each Ref-AVS sample's split).
    Raises ``ValueError`` for mismatched lengths or a reference that does not parse.
    """
    spec = get_task(subset)
    if len(predictions) != len(references):
        raise ValueError(f"{subset}: {len(predictions)} predictions but {len(references)} references")
    preds = [_as_prediction(subset, p) for p in predictions]
    refs = [_as_prediction(subset, r) for r in references]
    for i, r in enumerate(refs):
        if not r.ok:
            raise ValueError(f"{subset}: reference {i} does not parse ({r.error})")
    out = {"n": float(len(preds)), "parse_error_rate": _mean([float(not p.ok) for p in preds])}
    for metric in spec.metrics:
        if metric == "accuracy":
            out[metric] = (choice_accuracy if spec.answer_kind == "match" else label_accuracy)(preds, refs)
        elif metric in _SIMPLE:
            out[metric] = _SIMPLE[metric](preds, refs)
        elif metric.startswith("avvp_"):
            out.update(avvp_scores(preds, refs, metric.removeprefix("avvp_")))
        elif metric in ("bleu4", "cider", "rouge_l"):
            if "cider" not in out:
                out.update(caption_scores(preds, refs, meteor=meteor))
        elif metric in ("mask_j", "mask_f", "s_metric"):
            if pred_masks is not None and gt_masks is not None and not any(k.startswith("mask_excluded") for k in out):
                out.update(mask_scores(subset, predictions, refs, pred_masks, gt_masks, splits))
        else:
            raise AssertionError(f"registry names unknown metric {metric!r}")
    return out


_SIMPLE = {
    "label_accuracy": label_accuracy,
    "exist_accuracy": exist_accuracy,
    "ave_accuracy": ave_accuracy,
    "tiou": mean_tiou,
    "box_iou": mean_box_iou,
}


def mask_scores(
    subset: str,
    texts: Sequence[PredictionLike],
    refs: Sequence[Prediction],
    pred_masks: Sequence[np.ndarray],
    gt_masks: Sequence[np.ndarray],
    splits: Sequence[str | None] | None = None,
) -> dict[str, float]:
    """Mask J / F (and S on Ref-AVS's null split), by the authors' protocol and over all samples.

    Follows ``seg/scripts/inference_3.py`` and ``inference_ref_3.py`` (GeWu-Lab/Crab_Plus): ``mask_j``/``mask_f``
    average the answers whose raw text prompts SAM2 validly in the authors' exact grammar
    (``crabplus.segment.authors_prompt``; a Ref-AVS "false" is valid, an empty mask), ``mask_j_all``/``mask_f_all``
    every sample (with the mask it was given: ``crabplus.segment.mask_prompt``, empty when no parse reads it),
    ``mask_excluded`` counts the excluded. ``texts`` are the model's answers; a parsed ``Prediction`` has lost the
    spacing their grammar reads, so it raises ``ValueError``. Ref-AVS is scored per split, the suffix naming it: J and F
    on ``test_s`` (seen) and ``test_u`` (unseen), S on ``test_n`` (null), ``s_metric_test_n_infinite`` counting the
    full-frame masks whose infinite S is dropped from the mean, as theirs. Without ``splits`` a Ref-AVS sample whose
    reference is absent counts as null, the others as one unnamed split.
    """
    from crabplus.segment import authors_prompt

    if not len(pred_masks) == len(gt_masks) == len(refs) == len(texts):
        raise ValueError(f"{len(pred_masks)} predicted and {len(gt_masks)} reference masks for {len(refs)} samples")
    if splits is not None and len(splits) != len(refs):
        raise ValueError(f"{len(splits)} splits for {len(refs)} samples")
    ref_kind = get_task(subset).answer_kind == "ref"
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{subset}: mask metrics need the answer texts (the authors' grammar reads their spacing)")
    valid = [authors_prompt(subset, t).invalid is None for t in texts]
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, r in enumerate(refs):
        split = (splits[i] if splits is not None else None) or ""
        null = split == "test_n" if split else ref_kind and not r.exists
        groups.setdefault((split if ref_kind else "", null), []).append(i)
    out: dict[str, float] = {}
    for (split, null), members in sorted(groups.items()):
        sfx = f"_{split}" if split else ""
        chosen = {"": [i for i in members if valid[i]], "_all": members}
        out[f"mask_excluded{sfx}"] = float(len(members) - len(chosen[""]))
        if null:
            for tag, idx in chosen.items():
                out[f"s_metric{sfx}{tag}"] = _mean([v for v in (s_metric(pred_masks[i]) for i in idx) if v < math.inf])
            out[f"s_metric{sfx}_infinite"] = float(sum(s_metric(pred_masks[i]) == math.inf for i in members))
            continue
        for tag, idx in chosen.items():
            out[f"mask_j{sfx}{tag}"] = _mean([mask_j(pred_masks[i], gt_masks[i]) for i in idx])
            out[f"mask_f{sfx}{tag}"] = _mean([mask_f(pred_masks[i], gt_masks[i]) for i in idx])
    return out

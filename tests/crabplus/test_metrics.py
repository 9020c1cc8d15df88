"""Each metric against hand-computed cases; unreadable predictions score as wrong and never raise."""

import math

import numpy as np
import pytest
from crabplus import metrics
from crabplus.interface import Prediction as P
from crabplus.interface import parse
from crabplus.metrics import box_iou, mask_f, mask_j, s_metric, score, temporal_iou
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider


def test_classification_accuracy_ignores_case_and_spacing():
    refs = [P(label="Playing Drums"), P(label="dog"), P(label="cat")]
    preds = ["<answer> playing   drums </answer>", "<answer>Dog.</answer>", "no tag at all"]
    out = score("ks", preds, refs)
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["parse_error_rate"] == pytest.approx(1 / 3)
    assert out["n"] == 3


def test_matching_and_true_false():
    assert score("a2v", ["<answer>1</answer>", "<answer>one</answer>", "?"], [P(choice=1), P(choice=2), P(choice=1)])[
        "accuracy"
    ] == pytest.approx(1 / 3)
    refs = [P(exists=True, label="dog", box=(0, 0, 10, 10)), P(exists=False)]
    true = "<answer>true</answer> The referred object is dog. Its box is {}, and points on it are [1,1], [2,2], [3,3]."
    out = score("ref_avs", [true.format("[0,0,10,10]"), true.format("[1,1,2,2]")], refs)
    assert out["exist_accuracy"] == 0.5
    assert out["box_iou"] == 1.0  # over references with a box only


def test_temporal_iou_and_ave_accuracy():
    assert temporal_iou((0, 4), (2, 6)) == pytest.approx(2 / 6)
    assert temporal_iou((0, 1), (2, 3)) == 0.0
    ref = [P(events=(("dog", 0, 8),))]
    assert score("ave", [P(events=(("dog", 2, 8),))], ref)["ave_accuracy"] == pytest.approx(0.8)
    # Wrong label: only the two background segments (8, 9) agree.
    assert score("ave", [P(events=(("cat", 0, 8),))], ref)["ave_accuracy"] == pytest.approx(0.2)
    assert score("ave", ["gibberish"], ref)["ave_accuracy"] == 0.0
    assert score("ave", [P(events=(("Dog", 2, 8),))], ref)["tiou"] == pytest.approx(0.75)


def test_unav_tiou_matches_labels():
    ref = P(events=(("dog", 0, 4), ("cat", 2, 6)))
    pred = P(events=(("dog", 0, 2), ("bird", 2, 6)))
    assert score("unav", [pred], [ref])["tiou"] == pytest.approx((0.5 + 0.0) / 2)


def test_avvp_segment_and_event_f1():
    ref = P(audio_events=(("dog", 0, 10),), visual_events=(("dog", 0, 5),))
    pred = P(audio_events=(("dog", 0, 4),), visual_events=(("dog", 0, 5),))
    out = score("avvp", [pred], [ref])
    # Segment level: audio TP 4, FN 6 -> 8/14; visual exact -> 1; audio-visual: both 0-4 vs ref 0-5 -> 8/9.
    assert out["avvp_segment_audio"] == pytest.approx(8 / 14)
    assert out["avvp_segment_visual"] == 1.0
    assert out["avvp_segment_av"] == pytest.approx(8 / 9)
    assert out["avvp_segment_type"] == pytest.approx((8 / 14 + 1 + 8 / 9) / 3)
    assert out["avvp_segment_event"] == pytest.approx(2 * 9 / (2 * 9 + 6))  # pooled: TP 4+5, FN 6
    # Event level: audio run 0-4 vs 0-10 has IoU 0.4 < 0.5 -> no match; visual matches; av 0-4 vs 0-5 IoU 0.8.
    assert out["avvp_event_audio"] == 0.0
    assert out["avvp_event_visual"] == 1.0
    assert out["avvp_event_av"] == 1.0
    assert out["avvp_event_event"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    garbage = score("avvp", ["nothing here"], [ref])
    assert garbage["avvp_segment_type"] == 0.0 and garbage["avvp_event_event"] == 0.0


def test_avvp_averages_over_active_classes():
    ref = P(audio_events=(("dog", 0, 2), ("cat", 5, 7)))
    pred = P(audio_events=(("dog", 0, 2), ("bird", 5, 7)))
    # dog F1 1, cat F1 0 (missed), bird F1 0 (false alarm): mean over the three active classes.
    assert score("avvp", [pred], [ref])["avvp_segment_audio"] == pytest.approx(1 / 3)


def test_captions_go_through_pycocoevalcap():
    refs = ["A red circle moves to the left while a low tone plays.", "A blue triangle moves right."]
    preds = ["a red circle moves to the left while a low tone plays", "a green square stays"]
    out = score("avcap", preds, [P(caption=r) for r in refs])
    gts = {0: [metrics._tokens(refs[0])], 1: [metrics._tokens(refs[1])]}
    res = {0: [metrics._tokens(preds[0])], 1: [metrics._tokens(preds[1])]}
    assert out["bleu4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    assert out["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert 0 < out["rouge_l"] < 1
    perfect = score("avcap", refs, [P(caption=r) for r in refs])
    assert perfect["bleu4"] == pytest.approx(1.0) and perfect["rouge_l"] == pytest.approx(1.0)
    assert score("avcap", ["", "  "], [P(caption=r) for r in refs])["cider"] == 0.0


def test_box_iou():
    # inclusive pixel indices (crabplus.tasks): [0,0,10,10] covers 11 x 11 pixels; overlap with [5,5,15,15] is 6 x 6
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(36 / (2 * 121 - 36))
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), None) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 1.0  # one pixel
    assert box_iou((0, 0, 10, 10), (11, 0, 20, 10)) == 0.0  # adjacent, no shared pixel
    assert box_iou((5, 0, 4, 10), (0, 0, 10, 10)) == 0.0  # inverted
    refs = [P(label="dog", box=(0, 0, 10, 10))] * 2
    preds = ["The object making the sound in the video is dog. [5,5,15,15] [6,6] [7,7] [8,8]", "broken"]
    out = score("s4", preds, refs)
    assert out["box_iou"] == pytest.approx(36 / 206 / 2)
    assert out["label_accuracy"] == 0.5
    assert "mask_j" not in out  # mask metrics need masks


def test_mask_j_and_f_by_hand():
    pred, gt = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    pred[0, :4] = True  # 4 pixels
    gt[0, 1:4] = True
    gt[1, :3] = True  # 6 pixels, 3 shared
    assert mask_j(pred, gt) == pytest.approx(3 / 7)
    precision, recall = 3 / 4, 3 / 6
    assert mask_f(pred, gt) == pytest.approx(1.3 * precision * recall / (0.3 * precision + recall))
    empty = np.zeros((4, 4), bool)
    assert mask_j(empty, empty) == 1.0 and mask_f(empty, empty) == 1.0
    assert mask_j(empty, gt) == 0.0 and mask_f(empty, gt) == 0.0
    with pytest.raises(ValueError, match="shape"):
        mask_j(pred, np.zeros((2, 2)))


def _masks(*rows: int) -> np.ndarray:
    m = np.zeros((4, 4), bool)
    m[: rows[0]] = True
    return m


def test_segmentation_reports_the_authors_mean_and_all_samples():
    # seg/scripts/inference_3.py averages J and F over the answers that pass extract_coordinates and
    # validate_coordinates only; unparsable, out-of-range and box-without-points answers are left out of the mean.
    gt = _masks(2)
    ref = P(label="dog", box=(0, 0, 3, 1))
    texts = ["dog [0,0,3,1] [1,1]", "dog [0,0,3,1]", "dog [0,0,300,1] [1,1]", "nothing"]
    preds = [gt, np.zeros((4, 4), bool), np.zeros((4, 4), bool), np.zeros((4, 4), bool)]
    out = score("s4", texts, [ref] * 4, pred_masks=preds, gt_masks=[gt] * 4)
    assert out["mask_j"] == 1.0 and out["mask_f"] == 1.0  # the authors' protocol: the one valid answer
    assert out["mask_excluded"] == 3.0
    assert out["mask_j_all"] == 0.25 and out["mask_f_all"] == 0.25  # every sample, excluded ones as empty masks


def test_spaces_inside_coordinates_leave_the_answer_out_of_the_authors_mean_only():
    # inference_3.py's grammar r"\[(\d+),(\d+)(?:,(\d+),(\d+))?\]" has no spaces: "[0, 0, 3, 1] [1, 1]" fails
    # extract_coordinates there, so it is excluded from their J and F; our tolerant parse still prompts SAM2 with it
    # for the all-samples mean.
    gt = _masks(2)
    ref = P(label="dog", box=(0, 0, 3, 1))
    texts = ["dog [0,0,3,1] [1,1]", "dog [0, 0, 3, 1] [1, 1]", "dog [0,0,3,1] [1, 1]"]  # the last: a box alone
    half = _masks(1)
    out = score("s4", texts, [ref] * 3, pred_masks=[gt, half, half], gt_masks=[gt] * 3)
    assert out["mask_excluded"] == 2.0 and out["mask_j"] == 1.0
    assert out["mask_j_all"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    with pytest.raises(ValueError, match="answer texts"):  # parsed answers have lost the spacing their grammar reads
        score("s4", [parse("s4", t) for t in texts], [ref] * 3, pred_masks=[gt] * 3, gt_masks=[gt] * 3)


def test_s_metric_and_ref_avs_scores_per_split():
    half = _masks(2)
    assert s_metric(half) == 1.0
    assert s_metric(np.zeros((4, 4), bool)) == 0.0
    assert math.isinf(s_metric(np.ones((2, 2), bool)))
    # inference_ref_3.py --split test_s / test_u: J and F; --split test_n: S, infinite S dropped from the mean.
    dog = P(exists=True, label="dog", box=(0, 0, 3, 1))
    refs = [dog, dog, dog, P(exists=False), P(exists=False), P(exists=False)]
    splits = ["test_s", "test_u", "test_u", "test_n", "test_n", "test_n"]
    texts = ["<answer>true</answer> [0,0,3,1]", "<answer>true</answer> [0,0,3,1]", "<answer>false</answer>",
             "<answer>false</answer>", "<answer>true</answer> [0,0,3,3] [1,1]", "no answer"]  # fmt: skip
    full, empty = np.ones((4, 4), bool), np.zeros((4, 4), bool)
    pred = [half, _masks(1), empty, empty, full, empty]
    gt = [half, half, half, empty, empty, empty]
    out = score("ref_avs", texts, refs, pred_masks=pred, gt_masks=gt, splits=splits)
    assert out["mask_j_test_s"] == 1.0 and out["mask_f_test_s"] == 1.0
    assert out["mask_j_test_u"] == pytest.approx((0.5 + 0.0) / 2)  # the "false" answer is scored: an empty mask
    assert out["mask_excluded_test_u"] == 0.0
    assert out["s_metric_test_n"] == 0.0 and out["s_metric_test_n_infinite"] == 1.0  # full mask: S inf, dropped
    assert out["mask_excluded_test_n"] == 1.0 and out["s_metric_test_n_all"] == 0.0
    assert not {"mask_j", "s_metric", "mask_j_test_n", "s_metric_test_s"} & set(out)
    with pytest.raises(ValueError, match="masks"):
        score("s4", ["[1,2,3,4]"], [P(label="a", box=(1, 2, 3, 4))], pred_masks=[], gt_masks=[])


def test_bad_calls_raise_clearly():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score("ks", ["a", "b"], [P(label="a")])
    with pytest.raises(ValueError, match="reference 0 does not parse"):
        score("ks", ["<answer>a</answer>"], ["not a target"])
    with pytest.raises(KeyError, match="unknown AV-UIE"):
        score("nope", [], [])


@pytest.mark.parametrize("subset", ["ks", "a2v", "ave", "unav", "avvp", "avcap", "s4", "ref_avs", "arig"])
def test_garbage_predictions_never_crash(subset):
    junk = ["", "<answer>", "[1,2", "<event>x</event><range>a,b</range>", "\x00" * 5, "<visual_event>,(</visual_event>"]
    ref = {
        "ks": P(label="dog"),
        "a2v": P(choice=1),
        "ave": P(events=(("dog", 0, 3),)),
        "unav": P(events=(("dog", 0, 3),)),
        "avvp": P(audio_events=(("dog", 0, 3),), visual_events=(("dog", 0, 3),)),  # (a quiet modality would score 1)
        "avcap": P(caption="a dog"),
        "s4": P(label="dog", box=(0, 0, 5, 5)),
        "ref_avs": P(exists=True, label="dog", box=(0, 0, 5, 5)),
        "arig": P(label="dog", box=(0, 0, 5, 5)),
    }[subset]
    out = score(subset, junk, [ref] * len(junk))
    assert all(isinstance(v, float) for v in out.values())
    scores = [v for k, v in out.items() if k not in ("n", "parse_error_rate") and not math.isnan(v)]
    # Junk text is a (bad) caption, so it may share a word with the reference; anything else scores zero.
    assert scores and max(scores) <= (0.1 if subset == "avcap" else 1e-6)


def test_avvp_video_without_active_class_scores_one():
    # GeWu-Lab/Crab_Plus utils/avvp_eval_metrics.py, segment_level / event_level: a modality where no class is active
    # in prediction and reference leaves F_a (F_v, F, F_av) empty -> "f = 1.0  # all true negatives".
    quiet = P(visual_events=(("dog", 0, 10),))  # no audio event at all, in prediction and reference
    loud_ref = P(audio_events=(("speech", 0, 5),))
    loud_pred = P(audio_events=(("speech", 0, 10),))
    out = score("avvp", [quiet, loud_pred], [quiet, loud_ref])
    # video 1: audio 1.0 (no class), visual 1.0, av 1.0 (SO_a * SO_v = 0 = GT_av), pooled 1.0.
    # video 2, segments: audio TP 5 FP 5 -> 10/15; visual 1.0 (no class); av 1.0 (no class); pooled as audio, 10/15.
    assert out["avvp_segment_audio"] == pytest.approx((1 + 10 / 15) / 2)
    assert out["avvp_segment_visual"] == 1.0 and out["avvp_segment_av"] == 1.0
    assert out["avvp_segment_type"] == pytest.approx(((1 + 10 / 15) / 2 + 1 + 1) / 3)
    assert out["avvp_segment_event"] == pytest.approx((1 + 10 / 15) / 2)
    # video 2, events: predicted run 0-10 vs reference 0-5: sum(x1*x2) = 5 >= 0.5 * 10 -> TP, so F 1.0 everywhere.
    assert out["avvp_event_audio"] == 1.0 and out["avvp_event_type"] == 1.0 and out["avvp_event_event"] == 1.0


def test_avvp_llp_class_spelling_matches_either_way():
    # LLP's evaluation files write Violin_fiddle; an answer may write Violin fiddle.
    ref = P(audio_events=(("Violin_fiddle", 0, 10),))
    assert score("avvp", [P(audio_events=(("violin fiddle", 0, 10),))], [ref])["avvp_segment_audio"] == 1.0


def test_label_scores_alike_when_the_box_is_unreadable_in_s4_and_arig():
    from crabplus.metrics import score

    s4 = score("s4", ["The object making the sound in the video is dog. Its bounding box is [40,40,10,10]."],
               [P(label="dog", box=(1, 1, 9, 9))])  # fmt: skip
    arig = score("arig", ["The sounding object is dog. Its coordinate of top left corner is (a,b)."],
                 [P(label="dog", box=(1, 1, 9, 9))])  # fmt: skip
    assert s4["parse_error_rate"] == arig["parse_error_rate"] == 1.0
    assert s4["label_accuracy"] == arig["label_accuracy"] == 1.0
    assert s4["box_iou"] == arig["box_iou"] == 0.0


def test_an_unparsable_avvp_answer_scores_1_where_the_reference_has_no_class():
    # avvp_eval_metrics.py segment_level / event_level: a modality with no active class in prediction and reference
    # scores 1.0 ("all true negatives"), so garbage scores 1.0 there; on the real LLP test split 174 of 1200 videos
    # have no audio-visual event (and all-garbage answers score avvp_segment_av 0.145).
    ref = P(visual_events=(("Dog", 0, 4),))  # no audio event, so no audio-visual one either
    for garbage in ("garbage", "<audio> nonsense </audio>"):
        out = score("avvp", [garbage], [ref])
        assert out["parse_error_rate"] == 1.0
        for level in ("segment", "event"):
            assert out[f"avvp_{level}_audio"] == 1.0 and out[f"avvp_{level}_av"] == 1.0
            assert out[f"avvp_{level}_visual"] == 0.0 and out[f"avvp_{level}_event"] == 0.0


@pytest.mark.parametrize(
    ("subset", "text"),
    [
        ("s4", "The object making the sound in the video is dog. Points on it are [5,6], [7,8], [9,9]."),
        ("ms3", "The object making the sound in the video is dog. Its bounding box is [0,0,10,10]."),
        ("arig", "The sounding object is dog. Its bounding box is [0,0,10,10] or [1,1,10,10]."),
    ],
)
def test_partial_credit_is_the_same_in_every_box_task(subset, text):
    """A malformed answer is a parse error and its location scores 0, but the name read beside it scores alike."""
    out = score(subset, [text], [P(label="dog", box=(0, 0, 10, 10))])
    assert (out["parse_error_rate"], out["box_iou"], out["label_accuracy"]) == (1.0, 0.0, 1.0)


def test_a_true_answer_without_a_box_keeps_its_existence_but_not_a_location():
    refs = [P(exists=True, label="dog", box=(0, 0, 10, 10))]
    out = score("ref_avs", ["<answer>true</answer> The referred object is dog. Points [5,6], [7,8], [9,9]."], refs)
    assert (out["parse_error_rate"], out["box_iou"], out["exist_accuracy"]) == (1.0, 0.0, 1.0)

"""The unified text interface: round trips through format_target/parse, the authors' formats, and fuzzing."""

import re

import pytest
from crabplus.interface import _NONE_WORDS, Prediction, format_target, parse
from crabplus.tasks import NUM_POINTS, SUBSETS
from hypothesis import given, settings
from hypothesis import strategies as st

_WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-'", min_size=1, max_size=8)
# Words that mean "no label" in the interface ("none", "nothing", ...) are not labels a target can carry.
LABELS = st.lists(_WORDS, min_size=1, max_size=4).map(" ".join).filter(lambda s: s.lower() not in _NONE_WORDS)
OBJECT_LABELS = LABELS
EVENT_LABELS = st.lists(_WORDS, min_size=1, max_size=3).map(", ".join).filter(lambda s: s.lower() not in _NONE_WORDS)
TIMES = st.integers(0, 20).map(lambda k: k / 2)
EVENTS = st.tuples(EVENT_LABELS, TIMES, TIMES).map(lambda e: (e[0], min(e[1:]), max(e[1:])))
COORD = st.integers(0, 223)
_SPAN = st.tuples(COORD, COORD).filter(lambda p: p[0] != p[1]).map(sorted)
BOX = st.tuples(_SPAN, _SPAN).map(lambda xy: (xy[0][0], xy[1][0], xy[0][1], xy[1][1]))  # x1 < x2, y1 < y2
POINTS = st.lists(st.tuples(COORD, COORD), min_size=NUM_POINTS, max_size=NUM_POINTS).map(tuple)
CORNERS = "Its coordinate of top left corner is ({},{}) and coordinate of bottom right corner is ({},{})."
REASONING = st.text(alphabet="abcdefghij klmnop.,", max_size=60)


def _round_trip(subset: str, structured: Prediction, reasoning: str = "") -> None:
    text = format_target(subset, structured, reasoning)
    parsed = parse(subset, text)
    assert parsed.error is None, (text, parsed.error)
    assert parsed == structured, text


@settings(max_examples=60, deadline=None)
@given(subset=st.sampled_from(["ks", "ucf", "meld", "avqa", "avqa_thu", "dfew"]), label=LABELS, why=REASONING)
def test_answer_round_trip(subset, label, why):
    _round_trip(subset, Prediction(label=label), why)


@settings(max_examples=20, deadline=None)
@given(subset=st.sampled_from(["a2v", "v2a"]), choice=st.sampled_from([1, 2]), why=REASONING)
def test_match_round_trip(subset, choice, why):
    _round_trip(subset, Prediction(choice=choice), why)


@settings(max_examples=60, deadline=None)
@given(subset=st.sampled_from(["ave", "unav"]), events=st.lists(EVENTS, min_size=1, max_size=4), why=REASONING)
def test_events_round_trip(subset, events, why):
    _round_trip(subset, Prediction(events=tuple(events)), why)


@settings(max_examples=60, deadline=None)
@given(audio=st.lists(EVENTS, max_size=4), visual=st.lists(EVENTS, max_size=4), why=REASONING)
def test_avvp_round_trip(audio, visual, why):
    _round_trip("avvp", Prediction(audio_events=tuple(audio), visual_events=tuple(visual)), why)


@settings(max_examples=40, deadline=None)
@given(caption=st.text(alphabet="abcdefgh ,.'!-", min_size=1).filter(str.strip))
def test_caption_round_trip(caption):
    text = format_target("avcap", Prediction(caption=caption))
    assert parse("avcap", text) == Prediction(caption=" ".join(caption.split()))


@settings(max_examples=60, deadline=None)
@given(subset=st.sampled_from(["s4", "ms3"]), label=OBJECT_LABELS, box=BOX, points=POINTS, why=REASONING)
def test_box_points_round_trip(subset, label, box, points, why):
    _round_trip(subset, Prediction(label=label, box=box, points=points), why)


@settings(max_examples=40, deadline=None)
@given(label=OBJECT_LABELS, box=BOX, why=REASONING)
def test_grounding_round_trip(label, box, why):
    _round_trip("arig", Prediction(label=label, box=box), why)


@settings(max_examples=60, deadline=None)
@given(exists=st.booleans(), label=OBJECT_LABELS, box=BOX, points=POINTS, why=REASONING)
def test_ref_round_trip(exists, label, box, points, why):
    structured = Prediction(exists=True, label=label, box=box, points=points) if exists else Prediction(exists=False)
    _round_trip("ref_avs", structured, why)


FRAGMENTS = st.sampled_from(
    ["<answer>", "</answer>", "<event>", "</event>", "<range>", "</range>", "<visual_event>", "</audio_event>",
     "<audio>", "(", ")", "[", "]", ",", " ", "1", "99999999999999999999999999999999", "1e400", ".", "true", "is",
     "top left corner is (", "bottom right corner is (", "<obj>", "</s>", "none", "\n", "-", "é", "\x00"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(subset=st.sampled_from(SUBSETS), text=st.one_of(st.text(), st.lists(FRAGMENTS).map("".join)))
def test_parse_never_raises(subset, text):
    result = parse(subset, text)
    assert isinstance(result, Prediction)
    assert result.error is None or isinstance(result.error, str)


def test_authors_formats():
    ave = parse(
        "ave", "So the event is <event> Male speech, man speaking </event>, and the time range is <range> 0,8 </range>."
    )
    assert ave.events == (("Male speech, man speaking", 0.0, 8.0),)
    avvp = parse("avvp", "<visual_event>Chainsaw,(0 10)</visual_event> and <audio_event>Chainsaw,(0 10)</audio_event>")
    assert avvp.audio_events == avvp.visual_events == (("Chainsaw", 0.0, 10.0),)
    crab = parse("avvp", "<visual>Chainsaw,(0 1),(3 6)</visual> and <audio>Dog,(2 4); Chainsaw,(0 10)</audio>")
    assert crab.visual_events == (("Chainsaw", 0.0, 1.0), ("Chainsaw", 3.0, 6.0))
    assert crab.audio_events == (("Chainsaw", 0.0, 10.0), ("Dog", 2.0, 4.0))
    assert parse("avqa", "... So the answer is <answer> saxophone </answer>.").label == "saxophone"
    arig = (
        "The sounding object is dog. Its coordinate of top left corner is (3,4) and coordinate of bottom right corner "
        "is (50,60)"
    )
    assert parse("arig", arig) == Prediction(label="dog", box=(3, 4, 50, 60))
    assert parse("arig", "The sounding object is cat. Its coordinates are <obj>(1,2)(3,4)</obj>.").box == (1, 2, 3, 4)
    s4 = parse(
        "s4", "The object making the sound in the video is guitar. Box [10,20,30,40] points [15,25],[16,26],[17,27]"
    )
    assert (s4.label, s4.box, s4.points) == ("guitar", (10, 20, 30, 40), ((15, 25), (16, 26), (17, 27)))
    assert parse("ref_avs", "<answer>false</answer>") == Prediction(exists=False)
    ref = "<answer>true</answer> The referred object is dog. Its bounding box is [1,2,3,4], and points on it are "
    assert parse("ref_avs", ref + "[2,3], [2,3], [2,3].").box == (1, 2, 3, 4)
    assert parse("a2v", "<answer>1</answer>.").choice == 1
    assert parse("v2a", "<answer> the second audio </answer>").choice == 2


def test_spacing_and_case_tolerated():
    assert parse("ks", "<ANSWER>  Playing   Drums</Answer >").label == "Playing Drums"
    assert parse("ave", "< event >dog</EVENT> <Range> 2 - 5 </range>").events == (("dog", 2.0, 5.0),)
    spaced = "The object making the sound in the video is dog. [ 1 , 2 , 3 , 4 ] and [ 5,6 ], [7 ,8],[ 9,9 ]"
    assert parse("s4", spaced).points == ((5, 6), (7, 8), (9, 9))
    assert parse("ref_avs", "<Answer> TRUE </Answer> [1,2,3,4]").exists is True
    assert parse("ks", "x <answer>cat</answer> <|im_end|> <answer>dog</answer>").label == "cat"


@pytest.mark.parametrize(
    ("subset", "text", "reason"),
    [
        ("ks", "the answer is dog", "no <answer>"),
        ("ks", "<answer>  </answer>", "empty"),
        ("a2v", "<answer>1 or 2</answer>", "neither or both"),
        ("ave", "<event>dog</event>", "1 <event> tags but 0 <range>"),
        ("ave", "<event>dog</event><range>5,2</range>", "ends before"),
        ("avvp", "no tags at all", "no <visual_event>"),
        ("avvp", "<visual_event>none</visual_event><audio_event>just words</audio_event>", "unreadable audio"),
        ("s4", "a dog", "no [x1,y1,x2,y2]"),
        ("arig", "The sounding object is dog.", "no box"),
        ("ref_avs", "<answer>true</answer> somewhere", "answered true but"),
        ("ref_avs", "it is there", "no <answer>true"),
        ("avcap", "   ", "empty caption"),
        # Only well-formed answers parse: unterminated and nested tags, empty boxes, in every answer kind.
        ("ks", "tru a Hz <answer>tru a Hz", "unterminated <answer>"),
        ("ks", "so <answer> dog", "unterminated <answer>"),
        ("ks", "<answer> a <answer> b </answer>", "inside an unterminated <answer>"),
        ("ks", "<answer> a </answer> b </answer>", "closes no open"),
        ("a2v", "<answer> 1", "unterminated <answer>"),
        ("ref_avs", "<answer>true <answer>false</answer> [1,2,3,4]", "inside an unterminated"),
        ("ave", "<event> dog <range> 1,2 </range>", "inside an unterminated <event>"),
        ("ave", "<event> dog </event> <range> 1,2", "unterminated <range>"),
        ("avvp", "<visual_event>Dog,(0 1)</visual_event> and <audio_event>Dog,(0 1)", "unterminated <audio>"),
        ("avvp", "<visual_event>Dog,(0 1)<audio_event>Dog,(0 1)</audio_event></visual_event>", "inside"),
        ("s4", "The object making the sound in the video is dog. [30,30,10,10]", "empty"),
        ("arig", f"The sounding object is dog. {CORNERS.format(9, 9, 9, 20)}", "empty"),
        ("ref_avs", "<answer>true</answer> The referred object is dog. [5,5,5,9]", "empty"),
    ],
)
def test_errors_say_why(subset, text, reason):
    result = parse(subset, text)
    assert result.error is not None and reason in result.error, result


def test_non_text_prediction():
    assert "not text" in parse("ks", None).error
    assert "not text" in parse("ks", 3).error


@pytest.mark.parametrize(
    ("subset", "structured", "reasoning", "message"),
    [
        ("ks", Prediction(label=""), "", "label is empty"),
        ("ks", Prediction(label="a <b>"), "", "delimiter"),
        ("ks", Prediction(label="dog."), "", "punctuation"),
        ("a2v", Prediction(choice=3), "", "one of \\(1, 2\\)"),
        ("ave", Prediction(), "", "at least one event"),
        ("ave", Prediction(events=(("dog", 5, 2),)), "", "start <= end"),
        ("avcap", Prediction(caption="x"), "why", "no separate reasoning"),
        ("s4", Prediction(label="dog"), "", "box must be"),
        ("ref_avs", Prediction(), "", "exists must be"),
    ],
)
def test_format_errors_name_the_field(subset, structured, reasoning, message):
    with pytest.raises(ValueError, match=message):
        format_target(subset, structured, reasoning)


@pytest.mark.parametrize(
    ("subset", "text"),
    [
        ("s4", "The object making the sound in the video is dog. Its bounding box is [40,40,10,10]."),
        ("ms3", "The object making the sound in the video is dog. Its bounding box is garbage."),
        ("arig", "The sounding object is dog. Its coordinate of top left corner is (a,b)."),
        ("arig", f"The sounding object is dog. {CORNERS.format(40, 40, 10, 10)}"),
        ("ref_avs", "<answer>true</answer> The referred object is dog. Its bounding box is [40,40,10,10]."),
    ],
)
def test_a_readable_name_beside_an_unreadable_box_is_kept_alike_in_every_box_task(subset, text):
    parsed = parse(subset, text)
    assert parsed.error is not None and parsed.box is None
    assert parsed.label == "dog"  # partial credit the same way in s4, ms3, arig and ref_avs


def test_structure_keeps_falsy_but_meaningful_values():
    assert Prediction(exists=False).structure() == {"exists": False}
    assert Prediction(choice=0, label="").structure() == {"choice": 0, "label": ""}
    assert Prediction(box=(0, 0, 0, 0), points=((0, 0),)).structure() == {"box": (0, 0, 0, 0), "points": ((0, 0),)}
    assert Prediction(error="x").structure() == {}


# ------------------------------------------------------------------------ one strict grammar per answer kind

_S4_NAME = "The object making the sound in the video is dog."
_REF_NAME = "<answer>true</answer> The referred object is dog."


@pytest.mark.parametrize(
    ("subset", "text", "reason", "kept"),
    [
        # Points without a box, a box without points, too few points: not the answer the instruction asks for.
        ("s4", f"{_S4_NAME} Points on it are [5,6], [7,8], [9,9].", "no [x1,y1,x2,y2] box", {"label": "dog"}),
        ("ms3", f"{_S4_NAME} [5,6] [7,8] [9,9]", "no [x1,y1,x2,y2] box", {"label": "dog"}),
        ("ref_avs", f"{_REF_NAME} Points [5,6], [7,8], [9,9].", "no [x1,y1,x2,y2]", {"exists": True, "label": "dog"}),
        ("s4", f"{_S4_NAME} Its bounding box is [1,2,30,40].", "0 [x,y] points", {"label": "dog"}),
        ("ref_avs", f"{_REF_NAME} [1,2,30,40] [5,6]", "1 [x,y] points", {"exists": True, "label": "dog"}),
        ("s4", f"{_S4_NAME} [1,2,30,40] [1,2,3,4] [5,6] [7,8] [9,9]", "2 boxes", {"label": "dog"}),
        (
            "arig",
            f"The sounding object is dog. {CORNERS.format(1, 2, 30, 40)} [1,2,30,40]",
            "2 boxes",
            {"label": "dog"},
        ),
        ("s4", "[1,2,30,40] [5,6] [7,8] [9,9]", "no object name", {}),
        ("ref_avs", "<answer>false</answer> It is at [1,2,30,40].", "false but gives coordinates", {"exists": False}),
        ("ref_avs", "<answer>maybe</answer>", "not true or false", {}),
        # One <answer> tag: never the first of several (Ref-AVS before) nor the last (answers before).
        ("ks", "<answer> dog </answer> no, <answer> cat </answer>", "2 <answer> tags", {}),
        ("a2v", "<answer> 1 </answer> <answer> 2 </answer>", "2 <answer> tags", {}),
        ("ref_avs", "<answer>false</answer> <answer>true</answer>", "2 <answer> tags", {}),
        # Events and AVVP read whole.
        ("ave", "<range> 1,2 </range> <event> dog </event>", "followed by its <range>", {}),
        ("ave", "<event> dog </event> <range> 1,2 and 5 </range>", "unreadable event", {}),
        ("avvp", "<visual_event>Dog,(0 1)</visual_event>", "0 audio", {}),
        ("avvp", "<visual_event>none</visual_event> <audio_event>Dog,(0 1); ???</audio_event>", "unreadable audio", {}),
    ],
)
def test_only_well_formed_answers_parse(subset, text, reason, kept):
    result = parse(subset, text)
    assert result.error is not None and reason in result.error, result
    assert result.structure() == kept  # partial credit: only the class part (name, true/false), alike everywhere


def _corrupt(draw, subset: str, text: str) -> str:
    """A change that leaves ``text`` (a well-formed target) outside its subset's grammar."""
    kind = {"s4": "box", "ms3": "box", "ref_avs": "box", "arig": "grounding"}.get(subset, "answer")
    if kind == "box":
        how = draw(st.sampled_from(["drop box", "drop point", "add box", "add point"]))
        if how == "drop box":
            return re.sub(r"\[\d+,\d+,\d+,\d+\]", "", text)
        if how == "drop point":
            return re.sub(r"\[\d+,\d+\]", "", text, count=1)
        return text + (" [1,2,3,4]" if how == "add box" else " [1,2]")
    if kind == "grounding":
        return text + draw(st.sampled_from([" [1,2,3,4]", " <obj>(1,2)(3,4)", " " + CORNERS.format(1, 2, 3, 4)]))
    how = draw(st.sampled_from(["again", "unterminated"]))
    return text + (" <answer> other </answer>" if how == "again" else " <answer> other")


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_corrupting_a_well_formed_answer_is_a_parse_error_with_uniform_partial_credit(data):
    subset = data.draw(st.sampled_from(["ks", "meld", "avqa", "a2v", "s4", "ms3", "ref_avs", "arig"]))
    label, box = data.draw(OBJECT_LABELS), data.draw(BOX)
    structured = {
        "a2v": Prediction(choice=data.draw(st.sampled_from([1, 2]))),
        "s4": Prediction(label=label, box=box, points=data.draw(POINTS)),
        "ref_avs": Prediction(exists=True, label=label, box=box, points=data.draw(POINTS)),
        "arig": Prediction(label=label, box=box),
    }.get(subset, Prediction(label=label))
    if subset == "ms3":
        structured = Prediction(label=label, box=box, points=data.draw(POINTS))
    text = format_target(subset, structured, data.draw(REASONING))
    assert parse(subset, text) == structured
    result = parse(subset, _corrupt(data.draw, subset, text))
    assert result.error is not None, result
    if subset in ("s4", "ms3", "arig", "ref_avs"):  # the class part survives in every box task, the location never
        assert (result.label, result.exists, result.box, result.points) == (label, structured.exists, None, ())
    else:
        assert result.structure() == {}


_FRAGMENTS = {
    "name": "The object making the sound in the video is dog.",
    "box": "[1,2,30,40]",
    "point": "[5,6]",
    "true": "<answer>true</answer>",
    "false": "<answer>false</answer>",
}


@settings(max_examples=300, deadline=None)
@given(subset=st.sampled_from(["s4", "ms3", "ref_avs"]), parts=st.lists(st.sampled_from(list(_FRAGMENTS)), max_size=8))
def test_box_answers_parse_exactly_when_their_grammar_holds(subset, parts):
    """Any mix of a name, boxes, points and truth tags parses if and only if it is the answer the instruction asks
    for; whatever parses holds every part its kind needs."""
    n = {k: parts.count(k) for k in _FRAGMENTS}
    located = n["name"] >= 1 and n["box"] == 1 and n["point"] == NUM_POINTS
    if subset == "ref_avs":
        tags = n["true"] + n["false"]
        well_formed = tags == 1 and (located if n["true"] else n["box"] + n["point"] == 0)
    else:
        well_formed = located
    result = parse(subset, " ".join(_FRAGMENTS[k] for k in parts))
    assert result.ok == well_formed, (parts, result)
    if result.ok and result.exists is not False:
        assert result.label == "dog" and result.box == (1, 2, 30, 40) and result.points == ((5, 6),) * NUM_POINTS

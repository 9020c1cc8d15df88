"""The unified text interface: write a subset's structured answer as target text, and read it back from model output.

Formats follow the authors' data (REFERENCE.md section 2): ``<answer> x </answer>``; AVE's ``<event> x </event> ...
<range> 0,8 </range>``; AVVP's ``<visual_event>Chainsaw,(0 10)</visual_event> and <audio_event>...</audio_event>``;
Crab+ boxes ``[x1,y1,x2,y2]`` and points ``[x,y]``; ARIG's corner sentence; ``<answer>true</answer>`` for Ref-AVS.
Parsing tolerates spacing and case, Crab's ``<visual>``/``<audio>`` tags and the authors' test-time variants, and
never raises on model output: what it cannot read comes back as ``Prediction.error``.

One grammar per answer kind; text before a stop token (``<|im_end|>``, ``</s>``) is read, tags must be closed and
not nested, and an answer parses only when it is well formed:

- ``answer``, ``match``: exactly one ``<answer>`` tag, not empty (``match``: naming exactly one of 1 and 2).
- ``ref``: exactly one ``<answer>`` tag holding true / false (yes / no); true needs the ``box_points`` grammar,
  false no coordinate at all.
- ``box_points`` (s4, ms3): the object's name ("the object making the sound ... is NAME"), exactly one box
  ``[x1,y1,x2,y2]`` with ``x1 < x2``, ``y1 < y2`` and exactly ``NUM_POINTS`` points ``[x,y]``, as the instruction asks.
- ``grounding`` (ARIG): the name ("the sounding object is NAME") and exactly one box, in any one of the corner
  sentence, the ``<obj>`` tag or ``[x1,y1,x2,y2]``.
- ``events``: ``<event>`` / ``<range> a,b </range>`` pairs in that order, each range two numbers with ``a <= b``.
- ``avvp``: one ``<visual_event>`` and one ``<audio_event>`` tag, each "none" or ``label,(a b),...`` items joined
  by ``;``, read whole.
- ``caption``: any non-empty text.

Several ``<answer>`` tags are an error, not a choice between them: the authors' only answer reader,
``extract_coordinates`` in ``seg/scripts/inference_ref_3.py`` (GeWu-Lab/Crab_Plus), reads neither the first nor
the last tag but "false" wherever ``<answer>false</answer>`` appears, else "true" if ``<answer>true</answer>`` does;
their other inference scripts only write the text. With one tag, as every target holds, all these rules agree.

Partial credit is the same in every task: a malformed answer counts as a parse error and its location (box,
points) and events score nothing, but the class part read beside it, the object's name (s4, ms3, ARIG, Ref-AVS)
and Ref-AVS's true / false, is kept and scores (``crabplus.metrics``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from crabplus.tasks import MATCH_CHOICES, NUM_POINTS, get_task

Event = tuple[str, float, float]
Box = tuple[int, int, int, int]
Point = tuple[int, int]

# Characters a label may not hold: they delimit the structure around it.
_FORBIDDEN = set("<>[]();\n\r")
_OBJECT_FORBIDDEN = _FORBIDDEN | {".", ","}
_EDGE_PUNCTUATION = " .,;:"
_NONE_WORDS = {"", "none", "no event", "no events", "nothing"}


@dataclass(frozen=True)
class Prediction:
    """A structured answer; only the fields of the subset's answer kind are set.

    ``label``: class, emotion, QA answer or object category. ``choice``: 1 or 2 (matching). ``exists``: Ref-AVS
    true/false. ``events`` (AVE, UnAV), ``audio_events`` and ``visual_events`` (AVVP): ``(label, start, end)`` in
    seconds (segments), kept sorted. ``box``/``points``: pixels in the ``COORD_SIZE`` space. ``error``: None when the
    text parsed, else why not.
    """

    label: str | None = None
    choice: int | None = None
    exists: bool | None = None
    events: tuple[Event, ...] = ()
    audio_events: tuple[Event, ...] = ()
    visual_events: tuple[Event, ...] = ()
    caption: str | None = None
    box: Box | None = None
    points: tuple[Point, ...] = ()
    error: str | None = None

    def __post_init__(self) -> None:
        # Canonical form (sorted events, int coordinates, tuples) so equal structures compare equal.
        for name in ("events", "audio_events", "visual_events"):
            value = tuple(sorted((str(e[0]), float(e[1]), float(e[2])) for e in getattr(self, name)))
            object.__setattr__(self, name, value)
        if self.box is not None:
            object.__setattr__(self, "box", tuple(int(v) for v in self.box))
        object.__setattr__(self, "points", tuple((int(p[0]), int(p[1])) for p in self.points))

    @property
    def ok(self) -> bool:
        return self.error is None

    def structure(self) -> dict[str, object]:
        """The set fields (those not at their empty default: ``exists=False`` and ``choice=0`` are kept), ``error``
        excluded (for comparisons and reports)."""
        return {
            f.name: value
            for f in fields(self)
            if f.name != "error" and (value := getattr(self, f.name)) is not None and value != ()
        }


# ---------------------------------------------------------------------------------------------------------- format


def format_target(subset: str, structured: Prediction, reasoning: str = "") -> str:
    """The target text of ``subset`` for ``structured``, preceded by ``reasoning``.

    Raises ``ValueError`` naming the field that cannot be written (missing, or holding a delimiter character).
    Captions carry no separable reasoning: pass it inside the caption.
    """
    kind = get_task(subset).answer_kind
    reasoning = " ".join(reasoning.split())
    lead = f"{reasoning} " if reasoning else ""
    if kind == "answer":
        return f"{lead}So the answer is <answer> {_label(structured.label, 'label')} </answer>."
    if kind == "match":
        if structured.choice not in MATCH_CHOICES:
            raise ValueError(f"{subset}: choice must be one of {MATCH_CHOICES}, got {structured.choice!r}")
        return f"{lead}So the answer is <answer> {structured.choice} </answer>."
    if kind == "events":
        return lead + _format_events(subset, structured.events)
    if kind == "avvp":
        visual = _format_avvp("visual_event", structured.visual_events)
        audio = _format_avvp("audio_event", structured.audio_events)
        return f"{lead}Therefore, visual and audio events are: {visual} and {audio}"
    if kind == "caption":
        if reasoning:
            raise ValueError(f"{subset}: captions carry no separate reasoning; put it in the caption")
        caption = " ".join((structured.caption or "").split())
        if not caption:
            raise ValueError(f"{subset}: caption is empty")
        return caption
    if kind == "box_points":
        name = _label(structured.label, "label", _OBJECT_FORBIDDEN)
        return f"{lead}The object making the sound in the video is {name}. {_box_sentence(subset, structured)}"
    if kind == "grounding":
        name = _label(structured.label, "label", _OBJECT_FORBIDDEN)
        x1, y1, x2, y2 = _need_box(subset, structured.box)
        return (
            f"{lead}The sounding object is {name}. Its coordinate of top left corner is ({x1},{y1}) and coordinate "
            f"of bottom right corner is ({x2},{y2})."
        )
    if kind == "ref":
        if structured.exists is None:
            raise ValueError(f"{subset}: exists must be True or False")
        if not structured.exists:
            return f"{lead}<answer>false</answer> The object described is absent."
        name = _label(structured.label, "label", _OBJECT_FORBIDDEN)
        return f"{lead}<answer>true</answer> The referred object is {name}. {_box_sentence(subset, structured)}"
    raise AssertionError(f"unhandled answer kind {kind!r}")


def _label(value: str | None, name: str, forbidden: set[str] = _FORBIDDEN) -> str:
    text = " ".join((value or "").split())
    if not text:
        raise ValueError(f"{name} is empty")
    bad = sorted(set(text) & forbidden)
    if bad:
        raise ValueError(f"{name} {text!r} holds delimiter characters {bad}")
    if text != text.strip(_EDGE_PUNCTUATION):
        raise ValueError(f"{name} {text!r} starts or ends with punctuation, which parsing drops")
    return text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.10g}"


def _check_events(events: tuple[Event, ...], what: str) -> None:
    for label, start, end in events:
        _label(label, f"{what} label")
        if label.strip().lower() in _NONE_WORDS or not 0 <= start <= end:
            raise ValueError(f"{what} {(label, start, end)!r}: needs a real label and 0 <= start <= end")


def _format_events(subset: str, events: tuple[Event, ...]) -> str:
    if not events:
        raise ValueError(f"{subset}: at least one event is needed")
    _check_events(events, "event")
    pairs = [f"<event> {' '.join(lab.split())} </event> <range> {_num(s)},{_num(e)} </range>" for lab, s, e in events]
    if len(pairs) == 1:
        label, start, end = events[0]
        return (
            f"So the audible and visible event in the video is <event> {' '.join(label.split())} </event>, and the "
            f"time range is <range> {_num(start)},{_num(end)} </range>."
        )
    return "So the events and their time ranges are " + ", ".join(pairs) + "."


def _format_avvp(tag: str, events: tuple[Event, ...]) -> str:
    _check_events(events, tag)
    grouped: dict[str, list[str]] = {}
    for label, start, end in events:
        grouped.setdefault(" ".join(label.split()), []).append(f"({_num(start)} {_num(end)})")
    body = "; ".join(f"{label},{','.join(segs)}" for label, segs in grouped.items()) or "none"
    return f"<{tag}>{body}</{tag}>"


def _need_box(subset: str, box: Box | None) -> Box:
    if box is None or len(box) != 4 or min(box) < 0 or _box_error(box):
        raise ValueError(f"{subset}: box must be four non-negative pixel coordinates with x1 < x2 and y1 < y2, "
                         f"got {box!r}")  # fmt: skip
    return box


def _box_sentence(subset: str, s: Prediction) -> str:
    x1, y1, x2, y2 = _need_box(subset, s.box)
    if len(s.points) != NUM_POINTS:
        raise ValueError(f"{subset}: points must be {NUM_POINTS} [x,y] pixels on the object, got {s.points!r}")
    return (
        f"Its bounding box is [{x1},{y1},{x2},{y2}], and points on it are "
        + ", ".join(f"[{x},{y}]" for x, y in s.points)
        + "."
    )


# ----------------------------------------------------------------------------------------------------------- parse

_FLAGS = re.IGNORECASE | re.DOTALL
_NUMBER = r"(\d+(?:\.\d+)?)"
_ANSWER = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", _FLAGS)
_EVENT_TAG = re.compile(r"<\s*event\s*>(.*?)<\s*/\s*event\s*>", _FLAGS)
_RANGE_TAG = re.compile(r"<\s*range\s*>(.*?)<\s*/\s*range\s*>", _FLAGS)
_AVVP_TAG = re.compile(r"<\s*(visual|audio)(?:_event)?\s*>(.*?)<\s*/\s*\1(?:_event)?\s*>", _FLAGS)
_AVVP_EVENT = re.compile(r"([^()<>;]+?)\s*,\s*((?:\(\s*[\d.]+\s*[\s,]\s*[\d.]+\s*\)\s*,?\s*)+)", _FLAGS)
_PAIR = re.compile(rf"{_NUMBER}\s*(?:,|\s|-|~|to)\s*{_NUMBER}", _FLAGS)
# Integers only, as the authors' r"\[(\d+),(\d+)(?:,(\d+),(\d+))?\]" (seg/scripts/inference_3.py): no "[1.5,2]".
_COORDS = re.compile(r"\[\s*(\d+)\s*,\s*(\d+)\s*(?:,\s*(\d+)\s*,\s*(\d+)\s*)?\]")
_CORNERS = re.compile(
    rf"top\s*left\s*corner\s*is\s*\(\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\).*?"
    rf"bottom\s*right\s*corner\s*is\s*\(\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\)",
    _FLAGS,
)
_OBJ_TAG = re.compile(rf"<\s*obj\s*>\s*\(\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\)\s*,?\s*\(\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\)")
_OBJECT_NAME = re.compile(
    r"(?:object\s+making\s+the\s+sound(?:\s+in\s+the\s+(?:video|frame|image))?|sounding\s+object|referred\s+object)"
    r"\s+is\s+([^.\[\]<>()]+?)\s*(?:\.|,|$|\[|\bits\s+(?:bounding|coordinate))",
    _FLAGS,
)
_TRUTH = re.compile(r"<\s*answer\s*>\s*(true|false|yes|no)\s*\.?\s*<\s*/\s*answer\s*>", _FLAGS)
_CHOICE_WORDS = {"1": 1, "one": 1, "first": 1, "2": 2, "two": 2, "second": 2}
_STOP = re.compile(r"<\|im_end\|>|</s>")


# The tags each answer kind is read from (``visual`` stands for Crab's ``<visual>`` and ``<visual_event>``).
_KIND_TAGS = {"answer": ("answer",), "match": ("answer",), "ref": ("answer",), "events": ("event", "range"),
              "avvp": ("visual", "audio")}  # fmt: skip


def tag_error(text: str, names: tuple[str, ...]) -> str | None:
    """Why the ``<name>...</name>`` tags of ``names`` in ``text`` are not well formed (unterminated, nested, a stray
    closing tag), or None. ``visual_event`` / ``audio_event`` count as ``visual`` / ``audio``."""
    pattern = re.compile(rf"<\s*(/?)\s*({'|'.join(names)})(?:_event)?\s*>", _FLAGS)
    open_tag = None
    for found in pattern.finditer(text):
        closing, name = bool(found.group(1)), found.group(2).lower()
        if not closing and open_tag is not None:
            return f"<{name}> inside an unterminated <{open_tag}> tag"
        if closing and open_tag != name:
            return f"</{name}> closes no open <{name}> tag"
        open_tag = None if closing else name
    return f"unterminated <{open_tag}> tag" if open_tag else None


def parse(subset: str, text: object) -> Prediction:
    """Read ``subset``'s structured answer from ``text``; never raises on the text (raises only for a bad subset).

    Only a well-formed answer parses (the grammars in the module docstring). Where the object's name or Ref-AVS's
    true / false is readable but the rest is not, it is kept beside the error, alike in every task."""
    kind = get_task(subset).answer_kind
    if not isinstance(text, str):
        return Prediction(error=f"prediction is {type(text).__name__}, not text")
    text = _STOP.split(text, maxsplit=1)[0]
    if kind in _KIND_TAGS and (why := tag_error(text, _KIND_TAGS[kind])):
        return Prediction(error=why)
    try:
        return _PARSERS[kind](text)
    except (ValueError, IndexError, OverflowError) as exc:  # a malformed number or an absurd value
        return Prediction(error=f"unreadable {kind} answer: {exc}")


def _clean(text: str) -> str:
    return " ".join(text.split()).strip(_EDGE_PUNCTUATION)


def _one_answer(text: str) -> tuple[str | None, str | None]:
    """The content of the one ``<answer>`` tag, or why there is not exactly one."""
    found = _ANSWER.findall(text)
    if len(found) != 1:
        return None, "no <answer> tag" if not found else f"{len(found)} <answer> tags (a well-formed answer has one)"
    return found[0], None


def _parse_answer(text: str) -> Prediction:
    found, why = _one_answer(text)
    if why:
        return Prediction(error=why)
    label = _clean(found)
    return Prediction(label=label) if label else Prediction(error="empty <answer> tag")


def _parse_match(text: str) -> Prediction:
    answer = _parse_answer(text)
    if answer.error:
        return answer
    words = re.findall(r"[a-z0-9]+", answer.label.lower())
    choices = {_CHOICE_WORDS[w] for w in words if w in _CHOICE_WORDS}
    if len(choices) != 1:
        return Prediction(error=f"answer {answer.label!r} names neither or both of 1 and 2")
    return Prediction(choice=choices.pop())


def _parse_events(text: str) -> Prediction:
    labels = [_clean(x) for x in _EVENT_TAG.findall(text)]
    ranges = _RANGE_TAG.findall(text)
    if not labels:
        return Prediction(error="no <event> tag")
    if len(labels) != len(ranges):
        return Prediction(error=f"{len(labels)} <event> tags but {len(ranges)} <range> tags")
    order = [m.group(1).lower() for m in re.finditer(r"<\s*(event|range)\s*>", text, _FLAGS)]
    if order != ["event", "range"] * len(labels):
        return Prediction(error="each <event> tag must be followed by its <range> tag")
    events = []
    for label, span in zip(labels, ranges):
        pair = _PAIR.fullmatch(span.strip())
        if not label or pair is None:
            return Prediction(error=f"unreadable event {label!r} with range {span.strip()!r}")
        start, end = float(pair.group(1)), float(pair.group(2))
        if end < start:
            return Prediction(error=f"range {span.strip()!r} ends before it starts")
        events.append((label, start, end))
    return Prediction(events=tuple(events))


def _parse_avvp(text: str) -> Prediction:
    tags = _AVVP_TAG.findall(text)
    if not tags:
        return Prediction(error="no <visual_event> or <audio_event> tag")
    count = {m: [t[0].lower() for t in tags].count(m) for m in ("visual", "audio")}
    if count != {"visual": 1, "audio": 1}:
        return Prediction(error=f"{count['visual']} visual and {count['audio']} audio event tags (needs one of each)")
    out: dict[str, list[Event]] = {"visual": [], "audio": []}
    for modality, body in tags:
        body_clean = _clean(body)
        if body_clean.lower() in _NONE_WORDS:
            continue
        items = [item.strip() for item in body.strip().rstrip(".").split(";")]
        matches = [m.groups() for item in items if (m := _AVVP_EVENT.fullmatch(item))]
        if len(matches) != len(items):
            return Prediction(error=f"unreadable {modality.lower()} events {body_clean!r}")
        for label, segments in matches:
            label = _clean(label)
            for start, end in re.findall(r"\(\s*([\d.]+)\s*[\s,]\s*([\d.]+)\s*\)", segments):
                s, e = float(start), float(end)
                if not label or e < s:
                    return Prediction(error=f"bad {modality.lower()} event {label!r} ({start} {end})")
                out[modality.lower()].append((label, s, e))
    return Prediction(audio_events=tuple(out["audio"]), visual_events=tuple(out["visual"]))


def _parse_caption(text: str) -> Prediction:
    caption = " ".join(text.split())
    return Prediction(caption=caption) if caption else Prediction(error="empty caption")


def _object_name(text: str) -> str | None:
    found = _OBJECT_NAME.search(text)
    if found is None:
        return None
    return _clean(found.group(1)) or None


def _coordinates(text: str) -> tuple[list[Box], list[Point]]:
    boxes, points = [], []
    for match in _COORDS.findall(text):
        values = [int(v) for v in match if v]
        (boxes if len(values) == 4 else points).append(tuple(values))
    return boxes, points


def _box_error(box: Box | None) -> str | None:
    if box is not None and not (box[0] < box[2] and box[1] < box[3]):
        return f"box {list(box)} is empty (needs x1 < x2 and y1 < y2)"
    return None


def _located(text: str, num_points: int) -> Prediction:
    """The object's name, one box and ``num_points`` points (the grammar of s4, ms3 and a present Ref-AVS object);
    a readable name is kept beside an error in the location (``parse``'s partial credit)."""
    boxes, points = _coordinates(text)
    label = _object_name(text)
    if len(boxes) != 1:
        return Prediction(label=label, error="no [x1,y1,x2,y2] box" if not boxes else f"{len(boxes)} boxes")
    if why := _box_error(boxes[0]):
        return Prediction(label=label, error=why)
    if len(points) != num_points:
        return Prediction(label=label, error=f"{len(points)} [x,y] points (needs {num_points})")
    if label is None:
        return Prediction(error="no object name ('the object making the sound ... is NAME')")
    return Prediction(label=label, box=boxes[0], points=tuple(points))


def _parse_box_points(text: str) -> Prediction:
    return _located(text, NUM_POINTS)


def _parse_grounding(text: str) -> Prediction:
    found = [m.groups() for m in (*_CORNERS.finditer(text), *_OBJ_TAG.finditer(text))]
    boxes = [tuple(round(float(v)) for v in g) for g in found] + _coordinates(text)[0]
    label = _object_name(text)
    if len(boxes) != 1:
        what = "no box (corner sentence, <obj> tag or [x1,y1,x2,y2])" if not boxes else f"{len(boxes)} boxes"
        return Prediction(label=label, error=what)
    if why := _box_error(boxes[0]):
        return Prediction(label=label, error=why)
    if label is None:
        return Prediction(error="no object name ('the sounding object is NAME')")
    return Prediction(label=label, box=boxes[0])


def _parse_ref(text: str) -> Prediction:
    found, why = _one_answer(text)
    if found is None:
        return Prediction(
            error="no <answer>true</answer> or <answer>false</answer>" if why == "no <answer> tag" else why
        )
    truth = _TRUTH.fullmatch(f"<answer>{found}</answer>")
    if truth is None:
        return Prediction(error=f"<answer> holds {_clean(found)!r}, not true or false")
    if truth.group(1).lower() in ("false", "no"):
        boxes, points = _coordinates(text)
        if boxes or points:
            return Prediction(exists=False, error="answered false but gives coordinates")
        return Prediction(exists=False)
    located = _located(text, NUM_POINTS)
    if located.error:
        return Prediction(exists=True, label=located.label, error=f"answered true but {located.error}")
    return Prediction(exists=True, label=located.label, box=located.box, points=located.points)


_PARSERS = {
    "answer": _parse_answer,
    "match": _parse_match,
    "events": _parse_events,
    "avvp": _parse_avvp,
    "caption": _parse_caption,
    "box_points": _parse_box_points,
    "grounding": _parse_grounding,
    "ref": _parse_ref,
}

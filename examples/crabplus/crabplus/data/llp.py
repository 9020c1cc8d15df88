"""AVVP test references from the LLP evaluation files, as the authors' AVVP evaluation reads them.

The AV-UIE v2 AVVP test records hold only ``filename``, ``vid`` and event names; the dense ground truth is the LLP
dataset's (Tian et al., ECCV 2020) ``AVVP_eval_audio.csv`` and ``AVVP_eval_visual.csv``: tab-separated, a header
``filename  event_labels  onset  offset``, one row per event (class name with underscores, e.g. ``Violin_fiddle``;
onset and offset in whole one-second segments of the 10-s clip, ``GT[class, onset:offset] = 1``). A video with no
row in a file has no event of that modality. The released audio file has rows with ``onset >= offset`` (e.g.
``CaC2xvdLC34_250_260  9  9  Speech``, ``8DF2PxdT5tE_390_400  9  0  Cheering``); the authors' ``main_avvp.py`` slice
``GT_a[idx, x1:x2] = 1`` makes them mark nothing, so they are read as empty events (no segment; the video still belongs
to the evaluation), counted, and reported in one log line with an example.

Layout: pass the directory holding both files (``--avvp-labels DIR``, ``data.avvp_labels``), or put them in the
AV-UIE root's ``avvp/`` folder beside ``test.json``.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from crabplus.interface import Event, Prediction

LLP_FILES = {"audio": "AVVP_eval_audio.csv", "visual": "AVVP_eval_visual.csv"}
LLP_COLUMNS = ("filename", "event_labels", "onset", "offset")
LLP_SEGMENTS = 10  # one-second segments per clip

log = logging.getLogger(__name__)


def find_llp_dir(root: str | Path, avvp_labels: str | Path | None = None) -> tuple[Path | None, str]:
    """The directory holding both LLP files (``avvp_labels``, else ``<root>/avvp``), or None and what is missing."""
    where = Path(avvp_labels) if avvp_labels is not None else Path(root) / "avvp"
    missing = [name for name in LLP_FILES.values() if not (where / name).is_file()]
    if not missing:
        return where, ""
    how = "" if avvp_labels is not None else "; pass --avvp-labels DIR (data.avvp_labels) if they are elsewhere"
    return None, (
        f"AVVP test records hold no events and the LLP evaluation files {', '.join(missing)} are not in {where}{how}"
    )


def read_llp_labels(directory: str | Path) -> dict[str, Prediction]:
    """``{filename: Prediction(audio_events=..., visual_events=...)}`` from the two LLP files in ``directory``.

    A row with ``onset >= offset`` marks no segment (as ``GT[c, onset:offset] = 1`` in the authors' evaluation): its
    video is kept with no event from that row, and the rows are counted and logged with an example. Raises
    ``ValueError`` naming the file and line of a malformed row (missing column, non-integer or out of 0..10 onset or
    offset).
    """
    events: dict[str, dict[str, list[Event]]] = {}
    empty: list[str] = []
    for modality, name in LLP_FILES.items():
        path = Path(directory) / name
        with path.open(newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if reader.fieldnames is None or not set(LLP_COLUMNS) <= set(reader.fieldnames):
                raise ValueError(f"{path}: header must name {', '.join(LLP_COLUMNS)} (tab-separated)")
            for line, row in enumerate(reader, start=2):
                filename, event = _read_row(path, line, row)
                per_video = events.setdefault(filename, {"audio": [], "visual": []})
                if event[1] < event[2]:
                    per_video[modality].append(event)
                else:
                    empty.append(f"{name} line {line} ({filename} {event[1]} {event[2]} {event[0]})")
    if empty:
        log.warning(
            "LLP labels in %s: %d rows with onset >= offset read as empty events (they mark no segment in the "
            "authors' evaluation), e.g. %s",
            directory,
            len(empty),
            empty[0],
        )
    return {
        filename: Prediction(audio_events=tuple(e["audio"]), visual_events=tuple(e["visual"]))
        for filename, e in events.items()
    }


def _read_row(path: Path, line: int, row: dict[str, str | None]) -> tuple[str, Event]:
    """``(filename, (class, onset, offset))`` of one LLP row; raises ``ValueError`` naming the file and line."""
    try:
        onset, offset = int(row["onset"] or ""), int(row["offset"] or "")
    except ValueError:
        raise ValueError(f"{path} line {line}: onset/offset must be integers, got {row}") from None
    if not (min(onset, offset) >= 0 and max(onset, offset) <= LLP_SEGMENTS and row["event_labels"] and row["filename"]):
        raise ValueError(f"{path} line {line}: needs a filename, a class and onset, offset in 0..{LLP_SEGMENTS}")
    return row["filename"], (row["event_labels"], onset, offset)

"""AVVP test references from the LLP evaluation files, as the authors' AVVP evaluation reads them.

The AV-UIE v2 AVVP test records hold only ``filename``, ``vid`` and event names; the dense ground truth is the LLP
dataset's (Tian et al., ECCV 2020) ``AVVP_eval_audio.csv`` and ``AVVP_eval_visual.csv``: tab-separated, a header
``filename  event_labels  onset  offset``, one row per event (class name with underscores, e.g. ``Violin_fiddle``;
onset and offset in whole one-second segments of the 10-s clip, ``GT[class, onset:offset] = 1``). A video with no
row in a file has no event of that modality.

Layout: pass the directory holding both files (``--avvp-labels DIR``, ``data.avvp_labels``), or put them in the
AV-UIE root's ``avvp/`` folder beside ``test.json``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from crabplus.interface import Event, Prediction

LLP_FILES = {"audio": "AVVP_eval_audio.csv", "visual": "AVVP_eval_visual.csv"}
LLP_COLUMNS = ("filename", "event_labels", "onset", "offset")


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

    Raises ``ValueError`` naming the file and line of a malformed row (missing column, non-integer or inverted
    segment range outside 0..10).
    """
    events: dict[str, dict[str, list[Event]]] = {}
    for modality, name in LLP_FILES.items():
        path = Path(directory) / name
        with path.open(newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if reader.fieldnames is None or not set(LLP_COLUMNS) <= set(reader.fieldnames):
                raise ValueError(f"{path}: header must name {', '.join(LLP_COLUMNS)} (tab-separated)")
            for line, row in enumerate(reader, start=2):
                try:
                    onset, offset = int(row["onset"]), int(row["offset"])
                except (TypeError, ValueError):
                    raise ValueError(f"{path} line {line}: onset/offset must be integers, got {row}") from None
                if not 0 <= onset < offset <= 10 or not row["event_labels"] or not row["filename"]:
                    raise ValueError(f"{path} line {line}: needs a filename, a class and 0 <= onset < offset <= 10")
                per_video = events.setdefault(row["filename"], {"audio": [], "visual": []})
                per_video[modality].append((row["event_labels"], onset, offset))
    return {
        filename: Prediction(audio_events=tuple(e["audio"]), visual_events=tuple(e["visual"]))
        for filename, e in events.items()
    }

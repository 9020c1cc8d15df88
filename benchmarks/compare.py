"""Today's layer rows against a committed record of the same cases, measured again now (``run.py --compare``).

The record's code is not run again: its numbers are compared with the same (shape, tokens, mode, provider) cases
timed now. The figure compared is ``x base`` (time over the frozen base linear's, paired by round), which cancels
most of the machine's speed and load; the noise is the spread of the repeats, half the interquartile range of the
per-round ratios now plus half the record's relative IQR times its ratio (the record kept only its time quartiles).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]
KEY = ("shape", "tokens", "d", "dtype", "device", "mode", "provider")


def load_record(path: Path) -> dict[str, Any]:
    """A committed layer record (``benchmarks/results/*.json`` written by ``run.py``); ``ValueError`` naming the
    file when it is not one."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "rows" not in data or "config" not in data or "shapes" not in data["config"]:
        raise ValueError(f"{path} is not a layer benchmark record (python -m benchmarks.run writes those)")
    return data


def _spread(row: Row) -> float:
    """Half the IQR of a row's per-round x base; for a row without them (older records), from its time IQR."""
    if "x_base_q1" in row:
        return (row["x_base_q3"] - row["x_base_q1"]) / 2
    return row["x_base"] * (row["q3_s"] - row["q1_s"]) / row["median_s"] / 2


def compare_rows(today: Sequence[Row], record: Sequence[Row]) -> list[Row]:
    """One entry per case measured both now and in the record (the same shape, tokens, width, dtype, device, mode
    and provider; base rows left out): both ratios, their difference, the noise and ``within`` (the difference at
    most the noise)."""
    old = {tuple(r[k] for k in KEY): r for r in record if "skipped" not in r and r["provider"] != "base"}
    out = []
    for r in today:
        then = old.get(tuple(r.get(k) for k in KEY))
        if then is None or "skipped" in r:
            continue
        noise = _spread(r) + _spread(then)
        diff = r["x_base"] - then["x_base"]
        out.append({**{k: r[k] for k in KEY}, "x_base": r["x_base"], "x_base_record": then["x_base"],
                    "diff": diff, "noise": noise, "within": abs(diff) <= noise})  # fmt: skip
    return out


def format_comparison(entries: Sequence[Row], record_name: str) -> str:
    """A markdown table of :func:`compare_rows`, and how many cases are within noise."""
    head = f"| shape | T | mode | provider | x base now | x base {record_name} | now - record | noise | within |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in entries:
        lines.append(
            f"| {e['shape']} | {e['tokens']} | {e['mode']} | {e['provider']} | {e['x_base']:.2f} | "
            f"{e['x_base_record']:.2f} | {e['diff']:+.2f} | {e['noise']:.2f} | {'yes' if e['within'] else 'NO'} |"
        )
    within = sum(e["within"] for e in entries)
    return "\n".join(lines) + f"\n\n{within} of {len(entries)} cases within noise of {record_name}"

"""Reporting: the environment record, the targets of the issue, the text table, the JSON file and the PNG plot."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .providers import SHAPES

Row = dict[str, Any]

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"  # committed records: written only on request (--record), never overwritten
SCRATCH = BENCH_DIR / "out"  # ignored by git: where every run writes by default


def environment(threads: int) -> dict[str, Any]:
    """Machine, versions, commit and date: what a reader needs to reproduce or compare a result file."""
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "peft", "transformers", "ilora"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": threads, "arch": platform.machine(),
            "os": platform.platform(), "gpu": gpu,
        },
        "versions": versions,
        "commit": _git("rev-parse", "HEAD") or os.environ.get("ILORA_COMMIT"),  # a tree copied without .git
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # other work on the machine
        "dirty": bool(_git("status", "--porcelain", "--", "ilora", "kernels", "benchmarks/*.py")),  # code only
    }  # fmt: skip


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_tag(env: dict[str, Any]) -> str:
    """A short file-name tag: ``gpu-nvidia-h200`` or ``cpu-amd-epyc-2t``."""
    m = env["machine"]
    name = f"gpu-{m['gpu']}" if m["gpu"] else f"cpu-{m['cpu']}-{m['threads']}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _find(rows: Sequence[Row], **match: Any) -> Row | None:
    for row in rows:
        if "skipped" not in row and all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def evaluate_targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The issue's targets, each ``met`` True/False, or None with ``note`` when its rows were not measured."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, note: str = "") -> None:
        met = None if value is None else value <= limit
        out.append({"target": name, "value": value, "limit": limit, "met": met, "note": note})

    cpu = {"device": "cpu", "dtype": "float32", "shape": "crabplus", "tokens": 2048}
    for mode in ("fwd", "fwd+bwd"):
        il, au = (
            _find(rows, **cpu, mode=mode, provider="ilora_torch"),
            _find(rows, **cpu, mode=mode, provider="authors_loop"),
        )
        tag = f"CPU fp32 crabplus T=2048 {mode}"
        add(f"{tag}: ilora_torch x FLOP floor", il and il["x_floor"], 1.05)
        add(
            f"{tag}: ilora adapter time / authors' adapter time",
            il and au and il["adapter_s"] / au["adapter_s"], 0.8,
        )  # fmt: skip
        if mode == "fwd":  # saved bytes do not depend on the mode
            experts = SHAPES["crabplus"].experts
            add(
                f"CPU crabplus T=2048: ilora saved bytes / (authors' / {experts})",
                il and au and il["saved_bytes"] / (au["saved_bytes"] / experts), 1.0,
            )  # fmt: skip
    gpu_note = "not measured yet: no GPU in this run"
    for mode in ("fwd", "fwd+bwd"):
        for shape, limit in (("crabplus", 1.30), ("moe", 1.10)):
            il = _ilora_gpu(rows, shape=shape, tokens=8192, mode=mode)
            add(f"GPU bf16 {shape} T=8192 {mode}: ilora x base", il and il["x_base"], limit, gpu_note)
            au = _find(
                rows, device="cuda", dtype="bfloat16", shape=shape, tokens=8192, mode=mode, provider="authors_loop"
            )
            add(
                f"GPU bf16 {shape} T=8192 {mode}: ilora adapter time / authors'",
                il and au and il["adapter_s"] / au["adapter_s"], 1 / 3, gpu_note,
            )  # fmt: skip
        for shape in ("crabplus", "moe"):
            il = _ilora_gpu(rows, shape=shape, tokens=1, mode=mode)
            add(f"GPU bf16 {shape} T=1 {mode}: ilora x base", il and il["x_base"], 1.5, gpu_note)
    for t in out:
        if t["met"] is not None:
            t["note"] = ""
    return out


def _ilora_gpu(rows: Sequence[Row], **match: Any) -> Row | None:
    """On GPU ilora means its Triton kernels when they ran, else its torch path."""
    for provider in ("ilora_triton", "ilora_torch"):
        row = _find(rows, device="cuda", dtype="bfloat16", provider=provider, **match)
        if row is not None:
            return row
    return None


def format_ms(s: float | None) -> str:
    """Seconds as milliseconds, 3 significant digits ("-" for None)."""
    return "-" if s is None else f"{s * 1e3:.3g}" if abs(s) < 1 else f"{s * 1e3:.0f}"


def format_mib(b: int | None) -> str:
    """Bytes as MiB with 2 decimals ("-" for None)."""
    return "-" if b is None else f"{b / 2**20:.2f}"


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table, one line per measured (shape, tokens, mode, provider); skipped providers listed below."""
    head = "| shape | T | mode | provider | median ms | IQR ms | x base | x floor | adapter ms | saved MiB | peak MiB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    skipped: dict[str, dict[str, None]] = {}  # provider -> its distinct reasons, in order
    for r in rows:
        if "skipped" in r:
            skipped.setdefault(r["provider"], {})[r["skipped"]] = None
            continue
        # The anchor's floor ratio, adapter time and adapter bytes say nothing: dashes.
        anchor = r["provider"] == "base"
        x_floor = "-" if anchor else f"{r['x_floor']:.2f}"
        adapter = "-" if anchor else format_ms(r["adapter_s"])
        saved = "-" if anchor else format_mib(r["saved_bytes"])
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['mode']} | {r['provider']} | {format_ms(r['median_s'])} | "
            f"{format_ms(r['q1_s'])}-{format_ms(r['q3_s'])} | {r['x_base']:.2f} | {x_floor} | {adapter} | {saved} | "
            f"{format_mib(r['peak_bytes'])} |"
        )
    lines += [f"\nskipped: {name}: {'; '.join(why)}" for name, why in skipped.items()]
    notes: dict[str, dict[str, None]] = {}  # provider -> why it ran PyTorch where Triton would, distinct
    for r in rows:
        if r.get("note"):
            notes.setdefault(r["provider"], {})[r["note"]] = None
    lines += [f"\nnote: {name}: {'; '.join(why)}" for name, why in notes.items()]
    return "\n".join(lines)


def format_targets(targets: Sequence[dict[str, Any]]) -> str:
    """Markdown list of targets marked met / MISSED / not measured."""
    lines = []
    for t in targets:
        if t["met"] is None:
            lines.append(f"- [ ] {t['target']} <= {t['limit']:.3g}: {t['note'] or 'not measured in this run'}")
        else:
            mark = "met" if t["met"] else "MISSED"
            lines.append(f"- [{'x' if t['met'] else ' '}] {t['target']} <= {t['limit']:.3g}: {t['value']:.3f} ({mark})")
    return "\n".join(lines)


def result_paths(
    env: dict[str, Any], kind: str, record: bool, out: Path | None = None, tag: str | None = None
) -> tuple[Path, Path]:
    """The JSON and PNG paths of one run of ``kind`` (``quick``, ``full``, ``model``, ...).

    By default a run writes to the ignored :data:`SCRATCH` folder, its stem carrying the time of day so that runs
    never collide. ``record=True`` names a committed record, ``<date>_<machine>_<kind>`` in :data:`RESULTS`, or
    ``<date>_<machine>_<kind>-<tag>`` for a second record of the day; ``out`` replaces the folder either way.
    """
    date = env["date"][:10]
    when = date if record else env["date"][:19].replace(":", "")
    folder = out if out is not None else RESULTS if record else SCRATCH
    stem = f"{when}_{machine_tag(env)}_{kind}" + (f"-{tag}" if tag else "")
    return folder / f"{stem}.json", folder / f"{stem}.png"


def check_free(paths: Sequence[Path]) -> None:
    """Raise ``FileExistsError`` naming the first of ``paths`` that exists: a result file is never overwritten."""
    for path in paths:
        if path.exists():
            raise FileExistsError(
                f"{path} exists: a result file is never overwritten; move or delete it, or pass another --out"
            )


def redraw_path(source: Path, out: Path | None = None, beside: bool = False) -> Path:
    """Where a redraw of result file ``source``'s PNG goes: the ignored :data:`SCRATCH` folder by default, ``out``
    when given, beside ``source`` (a committed record's tracked PNG) only with ``beside``. Raises
    ``FileExistsError`` if that file exists: a redraw never overwrites."""
    folder = source.parent if beside else out if out is not None else SCRATCH
    path = folder / f"{source.stem}.png"
    check_free([path])
    return path


def add_redraw_args(ap: argparse.ArgumentParser) -> None:
    """``--out`` and ``--beside``: where a redrawn PNG goes (see :func:`redraw_path`)."""
    ap.add_argument("--out", type=Path, default=None, help="folder for the redrawn PNG (default: benchmarks/out/)")
    ap.add_argument(
        "--beside", action="store_true", help="write the PNG beside the JSON (refused if one is there already)"
    )


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a benchmark command's ``main``; a result file that exists already ends it with one line on stderr and
    exit status 2 (argparse's for a usage error) instead of a traceback."""
    try:
        return main(argv)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def write_text_new(path: Path, text: str) -> None:
    """Create ``path`` with ``text``; ``FileExistsError`` if it exists (exclusive create: no race either)."""
    check_free([path])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("x") as f:
        f.write(text)


def write_json(path: Path, env: dict[str, Any], config: dict[str, Any], rows: Sequence[Row]) -> dict[str, Any]:
    """Write the result file (environment, run configuration, rows, targets) as a new file; returns what was
    written. Raises ``FileExistsError`` if ``path`` exists."""
    data = {"environment": env, "config": config, "rows": list(rows), "targets": evaluate_targets(rows)}
    write_text_new(path, json.dumps(data, indent=1) + "\n")
    return data


def plot(rows: Sequence[Row], path: Path, title: str = "") -> None:
    """Bar chart of time / base-linear time per provider, one panel per mode, groups by (shape, tokens)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on benchmark machines
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "skipped" not in r and r["provider"] != "base"]
    modes = list(dict.fromkeys(r["mode"] for r in measured))
    groups = list(dict.fromkeys((r["shape"], r["tokens"]) for r in measured))
    providers = list(dict.fromkeys(r["provider"] for r in measured))
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(6, 1.6 * len(groups) + 2), 3.2 * len(modes)), squeeze=False)
    width = 0.8 / max(1, len(providers))
    for ax, mode in zip(axes[:, 0], modes):
        for j, prov in enumerate(providers):
            xs, ys = [], []
            for i, (shape, tokens) in enumerate(groups):
                r = _find(measured, shape=shape, tokens=tokens, mode=mode, provider=prov)
                if r is not None:
                    xs.append(i + (j - (len(providers) - 1) / 2) * width)
                    ys.append(r["x_base"])
            ax.bar(xs, ys, width=width, label=prov)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylim(0, 1.25 * max([r["x_base"] for r in measured if r["mode"] == mode], default=1.0))  # legend room
        ax.set_xticks(range(len(groups)), [f"{s}\nT={t}" for s, t in groups])
        ax.set_ylabel("time / base linear")
        ax.set_title(f"{title} {mode}".strip())
    axes[0, 0].legend(fontsize=7, ncol=len(providers), loc="upper center")
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Lay out and save a matplotlib figure as a new PNG, then close it; ``FileExistsError`` if ``path`` exists."""
    import matplotlib.pyplot as plt

    check_free([path])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.report RESULT.json``: print its table and targets again and redraw its PNG (into
    benchmarks/out/ unless ``--out`` or ``--beside``; never over an existing file)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    ap.add_argument("result", type=Path)
    add_redraw_args(ap)
    args = ap.parse_args(argv)
    png = redraw_path(args.result, args.out, args.beside)
    data = json.loads(args.result.read_text())
    env = data["environment"]
    print(f"# {env['date']}  {env['machine']}  commit {env['commit']}")
    print(format_table(data["rows"]))
    print("\nTargets:\n" + format_targets(evaluate_targets(data["rows"])))
    plot(data["rows"], png, title=f"{args.result.stem}:")
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))

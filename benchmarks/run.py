"""The one command: time every provider, print the table and targets, write JSON and a PNG (benchmarks/out/).

.venv/bin/python -m benchmarks.run --quick          # CPU subset, < 5 minutes on 2 cores
.venv/bin/python -m benchmarks.run                  # full grid of this machine (CPU: d=1024 fp32; GPU: d=4096 bf16)
.venv/bin/python -m benchmarks.run --quick --record # a record to commit: benchmarks/results/, never overwritten
.venv/bin/python -m benchmarks.run --presets        # every preset as a layer shape (CPU: d=1024; GPU: d=4096 bf16)
.venv/bin/python -m benchmarks.run --compare benchmarks/results/<record>.json   # its cases again, side by side
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .compare import compare_rows, format_comparison, load_record
from .flops import MODES
from .grid import FULL, PRESET_GRID, QUICK, layer_size
from .harness import run_case
from .providers import PROVIDERS, SHAPES
from .report import (
    check_free,
    environment,
    evaluate_targets,
    format_table,
    format_targets,
    plot,
    result_paths,
    run_main,
    write_json,
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the quick CPU subset: " + str(QUICK))
    ap.add_argument("--presets", action="store_true", help="every ilora preset as a shape: " + str(PRESET_GRID))
    ap.add_argument(
        "--compare", type=Path, default=None,
        help="a layer record: time its shapes, tokens, modes and providers now (unless given) and compare x base",
    )  # fmt: skip
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, except --quick)")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int)
    ap.add_argument("--modes", nargs="+", choices=list(MODES))
    ap.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    ap.add_argument("--d", type=int, default=None, help="d_in = d_out (default 4096 on GPU, 1024 on CPU)")
    ap.add_argument("--rounds", type=int, default=None, help="timed samples per provider (median and IQR over them)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU), recorded")
    ap.add_argument("--note", help="a sentence kept in the JSON's config (say, that the machine was busy)")
    add_output_args(ap)
    return ap.parse_args(argv)


def _tag(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", text):
        raise argparse.ArgumentTypeError(f"a tag is lower-case letters, digits and '-', got {text!r}")
    return text


def add_output_args(ap: argparse.ArgumentParser) -> None:
    """``--record``, ``--out`` and ``--no-write``: the same output options for every benchmark command."""
    ap.add_argument(
        "--record", action="store_true",
        help="write a record to commit, benchmarks/results/<date>_<machine>_<kind>.json and .png (refused if it "
        "exists); default: the ignored benchmarks/out/, stem with the time of day",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="another folder for the JSON and PNG")
    ap.add_argument(
        "--tag", type=_tag, default=None,
        help="appended to the kind in the file name ([a-z0-9-]+): a second record on the same day and machine",
    )  # fmt: skip
    ap.add_argument("--no-write", action="store_true", help="print only")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    grid = QUICK if args.quick else PRESET_GRID if args.presets else FULL
    record = load_record(args.compare) if args.compare else None
    if record is not None:  # the record's cases, on its device, unless given
        rc = record["config"]
        args.device = args.device or rc["device"]
        args.d = args.d or rc["d"]
        args.shapes, args.tokens = args.shapes or rc["shapes"], args.tokens or rc["tokens"]
        args.modes = args.modes or rc["modes"]
        if args.providers == list(PROVIDERS):
            args.providers = [n for n in rc["providers"] if n in PROVIDERS]
    device = args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    d, dtype = layer_size(device)
    d = args.d or d
    # Pinned and recorded. One CPU thread by default: a multi-threaded GEMM waits at every barrier for its slowest
    # thread, so any other load on the machine swings the timings by 2x; one thread also compares across machines.
    threads = args.threads or (1 if device == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config: dict[str, Any] = {
        "preset": "compare" if record else "quick" if args.quick else "presets" if args.presets else "full",
        "device": device, "d": d,
        "dtype": str(dtype).removeprefix("torch."),
        "shapes": args.shapes or list(grid.shapes), "tokens": args.tokens or list(grid.tokens),
        "modes": args.modes or list(grid.modes), "providers": args.providers, "rounds": args.rounds or grid.rounds,
        "threads": threads, **({"note": args.note} if args.note else {}),
    }  # fmt: skip
    env = environment(threads)
    paths = result_paths(env, config["preset"], args.record, args.out, args.tag)
    if not args.no_write:
        check_free(paths)  # before the run, not after minutes of timing
    print(f"# {env['date']}  {env['machine']['gpu'] or env['machine']['cpu']}  threads={threads}  {config}", flush=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for shape in config["shapes"]:
        for tokens in config["tokens"]:
            t0 = time.perf_counter()
            rows += run_case(
                SHAPES[shape], tokens, d, dtype, device, config["modes"], config["providers"], config["rounds"]
            )
            print(f"  {shape} T={tokens}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    config["wall_s"] = round(time.perf_counter() - start, 1)
    config["load_avg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(format_table(rows))
    print("\nTargets:\n" + format_targets(evaluate_targets(rows)))
    if record is not None:
        config["compare"] = {"record": args.compare.name, "rows": compare_rows(rows, record["rows"])}
        print("\n" + format_comparison(config["compare"]["rows"], args.compare.name))
    print(f"\nwall time {config['wall_s']} s")
    if not args.no_write:
        write_json(paths[0], env, config, rows)
        plot(rows, paths[1], title=f"{paths[0].stem}:")
        print(f"wrote {paths[0]} and {paths[1].name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))

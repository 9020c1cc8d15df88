"""The one command: time every provider, print the table and targets, write JSON and a PNG under results/.

.venv/bin/python -m benchmarks.run --quick          # CPU subset, < 5 minutes on 2 cores
.venv/bin/python -m benchmarks.run                  # full grid of this machine (CPU: d=1024 fp32; GPU: d=4096 bf16)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .flops import MODES
from .harness import run_case
from .providers import PROVIDERS, SHAPES
from .report import environment, evaluate_targets, format_table, format_targets, machine_tag, plot, write_json

RESULTS = Path(__file__).resolve().parent / "results"

# The quick subset: the two shapes with targets, decode-ish and training token counts, inference and training.
QUICK = {"shapes": ["crabplus", "moe"], "tokens": [16, 2048], "modes": ["fwd", "fwd+bwd"], "rounds": 15}
FULL = {"shapes": list(SHAPES), "tokens": [1, 16, 2048, 8192], "modes": list(MODES), "rounds": 15}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the quick CPU subset: " + str(QUICK))
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, except --quick)")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int)
    ap.add_argument("--modes", nargs="+", choices=list(MODES))
    ap.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    ap.add_argument("--d", type=int, default=None, help="d_in = d_out (default 4096 on GPU, 1024 on CPU)")
    ap.add_argument("--rounds", type=int, default=None, help="timed samples per provider (median and IQR over them)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU), recorded")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory of the JSON and PNG")
    ap.add_argument("--name", default=None, help="file stem (default: <date>_<machine>_<quick|full>)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    preset = QUICK if args.quick else FULL
    device = args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    d = args.d or (4096 if device == "cuda" else 1024)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # Pinned and recorded. One CPU thread by default: a multi-threaded GEMM waits at every barrier for its slowest
    # thread, so any other load on the machine swings the timings by 2x; one thread also compares across machines.
    threads = args.threads or (1 if device == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config: dict[str, Any] = {
        "preset": "quick" if args.quick else "full", "device": device, "d": d,
        "dtype": str(dtype).removeprefix("torch."),
        "shapes": args.shapes or preset["shapes"], "tokens": args.tokens or preset["tokens"],
        "modes": args.modes or preset["modes"], "providers": args.providers, "rounds": args.rounds or preset["rounds"],
        "threads": threads,
    }  # fmt: skip
    env = environment(threads)
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
    print(f"\nwall time {config['wall_s']} s")
    if not args.no_write:
        stem = args.name or f"{env['date'][:10]}_{machine_tag(env)}_{config['preset']}"
        write_json(args.out / f"{stem}.json", env, config, rows)
        plot(rows, args.out / f"{stem}.png", title=f"{stem}:")
        print(f"wrote {args.out / stem}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Model-level training step: what a user sees. A tiny Llama with all seven projections adapted, one training step
(forward, loss, backward, AdamW step) per provider, the providers interleaved round by round, ratios paired by round.

.venv/bin/python -m benchmarks.model_step --quick            # CPU, one thread, part of `make bench` (~1-2 minutes)
.venv/bin/python -m benchmarks.model_step --quick --record   # a record to commit (benchmarks/results/)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from .harness import Step, quartiles, step_peak_bytes, time_interleaved
from .model_providers import MODEL_PROVIDERS, Built, ModelSize, base_model, build_model, model_skip_reason
from .report import (
    check_free,
    environment,
    format_mib,
    format_ms,
    result_paths,
    run_main,
    save_figure,
    write_text_new,
)

Row = dict[str, Any]
QUICK_ROUNDS = 7


def make_train_step(built: Built, input_ids: torch.Tensor) -> Step:
    """One training step of ``built``: grads reset untimed, then forward with the LM loss, backward, AdamW step
    (none for a model without trainable parameters: the frozen anchor times forward and backward)."""
    opt = torch.optim.AdamW(built.params, lr=1e-4) if built.params else None

    def prepare() -> None:
        if opt is not None:
            opt.zero_grad(set_to_none=True)

    def timed() -> None:
        loss = built.model(input_ids=input_ids, labels=input_ids, **built.forward_kwargs).loss
        loss.backward()
        if opt is not None:
            opt.step()

    return Step(prepare, timed)


def _init_error(built: Built, reference: torch.Tensor, input_ids: torch.Tensor) -> float:
    """Largest logit difference to the frozen model before training: every adapter starts as the identity (zero
    B), so anything but rounding means the provider does not wrap the same base model."""
    with torch.no_grad():
        logits = built.model(input_ids=input_ids, **built.forward_kwargs).logits
    return (logits.float() - reference).abs().max().item()


def _peak_bytes(step: Step, device: str) -> int | None:
    return step_peak_bytes(step) if device == "cuda" else None


def run_model_step(
    size: ModelSize, device: str, dtype: torch.dtype, providers: Sequence[str], rounds: int, warmup: int = 1
) -> list[Row]:
    """Every provider's training step on one base model and one batch; rows with median, IQR, ratios paired by
    round to the frozen model and to each provider's PEFT LoRA pair, trainable parameters, the init check and peak
    GPU memory (skipped providers get a row with the reason)."""
    base = base_model(size, device, dtype)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(size.vocab, (size.batch, size.seq), generator=g).to(device)
    with torch.no_grad():
        reference = base(input_ids=input_ids).logits.float()
    names = ["frozen", *[n for n in providers if n != "frozen"]]
    steps: dict[str, Step] = {}
    info: dict[str, Row] = {}
    rows: list[Row] = []
    for name in names:
        common = {"provider": name, "what": MODEL_PROVIDERS[name].what, "device": device, **asdict(size)}
        reason = model_skip_reason(name)
        if reason is None:
            try:
                built = build_model(name, base, size)
                init_err = _init_error(built, reference, input_ids)
            except Exception as exc:
                reason = f"fails on this stack: {type(exc).__name__}: {exc}"
        if reason is not None:
            rows.append({**common, "skipped": reason})
            continue
        info[name] = {
            **common, "trainable_params": sum(p.numel() for p in built.params), "packages": built.packages,
            "init_max_abs_err": init_err,
        }  # fmt: skip
        steps[name] = make_train_step(built, input_ids)
    samples = time_interleaved(steps, torch.device(device), rounds, warmup, min_round_s=0.0)
    frozen = samples["frozen"]
    for name, ts in samples.items():
        q1, med, q3 = quartiles(ts)
        pair = MODEL_PROVIDERS[name].paired_with
        ratios = quartiles([t / b for t, b in zip(ts, frozen)])
        row = {
            **info[name], "median_s": med, "q1_s": q1, "q3_s": q3, "rounds": len(ts),
            "x_frozen": ratios[1], "x_frozen_q1": ratios[0], "x_frozen_q3": ratios[2],
            "paired_with": pair if pair in samples else None,
            "x_pair": statistics.median(t / b for t, b in zip(ts, samples[pair])) if pair in samples else None,
            "peak_bytes": _peak_bytes(steps[name], device),
        }  # fmt: skip
        rows.append(row)
    return rows


def format_model_table(rows: Sequence[Row]) -> str:
    """Markdown table of the model-level rows; skipped providers listed below with their reason."""
    head = "| provider | what | trainable | median ms | IQR ms | x frozen | x PEFT pair | peak MiB | init err |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "skipped" in r:
            continue
        pair = "-" if r["x_pair"] is None else f"{r['x_pair']:.2f} ({r['paired_with']})"
        lines.append(
            f"| {r['provider']} | {r['what']} | {r['trainable_params']:,} | {format_ms(r['median_s'])} | "
            f"{format_ms(r['q1_s'])}-{format_ms(r['q3_s'])} | {r['x_frozen']:.2f} | {pair} | "
            f"{format_mib(r['peak_bytes'])} | {r['init_max_abs_err']:.1e} |"
        )
    lines += [f"\nskipped: {r['provider']}: {r['skipped']}" for r in rows if "skipped" in r]
    return "\n".join(lines)


def plot_model(rows: Sequence[Row], path: Any, title: str) -> None:
    """Horizontal bars: step time / frozen model's step, median of the paired rounds, their IQR as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "skipped" not in r]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(measured) + 1.2))
    ys = range(len(measured))[::-1]
    xs = [r["x_frozen"] for r in measured]
    ax.barh(list(ys), xs, color="tab:blue")
    spread = [
        [x - r["x_frozen_q1"] for x, r in zip(xs, measured)],
        [r["x_frozen_q3"] - x for x, r in zip(xs, measured)],
    ]
    ax.errorbar(xs, list(ys), xerr=spread, fmt="none", color="black", capsize=2)
    ax.set_yticks(list(ys), [r["provider"] for r in measured])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("training step time / frozen model's step (median of paired rounds)")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    from .run import add_output_args

    ap = argparse.ArgumentParser(prog="python -m benchmarks.model_step", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"CPU, one thread, {QUICK_ROUNDS} rounds")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, except --quick)")
    ap.add_argument("--providers", nargs="+", choices=list(MODEL_PROVIDERS), default=list(MODEL_PROVIDERS))
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on CPU), recorded")
    add_output_args(ap)
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    threads = args.threads or (1 if device == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    size = ModelSize()
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else 15)
    env = environment(threads)
    for pkg in ("mixlora",):
        env["versions"][pkg] = _installed(pkg)
    paths = result_paths(env, "model", args.record, args.out, args.tag)
    if not args.no_write:
        check_free(paths)
    print(f"# {env['date']}  {env['machine']['gpu'] or env['machine']['cpu']}  threads={threads}  {asdict(size)}")
    start = time.perf_counter()
    rows = run_model_step(size, device, dtype, args.providers, rounds)
    config = {
        "kind": "model", "device": device, "dtype": str(dtype).removeprefix("torch."), "rounds": rounds,
        "threads": threads, "size": asdict(size), "wall_s": round(time.perf_counter() - start, 1),
        "load_avg_1m_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }  # fmt: skip
    print(format_model_table(rows))
    print(f"\nwall time {config['wall_s']} s", file=sys.stderr)
    if not args.no_write:
        import json

        write_text_new(paths[0], json.dumps({"environment": env, "config": config, "rows": rows}, indent=1) + "\n")
        plot_model(rows, paths[1], title=f"{paths[0].stem}: {device} {config['dtype']}, {threads} thread(s)")
        print(f"wrote {paths[0]} and {paths[1].name}")
    return 0


def _installed(pkg: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(run_main(main))

"""Method study: routing settings and plain LoRA at one trainable-parameter budget, trained the same steps on tasks
that conflict by construction; per-task score, mean with a 95% confidence interval over seeds, and the share of
tasks where multi-task training beats single-task training.

.venv/bin/python -m benchmarks.study             # 8 minutes on 2 heavily loaded cores; JSON, PNG in benchmarks/out/
.venv/bin/python -m benchmarks.study --record    # the committed record, benchmarks/results/ (never overwritten)

The data. Sequences ``[task token, x1, y1, x2, y2, ...]`` over ``symbols`` symbols: ``y_i = map_t(x_i)``. The maps of
all tasks agree on the first half of the symbols (shared structure: one task's data teaches the others) and differ
on every symbol of the second half (conflict: each input there has a different answer in every task, told only by
the task token). A model that ignores the task token cannot score above chance on the conflicting half.
The score is the accuracy of the predicted ``y`` tokens (argmax, teacher forced) on held-out sequences.

The model. A randomly initialized tiny Llama (frozen, no download), all seven projections adapted. Each setting's
rank is the one whose trainable parameters come nearest the budget (plain LoRA at ``budget_rank``); the table gives
each setting's count. Single-task runs train one adapter per task on that task alone, the same steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import ilora
from ilora.config import CRAB_TARGETS

from .report import run_main, save_figure


@dataclass(frozen=True)
class StudySize:
    symbols: int = 32
    tasks: int = 4
    pairs: int = 8  # (x, y) pairs per sequence
    hidden: int = 64
    layers: int = 1
    heads: int = 4
    intermediate: int = 128
    batch: int = 32
    steps: int = 80
    lr: float = 5e-3
    test_per_task: int = 256
    budget_rank: int = 8  # the budget: plain LoRA of this rank on the seven projections


# Each setting's ilora options (None: PEFT's plain LoRA). Top-k gets the usual load-balance loss (Switch
# Transformer's 0.01): without it a top-k router may send every token to the same experts.
SETTINGS: dict[str, dict[str, Any] | None] = {
    "lora": None,
    "one_expert": {"num_experts": 1},
    "soft_token": {"num_experts": 3},
    "topk_token": {"num_experts": 4, "shared_a": False, "routing": "topk", "top_k": 2, "balance_loss_coef": 0.01},
    "task": {"num_experts": 4, "router": "task"},
}


def task_maps(size: StudySize, seed: int) -> torch.Tensor:
    """``[tasks, symbols]``: ``maps[t, x]`` is task t's answer to symbol x, a permutation per task. On the first half
    of the symbols every task has the same map; on the second half, ``m`` symbols, task t answers
    ``half + cycle[(start[x] + t) % m]`` (random ``cycle`` and ``start``), so any two tasks give different answers
    to every symbol of that half (needs ``tasks <= m``)."""
    half = size.symbols // 2
    m = size.symbols - half
    if size.tasks > m:
        raise ValueError(f"StudySize.tasks: {size.tasks} tasks cannot all conflict on {m} symbols; raise symbols")
    g = torch.Generator().manual_seed(10_000 + seed)
    shared = torch.randperm(half, generator=g)
    cycle, start = torch.randperm(m, generator=g), torch.randperm(m, generator=g)
    rows = [torch.cat([shared, half + cycle[(start + t) % m]]) for t in range(size.tasks)]
    return torch.stack(rows)


def make_batch(
    maps: torch.Tensor, tasks: torch.Tensor, pairs: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` ``[B, 1 + 2 pairs]`` for the task of each row; labels are -100 except at the ``y``.
    Token ids: symbols ``0..S-1``, then one task token per task."""
    symbols = maps.shape[1]
    x = torch.randint(symbols, (tasks.numel(), pairs), generator=g)
    y = maps[tasks[:, None], x]
    ids = torch.cat([(symbols + tasks)[:, None], torch.stack([x, y], -1).reshape(tasks.numel(), 2 * pairs)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, 2::2] = ids[:, 2::2]
    return ids, labels


def base_model(size: StudySize, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=size.symbols + size.tasks, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=2 + 2 * size.pairs, use_cache=False,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def adapt(base: nn.Module, setting: str, r: int, size: StudySize) -> nn.Module:
    """``base`` with the setting's adapter of rank ``r`` on the seven projections (alpha = 2 r, no dropout)."""
    options = SETTINGS[setting]
    targets = list(CRAB_TARGETS)
    if options is None:
        return get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    extra = {"num_tasks": size.tasks} if options.get("router") == "task" else {}
    config = ilora.ILoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0, **options, **extra)
    return get_peft_model(base, config)


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_rank(setting: str, size: StudySize) -> tuple[int, int]:
    """``(rank, trainable parameters)`` of ``setting`` nearest the budget. Parameters are affine in the rank
    (router and gates do not depend on it), so two builds give the line and a third checks the pick."""
    budget = _trainable(adapt(base_model(size, 0), "lora", size.budget_rank, size))
    p1, p2 = (_trainable(adapt(base_model(size, 0), setting, r, size)) for r in (1, 2))
    r = max(1, round((budget - (2 * p1 - p2)) / (p2 - p1)))
    params = _trainable(adapt(base_model(size, 0), setting, r, size))
    if params != (2 * p1 - p2) + r * (p2 - p1):
        raise AssertionError(f"{setting}: trainable parameters are not affine in the rank; the budget match is off")
    return r, params


def _forward_kwargs(setting: str, tasks: torch.Tensor) -> dict[str, torch.Tensor]:
    options = SETTINGS[setting]
    return {"ilora_task_ids": tasks} if options is not None and options.get("router") == "task" else {}


def train(model: nn.Module, setting: str, maps: torch.Tensor, tasks: Sequence[int], size: StudySize, seed: int) -> None:
    """``size.steps`` AdamW steps on batches whose rows draw their task uniformly from ``tasks``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=size.lr)
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor(list(tasks))
    model.train()
    for _ in range(size.steps):
        rows = allowed[torch.randint(len(allowed), (size.batch,), generator=g)]
        ids, labels = make_batch(maps, rows, size.pairs, g)
        loss = model(input_ids=ids, labels=labels, **_forward_kwargs(setting, rows)).loss + ilora.aux_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate(model: nn.Module, setting: str, maps: torch.Tensor, tasks: Sequence[int], size: StudySize, seed: int):
    """Accuracy of the predicted ``y`` tokens per task, on held-out sequences (a generator no training run uses)."""
    model.eval()
    scores = {}
    for t in tasks:
        g = torch.Generator().manual_seed(1_000_000 + 1000 * seed + t)
        rows = torch.full((size.test_per_task,), t)
        ids, labels = make_batch(maps, rows, size.pairs, g)
        pred = model(input_ids=ids, **_forward_kwargs(setting, rows)).logits.argmax(-1)[:, :-1]
        target = labels[:, 1:]
        mask = target != -100
        scores[t] = (pred[mask] == target[mask]).float().mean().item()
    return scores


def run_study(size: StudySize, seeds: Sequence[int], settings: Sequence[str], log: bool = True) -> dict[str, Any]:
    """Every setting, multi-task and single-task per task, for every seed: ``{setting: {rank, params, multi:
    [[score per task] per seed], single: [[...] per seed]}}``."""
    out: dict[str, Any] = {}
    all_tasks = list(range(size.tasks))
    for setting in settings:
        r, params = matched_rank(setting, size)
        multi, single = [], []
        t0 = time.perf_counter()
        for seed in seeds:
            maps = task_maps(size, seed)
            model = adapt(base_model(size, seed), setting, r, size)
            train(model, setting, maps, all_tasks, size, seed)
            multi.append([evaluate(model, setting, maps, all_tasks, size, seed)[t] for t in all_tasks])
            alone = []
            for t in all_tasks:
                model = adapt(base_model(size, seed), setting, r, size)
                train(model, setting, maps, [t], size, seed)
                alone.append(evaluate(model, setting, maps, [t], size, seed)[t])
            single.append(alone)
        out[setting] = {"rank": r, "trainable_params": params, "multi": multi, "single": single}
        if log:
            print(f"  {setting}: r={r}, {params} params, {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (p > 0.5): bisection on the CDF, the CDF
    by Simpson's rule on the density (accurate to ~1e-6 here; no SciPy in the environment)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t over the values; 0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, t_quantile(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per setting: per-task mean and CI (multi- and single-task), the mean over tasks (per seed, then CI over
    seeds), the share of tasks where the multi-task mean beats the single-task mean, and (when plain LoRA ran) the
    multi-task mean minus LoRA's, paired by seed (same base, data and batches), with its CI."""
    out = {}
    seed_means = {k: [statistics.fmean(run) for run in res["multi"]] for k, res in results.items()}
    for setting, res in results.items():
        multi, single = res["multi"], res["single"]
        tasks = range(len(multi[0]))
        per_task = [mean_ci([run[t] for run in multi]) for t in tasks]
        per_task_single = [mean_ci([run[t] for run in single]) for t in tasks]
        beats = sum(m[0] > s[0] for m, s in zip(per_task, per_task_single))
        out[setting] = {
            "rank": res["rank"], "trainable_params": res["trainable_params"],
            "multi_per_task": per_task, "single_per_task": per_task_single,
            "multi_mean": mean_ci([statistics.fmean(run) for run in multi]),
            "single_mean": mean_ci([statistics.fmean(run) for run in single]),
            "share_multi_beats_single": beats / len(per_task),
            "minus_lora_paired": (
                mean_ci([a - b for a, b in zip(seed_means[setting], seed_means["lora"])])
                if "lora" in results and setting != "lora" else None
            ),
        }  # fmt: skip
    return out


def format_summary(summary: dict[str, Any]) -> str:
    tasks = len(next(iter(summary.values()))["multi_per_task"])
    head = [
        "setting", "rank", "params", *[f"task {t}" for t in range(tasks)], "mean (95% CI)", "minus LoRA, paired",
        "single-task mean",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, s in summary.items():
        cells = [f"{m:.3f} ± {h:.3f}" for m, h in s["multi_per_task"]]
        paired = s.get("minus_lora_paired")
        diff = "-" if paired is None else f"{paired[0]:+.3f} ± {paired[1]:.3f}"
        lines.append(
            f"| {setting} | {s['rank']} | {s['trainable_params']:,} | {' | '.join(cells)} | "
            f"**{s['multi_mean'][0]:.3f} ± {s['multi_mean'][1]:.3f}** | {diff} | "
            f"{s['single_mean'][0]:.3f} ± {s['single_mean'][1]:.3f} |"
        )
    shares = ", ".join(f"{k} {s['share_multi_beats_single']:.0%}" for k, s in summary.items())
    return "\n".join(lines) + f"\n\nshare of tasks where multi-task beats single-task: {shares}"


def plot_study(summary: dict[str, Any], path: Path, title: str) -> None:
    """Left: mean score over tasks, multi-task and single-task, 95% CI. Right: multi-task score per task, 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    tasks = len(summary[names[0]]["multi_per_task"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 1.6]})
    xs = range(len(names))
    series = ((-0.15, "multi_mean", "multi-task", "o"), (0.15, "single_mean", "single-task", "s"))
    for offset, key, label, style in series:
        ms = [summary[n][key] for n in names]
        left.errorbar([x + offset for x in xs], [m for m, _ in ms], yerr=[h for _, h in ms], fmt=style, capsize=3,
                      label=label, mfc="white" if key == "single_mean" else None)  # fmt: skip
    left.set_xticks(list(xs), names, rotation=20)
    left.set_ylabel("y-token accuracy, held out (mean over tasks)")
    left.legend(fontsize=8)
    left.set_title("mean over tasks, 95% CI over seeds", fontsize=9)
    width = 0.8 / len(names)
    for j, n in enumerate(names):
        ms = summary[n]["multi_per_task"]
        pos = [t + (j - (len(names) - 1) / 2) * width for t in range(tasks)]
        right.bar(pos, [m for m, _ in ms], width=width, yerr=[h for _, h in ms], capsize=2, label=n)
    right.set_xticks(range(tasks), [f"task {t}" for t in range(tasks)])
    right.set_ylim(0, 1.3)  # room above 1 for the CI whiskers and the legend
    right.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    right.legend(fontsize=7, ncol=len(names), loc="upper center")
    right.set_title("multi-task score per task, 95% CI over seeds", fontsize=9)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def _title(stem: str, tasks: int, seeds: int) -> str:
    return f"{stem}: {tasks} conflicting tasks, {seeds} seeds"


def main(argv: Sequence[str] | None = None) -> int:
    from .report import check_free, environment, redraw_path, result_paths, write_text_new
    from .run import add_output_args

    ap = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=StudySize.steps)
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--threads", type=int, default=1, help="CPU threads, recorded")
    ap.add_argument(
        "--replot", type=Path, default=None,
        help="reprint the table of this study JSON and redraw its PNG (into --out, default benchmarks/out/, or "
        "--beside it; never over an existing file); run nothing",
    )  # fmt: skip
    ap.add_argument("--beside", action="store_true", help="with --replot: write the PNG beside the JSON")
    add_output_args(ap)
    args = ap.parse_args(argv)
    if args.replot is not None:
        png = redraw_path(args.replot, args.out, args.beside)
        data = json.loads(args.replot.read_text())
        title = _title(args.replot.stem, data["config"]["size"]["tasks"], data["config"]["seeds"])
        summary = summarize(data["results"])  # recomputed from the raw scores: summaries added later show too
        print(format_summary(summary))
        plot_study(summary, png, title)
        print(f"wrote {png}")
        return 0
    torch.set_num_threads(args.threads)
    size = StudySize(steps=args.steps)
    env = environment(args.threads)
    paths = result_paths(env, "study", args.record, args.out, args.tag)
    if not args.no_write:
        check_free(paths)
    start = time.perf_counter()
    results = run_study(size, range(args.seeds), args.settings)
    summary = summarize(results)
    config = {
        "kind": "study", "size": asdict(size), "seeds": args.seeds, "settings": {k: SETTINGS[k] for k in args.settings},
        "threads": args.threads, "wall_s": round(time.perf_counter() - start, 1),
        "load_avg_1m_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }  # fmt: skip
    print(format_summary(summary))
    print(f"\nwall time {config['wall_s']} s", file=sys.stderr)
    if not args.no_write:
        record = {"environment": env, "config": config, "results": results, "summary": summary}
        write_text_new(paths[0], json.dumps(record, indent=1) + "\n")
        plot_study(summary, paths[1], _title(paths[0].stem, size.tasks, args.seeds))
        print(f"wrote {paths[0]} and {paths[1].name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))

"""Multi-task transfer: each task trained alone and all tasks together, with plain LoRA and with I-LoRA.

    crabplus transfer --config examples/crabplus/configs/transfer_tiny.yaml

For every adapter, one run per task (``<out>/<adapter>/<task>``) and one on all tasks (``<out>/<adapter>/all``), each
trained with the same config (epochs, lr, ...) and scored on the tasks it saw. Per task, transfer = multi-task score
minus single-task score on the task's primary metric (the first metric of the registry that was computed);
positive transfer = the multi-task model is better. Writes ``transfer.csv``, ``transfer.md``, ``transfer.png`` and,
for I-LoRA, ``router_usage_ilora_all.png`` (the multi-task model's routing per task, layer and expert).
"""

from __future__ import annotations

import copy
import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from crabplus.config import RunConfig
from crabplus.folder_lock import hold_folder
from crabplus.tasks import get_task

LOWER_IS_BETTER = ("s_metric",)


@dataclass
class TransferConfig:
    out: str = "runs/transfer"
    adapters: list[Literal["lora", "ilora"]] = field(default_factory=lambda: ["lora", "ilora"])
    synthesize: bool = True
    """Generate the synthetic dataset (``data.synth``) under ``<out>/data`` and use it, instead of ``data.root``."""


@dataclass
class TransferRunConfig(RunConfig):
    """A run config plus the ``transfer`` section; the tasks are ``data.subsets``."""

    transfer: TransferConfig = field(default_factory=TransferConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.data.subsets, dict) or len(self.subsets()) < 2:
            raise ValueError("data.subsets: transfer needs a list of at least two subsets (the tasks)")
        if missing := [s for s in self.subsets() if not get_task(s).has_test]:
            raise ValueError(f"data.subsets: {missing} ship no test split, so transfer cannot be scored on them")
        if not self.transfer.adapters:
            raise ValueError("transfer.adapters: name at least one of 'lora', 'ilora'")


def primary_metric(subset: str, scores: Mapping[str, float]) -> tuple[str, float]:
    """The first registry metric of ``subset`` present in ``scores`` and not NaN (``nan`` if none)."""
    for metric in get_task(subset).metrics:
        for key in (metric, f"{metric}_type"):  # AVVP reports avvp_segment as several averages; "type" is the main
            if key in scores and not math.isnan(scores[key]) and metric not in LOWER_IS_BETTER:
                return key, float(scores[key])
    return "", float("nan")


@dataclass
class TransferRow:
    adapter: str
    task: str
    metric: str
    single: float
    multi: float

    @property
    def delta(self) -> float:
        return self.multi - self.single


def transfer_rows(
    single: Mapping[str, Mapping[str, Mapping[str, float]]], multi: Mapping[str, Mapping[str, Mapping[str, float]]]
) -> list[TransferRow]:
    """Rows from ``single[adapter][task]`` and ``multi[adapter][task]`` score dicts (``crabplus.metrics.score``)."""
    rows = []
    for adapter, tasks in single.items():
        for task, scores in tasks.items():
            metric, alone = primary_metric(task, scores)
            _, together = primary_metric(task, multi.get(adapter, {}).get(task, {}))
            rows.append(TransferRow(adapter, task, metric, alone, together))
    return rows


def positive_share(rows: list[TransferRow], adapter: str) -> float:
    """Share of the adapter's tasks where the multi-task model scores strictly higher (NaN rows left out)."""
    deltas = [r.delta for r in rows if r.adapter == adapter and not math.isnan(r.delta)]
    return sum(d > 0 for d in deltas) / len(deltas) if deltas else float("nan")


def transfer_table(rows: list[TransferRow]) -> str:
    """Markdown: one row per (adapter, task), then the share of tasks with positive transfer per adapter."""
    lines = ["| adapter | task | metric | single-task | multi-task | transfer |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r.adapter} | {r.task} | {r.metric} | {r.single:.3f} | {r.multi:.3f} | {r.delta:+.3f} |" for r in rows
    ]
    lines += ["", "| adapter | tasks with positive transfer |", "|---|---|"]
    for adapter in dict.fromkeys(r.adapter for r in rows):
        lines.append(f"| {adapter} | {positive_share(rows, adapter):.0%} |")
    return "\n".join(lines)


def write_transfer(rows: list[TransferRow], out: Path) -> tuple[str, Path]:
    """``transfer.csv``, ``transfer.md`` and ``transfer.png`` under ``out``; returns the table and the plot path."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "transfer.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["adapter", "task", "metric", "single", "multi", "transfer"])
        writer.writerows([r.adapter, r.task, r.metric, r.single, r.multi, r.delta] for r in rows)
    from crabplus.plots import plot_transfer

    table = transfer_table(rows)
    (out / "transfer.md").write_text(table + "\n")
    deltas: dict[str, dict[str, float]] = {}
    for r in rows:
        deltas.setdefault(r.adapter, {})[r.task] = r.delta
    return table, plot_transfer(deltas, out / "transfer.png")


def _run_config(cfg: TransferRunConfig, adapter: str, tasks: list[str], name: str) -> RunConfig:
    run = RunConfig(**{k: copy.deepcopy(getattr(cfg, k)) for k in ("data", "model", "train", "eval")})
    run.model.adapter = adapter
    if adapter == "lora":  # plain LoRA has no experts or router settings
        run.model.num_experts, run.model.ilora_extra = None, {}
    run.data.subsets, run.eval.subsets = list(tasks), list(tasks)
    run.train.out = str(Path(cfg.transfer.out) / adapter / name)
    return run


def run_transfer(cfg: TransferRunConfig, progress: bool = True) -> list[TransferRow]:
    """Train and score every (adapter, single task | all tasks) run, then write the transfer table and plots.
    Finished runs are kept: running again resumes and re-scores. Holds ``transfer.out`` (``crabplus.folder_lock``)."""
    with hold_folder(cfg.transfer.out):  # one transfer writes into its folder at a time
        return _run_transfer(cfg, Path(cfg.transfer.out), progress)


def _run_transfer(cfg: TransferRunConfig, out: Path, progress: bool) -> list[TransferRow]:
    """``run_transfer`` once ``out`` is held."""
    from crabplus.data.synth import synthesize
    from crabplus.evaluate import evaluate
    from crabplus.interrupt import Interrupted
    from crabplus.plots import plot_router_usage
    from crabplus.train import loss_summary, train

    if cfg.transfer.synthesize:
        synthesize(cfg, out / "data")
    tasks = cfg.subsets()
    single: dict[str, dict[str, dict[str, float]]] = {}
    multi: dict[str, dict[str, dict[str, float]]] = {}
    for adapter in cfg.transfer.adapters:
        single[adapter] = {}
        for name, run_tasks in [(t, [t]) for t in tasks] + [("all", tasks)]:
            run = _run_config(cfg, adapter, run_tasks, name)
            print(f"transfer: {adapter} on {name}")
            result = train(run, progress=progress)
            print(f"  {loss_summary(result.losses)}")
            ev = None if result.interrupted else evaluate(run, progress=progress)
            if ev is None or ev.interrupted:  # the runs so far are kept; the same command continues
                raise Interrupted(result.interrupted or ev.interrupted)
            if name == "all":
                multi[adapter] = ev.scores
                if ev.usage:
                    plot_router_usage(ev.usage, out / f"router_usage_{adapter}_all.png",
                                      f"{adapter} multi-task model: router usage per task")  # fmt: skip
            else:
                single[adapter][name] = ev.scores[name]
    rows = transfer_rows(single, multi)
    table, plot = write_transfer(rows, out)
    print(table)
    print(f"wrote {out / 'transfer.csv'}, {plot}")
    return rows

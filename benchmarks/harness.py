"""Measurement: interleaved timing, bytes saved for backward, peak GPU memory, and one case run end to end."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ilora import functional as IF

from .flops import MODES, flop_floor, flop_ratio
from .providers import PROVIDERS, Problem, Shape, build, ilora_choice, make_problem, route, skip_reason


@dataclass
class Step:
    """One timed unit: ``prepare`` runs untimed before each call of ``timed``."""

    prepare: Callable[[], None]
    timed: Callable[[], Any]


def make_step(module: nn.Module, p: Problem, mode: str) -> Step:
    """The call timed in ``mode``: forward under no_grad (inference), backward alone, or forward plus backward."""
    params = [q for q in module.parameters() if q.requires_grad]
    state: dict[str, torch.Tensor] = {}

    def clear_grads() -> None:
        # Fresh grads every call: accumulating into old ones would add a pass the first call does not pay.
        p.x.grad = None
        for q in params:
            q.grad = None

    def forward_nograd() -> torch.Tensor:
        with torch.no_grad():
            return module(p.x)

    def prepare_bwd() -> None:
        clear_grads()
        state["out"] = module(p.x)

    if mode == "fwd":
        return Step(lambda: None, forward_nograd)
    if mode == "bwd":
        return Step(prepare_bwd, lambda: state.pop("out").backward(p.dy))
    if mode == "fwd+bwd":
        return Step(clear_grads, lambda: module(p.x).backward(p.dy))
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


class _Clock:
    """perf_counter on CPU; CUDA events on GPU, with the L2 cache flushed before each call (as do_bench does)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if self.cuda else None

    def run(self, step: Step, calls: int) -> float:
        """Mean seconds per call of ``step.timed`` over ``calls`` calls."""
        if not self.cuda:
            total = 0.0
            for _ in range(calls):
                step.prepare()
                start = time.perf_counter()
                step.timed()
                total += time.perf_counter() - start
            return total / calls
        events = []
        for _ in range(calls):
            step.prepare()
            assert self.flush is not None
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step.timed()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in events) / 1e3 / calls


def time_interleaved(
    steps: dict[str, Step], device: torch.device, rounds: int, warmup: int = 1, min_round_s: float = 0.05
) -> dict[str, list[float]]:
    """Seconds per call of each step, one sample per round; providers alternate within every round (order
    rotated each round) so drift in clock speed or cache state hits all of them alike."""
    clock = _Clock(device)
    calls: dict[str, int] = {}
    for name, step in steps.items():
        for _ in range(warmup):
            clock.run(step, 1)
        once = clock.run(step, 1)
        # Short calls are repeated within a sample so the timer's resolution and overhead stay negligible.
        calls[name] = max(1, min(1000, math.ceil(min_round_s / max(once, 1e-7))))
    names = list(steps)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            samples[name].append(clock.run(steps[name], calls[name]))
    return samples


def saved_bytes(module: nn.Module, p: Problem) -> int:
    """Bytes of the tensors one forward saves for backward, counted once per storage (views share one), leaving out
    the module's parameters and the input ``x``: those are resident anyway, the rest is memory the layer adds."""
    resident = {t.untyped_storage().data_ptr() for t in [p.x, *module.parameters()]}
    return count_saved_bytes(lambda: module(p.x), resident)


def count_saved_bytes(fn: Callable[[], Any], resident: Iterable[int] = ()) -> int:
    """Bytes saved for backward while ``fn`` runs, deduplicated by storage; storages whose data pointer is in
    ``resident`` are not counted."""
    skip = set(resident)
    seen: dict[int, int] = {}
    keep: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = storage.nbytes()
        keep.append(t)  # keeps the storage alive so its address is not reused by a later tensor
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    keep.clear()
    return sum(seen.values())


def peak_memory(module: nn.Module, p: Problem, mode: str) -> int | None:
    """Peak GPU bytes allocated above the resting state during one call in ``mode`` (None off GPU)."""
    if p.x.device.type != "cuda":
        return None
    step = make_step(module, p, "fwd+bwd" if mode == "bwd" else mode)  # bwd alone still needs its forward's graph
    return step_peak_bytes(step)


def step_peak_bytes(step: Step) -> int:
    """Peak CUDA bytes allocated above the resting state while ``step.timed()`` runs once (after ``prepare``)."""
    step.prepare()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    rest = torch.cuda.memory_allocated()
    step.timed()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - rest


def reference_output(p: Problem) -> torch.Tensor:
    """The routed-LoRA output by ilora's pure-PyTorch math in float32: the oracle every routed provider matches."""
    x = p.x.detach().float()
    g = route(x, p.router.float().T, p.shape)
    A, B = p.A.float(), p.B.float()
    if g.dense is not None:
        delta = IF.soft_routed_lora(x, A, B, g.dense, p.scaling)
    else:
        delta = IF.topk_routed_lora(x, A, B, g.weights, g.indices, p.scaling)
    return x @ p.weight.float().T + delta


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median, third quartile (inclusive method; all three the value itself for one value)."""
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return q1, med, q3


def provider_note(name: str, p: Problem) -> dict[str, str]:
    """For ilora's providers, the compute path the layer takes and, where it runs PyTorch where Triton would, why
    (``ilora.paths.select_path``'s reason, the one the layer logs): ``{"path": ..., "note": ...}``."""
    kernels = {"ilora_torch": "torch", "ilora_triton": "triton"}.get(name)
    if kernels is None:
        return {}
    choice = ilora_choice(p, kernels)
    return {"path": choice.path.value, **({"note": choice.reason} if choice.reason else {})}


def run_case(
    shape: Shape,
    tokens: int,
    d: int,
    dtype: torch.dtype,
    device: str,
    modes: Sequence[str],
    providers: Sequence[str],
    rounds: int,
    warmup: int = 1,
    min_round_s: float = 0.05,
) -> list[dict[str, Any]]:
    """Every provider on one (shape, tokens) problem in each mode: one row per provider and mode (skips included)."""
    p = make_problem(shape, tokens, d, dtype, device)
    names = ["base", *[n for n in providers if n != "base"]]
    modules: dict[str, nn.Module] = {}
    rows: list[dict[str, Any]] = []
    common = dict(shape=shape.name, tokens=tokens, d=d, dtype=str(dtype).removeprefix("torch."), device=device)
    for name in names:
        reason = skip_reason(name, p)
        if reason is None:
            modules[name] = build(name, p)
        else:
            rows.extend({**common, "mode": m, "provider": name, "skipped": reason} for m in modes)
    notes = {name: provider_note(name, p) for name in modules}
    ref = reference_output(p)
    checks: dict[str, float | None] = {}
    saved: dict[str, int] = {}
    for name, module in modules.items():
        routed = PROVIDERS[name][2]
        with torch.no_grad():
            out = module(p.x).float()
        checks[name] = (out - ref).abs().max().item() if routed else None
        saved[name] = saved_bytes(module, p)
    for mode in modes:
        samples = time_interleaved(
            {n: make_step(m, p, mode) for n, m in modules.items()}, torch.device(device), rounds, warmup, min_round_s
        )
        base = samples["base"]
        _, base_med, _ = quartiles(base)
        fr = flop_ratio(shape, tokens, d, d, mode)
        for name, ts in samples.items():
            q1, med, q3 = quartiles(ts)
            # Ratios and differences are paired by round (median over rounds): the two samples of a round ran
            # seconds apart, so load from other processes on a shared machine mostly cancels.
            x_q1, x_base, x_q3 = quartiles([t / b for t, b in zip(ts, base)])
            rows.append(
                {
                    **common, "mode": mode, "provider": name, "median_s": med, "q1_s": q1, "q3_s": q3,
                    "min_s": min(ts), "max_s": max(ts), "rounds": len(ts), "base_median_s": base_med,
                    "x_base": x_base, "x_floor": x_base / (1 + fr), "flop_ratio": fr,
                    "floor_s": flop_floor(base_med, shape, tokens, d, d, mode),
                    "adapter_s": statistics.median(t - b for t, b in zip(ts, base)),
                    "saved_bytes": saved[name] - saved["base"],
                    "peak_bytes": peak_memory(modules[name], p, mode),
                    "max_abs_err": checks[name], "x_base_q1": x_q1, "x_base_q3": x_q3, **notes[name],
                }
            )  # fmt: skip
    return rows

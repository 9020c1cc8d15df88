"""The sparse (top-k) path against PEFT LoRA of the same adapter FLOPs, at the layer level, and where its time goes.

    python -m benchmarks.sparse_path                       # moe shape (top-2 of 8, r 16, per-expert A), T 1024, d 512
    python -m benchmarks.sparse_path --tokens 2048 --d 1024 --rounds 21
    python -m benchmarks.sparse_path --thread-clock        # CPU time of this thread: on a machine others load
    python -m benchmarks.sparse_path --profile             # torch.profiler: self time per op, ilora and LoRA
    python -m benchmarks.sparse_path --ops                 # CPU time of this thread per op (a shared machine)

Providers, timed interleaved round by round on one thread (``benchmarks.harness``): the frozen base linear, ilora's
layer on the PyTorch path, and PEFT LoRA of rank ``--lora-rank`` (default 36: the rank whose ``r (d_in + d_out)``
FLOPs per token equal top-2 of 8 experts of rank 16 with per-expert A plus the router, ``(2*16 + 8) d_in + 2*16 d_out``,
at d_in = d_out). Printed: median ms per call and the per-round paired ratios ilora / LoRA and each / base.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from unittest import mock

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import harness
from .harness import make_step
from .providers import SHAPES, BaseLinear, IloraLinear, Problem, _frozen_linear, make_problem


class PeftLoraOfRank(nn.Module):
    """PEFT's plain LoRA of a given rank on the problem's frozen base (its own random A and B)."""

    def __init__(self, p: Problem, rank: int) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        holder = nn.Module()
        holder.proj = _frozen_linear(p)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], lora_dropout=0.0)
        self.proj = get_peft_model(holder, config, autocast_adapter_dtype=False).base_model.model.proj
        with torch.no_grad():
            self.proj.lora_B["default"].weight.uniform_(-(rank**-0.5), rank**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def compare(p: Problem, lora_rank: int, modes: Sequence[str], rounds: int, thread_clock: bool = False) -> None:
    """Interleaved timing (``harness.time_interleaved``); ``thread_clock`` swaps its wall clock for this thread's CPU
    time, which leaves out the time other processes hold the core (a shared machine), not the cache they evict."""
    modules = {"base": BaseLinear(p), "ilora_torch": IloraLinear(p, "torch"), "peft_lora": PeftLoraOfRank(p, lora_rank)}
    for mode in modes:
        steps = {n: make_step(m, p, mode) for n, m in modules.items()}
        with mock.patch.object(harness.time, "perf_counter", time.thread_time if thread_clock else time.perf_counter):
            samples = harness.time_interleaved(steps, p.x.device, rounds, warmup=2)
        base, ilora, lora = samples["base"], samples["ilora_torch"], samples["peft_lora"]
        paired = statistics.median(a / b for a, b in zip(ilora, lora))
        spread = sorted(a / b for a, b in zip(ilora, lora))
        print(
            f"{mode:8s} base {statistics.median(base) * 1e3:7.2f} ms | ilora {statistics.median(ilora) * 1e3:7.2f} ms"
            f" ({statistics.median(a / b for a, b in zip(ilora, base)):.3f}x base) | lora r{lora_rank}"
            f" {statistics.median(lora) * 1e3:7.2f} ms ({statistics.median(a / b for a, b in zip(lora, base)):.3f}x"
            f" base) | ilora / lora {paired:.3f} (min {spread[0]:.3f}, max {spread[-1]:.3f}, {rounds} rounds)"
        )


def profile(p: Problem, lora_rank: int, calls: int = 10, rows: int = 25) -> None:
    """Self CPU time per (op, input shapes), per fwd+bwd call, of ilora's layer and of PEFT LoRA, sorted."""
    for name, module in (
        ("ilora_torch", IloraLinear(p, "torch")),
        (f"peft_lora r{lora_rank}", PeftLoraOfRank(p, lora_rank)),
    ):
        step = make_step(module, p, "fwd+bwd")
        for _ in range(3):
            step.prepare()
            step.timed()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                step.prepare()
                step.timed()
        events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
        events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) / calls / 1e3
        print(f"== {name}: {total:.2f} ms of aten ops per fwd+bwd call")
        for e in events[:rows]:
            shapes = [s for s in e.input_shapes if s][:3]
            print(f"  {e.self_cpu_time_total / calls / 1e3:7.3f} ms  {e.count // calls:3d}x  {e.key:28s} {shapes}")


class _OpClock(TorchDispatchMode):
    """This thread's CPU time per (aten op, input shapes): unlike the profiler's wall time, it leaves out the time
    other processes hold the core."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: Counter[tuple[str, tuple]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.thread_time()
        out = func(*args, **(kwargs or {}))
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))[:3]
        self.seconds[(str(func).removeprefix("aten."), shapes)] += time.thread_time() - start
        return out


def op_times(p: Problem, lora_rank: int, mode: str, calls: int = 10, rows: int = 16) -> None:
    """CPU time per op per call in ``mode`` of ilora's layer and of PEFT LoRA, largest first."""
    for name, module in (
        ("ilora_torch", IloraLinear(p, "torch")),
        (f"peft_lora r{lora_rank}", PeftLoraOfRank(p, lora_rank)),
    ):
        step = make_step(module, p, mode)
        for _ in range(3):
            step.prepare()
            step.timed()
        clock = _OpClock()
        for _ in range(calls):
            step.prepare()
            with clock:
                step.timed()
        print(f"== {name} {mode}: {sum(clock.seconds.values()) / calls * 1e3:.2f} ms of aten ops per call")
        for (op, shapes), seconds in clock.seconds.most_common(rows):
            print(f"  {seconds / calls * 1e3:7.3f} ms  {op:28s} {list(shapes)}")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sparse_path", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="moe", choices=[n for n, s in SHAPES.items() if s.top_k is not None])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--lora-rank", type=int, default=36)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="torch.profiler table (wall time) of one fwd+bwd call")
    ap.add_argument("--ops", action="store_true", help="CPU time per aten op in each of --modes")
    ap.add_argument("--thread-clock", action="store_true", help="time this thread's CPU time (a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    p = make_problem(SHAPES[args.shape], args.tokens, args.d)
    if args.profile:
        profile(p, args.lora_rank)
    elif args.ops:
        for mode in args.modes:
            op_times(p, args.lora_rank, mode)
    else:
        compare(p, args.lora_rank, args.modes, args.rounds, args.thread_clock)


if __name__ == "__main__":
    main()

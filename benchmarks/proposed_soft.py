"""What-if for ilora's torch path (soft routing, shared A): the changes proposed in README "Why ilora's torch path
misses the CPU targets", timed in the same interleaved run as the current path and the authors' loop.

    .venv/bin/python -m benchmarks.proposed_soft            # crabplus, T=2048, d=1024, fp32, 1 thread, ~1 minute

This file only measures a proposal; ilora itself is unchanged by it.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from .flops import flop_ratio
from .harness import make_step, reference_output, time_interleaved
from .providers import SHAPES, Problem, build, make_problem


class ProposedSoft(nn.Module):
    """ilora's soft shared-A math with three changes: the router weight in ``nn.Linear`` layout ``[E, d_in]``, the
    scaling applied to the ``[T, E]`` gates instead of the ``[T, d_out]`` output, and the residual add fused into
    the expand GEMM (``addmm``)."""

    def __init__(self, p: Problem) -> None:
        super().__init__()
        self.base = build("base", p).base
        self.A = nn.Parameter(p.A.detach().clone())
        self.B = nn.Parameter(p.B.detach().clone())
        self.router = nn.Parameter(p.router.detach().T.contiguous())
        self.scaling = p.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        E, r, d_out = self.B.shape
        g = torch.softmax(F.linear(x, self.router).float(), -1).to(x.dtype) * self.scaling
        hg = ((x @ self.A[0]).unsqueeze(1) * g.unsqueeze(-1)).reshape(x.shape[0], E * r)
        return torch.addmm(self.base(x), hg, self.B.reshape(E * r, d_out))


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.proposed_soft", description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = make_problem(SHAPES["crabplus"], args.tokens, args.d)
    modules = {n: build(n, p) for n in ("base", "ilora_torch", "authors_loop")}
    modules["proposed"] = ProposedSoft(p)
    err = (modules["proposed"](p.x) - reference_output(p)).abs().max().item()
    print(f"proposed vs reference: max abs err {err:.2e}")
    for mode in ("fwd", "fwd+bwd"):
        steps = {n: make_step(m, p, mode) for n, m in modules.items()}
        samples = time_interleaved(steps, torch.device("cpu"), rounds=args.rounds)
        base, fr = samples["base"], flop_ratio(p.shape, args.tokens, args.d, args.d, mode)
        adapter = {n: statistics.median(t - b for t, b in zip(ts, base)) for n, ts in samples.items()}
        for name, ts in samples.items():
            x_floor = statistics.median(t / b for t, b in zip(ts, base)) / (1 + fr)
            print(
                f"{mode:8s} {name:13s} median {statistics.median(ts) * 1e3:7.1f} ms  x floor {x_floor:.3f}  "
                f"adapter {adapter[name] * 1e3:6.1f} ms  / authors' {adapter[name] / adapter['authors_loop']:.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

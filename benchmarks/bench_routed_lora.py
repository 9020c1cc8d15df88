"""The suite under pytest-benchmark: one benchmark per (shape, tokens, mode, provider).

    .venv/bin/pytest benchmarks/bench_routed_lora.py                          # quick CPU subset
    ILORA_BENCH=full .venv/bin/pytest benchmarks/bench_routed_lora.py         # full grid of this machine
    .venv/bin/pytest benchmarks/bench_routed_lora.py --benchmark-autosave     # keep for --benchmark-compare

pytest-benchmark runs each benchmark's rounds back to back; ``python -m benchmarks.run`` interleaves the providers
round by round and is the one to quote (ratios, FLOP floor, saved bytes, targets). Use this file to track one
provider across commits. ``extra_info`` carries the FLOP ratio and the bytes saved for backward.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from .flops import flop_ratio
from .grid import FULL, QUICK, layer_size
from .harness import make_step, saved_bytes
from .providers import PROVIDERS, SHAPES, build, make_problem, skip_reason

GRID = FULL if os.environ.get("ILORA_BENCH", "quick") == "full" else QUICK
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
D, DTYPE = layer_size(DEVICE)


@functools.lru_cache(maxsize=1)
def _problem(shape: str, tokens: int):  # one problem alive at a time: d=4096, T=8192 inputs are large
    return make_problem(SHAPES[shape], tokens, D, DTYPE, DEVICE)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("mode", GRID.modes)
@pytest.mark.parametrize("tokens", GRID.tokens)
@pytest.mark.parametrize("shape", GRID.shapes)
def test_routed_lora(benchmark, shape: str, tokens: int, mode: str, provider: str) -> None:
    p = _problem(shape, tokens)
    if (why := skip_reason(provider, p)) is not None:
        pytest.skip(why)
    module = build(provider, p)
    step = make_step(module, p, mode)

    def timed() -> None:
        step.timed()
        if CUDA:  # pytest-benchmark reads the wall clock: wait for the kernels
            torch.cuda.synchronize()

    benchmark.group = f"{shape} T={tokens} {mode}"
    benchmark.extra_info.update(
        device=DEVICE, dtype=str(DTYPE), d=D, threads=torch.get_num_threads(),
        flop_ratio=flop_ratio(SHAPES[shape], tokens, D, D, mode), saved_bytes=saved_bytes(module, p),
    )  # fmt: skip
    rounds = 5 if tokens >= 2048 else 50
    benchmark.pedantic(timed, setup=step.prepare, rounds=rounds, warmup_rounds=1, iterations=1)

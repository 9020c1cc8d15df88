"""Every kernel launch the GPU path makes, compiled for Hopper (sm_90) with Triton's own compiler and ptxas.

No GPU needed: a stand-in Triton driver reports an sm_90 target, the launchers run on CPU tensors with the compiled
path's choices (tiles, ``tl.dot`` operand types) and every launch is compiled instead of run, through
``JITFunction.warmup``, so each kernel is specialized on its real arguments (alignment, ``== 1`` and ``% 16``
integers) exactly as a CUDA launch would be. The cubins are then checked for what a GPU run would suffer from: no
register spills, shared memory within the H100/H200 per-block limit, and tensor-core MMAs for 16-bit inputs.
Outputs are never written here (nothing runs); the interpreter tests check the numbers.

With ``ILORA_KERNEL_BUILDS`` set (``python -m benchmarks.kernel_check``), each build's resources are appended as JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ilora.kernels import _utils, gemm, per_row, per_row_routed_lora, soft_routed_lora, topk, topk_routed_lora

from .conftest import DTYPES

triton = pytest.importorskip("triton")
from triton.runtime.jit import JITFunction  # noqa: E402

SM90 = 90
SMEM_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90 (227 KiB)
_NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
CUOBJDUMP = _NVIDIA_BIN / "cuobjdump"
KERNELS = {"_mm_kernel", "_scatter_mm_kernel", "_grouped_outer_kernel", "_bgmv_shrink_kernel", "_bgmv_expand_kernel"}
DOT_KERNELS = {"_mm_kernel", "_scatter_mm_kernel", "_grouped_outer_kernel"}

pytestmark = pytest.mark.skipif(
    not (_NVIDIA_BIN / "ptxas").is_file() or not CUOBJDUMP.is_file(),
    reason="this triton build has no NVIDIA backend binaries (ptxas, cuobjdump)",
)


class _Indexable:
    def __init__(self, get):
        self.get = get

    def __getitem__(self, grid):
        return self.get(grid)


class _Sm90Driver:
    """The part of Triton's driver API that compiling needs, reporting an sm_90 device."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", SM90, 32)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Run every routed op forward and backward with launches compiled for sm_90; returns the builds by key."""
    from triton.runtime.driver import driver

    built: dict[tuple, dict] = {}
    jitted: dict[str, JITFunction] = {}
    op_dtype = {}

    def compile_launch(self, grid, tuned=False):
        name = self.fn.__name__
        # never the interpreter, whatever TRITON_INTERPRET says
        fn = jitted.setdefault(name, JITFunction(self.fn, do_not_specialize=self.do_not_specialize))

        def build(args, constexprs, options):
            compiled = fn.warmup(*args, grid=grid, **constexprs, **options)
            dtype = str(op_dtype["input"]).removeprefix("torch.")
            key = (name, dtype, tuple(sorted((k, str(v)) for k, v in {**constexprs, **options}.items())))
            built.setdefault(
                key, {"kernel": name, "input_dtype": dtype, "compiled": compiled, "constexprs": dict(key[2])}
            )

        def launch(*args, **constexprs):
            if not tuned:
                return build(args, constexprs, {})
            # every config the autotuner would time for this launch
            for config in self.prune(self.triton_configs(), dict(zip(fn.arg_names, args)), **constexprs):
                build(
                    args,
                    {**constexprs, **config.kwargs},
                    {"num_warps": config.num_warps, "num_stages": config.num_stages},
                )

        return launch

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton-cache")))  # compile for real every run
        mp.setattr(_utils.kernel, "__getitem__", compile_launch)
        mp.setattr(
            _utils.kernel, "tuned", property(lambda self: _Indexable(lambda grid: compile_launch(self, grid, True)))
        )
        mp.setattr(_utils, "interpreting", lambda: False)  # tiles and dot operand types of the compiled path
        mp.setattr(per_row, "interpreting", lambda: False)
        # triton's own @jit helpers are bound to the interpreter when TRITON_INTERPRET was set at its import
        combine = getattr(_utils.sum_combine, "fn", _utils.sum_combine)
        for module in (topk, per_row):
            mp.setattr(module, "sum_combine", JITFunction(combine) if not isinstance(combine, JITFunction) else combine)
        mp.setattr(driver, "_active", _Sm90Driver())  # restored as it was: there may be no real driver to reset to
        for dtype in DTYPES:
            op_dtype["input"] = dtype
            _run_every_op(dtype)
    return built


def _run_every_op(dtype: torch.dtype) -> None:
    """Each op, forward and backward, at decode and training sizes, shared and per-expert A, aligned and odd widths."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    for T, d, (E, r, k), shared in [
        (8192, 4096, (3, 128, None), True),  # Crab+
        (8192, 4096, (8, 16, None), False),  # MoE top-2 as the layer runs it: dense, unselected gates zero
        (8192, 4096, (8, 16, 2), False),  # MoE top-2 (the 64-expert shape launches the same tiles)
        (37, 1000, (4, 16, 1), True),  # odd sizes, k == 1 (store path)
        (1, 4096, (8, 16, 1), False),  # decode
        (16, 1000, (8, 16, 1), True),  # decode batch, split-K shrink
    ]:
        x, base = rand(T, d), rand(T, d)
        A, B = rand(1 if shared else E, d, r), rand(E, r, d)
        if k is None:
            out = soft_routed_lora(x, A, B, rand(T, E), 2.0, base_out=base)
        else:
            indices = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
            out = topk_routed_lora(x, A, B, rand(T, k), indices, 2.0, base_out=base)
            if k == 1 and T <= per_row.PER_ROW_MAX_TOKENS:
                out = out + per_row_routed_lora(x, A, B, indices[:, 0], 2.0, base_out=base)
        out.backward(torch.randn(out.shape, generator=g).to(dtype))


def _resources(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in usage:
        raise AssertionError(f"cuobjdump gave no resource usage:\n{text}")
    return {k.lower(): int(v) for k, v in usage.items()}


def _record(rows: list[dict]) -> None:
    path = os.environ.get("ILORA_KERNEL_BUILDS")
    if path:
        with open(path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def test_every_kernel_is_built(builds):
    assert {b["kernel"] for b in builds.values()} == KERNELS
    tiles = {(b["constexprs"].get("BLOCK_M"), b["constexprs"].get("BLOCK_N")) for b in builds.values()}
    assert ("128", "256") in tiles  # the training-size GEMMs were offered the autotuner's largest tile


@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 20000), N=st.integers(1, 9000), K=st.integers(1, 9000), fp32=st.booleans())
def test_autotune_candidates(M, N, K, fp32):
    """The launcher's default tile always competes; larger tiles only where they fit inside the problem; fp32 operands
    keep the default tile (its larger tiles spill, see above)."""
    configs = gemm._mm_kernel.triton_configs()
    dot = triton.language.float32 if fp32 else triton.language.bfloat16
    kept = gemm._prune_mm_configs(configs, {"M": M, "N": N, "K": K}, DOT=dot)
    assert kept[0] is configs[0]
    if fp32:
        assert kept == [configs[0]]
    for c in kept[1:]:
        assert c.kwargs["BLOCK_M"] < 2 * M and c.kwargs["BLOCK_N"] < 2 * N and c.kwargs["BLOCK_K"] < 2 * K
    if not fp32 and min(M, N, K) >= 256:
        assert len(kept) == len(configs)


def test_builds_fit_hopper(builds):
    """No spills to local memory, shared memory within one block's limit, tensor cores for every 16-bit dot."""
    rows, problems = [], []
    for (name, dtype, _), b in sorted(builds.items(), key=lambda kv: str(kv[0])):
        compiled = b["compiled"]
        usage = _resources(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
        meta = compiled.metadata
        row = {
            "kernel": name, "input_dtype": dtype, "constexprs": b["constexprs"], "num_warps": meta.num_warps,
            "num_stages": meta.num_stages, "registers": usage["reg"], "spill_bytes": usage["local"],
            "stack_bytes": usage["stack"], "shared_bytes": meta.shared, "mma": mma,
        }  # fmt: skip
        rows.append(row)
        if usage["local"] or usage["stack"]:
            problems.append(f"{name} {b['constexprs']}: spills ({usage['local']} B local, {usage['stack']} B stack)")
        if meta.shared > SMEM_LIMIT:
            problems.append(f"{name} {b['constexprs']}: {meta.shared} B shared > {SMEM_LIMIT}")
        sixteen_bit = b["constexprs"].get("DOT") in ("bf16", "fp16")
        if name in DOT_KERNELS and sixteen_bit and mma == "none":
            problems.append(f"{name} {b['constexprs']}: 16-bit dot without tensor-core MMA")
    _record(rows)
    assert not problems, "\n".join(problems)


def test_compiled_path_uses_16_bit_dots(builds):
    """bf16 / fp16 inputs reach ``tl.dot`` in their own type on the GPU (fp32 operands would halve throughput or
    worse); fp32 inputs keep IEEE fp32 so they match PyTorch."""
    dots = {(dtype, b["constexprs"]["DOT"], b["constexprs"]["PRECISION"])
            for (name, dtype, _), b in builds.items() if name in DOT_KERNELS}  # fmt: skip
    assert ("bfloat16", "bf16", "tf32") in dots and ("float16", "fp16", "tf32") in dots
    assert {d for d in dots if d[0] == "float32"} == {("float32", "fp32", "ieee")}

"""Fixtures for the kernel tests: the device, the Triton interpreter on CPU, poisoned buffers and the reference check.

Without CUDA the kernels run through the Triton interpreter: ``TRITON_INTERPRET`` is set here, before this conftest
imports triton. In a whole-suite run other folders (peft) have imported triton already; the kernels still run because
they compile on first launch and avoid triton's import-bound helpers (see ``ilora.kernels._utils``). The layer's
``use_kernels="auto"`` keeps the PyTorch path on CPU, so the variable does not change other folders' tests.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ilora.kernels import _utils

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Hypothesis draws shared by the kernel tests (token and expert counts differ per op).
DRAWS = dict(
    d_in=st.integers(1, 80), d_out=st.integers(1, 80), r=st.integers(1, 64), shared=st.booleans(),
    dtype=st.sampled_from(DTYPES), with_base=st.booleans(), seed=st.integers(0, 2**16),
)  # fmt: skip

# flash-attention's rule, max|out - ref32| <= 2 * max|torch_lowp - ref32| + atol, plus one unit of rounding of the
# largest reference value in the output dtype: gradients that sum over many tokens (dA, dB) reach magnitudes where a
# single final rounding exceeds atol, and PyTorch's low-precision path, rounding elsewhere, can land closer by chance.
ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if not _utils.HAS_TRITON and item.get_closest_marker("no_triton_ok") is None:
        pytest.skip("triton is not installed")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "no_triton_ok: runs without triton (tests of the import guard)")


@pytest.fixture(autouse=True, scope="module")
def _poison_buffers():
    """Every buffer a kernel is meant to overwrite starts as NaN, so a skipped row or tile fails the comparison."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_utils, "empty", poisoned)
        yield


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


def expert_tensors(
    T: int, d_in: int, d_out: int, r: int, E: int, shared: bool, dtype: torch.dtype, device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random ``x``, ``A``, ``B`` (never the zero init) and ``base_out``, scaled so every value stays O(1)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    return {
        "x": rand(T, d_in),
        "A": rand(1 if shared else E, d_in, r, scale=d_in**-0.5),
        "B": rand(E, r, d_out, scale=r**-0.5),
        "base_out": rand(T, d_out),
    }


def _forward_backward(fn: Callable, inputs: dict, diff: list[str], dy: torch.Tensor, **kw):
    leaves = {k: v.detach().clone().requires_grad_(k in diff) if torch.is_tensor(v) else v for k, v in inputs.items()}
    out = fn(**leaves, **kw)
    grads = torch.autograd.grad(out, [leaves[k] for k in diff], dy.to(out.dtype))
    return {"out": out.detach(), **{f"d{k}": g for k, g in zip(diff, grads)}}


def check_against_ref(
    kernel_fn: Callable, ref_fn: Callable, inputs: dict, diff: list[str] | None = None, seed: int = 0
) -> None:
    """Output and every gradient in ``diff`` (default: every floating-point input) of ``kernel_fn`` against
    ``ref_fn`` under the flash-attention rule."""
    if diff is None:
        diff = [k for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point()]
    dtype = inputs["x"].dtype
    kw = {k: v for k, v in inputs.items() if not torch.is_tensor(v)}
    tensors = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
    T = inputs["x"].shape[0]
    d_out = inputs["B"].shape[2]
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(T, d_out, generator=g).to(dtype=dtype, device=inputs["x"].device)
    got = _forward_backward(kernel_fn, {**tensors, **kw}, diff, dy)
    up = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    ref32 = _forward_backward(ref_fn, {**up, **kw}, diff, dy.float())
    lowp = _forward_backward(ref_fn, {**tensors, **kw}, diff, dy, upcast=False)
    for name, ref in ref32.items():
        assert got[name].dtype == lowp[name].dtype, f"{name}: dtype {got[name].dtype}, expected {lowp[name].dtype}"
        assert got[name].shape == ref.shape, f"{name}: shape {tuple(got[name].shape)}, expected {tuple(ref.shape)}"
        if ref.numel() == 0:
            continue
        err = (got[name].float() - ref).abs().max().item()
        ulp = torch.finfo(dtype).eps * ref.abs().max().item()
        bound = 2 * (lowp[name].float() - ref).abs().max().item() + ATOL[dtype] + ulp
        _record_error(name, dtype, err, bound)
        assert err <= bound, f"{name} ({dtype}): max error {err:.3g} > bound {bound:.3g}"


def _record_error(name: str, dtype: torch.dtype, err: float, bound: float) -> None:
    """With ``ILORA_KERNEL_ERRORS`` set (``python -m benchmarks.kernel_check``), append each comparison as JSON."""
    path = os.environ.get("ILORA_KERNEL_ERRORS")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        row = {"test": test, "tensor": name, "dtype": str(dtype).removeprefix("torch."), "err": err, "bound": bound}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="session")
def make_inputs() -> Callable[..., dict[str, torch.Tensor]]:
    return expert_tensors


@pytest.fixture(scope="session")
def check() -> Callable[..., None]:
    return check_against_ref

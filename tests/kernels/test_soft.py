"""Dense soft routing: the Triton op against ``soft_routed_lora_ref`` (flash-attention tolerance rule)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ilora.kernels import gemm, soft_routed_lora, soft_routed_lora_ref
from ilora.kernels import soft as soft_mod

from .conftest import DRAWS, DTYPES

# (T, d_in, d_out, r, E, shared A)
SHAPES = [
    (1, 17, 40, 1, 1, True),
    (7, 40, 17, 8, 3, False),
    (33, 96, 40, 16, 4, True),
    (130, 17, 96, 64, 8, False),
    (33, 40, 17, 5, 2, False),
]


def _soft_inputs(make_inputs, device, T, d_in, d_out, r, E, shared, dtype, with_base=True, seed=0):
    inputs = make_inputs(T, d_in, d_out, r, E, shared, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 7)
    inputs["gates"] = torch.randn(T, E, generator=g).softmax(-1).to(dtype=dtype, device=device)
    inputs["scaling"] = 1.7
    if not with_base:
        del inputs["base_out"]
    return inputs


def _diff(inputs):
    return [k for k in ("x", "A", "B", "gates", "base_out") if k in inputs]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(check, make_inputs, device, shape, dtype):
    inputs = _soft_inputs(make_inputs, device, *shape, dtype)
    check(soft_routed_lora, soft_routed_lora_ref, inputs)


@pytest.mark.parametrize("shared", [True, False])
def test_without_base(check, make_inputs, device, shared):
    inputs = _soft_inputs(make_inputs, device, 33, 40, 17, 4, 3, shared, torch.float16, with_base=False)
    check(soft_routed_lora, soft_routed_lora_ref, inputs)


def test_non_contiguous_inputs(check, make_inputs, device):
    """Strides are honoured: transposed x, a permuted A and B, a column slice of the gates."""
    inputs = _soft_inputs(make_inputs, device, 33, 40, 17, 4, 3, False, torch.float32)
    inputs["x"] = inputs["x"].t().contiguous().t()
    inputs["A"] = inputs["A"].permute(0, 2, 1).contiguous().permute(0, 2, 1)
    inputs["B"] = inputs["B"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    inputs["gates"] = torch.cat([inputs["gates"], inputs["gates"]], 1)[:, ::2]
    assert not inputs["x"].is_contiguous() and not inputs["A"].is_contiguous() and not inputs["B"].is_contiguous()
    check(soft_routed_lora, soft_routed_lora_ref, inputs)


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(1, 70),
    E=st.integers(1, 8),
    **DRAWS,
)
def test_hypothesis_shapes(check, make_inputs, device, T, d_in, d_out, r, E, shared, dtype, with_base, seed):
    inputs = _soft_inputs(make_inputs, device, T, d_in, d_out, r, E, shared, dtype, with_base, seed)
    check(soft_routed_lora, soft_routed_lora_ref, inputs, seed=seed)


def test_empty_batch(make_inputs, device):
    inputs = _soft_inputs(make_inputs, device, 0, 17, 40, 4, 3, False, torch.float32)
    leaves = {k: v.requires_grad_() if torch.is_tensor(v) else v for k, v in inputs.items()}
    out = soft_routed_lora(**leaves)
    assert out.shape == (0, 40)
    out.sum().backward()
    assert torch.count_nonzero(leaves["A"].grad) == 0 and torch.count_nonzero(leaves["B"].grad) == 0


def test_ref_upcast_returns_input_dtype(make_inputs, device):
    inputs = _soft_inputs(make_inputs, device, 7, 17, 40, 4, 3, True, torch.float16)
    out = soft_routed_lora_ref(**inputs)
    full = soft_routed_lora_ref(**{k: v.float() if torch.is_tensor(v) else v for k, v in inputs.items()})
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, full.half())


def test_rejects_bad_gates(make_inputs, device):
    inputs = _soft_inputs(make_inputs, device, 7, 17, 40, 4, 3, False, torch.float32)
    inputs["gates"] = inputs["gates"][:, :2]
    with pytest.raises(ValueError, match="gates must be"):
        soft_routed_lora(**inputs)


def test_poison_catches_a_skipped_row(make_inputs, device, monkeypatch):
    """The NaN-filled buffers make a kernel that leaves rows unwritten fail: drop the last row of every GEMM."""
    inputs = _soft_inputs(make_inputs, device, 7, 17, 40, 4, 3, False, torch.float32)
    real = gemm.matmul

    def skip_last_row(a, a_strides, b, b_strides, c, c_strides, M, N, K, **kw):
        return real(a, a_strides, b, b_strides, c, c_strides, M - 1, N, K, **kw)

    monkeypatch.setattr(soft_mod, "matmul", skip_last_row)
    out = soft_routed_lora(**inputs)
    assert torch.isnan(out[-1]).all() and not torch.isnan(out[:-1]).any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [True, False])
def test_large_shapes_gpu(check, make_inputs, device, dtype, shared):
    inputs = _soft_inputs(make_inputs, device, 1000, 1024, 768, 32, 4, shared, dtype)
    check(soft_routed_lora, soft_routed_lora_ref, inputs)

"""Per-row routing (one expert per row): the BGMV kernels for decode batches and the grouped path beyond them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ilora.kernels import per_row as per_row_mod
from ilora.kernels import per_row_routed_lora, per_row_routed_lora_ref

from .conftest import DRAWS, DTYPES

# (T, d_in, d_out, r, E, shared A); T <= 64 takes the BGMV kernels, larger T the grouped top-k path
SHAPES = [
    (1, 17, 40, 1, 1, True),
    (7, 40, 17, 8, 3, False),
    (33, 96, 40, 16, 8, True),
    (64, 17, 96, 64, 4, False),
    (130, 40, 17, 5, 6, False),
]


def _per_row_inputs(make_inputs, device, T, d_in, d_out, r, E, shared, dtype, with_base=True, seed=0):
    inputs = make_inputs(T, d_in, d_out, r, E, shared, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 5)
    inputs["expert_ids"] = torch.randint(0, E, (T,), generator=g).to(device)
    inputs["scaling"] = 2.0
    if not with_base:
        del inputs["base_out"]
    return inputs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(check, make_inputs, device, shape, dtype):
    inputs = _per_row_inputs(make_inputs, device, *shape, dtype)
    check(per_row_routed_lora, per_row_routed_lora_ref, inputs)


def test_split_k_shrink(check, make_inputs, device):
    """A wide input is split over several programs per row whose partial sums meet in fp32 atomics."""
    inputs = _per_row_inputs(make_inputs, device, 3, 1500, 17, 4, 3, False, torch.float16, with_base=False)
    check(per_row_routed_lora, per_row_routed_lora_ref, inputs)


def test_non_contiguous_inputs(check, make_inputs, device):
    inputs = _per_row_inputs(make_inputs, device, 7, 40, 17, 4, 3, False, torch.float32)
    inputs["x"] = inputs["x"].t().contiguous().t()
    inputs["A"] = inputs["A"].permute(0, 2, 1).contiguous().permute(0, 2, 1)
    inputs["B"] = inputs["B"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    inputs["base_out"] = inputs["base_out"].t().contiguous().t()
    check(per_row_routed_lora, per_row_routed_lora_ref, inputs)


@settings(max_examples=10, deadline=None)
@given(
    T=st.integers(1, per_row_mod.PER_ROW_MAX_TOKENS),
    E=st.integers(1, 8),
    **DRAWS,
)
def test_hypothesis_decode_shapes(check, make_inputs, device, T, d_in, d_out, r, E, shared, dtype, with_base, seed):
    inputs = _per_row_inputs(make_inputs, device, T, d_in, d_out, r, E, shared, dtype, with_base, seed)
    check(per_row_routed_lora, per_row_routed_lora_ref, inputs, seed=seed)


def test_empty_batch(make_inputs, device):
    inputs = _per_row_inputs(make_inputs, device, 0, 17, 40, 4, 3, False, torch.float32)
    leaves = {k: v.requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    out = per_row_routed_lora(**leaves)
    assert out.shape == (0, 40)
    out.sum().backward()
    assert torch.count_nonzero(leaves["B"].grad) == 0


@pytest.mark.parametrize("T", [7, 130])
def test_out_of_range_expert_is_an_error(make_inputs, device, T):
    if device.type == "cuda":
        pytest.skip("on CUDA this is a device-side assert, which would poison the context for the other tests")
    inputs = _per_row_inputs(make_inputs, device, T, 17, 40, 4, 3, False, torch.float32)
    inputs["expert_ids"][-1] = 3
    with pytest.raises((IndexError, RuntimeError)):
        per_row_routed_lora(**inputs)


def test_rejects_bad_ids_shape(make_inputs, device):
    inputs = _per_row_inputs(make_inputs, device, 7, 17, 40, 4, 3, False, torch.float32)
    inputs["expert_ids"] = inputs["expert_ids"][:, None]
    with pytest.raises(ValueError, match="expert_ids must be"):
        per_row_routed_lora(**inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 16, 64, 1000])
def test_large_shapes_gpu(check, make_inputs, device, dtype, T):
    inputs = _per_row_inputs(make_inputs, device, T, 4096, 4096, 16, 8, False, dtype)
    check(per_row_routed_lora, per_row_routed_lora_ref, inputs)

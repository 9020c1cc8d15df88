"""Sparse top-k routing: the block plan, and the Triton op against ``topk_routed_lora_ref`` (flash-attention rule)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ilora.kernels import topk as topk_mod
from ilora.kernels import topk_routed_lora, topk_routed_lora_ref

from .conftest import DRAWS, DTYPES

# (T, k, d_in, d_out, r, E, shared A)
SHAPES = [
    (1, 1, 17, 40, 1, 1, True),  # one token, one expert
    (1, 4, 40, 17, 8, 8, False),  # one token, most experts empty
    (7, 2, 40, 17, 5, 64, False),  # 64 experts, almost all empty
    (33, 2, 96, 40, 16, 4, True),
    (130, 3, 17, 96, 64, 8, False),  # T not a multiple of the block
    (130, 1, 40, 17, 4, 3, False),  # k == 1: the store path
]


def _topk_inputs(make_inputs, device, T, k, d_in, d_out, r, E, shared, dtype, with_base=True, seed=0):
    inputs = make_inputs(T, d_in, d_out, r, E, shared, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 11)
    inputs["indices"] = torch.rand(T, E, generator=g).argsort(-1)[:, :k].to(device)  # k distinct experts per token
    inputs["weights"] = torch.rand(T, k, generator=g).add(0.1).to(dtype=dtype, device=device)
    inputs["scaling"] = 0.8
    if not with_base:
        del inputs["base_out"]
    return inputs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(check, make_inputs, device, shape, dtype):
    inputs = _topk_inputs(make_inputs, device, *shape, dtype)
    check(topk_routed_lora, topk_routed_lora_ref, inputs)


@pytest.mark.parametrize("shared", [True, False])
def test_repeated_expert_and_no_base(check, make_inputs, device, shared):
    """A token may list the same expert twice: both pairs land in one block and add to one output row."""
    inputs = _topk_inputs(make_inputs, device, 33, 3, 40, 17, 4, 3, shared, torch.float32, with_base=False)
    inputs["indices"][:, 1] = inputs["indices"][:, 0]
    check(topk_routed_lora, topk_routed_lora_ref, inputs)


def test_non_contiguous_inputs(check, make_inputs, device):
    inputs = _topk_inputs(make_inputs, device, 33, 2, 40, 17, 4, 5, False, torch.float32)
    inputs["x"] = inputs["x"].t().contiguous().t()
    inputs["B"] = inputs["B"].permute(2, 0, 1).contiguous().permute(1, 2, 0)
    inputs["weights"] = inputs["weights"].t().contiguous().t()
    inputs["indices"] = inputs["indices"].t().contiguous().t()
    assert not inputs["weights"].is_contiguous()
    check(topk_routed_lora, topk_routed_lora_ref, inputs)


@settings(max_examples=10, deadline=None)
@given(
    T=st.integers(1, 70),
    k=st.integers(1, 4),
    E=st.integers(1, 16),  # 64 experts are in SHAPES: the interpreter's cost grows with the number of blocks
    **DRAWS,
)
def test_hypothesis_shapes(check, make_inputs, device, T, k, d_in, d_out, r, E, shared, dtype, with_base, seed):
    inputs = _topk_inputs(make_inputs, device, T, min(k, E), d_in, d_out, r, E, shared, dtype, with_base, seed)
    check(topk_routed_lora, topk_routed_lora_ref, inputs, seed=seed)


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(0, 300), k=st.integers(1, 8), E=st.integers(1, 64), exact=st.booleans(), seed=st.integers(0, 2**16)
)
def test_plan_covers_every_pair_once(T, k, E, exact, seed):
    """Blocks hold one expert each, never cross a segment, and together cover each sorted pair exactly once; the
    sync-free grid (CUDA) only adds empty blocks."""
    indices = torch.randint(0, E, (T, k), generator=torch.Generator().manual_seed(seed))
    plan = topk_mod._plan(indices, E, exact_grid=exact)
    flat = indices.reshape(-1)
    assert torch.equal(plan.token, plan.order // k)
    assert torch.equal(flat[plan.order], flat.sort(stable=True).values)
    seen = torch.zeros(T * k, dtype=torch.int64)
    for start, end, e in zip(plan.block_start.tolist(), plan.block_end.tolist(), plan.block_expert.tolist()):
        if start < end:
            rows = torch.arange(start, min(start + plan.block_m, end))
            assert end == plan.seg_end[e] and start >= plan.seg_start[e]
            assert (flat[plan.order[rows]] == e).all()
            seen[rows] += 1
        else:
            assert not exact
    assert (seen == 1).all()


def test_empty_batch(make_inputs, device):
    inputs = _topk_inputs(make_inputs, device, 0, 2, 17, 40, 4, 3, False, torch.float32)
    leaves = {k: v.requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    out = topk_routed_lora(**leaves)
    assert out.shape == (0, 40)
    out.sum().backward()
    assert torch.count_nonzero(leaves["B"].grad) == 0


def test_out_of_range_expert_is_an_error(make_inputs, device):
    if device.type == "cuda":
        pytest.skip("on CUDA this is a device-side assert, which would poison the context for the other tests")
    inputs = _topk_inputs(make_inputs, device, 7, 2, 17, 40, 4, 3, False, torch.float32)
    inputs["indices"][3, 1] = 3
    with pytest.raises(IndexError):
        topk_routed_lora(**inputs)


def test_mismatched_weights_are_an_error(make_inputs, device):
    inputs = _topk_inputs(make_inputs, device, 7, 2, 17, 40, 4, 3, False, torch.float32)
    inputs["weights"] = inputs["weights"][:, :1]
    with pytest.raises(ValueError, match="must both be"):
        topk_routed_lora(**inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [True, False])
def test_large_shapes_gpu(check, make_inputs, device, dtype, shared):
    inputs = _topk_inputs(make_inputs, device, 2000, 2, 1024, 768, 16, 8, shared, dtype)
    check(topk_routed_lora, topk_routed_lora_ref, inputs)

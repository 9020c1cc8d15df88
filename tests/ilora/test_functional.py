"""The PyTorch path equals the authors' per-expert loop (float64) for random shapes and every routing mode."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ilora import functional as F

from .oracle import naive_delta, naive_gates

shapes = st.fixed_dictionaries(
    {
        "T": st.integers(1, 40),
        "d_in": st.integers(1, 33),
        "d_out": st.integers(1, 33),
        "E": st.integers(1, 8),
        "r": st.integers(1, 64),
        "shared": st.booleans(),
        "k": st.integers(1, 8),
        "seed": st.integers(0, 2**16),
    }
)


def _inputs(s: dict, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(s["seed"])
    E = s["E"]
    x = torch.randn(s["T"], s["d_in"], generator=g, dtype=dtype, requires_grad=True)
    A = torch.randn(1 if s["shared"] else E, s["d_in"], s["r"], generator=g, dtype=dtype, requires_grad=True)
    B = torch.randn(E, s["r"], s["d_out"], generator=g, dtype=dtype, requires_grad=True)
    logits = torch.randn(s["T"], E, generator=g, dtype=dtype, requires_grad=True)
    return x, A, B, logits


def _grads(out: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    seed = torch.Generator().manual_seed(7)
    cotangent = torch.randn(out.shape, generator=seed, dtype=out.dtype)
    return list(torch.autograd.grad(out, tensors, cotangent, retain_graph=True))


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_soft_matches_naive_loop_with_gradients(s: dict) -> None:
    x, A, B, logits = _inputs(s)
    gates = torch.softmax(logits, -1)
    fast = F.soft_routed_lora(x, A, B, gates, 0.7)
    ref = naive_delta(x, A, B, gates, 0.7)
    torch.testing.assert_close(fast, ref)
    for a, b in zip(_grads(fast, x, A, B, logits), _grads(ref, x, A, B, logits)):
        torch.testing.assert_close(a, b)


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_soft_with_base_out_fuses_the_residual_add(s: dict) -> None:
    x, A, B, logits = _inputs(s)
    gates = torch.softmax(logits, -1)
    base = torch.randn(x.shape[0], B.shape[2], dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    base.requires_grad_(True)
    fused = F.soft_routed_lora(x, A, B, gates, 0.7, base_out=base)
    ref = base + naive_delta(x, A, B, gates, 0.7)
    torch.testing.assert_close(fused, ref)
    for a, b in zip(_grads(fused, x, A, B, logits, base), _grads(ref, x, A, B, logits, base)):
        torch.testing.assert_close(a, b)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_topk_matches_naive_loop_with_gradients(s: dict) -> None:
    x, A, B, logits = _inputs(s)
    k = min(s["k"], s["E"])
    probs = torch.softmax(logits, -1)
    weights, indices = probs.topk(k, -1)
    fast = F.topk_routed_lora(x, A, B, weights, indices, 1.3)
    dense = torch.zeros_like(probs).scatter(1, indices, weights)
    ref = naive_delta(x, A, B, dense, 1.3)
    torch.testing.assert_close(fast, ref)
    for a, b in zip(_grads(fast, x, A, B, logits), _grads(ref, x, A, B, logits)):
        torch.testing.assert_close(a, b)


@settings(max_examples=25, deadline=None)
@given(shapes)
def test_per_row_matches_naive_loop(s: dict) -> None:
    x, A, B, _ = _inputs(s)
    ids = torch.randint(0, s["E"], (s["T"],), generator=torch.Generator().manual_seed(s["seed"]))
    fast = F.per_row_routed_lora(x, A, B, ids, 0.5)
    ref = naive_delta(x, A, B, torch.nn.functional.one_hot(ids, s["E"]).double(), 0.5)
    torch.testing.assert_close(fast, ref)
    for a, b in zip(_grads(fast, x, A, B), _grads(ref, x, A, B)):
        torch.testing.assert_close(a, b)


def test_topk_with_empty_experts_and_one_token() -> None:
    s = {"T": 1, "d_in": 5, "d_out": 3, "E": 64, "r": 2, "shared": False, "seed": 3}
    x, A, B, logits = _inputs(s)
    weights, indices = torch.softmax(logits, -1).topk(4, -1)
    dense = torch.zeros(1, 64, dtype=torch.float64).scatter(1, indices, weights)
    torch.testing.assert_close(F.topk_routed_lora(x, A, B, weights, indices, 1.0), naive_delta(x, A, B, dense, 1.0))


def test_gates_oracle_agrees_with_router_gate() -> None:
    from ilora.router import gate

    logits = torch.randn(9, 5, dtype=torch.float64)
    for routing, k in (("soft", 1), ("topk", 1), ("topk", 3)):
        ours = gate(logits, routing, k, 0.8).to_dense(5)
        torch.testing.assert_close(ours, naive_gates(logits, routing, k, 0.8))


@pytest.mark.parametrize(
    ("x_shape", "a_shape", "b_shape", "message"),
    [
        ((4, 6), (1, 7, 2), (3, 2, 5), "input width 6"),
        ((4, 6), (2, 6, 2), (3, 2, 5), "A holds 2 experts"),
        ((4, 6), (1, 6, 3), (3, 2, 5), "rank mismatch"),
        ((2, 4, 6), (1, 6, 2), (3, 2, 5), "x must be 2-D"),
    ],
)
def test_shape_errors_name_the_shape(x_shape, a_shape, b_shape, message) -> None:
    with pytest.raises(ValueError, match=message):
        F.soft_routed_lora(torch.randn(x_shape), torch.randn(a_shape), torch.randn(b_shape), torch.rand(4, 3), 1.0)


def test_soft_rejects_gates_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match="gates must be"):
        F.soft_routed_lora(torch.randn(4, 6), torch.randn(1, 6, 2), torch.randn(3, 2, 5), torch.rand(4, 2), 1.0)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 40), E=st.integers(1, 9), k=st.integers(1, 3), shared=st.booleans(),
    widths=st.tuples(st.sampled_from([4, 8, 12, 16]), st.sampled_from([4, 8]), st.sampled_from([4, 12, 20])),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_grouped_gemm_path_equals_the_dense_fallback(T, E, k, shared, widths, seed) -> None:
    # float32 with 16-byte rows takes torch's grouped_mm on CPU; the float64 oracle tests above take the dense
    # fallback (every expert, unselected gates zero).
    d_in, r, d_out = widths
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g, requires_grad=True)
    A = torch.randn(1 if shared else E, d_in, r, generator=g, requires_grad=True)
    B = torch.randn(E, r, d_out, generator=g, requires_grad=True)
    k = min(k, E)
    w, idx = torch.softmax(torch.randn(T, E, generator=g), -1).topk(k, -1)
    w.requires_grad_(True)
    if not F.grouped_mm_supported(x, A, B):
        pytest.skip(f"torch {torch.__version__} has no CPU grouped_mm")
    results = []
    for grouped in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(F, "grouped_mm_supported", lambda *_, grouped=grouped: grouped)
            out = F.topk_routed_lora(x, A, B, w, idx, 0.5)
        results.append([out, *_grads(out, x, A, B, w)])
    for got, want in zip(*results):  # float32, the same products summed in a different order
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(shapes, st.booleans())
def test_topk_with_base_out_fuses_the_residual_add(s: dict, grouped: bool) -> None:
    if grouped:  # float32 rows of 16-byte multiples: torch's grouped_mm on CPU
        s = {**s, **{n: -(-s[n] // 4) * 4 for n in ("d_in", "d_out", "r")}}
    x, A, B, logits = _inputs(s, torch.float32 if grouped else torch.float64)
    assert F.grouped_mm_supported(x, A, B) is grouped
    k = min(s["k"], s["E"])
    weights, indices = torch.softmax(logits, -1).topk(k, -1)
    dense = torch.zeros_like(logits).scatter(1, indices, weights)
    base = torch.randn(x.shape[0], B.shape[2], dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    base.requires_grad_(True)
    fused = F.topk_routed_lora(x, A, B, weights, indices, 0.7, base_out=base)
    ref = (base + naive_delta(x, A, B, dense, 0.7)).to(x.dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if grouped else {}
    torch.testing.assert_close(fused, ref, **tol)
    for a, b in zip(_grads(fused, x, A, B, logits, base), _grads(ref, x, A, B, logits, base)):
        torch.testing.assert_close(a, b, **tol)


def test_topk_refuses_out_of_range_experts_and_a_wrong_base() -> None:
    x, A, B = torch.randn(4, 8), torch.randn(3, 8, 4), torch.randn(3, 4, 8)
    w = torch.ones(4, 1)
    for bad in (3, -1):
        with pytest.raises(RuntimeError, match=r"top-k indices must name experts in \[0, 3\)"):
            F.topk_routed_lora(x, A, B, w, torch.tensor([[0], [1], [bad], [2]]), 1.0)
    with pytest.raises(ValueError, match=r"base_out must be \[T=4, 8\] of torch.float32"):
        F.topk_routed_lora(x, A, B, w, torch.zeros(4, 1, dtype=torch.long), 1.0, base_out=torch.zeros(4, 8).double())


F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


@pytest.mark.parametrize(
    ("device", "capability", "dtypes", "aligned", "compiling", "takes"),
    [
        ("cpu", None, {F32}, True, False, True),
        ("cpu", None, {BF16}, True, False, True),
        ("cpu", None, {F16}, True, False, True),
        ("cpu", None, {F64}, True, False, False),
        ("cpu", None, {F32, BF16}, True, False, False),  # mixed operands
        ("cpu", None, {F32}, False, False, False),  # rows not 16-byte multiples
        ("cpu", None, {F32}, True, True, False),  # under torch.compile the fake rule is CUDA's
        ("cuda", (9, 0), {BF16}, True, False, True),
        ("cuda", (10, 0), {BF16}, True, True, True),
        ("cuda", (8, 0), {BF16}, True, False, False),  # torch's fallback copies the offsets to the host
        ("cuda", (9, 0), {F32}, True, False, False),
        ("cuda", (9, 0), {F16}, True, False, False),
        ("cuda", (9, 0), {BF16}, False, False, False),
        ("mps", None, {F32}, True, False, False),
    ],
)
def test_grouped_mm_rule(device, capability, dtypes, aligned, compiling, takes) -> None:
    assert F.grouped_mm_takes(device, capability, dtypes, aligned, compiling) is takes

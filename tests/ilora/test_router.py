"""Routers compute in float32 whatever the autocast or adapter dtype: the experts chosen are those of float32 logits."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ilora
from ilora import Linear
from ilora.router import SequenceRouter, TaskRouter, TokenRouter, gate

HALF = (torch.bfloat16, torch.float16)
# On CUDA the layer takes the Triton path (use_kernels="auto"): the router runs before the path is chosen.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
    ),
]


def _topk_layer(d_in: int = 256, d_out: int = 64, dtype: torch.dtype = torch.float32, **config) -> Linear:
    torch.manual_seed(0)
    settings_ = dict(target_modules=["x"], r=4, num_experts=8, routing="topk", top_k=2, init_lora_weights=False)
    layer = Linear(nn.Linear(d_in, d_out), "default", ilora.ILoraConfig(**{**settings_, **config})).to(dtype)
    layer.ilora_name = "layer"
    return layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_router_under_bf16_autocast_chooses_the_float32_experts(seed: int, device: str) -> None:
    # 8 experts, top-2, inputs randn * 4: bf16 logits pick another top-2 set for 9 to 15 of the 4096 tokens.
    layer = _topk_layer().to(device)
    x = (torch.randn(4096, 256, generator=torch.Generator().manual_seed(seed)) * 4).to(device)
    weight = layer.ilora_router["default"].weight
    with torch.no_grad():
        expected = gate(nn.functional.linear(x, weight), "topk", 2, 1.0).to_dense(8).cpu()
        with torch.autocast(device, dtype=torch.bfloat16), ilora.record_routing() as rec:
            out = layer(x)
    assert out.dtype == torch.bfloat16  # the layer itself still runs under autocast
    (got,) = rec.weights["layer"]
    assert torch.equal(got != 0, expected != 0)
    torch.testing.assert_close(got, expected, rtol=1.3e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base_dtype", [torch.float16, torch.float32])
def test_fp16_adapter_router_does_not_overflow(base_dtype: torch.dtype, device: str) -> None:
    # A token whose float32 logit is 76800 (> 65504, fp16's largest) must route, not become inf and raise.
    layer = _topk_layer(dtype=base_dtype).to(device)
    for p in layer.ilora_A.values():
        p.data = p.data.half()
    for p in layer.ilora_B.values():
        p.data = p.data.half()
    router = layer.ilora_router["default"]
    router.half()
    with torch.no_grad():
        router.weight.zero_()
        router.weight[3] = 1.0
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0)).to(device, base_dtype)
    x[2] = 300.0
    with torch.no_grad(), ilora.record_routing() as rec:
        out = layer(x)
    assert torch.isfinite(out).all()
    expected = gate(nn.functional.linear(x.float(), router.weight.float()), "topk", 2, 1.0).to_dense(8).cpu()
    assert expected[2, 3] == 1.0
    torch.testing.assert_close(rec.weights["layer"][0], expected, rtol=1.3e-6, atol=1e-6)


def _reference_logits(kind: str, router: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    w = router.weight.float()
    if kind == "token":
        return nn.functional.linear(x.float().reshape(-1, x.shape[-1]), w)
    if kind == "sequence":
        m = mask.float().unsqueeze(-1)
        pooled = (x.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
        return nn.functional.linear(pooled, w).repeat_interleave(x.shape[1], dim=0)
    return w[torch.tensor([1, 0])].repeat_interleave(x.shape[1], dim=0)


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["token", "sequence", "task"]),
    adapter_dtype=st.sampled_from([torch.float32, *HALF]),
    input_dtype=st.sampled_from([torch.float32, *HALF]),
    autocast=st.sampled_from([None, *HALF]),
    seq=st.integers(1, 6),
    d=st.integers(1, 40),
    num_experts=st.integers(2, 6),
    scale=st.sampled_from([1.0, 30.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_router_logits_are_float32_of_the_inputs_as_given(
    kind, adapter_dtype, input_dtype, autocast, seq, d, num_experts, scale, seed
) -> None:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    router = {"token": TokenRouter(d, num_experts), "sequence": SequenceRouter(d, num_experts),
              "task": TaskRouter(2, num_experts)}[kind].to(adapter_dtype)  # fmt: skip
    x = (torch.randn(2, seq, d, generator=g) * scale).to(input_dtype)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, (seq + 1) // 2 :] = 0
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ilora.routing_context(task_ids=[1, 0], attention_mask=mask), ctx:
        logits = router(x)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, _reference_logits(kind, router, x, mask), rtol=1.3e-6, atol=1e-5)
    assert torch.isfinite(logits).all()

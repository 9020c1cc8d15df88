"""No host sync on the PyTorch path's hot loop: a layer's forward and backward read nothing back from the device.

``torch.cuda.set_sync_debug_mode`` works only on CUDA, so on CPU a ``TorchDispatchMode`` counts the ops that read a
value back (``aten._local_scalar_dense``: ``.item()``, ``int()``, ``bool()``) or whose output size depends on the data
and so sync on CUDA (``bincount``, ``nonzero``, boolean-mask indexing ``x[mask]``, ...), and ``Tensor.tolist`` is
counted by a wrapper. The CUDA runs
of the same checks are marked ``gpu``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ilora

aten = torch.ops.aten
SYNCING = {
    aten._local_scalar_dense.default,
    aten.bincount.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
}

# Ops that sync when indexed with a boolean mask (the output's size is the mask's count).
BOOL_INDEXING = {aten.index.Tensor, aten._unsafe_index.Tensor, aten.index_put.default, aten.index_put_.default}


def _indices(func, args) -> list:
    return list(args[1]) if len(args) > 1 and isinstance(args[1], (list, tuple)) else []


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            self.calls[str(func)] += 1
        elif func in BOOL_INDEXING and any(_is_mask(i) for i in _indices(func, args)):
            self.calls[f"{func} (bool mask)"] += 1
        return func(*args, **(kwargs or {}))


def count_syncs(fn, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    counter = SyncCounter()
    real_tolist = torch.Tensor.tolist

    def tolist(self):
        counter.calls["Tensor.tolist"] += 1
        return real_tolist(self)

    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "tolist", tolist)
        with counter:
            fn()
    return counter.calls


CASES = {
    "soft_shared_a": dict(num_experts=3, routing="soft"),
    "soft_per_expert_a": dict(num_experts=4, shared_a=False, routing="soft"),
    "topk2_per_expert_a": dict(num_experts=8, shared_a=False, routing="topk", top_k=2),  # grouped GEMMs on CPU
    "top1_shared_a": dict(num_experts=4, routing="topk", top_k=1),
    "topk2_balance_loss": dict(num_experts=8, shared_a=False, routing="topk", top_k=2, balance_loss_coef=0.01),
    "soft_z_loss": dict(num_experts=3, routing="soft", router_z_loss_coef=0.001),
    "soft_entropy_loss": dict(num_experts=4, routing="soft", router_entropy_coef=0.01),
    "topk_localized_balance": dict(
        num_experts=4, routing="topk", top_k=2, localized_balance_coef=0.01, num_expert_groups=2
    ),
    "task_router": dict(num_experts=3, routing="soft", router="task", num_tasks=2),
    "sequence_router": dict(num_experts=3, routing="soft", router="sequence"),
}
# Every case runs inside a call with task ids and an attention mask that pads the end of the second sequence, so the
# padding is left out of the losses' statistics (by weighting, not indexing) on every path.
SEQ = 24


def _layer_step(options: dict, device: str, dtype: torch.dtype, check: bool = False, d: int = 16):
    config = ilora.ILoraConfig(
        target_modules=["q"], r=8, init_lora_weights=False, use_kernels="torch", check_router_logits=check, **options
    )
    layer = ilora.Linear(torch.nn.Linear(d, d), "default", config).to(device=device, dtype=dtype)
    layer.train()
    x = torch.randn(2, SEQ, d, device=device, dtype=dtype, requires_grad=True)
    mask = torch.ones(2, SEQ, dtype=torch.long, device=device)
    mask[1, SEQ // 2 :] = 0
    task_ids = torch.tensor([0, 1], device=device)

    def step() -> None:
        with ilora.routing_context(task_ids=task_ids, attention_mask=mask):
            layer(x).square().sum().backward()

    step()  # warm up outside the count (lazy imports, first-call caches)
    return step


@pytest.mark.parametrize("case", list(CASES))
def test_layer_step_has_no_host_sync(case: str, monkeypatch) -> None:
    assert count_syncs(_layer_step(CASES[case], "cpu", torch.float32), monkeypatch) == {}


@pytest.mark.parametrize("case", list(CASES))
def test_the_logit_check_is_the_only_sync_when_on(case: str, monkeypatch) -> None:
    """``check_router_logits`` (on by default) costs exactly one host sync per routed layer per forward."""
    calls = count_syncs(_layer_step(CASES[case], "cpu", torch.float32, check=True), monkeypatch)
    assert calls == {str(aten._local_scalar_dense.default): 1}


def test_the_counter_sees_bool_mask_indexing(monkeypatch) -> None:
    """What may sync does show up: boolean-mask indexing and nonzero."""
    x, keep = torch.randn(6, 3), torch.tensor([True, False] * 3)
    assert count_syncs(lambda: x[keep], monkeypatch) == {f"{aten.index.Tensor} (bool mask)": 1}
    assert count_syncs(lambda: x[keep.nonzero().squeeze(1)], monkeypatch) == {str(aten.nonzero.default): 1}


@pytest.mark.parametrize("case", [c for c, options in CASES.items() if options["routing"] == "topk"])
def test_top_k_without_grouped_mm_has_no_host_sync(case: str, monkeypatch) -> None:
    """Where grouped_mm does not take the operands (here float64), top-k runs the dense op with the unselected gates
    zero: no loop over experts reading their counts back to the host."""
    assert count_syncs(_layer_step(CASES[case], "cpu", torch.float64), monkeypatch) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_layer_step_has_no_host_sync(case: str) -> None:
    """On CUDA with bf16 (grouped_mm on sm_90 and newer, the dense op elsewhere), torch's own sync detector."""
    step = _layer_step(CASES[case], "cuda", torch.bfloat16)  # older GPUs than sm_90 take the dense top-k op
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")

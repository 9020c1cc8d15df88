"""The layer's Triton path (through the interpreter on CPU) equals its PyTorch path, gradients included."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

import ilora

from .conftest import build, example_input, output, targets

pytest.importorskip("triton")

# (config, the kernel the layer must pick)
CASES = {
    "soft_shared": (dict(num_experts=3, routing="soft"), "soft"),
    # few small experts: the dense kernel with the unselected gates zero
    "topk2_per_expert_a": (dict(num_experts=4, shared_a=False, routing="topk", top_k=2), "soft"),
    "top1_per_row": (dict(num_experts=3, routing="topk", top_k=1), "per_row"),  # <= 64 tokens: the per-row kernel
    "topk4_64_experts": (dict(num_experts=64, r=8, shared_a=False, routing="topk", top_k=4), "topk"),  # sorted
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_path_matches_torch_path(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    options, kernel = CASES[case]
    calls = _count_kernel_calls(monkeypatch)
    cfg = ilora.ILoraConfig(target_modules=targets("llama"), init_lora_weights=False, use_kernels="torch",
                            **{"r": 4, **options})  # fmt: skip
    torch_model = get_peft_model(build("llama"), cfg)
    triton_model = copy.deepcopy(torch_model)
    for layer in ilora.ilora_layers(triton_model):
        # use_kernels="triton" raises when Triton cannot run, so this model cannot silently fall back to PyTorch.
        layer.ilora_config["default"] = _with_triton(layer.ilora_config["default"])
    inputs = example_input("llama")
    outs = []
    for model in (torch_model, triton_model):
        out = output(model, inputs)
        out.pow(2).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        outs.append((out, grads))
    (ref, ref_grads), (got, got_grads) = outs
    assert set(calls) == {kernel}, f"the layer ran {dict(calls)}, expected only the {kernel} kernel"
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)


def _count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    from ilora import kernels

    calls: dict[str, int] = {}
    for op in ("soft", "topk", "per_row"):
        fn = getattr(kernels, f"{op}_routed_lora")

        def counted(*args, _fn=fn, _op=op, **kwargs):
            calls[_op] = calls.get(_op, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(kernels, f"{op}_routed_lora", counted)
    return calls


def _with_triton(config: ilora.ILoraConfig) -> ilora.ILoraConfig:
    clone = copy.copy(config)
    clone.use_kernels = "triton"
    return clone

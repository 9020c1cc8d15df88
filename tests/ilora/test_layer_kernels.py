"""The layer's Triton path (through the interpreter on CPU) equals its PyTorch path, gradients included."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

import ilora

from .conftest import build, example_input, output, targets

pytest.importorskip("triton")

CASES = {
    "soft_shared": dict(num_experts=3, routing="soft"),
    "topk2_per_expert_a": dict(num_experts=4, shared_a=False, routing="topk", top_k=2),
    "top1_per_row": dict(num_experts=3, routing="topk", top_k=1),  # <= 64 tokens: the per-row kernel
}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_path_matches_torch_path(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = ilora.ILoraConfig(r=4, target_modules=targets("llama"), init_lora_weights=False, use_kernels="torch",
                            **CASES[case])  # fmt: skip
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
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)


def _with_triton(config: ilora.ILoraConfig) -> ilora.ILoraConfig:
    clone = copy.copy(config)
    clone.use_kernels = "triton"
    return clone

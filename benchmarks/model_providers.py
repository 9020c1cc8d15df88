"""Model-level providers: one tiny Llama, adapted on all seven projections by ilora, PEFT LoRA and the routed methods
that ship in packages (PEFT's X-LoRA and Poly, the ``mixlora`` package), each built on a copy of the same base.

Every provider returns a :class:`Built`: the model, its trainable parameters, the keyword arguments of its forward
(task ids for task routing) and the packages it ran on. A provider that cannot run here returns the reason instead
(see :func:`skip_reason`).
"""

from __future__ import annotations

import copy
import importlib.metadata
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import ilora
from ilora.config import CRAB_TARGETS

__all__ = ["MODEL_PROVIDERS", "Built", "ModelSize", "base_model", "build_model", "model_skip_reason"]

NUM_TASKS = 4  # task-routed providers: the batch's sequences carry task ids 0..3


@dataclass(frozen=True)
class ModelSize:
    """The tiny Llama and its batch (issue 17: hidden 512, 2 layers, batch 4 x 256 tokens)."""

    hidden: int = 512
    layers: int = 2
    intermediate: int = 1408  # ~ 8/3 hidden, as Llama's SwiGLU MLP, rounded to a multiple of 128
    heads: int = 8
    vocab: int = 1024  # small: a 32k vocabulary's head would dominate a 2-layer model's step
    batch: int = 4
    seq: int = 256


@dataclass
class Built:
    model: nn.Module
    params: list[nn.Parameter]
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    packages: dict[str, str] = field(default_factory=dict)


def base_model(size: ModelSize, device: str, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """The frozen base every provider copies: a randomly initialized Llama (no download), eval mode, no cache."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=size.seq, use_cache=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def _version(pkg: str) -> str:
    return importlib.metadata.version(pkg)


def _task_ids(size: ModelSize, device: str) -> torch.Tensor:
    return torch.arange(size.batch, device=device) % NUM_TASKS


def _frozen(base: LlamaForCausalLM, size: ModelSize) -> Built:
    return Built(base, [])


def _ilora(**settings: Any) -> Callable[[LlamaForCausalLM, ModelSize], Built]:
    def build(base: LlamaForCausalLM, size: ModelSize) -> Built:
        from peft import get_peft_model

        r = settings["r"]
        config = ilora.ILoraConfig(lora_alpha=2 * r, target_modules=list(CRAB_TARGETS), **settings)
        model = get_peft_model(base, config)
        kwargs = {"ilora_task_ids": _task_ids(size, base.device)} if settings.get("router") == "task" else {}
        return Built(model, _trainable(model), kwargs, {"ilora": _version("ilora"), "peft": _version("peft")})

    return build


def _peft_lora(r: int) -> Callable[[LlamaForCausalLM, ModelSize], Built]:
    def build(base: LlamaForCausalLM, size: ModelSize) -> Built:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(CRAB_TARGETS), lora_dropout=0.0)
        model = get_peft_model(base, config, autocast_adapter_dtype=False)
        return Built(model, _trainable(model), {}, {"peft": _version("peft")})

    return build


def _xlora(base: LlamaForCausalLM, size: ModelSize) -> Built:
    """PEFT's X-LoRA over 3 LoRA experts of rank 32 (its adapters are loaded from disk: saved here first), experts
    trainable, one scaling per layer and expert: the dense "every expert, then weight" method, with its scaling pass
    (a no-grad forward of the base model) before each forward."""
    from peft import LoraConfig, XLoraConfig, get_peft_model

    with tempfile.TemporaryDirectory() as tmp:
        adapters = {}
        for i in range(3):
            lora = get_peft_model(
                copy.deepcopy(base), LoraConfig(r=32, lora_alpha=64, target_modules=list(CRAB_TARGETS))
            )
            lora.save_pretrained(f"{tmp}/{i}")
            adapters[str(i)] = f"{tmp}/{i}"
        config = XLoraConfig(
            task_type="CAUSAL_LM", hidden_size=size.hidden, adapters=adapters, use_trainable_adapters=True,
            layerwise_scalings=True,
        )  # fmt: skip
        model = get_peft_model(base, config)
    model.train()  # X-LoRA's constructor leaves the model in eval mode
    return Built(model, _trainable(model), {}, {"peft": _version("peft")})


def _poly(base: LlamaForCausalLM, size: ModelSize) -> Built:
    """PEFT's Poly: per task, a learned mix of 3 LoRA "skills" of rank 32 (weights mixed, then one LoRA runs)."""
    from peft import PolyConfig, get_peft_model

    config = PolyConfig(
        task_type="CAUSAL_LM", r=32, target_modules=list(CRAB_TARGETS), n_tasks=NUM_TASKS, n_skills=3, n_splits=1
    )
    model = get_peft_model(base, config)
    return Built(model, _trainable(model), {"task_ids": _task_ids(size, base.device)}, {"peft": _version("peft")})


def _mixlora(base: LlamaForCausalLM, size: ModelSize) -> Built:
    """The ``mixlora`` package's forward (MixLoRA, Li et al. 2024): top-2 of 8 LoRA experts on the MLP (gate, up,
    down, one router per MLP) and plain LoRA on q, k, v, o, all of rank 16: version 0.2.3 gives its experts the
    attention LoRA's rank (``inject_adapter_in_model`` ignores ``expert_lora``), so its attention adapters do half
    the FLOPs of ilora's top-2 there. Its ``LoraLinear`` asserts ``lora_dropout > 0``; the dropout modules are put
    in eval mode (identity), as no other provider pays dropout. ``act_fn`` is given (the base MLP's): left unset,
    0.2.3's forward calls ``None``."""
    import mixlora

    r, E = 16, 8
    cfg = mixlora.MixLoraConfig.from_config({
        "base_model_name_or_path": "tiny-llama", "task_type": "CAUSAL_LM", "peft_type": "MIXLORA", "r": r,
        "lora_alpha": 2 * r, "lora_dropout": 0.05, "target_modules": list(CRAB_TARGETS),
        "routing_strategy": "mixlora", "num_experts": E, "top_k": 2, "act_fn": base.config.hidden_act,
    })  # fmt: skip
    cfg.adapter_name_, cfg.dtype_ = "default", base.dtype
    cfg.check()
    h, inter, device = size.hidden, size.intermediate, base.device
    dims = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # fmt: skip
    weights: dict[str, torch.Tensor] = {}
    for i in range(size.layers):
        for proj, (d_in, d_out) in dims.items():
            names = [f"self_attn.{proj}"] if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else [
                f"mlp.{proj}.experts.{e}" for e in range(E)
            ]  # fmt: skip
            for name in names:
                a = torch.empty(r, d_in, device=device, dtype=base.dtype)
                nn.init.kaiming_uniform_(a, a=5**0.5)
                weights[f"mixlora.layers.{i}.{name}.lora_A.weight"] = a
                weights[f"mixlora.layers.{i}.{name}.lora_B.weight"] = torch.zeros(
                    d_out, r, device=device, dtype=base.dtype
                )
        gate = torch.empty(E, h, device=device, dtype=base.dtype).normal_(0, cfg.router_init_range_)
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = gate
    mixlora.inject_adapter_in_model(base, cfg, weights)
    params: list[nn.Parameter] = _trainable(base)
    for layer in base.model.layers:
        moe = layer.mlp.mixlora_moes["default"]
        moe.gate_ = nn.Parameter(moe.gate_)  # a plain tensor in the package: made a leaf we can train
        params.append(moe.gate_)
        for expert in moe.experts_.values():  # a dict, not a ModuleDict: invisible to base.parameters()
            expert.dropout_.eval()
            params += [expert.lora_A.weight, expert.lora_B.weight]
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    return Built(base, params, {}, {"mixlora": _version("mixlora")})


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@dataclass(frozen=True)
class ModelProvider:
    """One row of the model-level table: how to build it, what it is, and the PEFT LoRA row of the same adapter
    FLOPs (or budget) it is paired with, if any."""

    build: Callable[[LlamaForCausalLM, ModelSize], Built]
    what: str
    paired_with: str | None = None


MODEL_PROVIDERS: dict[str, ModelProvider] = {
    "frozen": ModelProvider(_frozen, "the base model alone, no adapter (forward and backward to the embeddings)"),
    "ilora_soft": ModelProvider(
        _ilora(r=32, num_experts=3, shared_a=True, routing="soft"),
        "ilora soft, 3 experts r32, shared A",
        "peft_lora_r96",
    ),
    "peft_lora_r96": ModelProvider(_peft_lora(96), "PEFT LoRA r96 (ilora_soft's E * r)"),
    "xlora": ModelProvider(_xlora, "PEFT X-LoRA, 3 LoRA experts r32, trainable, layerwise scalings", "peft_lora_r96"),
    "ilora_top2": ModelProvider(
        _ilora(r=16, num_experts=8, shared_a=False, routing="topk", top_k=2),
        "ilora top-2 of 8, r16, per-expert A",
        "peft_lora_r36",
    ),
    "peft_lora_r36": ModelProvider(_peft_lora(36), "PEFT LoRA r36 (the adapter FLOPs per token of ilora_top2)"),
    "mixlora": ModelProvider(
        _mixlora, "mixlora package: top-2 of 8 r16 on the MLP, LoRA r16 on attention", "peft_lora_r36"
    ),
    "ilora_task": ModelProvider(
        _ilora(r=32, num_experts=3, shared_a=True, router="task", num_tasks=NUM_TASKS),
        "ilora task routing, 3 experts r32, shared A, 4 tasks",
        "peft_lora_r96",
    ),
    "poly": ModelProvider(_poly, "PEFT Poly, 3 skills r32, 4 tasks", "peft_lora_r96"),
}


def model_skip_reason(name: str) -> str | None:
    """Why model provider ``name`` cannot run here, or None."""
    if name not in MODEL_PROVIDERS:
        raise KeyError(f"unknown model provider {name!r}; known: {', '.join(MODEL_PROVIDERS)}")
    if name == "mixlora":
        try:
            import mixlora  # noqa: F401
        except Exception as exc:
            return f"mixlora does not import on this stack: {type(exc).__name__}: {exc}"
    return None


def build_model(name: str, base: LlamaForCausalLM, size: ModelSize) -> Built:
    """Provider ``name`` on a deep copy of ``base``, with the embeddings' output requiring grad so that backward
    reaches the first layer's input in every provider (the frozen one included), as ``x`` does in the layer suite."""
    model = copy.deepcopy(base)
    model.enable_input_require_grads()
    return MODEL_PROVIDERS[name].build(model, size)

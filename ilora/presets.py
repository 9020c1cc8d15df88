"""Settings of published routed-LoRA designs, as ``ILoraConfig`` keyword arguments (used by its classmethods).

Each preset names the file of the authors' code it follows; where ilora's per-linear routing differs from the
design, the difference is stated. Every preset is overridable: ``ILoraConfig.mixlora(num_experts=4)``.
"""

from __future__ import annotations

from typing import Any

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
CRAB_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
"""The seven ``_proj`` projections of a LLaMA/Qwen block, matched by suffix: the targets of Crab, Crab+ and MoLA."""


def crabplus() -> dict[str, Any]:
    """Crab+ (Qwen2.5-Omni thinker): 3 experts, shared A, r 128, alpha 256, dropout 0.1 (one mask for all experts),
    soft per-token routing on the seven ``_proj`` projections, no auxiliary loss. The layer is ``Linear`` in
    ``peft_hyper/tuners/lora.py`` (GeWu-Lab/Crab_Plus)."""
    return dict(r=128, lora_alpha=256, lora_dropout=0.1, num_experts=3, shared_a=True, router="token",
                routing="soft", target_modules=list(CRAB_TARGETS))  # fmt: skip


def crab() -> dict[str, Any]:
    """Crab (LLaMA-2-7B-chat): 3 experts, shared A, r 8, alpha 16, dropout 0.05 with a mask per expert (its layer
    calls dropout inside the loop over heads), soft per-token routing on the seven ``_proj`` projections. The layer
    is ``Linear`` in ``peft_hyper/tuners/lora.py`` (GeWu-Lab/Crab)."""
    return dict(r=8, lora_alpha=16, lora_dropout=0.05, dropout_per_expert=True, num_experts=3, shared_a=True,
                router="token", routing="soft", target_modules=list(CRAB_TARGETS))  # fmt: skip


def hydralora() -> dict[str, Any]:
    """HydraLoRA (Tian et al., NeurIPS 2024): one shared A, ``lora_nums`` B heads mixed by a soft per-token router,
    no auxiliary loss. Numbers from ``HydraLoRA/fine-tuning.sh`` (r 4, alpha 32, dropout 0.05, 4 B heads, the MLP
    projections); the layer is ``Linear`` in ``HydraLoRA/peft/tuners/lora.py`` (Clin0212/HydraLoRA)."""
    return dict(r=4, lora_alpha=32, lora_dropout=0.05, num_experts=4, shared_a=True, router="token",
                routing="soft", target_modules=list(MLP_TARGETS))  # fmt: skip


def mixlora() -> dict[str, Any]:
    """MixLoRA (Li et al. 2024): 8 LoRA experts per MLP projection with their own A and B, top-2 of a per-token
    router, Mixtral renormalisation, plain LoRA (one expert) on the attention projections. Numbers from MoE-PEFT's
    ``templates/mixlora.json`` (r 16, alpha 32, dropout 0.05) and ``router_aux_loss_coef`` 0.001 (the default of
    ``MixLoraConfig.from_config``, ``mixlora/config.py``).

    Differences from MixLoRA's block-level design (``MixLoraSparseMoe``, ``mixlora/model.py``), where one router per
    MLP block picks two LoRA-adapted copies of the whole block: here each projection (gate, up, down) has its own
    router, and a token's experts are mixed after each projection rather than after the block. The two agree
    exactly when only ``up_proj`` is adapted (the mixture then passes linearly through ``down_proj``, and the router
    sees the block input), which the preset's test checks; with gate or down adapted they are different models.
    MixLoRA's balance loss is Mixtral's, which sums the shares over the k choices (k times ilora's mean share) and
    pools all layers' tokens: ``balance_loss_coef = 0.001 * top_k`` makes each layer's term equal to MixLoRA's for a
    one-layer model. MixLoRA initialises its router with N(0, 0.02), ilora with kaiming-uniform.
    """
    return dict(r=16, lora_alpha=32, lora_dropout=0.05, num_experts=8, shared_a=False, router="token",
                routing="topk", top_k=2, balance_loss_coef=0.001 * 2,
                target_modules=list(CRAB_TARGETS),
                num_experts_pattern={name: 1 for name in ATTENTION_TARGETS})  # fmt: skip


def loramoe() -> dict[str, Any]:
    """LoRAMoE (Dou et al. 2024): per-expert A and B, a dense softmax router per linear, and the localized
    balancing constraint over two expert groups (task type 1, world knowledge, favours the first half). Numbers
    from ``run_loramoe.sh`` (Ablustrund/LoRAMoE: r 4, alpha 32, dropout 0.05, 8 experts, the MLP projections); the
    script sets ``blc_weight`` and ``blc_alpha`` to 0.0, as here: set ``localized_balance_coef`` and
    ``localized_balance_alpha`` to turn the constraint on, and pass the task types as ``ilora_task_ids``. The layer
    is ``Linear`` in ``peft/tuners/lora.py``; LoRAMoE sums the constraint over every adapted linear, ilora's
    ``aux_loss`` averages it (scale the coefficient by the number of adapted linears to match), and LoRAMoE counts
    padding tokens in a sequence's importance where ilora leaves them out."""
    return dict(r=4, lora_alpha=32, lora_dropout=0.05, num_experts=8, shared_a=False, router="token",
                routing="soft", target_modules=list(MLP_TARGETS), num_expert_groups=2, task_expert_groups=[1, 0],
                localized_balance_coef=0.0, localized_balance_alpha=0.0)  # fmt: skip


def mola(num_layers: int = 32, experts_per_quarter: tuple[int, int, int, int] = (2, 4, 6, 8)) -> dict[str, Any]:
    """MoLA (Gao et al. 2024, "Higher layers need more LoRA experts"): top-2 routing over per-expert LoRA, with
    fewer experts in lower layers: the model's layers split into four equal quarters with 2, 4, 6 and 8 experts
    (the paper's "2-4-6-8" for 32-layer LLaMA-2), set through ``num_experts_pattern``. Numbers from the defaults of
    the authors' ``mola_training.py`` (GCYZSL/MoLA: ``lora_r`` 8 in every layer, ``lora_alpha`` 16,
    ``lora_dropout`` 0.05, ``number_experts`` 2,...,8 by eight layers, ``top_k`` 2, the seven projections); the layer
    is ``Linear_MoE.forward`` in ``src/mola_lora_hacked.py`` there (softmax, top-k, renormalised, one dropout mask
    for all experts, ``scaling = lora_alpha / r``), without auxiliary loss (``obalance`` defaults to False).
    MoE-PEFT's re-implementation (``MolaSparseMoe``, ``moe_peft/adapters/mola/model.py``, TUDB-Labs/MoE-PEFT) routes
    the same way; its ``templates/mola.json`` uses r 10 and alpha 20 instead."""
    if num_layers < 4 or num_layers % 4:
        raise ValueError(f"ILoraConfig.mola: num_layers must be a positive multiple of 4, got {num_layers}")
    quarter = num_layers // 4
    pattern = {rf"layers\.{i}\..*": experts_per_quarter[i // quarter] for i in range(num_layers)}
    return dict(r=8, lora_alpha=16, lora_dropout=0.05, num_experts=max(experts_per_quarter), shared_a=False,
                router="token", routing="topk", top_k=2, target_modules=list(CRAB_TARGETS),
                num_experts_pattern=pattern)  # fmt: skip

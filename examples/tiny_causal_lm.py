"""A minimal ilora fine-tune: a tiny Llama built from a config learns a repeating pattern with routed LoRA.

Run: .venv/bin/python examples/tiny_causal_lm.py

Prints the loss going down and each layer type's per-expert routing usage; no download, CPU, seconds.
"""

from __future__ import annotations

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import ilora


def main(steps: int = 60, seed: int = 0) -> None:
    torch.manual_seed(seed)
    llama = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    base = LlamaForCausalLM(llama)
    config = ilora.ILoraConfig.crab(r=8, num_experts=4, balance_loss_coef=0.01, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    # Two "tasks": counting up and counting down, so routing has something to separate.
    up = torch.arange(16).repeat(8, 1) % 32
    down = (31 - torch.arange(16)).repeat(8, 1)
    batch = torch.cat([up, down])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(steps):
        out = model(input_ids=batch, labels=batch)  # training with labels: the balance loss is in out.loss
        loss = out.loss - out.ilora_aux_loss
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad(), ilora.record_routing() as recorder:
        model(input_ids=batch)
    print("per-expert routing usage (mean weight over tokens):")
    for name, usage in recorder.usage().items():
        print(f"  {name:48s} " + " ".join(f"{u:.2f}" for u in usage.tolist()))


if __name__ == "__main__":
    main()

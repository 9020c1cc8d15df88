"""A minimal ilora fine-tune: a tiny Llama built from a config learns two tasks with routed LoRA.

Run: .venv/bin/python examples/tiny_causal_lm.py

The two tasks are counting up and counting down (token ids mod 32): each next token follows from the one before, so
a model that has learned them predicts every token after the first exactly (loss near 0 on those positions; the first
token of a row carries no information and is not scored). Trains until that loss is under ``target`` or ``max_steps``
pass, and says which; then prints, for each layer type, the mean routing weight per expert on each task separately,
so you can see whether the router sends the two tasks to different experts. No download, CPU, seconds.
"""

from __future__ import annotations

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import ilora

VOCAB = 32


def tasks(rows: int = 8, length: int = 16) -> dict[str, torch.Tensor]:
    """Each task's batch: rows of counting up or down from different starting tokens."""
    start = torch.arange(rows)[:, None] * 3
    steps = torch.arange(length)[None]
    return {"count up": (start + steps) % VOCAB, "count down": (start - steps) % VOCAB}


def per_task_usage(model: torch.nn.Module, batches: dict[str, torch.Tensor]) -> dict[str, dict[str, list[float]]]:
    """``{layer type: {task: mean routing weight per expert}}`` over all layers of that type (q_proj, ...), the types
    in the model's order (a Llama layer's q, k, v, o, gate, up, down), not the recorder's alphabetical one."""
    out: dict[str, dict[str, list[float]]] = {}
    order = dict.fromkeys(m.ilora_name for m in model.modules() if isinstance(m, ilora.ILoraLayer))
    model.eval()
    for task, batch in batches.items():
        with torch.no_grad(), ilora.record_routing() as recorder:
            model(input_ids=batch)
        recorded = recorder.usage()
        by_type: dict[str, list[torch.Tensor]] = {}
        for name in [n for n in order if n in recorded] + [n for n in recorded if n not in order]:
            by_type.setdefault(name.rsplit(".", 1)[-1], []).append(recorded[name])
        for kind, usages in by_type.items():
            out.setdefault(kind, {})[task] = torch.stack(usages).mean(0).tolist()
    return out


def main(max_steps: int = 400, target: float = 0.05, seed: int = 0) -> float:
    """Train until the loss on the predictable tokens is below ``target`` (or ``max_steps``); returns that loss."""
    torch.manual_seed(seed)
    llama = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    # The model is random, not pretrained: its frozen head (weights of std 0.02 after a unit-RMS norm) caps the logits
    # near 1, so with adapters alone the loss cannot fall below about 2.25 however long it trains. The head and the
    # embedding are trained beside the adapter (PEFT's modules_to_save), as a real fine-tune of a random model must.
    config = ilora.ILoraConfig.crab(r=16, num_experts=4, balance_loss_coef=0.01, task_type="CAUSAL_LM",
                                    modules_to_save=["lm_head", "embed_tokens"])  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(llama), config)
    model.print_trainable_parameters()
    batches = tasks()
    batch = torch.cat(list(batches.values()))
    labels = batch.clone()
    labels[:, 1] = -100  # the first prediction (token 1 from token 0) cannot tell up from down: not scored
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(1, max_steps + 1):
        out = model(input_ids=batch, labels=labels)  # training with labels: the balance loss is in out.loss
        loss = out.loss - out.ilora_aux_loss
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0 or step == 1 or loss.item() < target:
            print(f"step {step:3d}  loss {loss.item():.4f}")
        if loss.item() < target:
            print(f"learned both tasks: loss {loss.item():.4f} < {target} after {step} steps")
            break
    else:
        print(f"not learned in {max_steps} steps: loss {loss.item():.4f} >= {target}; try more steps or a higher lr")
    print("per-task routing usage (mean weight per expert, averaged over the layers of each type):")
    usage = per_task_usage(model, batches)
    for kind, per_task in usage.items():
        cells = "   ".join(f"{task}: " + " ".join(f"{u:.2f}" for u in weights) for task, weights in per_task.items())
        print(f"  {kind:10s} {cells}")
    gap, kind = max((max(abs(a - b) for a, b in zip(*per_task.values())), kind) for kind, per_task in usage.items())
    print(
        f"largest difference between the tasks' usage: {gap:.2f} ({kind}); the balance loss keeps each task's "
        "usage near uniform, so a task's preference shows as a few hundredths here"
    )
    return loss.item()


if __name__ == "__main__":
    main()

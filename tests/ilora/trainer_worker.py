"""``ILoraTrainer`` (or the plain ``Trainer``, the model adding the router losses to its own loss, or TRL's
``SFTTrainer``, adding the model's ``aux_loss``) on a tiny Llama with a top-2 router and a balance loss; run by
test_distributed.py in one process or under torchrun. Writes the logged losses (task + aux) of rank 0 to
``<out>/losses.json``.

    python tests/ilora/trainer_worker.py PER_DEVICE_BATCH OUT [ILoraTrainer|Trainer|SFTTrainer]
"""

from __future__ import annotations

import json
import os
import sys

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

import ilora


class Tokens(torch.utils.data.Dataset):
    """16 sequences of 4 to 8 tokens: batches pad differently depending on how they are split over ranks."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(1, 64, (4 + i % 5,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def collate(items: list[dict]) -> dict:
    n = max(len(it["input_ids"]) for it in items)
    batch = {
        "input_ids": torch.zeros(len(items), n, dtype=torch.long),
        "labels": torch.full((len(items), n), -100),
        "attention_mask": torch.zeros(len(items), n, dtype=torch.long),
    }
    for i, it in enumerate(items):
        length = len(it["input_ids"])
        batch["input_ids"][i, :length] = torch.as_tensor(it["input_ids"])
        batch["labels"][i, :length] = torch.as_tensor(it["labels"])
        batch["attention_mask"][i, :length] = 1
    return batch


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the 64 ids: without one, TRL would fetch the model's from the Hub."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0")


def main(per_device: int, out: str, trainer_cls: str = "ILoraTrainer") -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    adapter = ilora.ILoraConfig(r=4, num_experts=4, routing="topk", top_k=2, balance_loss_coef=0.5,
                                target_modules=["q_proj", "v_proj", "up_proj"])  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), adapter)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    settings = dict(output_dir=out, per_device_train_batch_size=per_device, max_steps=4, learning_rate=1e-2,
                    report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0,
                    ddp_backend="gloo" if distributed else None, average_tokens_across_devices=True)  # fmt: skip
    if trainer_cls == "SFTTrainer":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**settings, gradient_checkpointing=False, dataset_kwargs={"skip_prepare_dataset": True})
        from datasets import Dataset

        tokens = Tokens()
        rows = Dataset.from_list([{k: v.tolist() for k, v in tokens[i].items()} for i in range(len(tokens))])
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                             processing_class=tokenizer())  # fmt: skip
    else:
        cls = {"ILoraTrainer": ilora.ILoraTrainer, "Trainer": Trainer}[trainer_cls]
        trainer = cls(model=model, args=TrainingArguments(**settings), train_dataset=Tokens(), data_collator=collate)
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump(losses, f)
    if distributed:
        # The Trainer leaves its DDP wrapper and the process group alive; torn down at interpreter exit instead, the
        # gloo threads can abort the process ("terminate called without an active exception").
        del trainer, model
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], *sys.argv[3:])

"""The transformers.Trainer integration trains the auxiliary router losses along with the task loss."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import ilora
from ilora.losses import caller_adds_aux_loss

from .conftest import build, targets


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, 64, (6,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def test_trainer_adds_aux_loss_to_the_training_loss(tmp_path) -> None:
    cfg = ilora.ILoraConfig(r=4, num_experts=4, routing="topk", top_k=1, target_modules=targets("llama"),
                            balance_loss_coef=1.0)  # fmt: skip
    model = get_peft_model(build("llama"), cfg)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, logging_steps=1, save_strategy="no")  # fmt: skip
    trainer = ilora.ILoraTrainer(model=model, args=args, train_dataset=_Tokens())
    batch = {k: torch.stack([_Tokens()[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
    model.train()
    with_aux = trainer.compute_loss(model, batch)
    with caller_adds_aux_loss():
        task_only = model(**batch).loss
    assert with_aux.item() >= task_only.item() + 0.99  # the balance loss is >= 1 at any routing
    router = next(iter(ilora.ilora_layers(model))).ilora_router["default"].weight
    before = router.detach().clone()
    trainer.train()
    assert not torch.equal(before, router.detach())


def test_aux_loss_follows_the_trainers_accumulation_scaling(tmp_path) -> None:
    # When the task loss is normalized by the step's token count the Trainer no longer divides by the accumulation
    # steps, so the aux term must be divided here, or it would weigh `steps` times more than configured.
    cfg = ilora.ILoraConfig(r=4, num_experts=4, target_modules=targets("llama"), balance_loss_coef=1.0)
    model = get_peft_model(build("llama"), cfg)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             report_to=[], use_cpu=True, save_strategy="no")  # fmt: skip
    trainer = ilora.ILoraTrainer(model=model, args=args, train_dataset=_Tokens())
    trainer.current_gradient_accumulation_steps = 2
    assert trainer.model_accepts_loss_kwargs
    batch = {k: torch.stack([_Tokens()[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
    model.train()
    with caller_adds_aux_loss():
        task = model(**batch).loss
    aux = ilora.aux_loss(model)
    assert aux.item() > 0.5
    tokens = torch.tensor(int(batch["labels"][:, 1:].numel()))
    torch.testing.assert_close(trainer.compute_loss(model, batch, num_items_in_batch=tokens), task + aux / 2)
    torch.testing.assert_close(trainer.compute_loss(model, batch), task + aux)


def _task_data() -> Dataset:
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(1, 64, (6,), generator=g).tolist() for _ in range(8)]
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "ilora_task_ids": [i % 3 for i in range(8)]})


@pytest.mark.parametrize("trainer_cls", [Trainer, ilora.ILoraTrainer])
def test_task_ids_column_survives_remove_unused_columns_or_the_error_says_what_to_set(tmp_path, trainer_cls) -> None:
    cfg = ilora.ILoraConfig(r=4, num_experts=3, router="task", num_tasks=3, target_modules=targets("llama"),
                            init_lora_weights=False)  # fmt: skip
    model = get_peft_model(build("llama"), cfg)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no")  # fmt: skip
    assert args.remove_unused_columns  # the default
    trainer = trainer_cls(model=model, args=args, train_dataset=_task_data())
    if trainer_cls is Trainer:
        with pytest.raises(ValueError, match=r"remove_unused_columns=False"):
            trainer.train()
        return
    router = ilora.ilora_layers(model)[0].ilora_router["default"].weight
    before = router.detach().clone()
    trainer.train()
    changed = (router.detach() != before).any(dim=1)
    assert changed.tolist() == [True, True, True]  # each task's gate row learned from its own rows

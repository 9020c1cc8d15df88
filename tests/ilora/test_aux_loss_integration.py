"""The router losses reach the training loss with any trainer: a plain loop, transformers' Trainer, TRL."""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments

import ilora
from ilora.integrations.transformers import AuxLossMixin
from ilora.losses import caller_adds_aux_loss

from .conftest import build, example_input, targets

COEF = 0.5


def _model(**extra) -> torch.nn.Module:
    cfg = ilora.ILoraConfig(r=4, num_experts=4, routing="topk", top_k=2, target_modules=targets("llama"),
                            balance_loss_coef=COEF, router_z_loss_coef=0.01, **extra)  # fmt: skip
    model = get_peft_model(build("llama"), cfg)
    model.train()
    return model


def _batch() -> dict:
    inputs = example_input("llama")
    return {**inputs, "labels": inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)}


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return grads


def test_a_training_call_with_labels_adds_the_router_losses_to_its_loss() -> None:
    model, batch = _model(), _batch()
    out = model(**batch)
    router = ilora.aux_loss(model)  # the same training call's statistics
    assert router.item() >= COEF  # the balance loss is >= 1 at any routing
    with caller_adds_aux_loss():
        task = model(**batch).loss
    torch.testing.assert_close(out.loss, task + router)
    torch.testing.assert_close(out.ilora_aux_loss, router.detach())
    out.loss.backward()
    via_output = _grads(model)
    model(**batch)
    (task.detach() + ilora.aux_loss(model)).backward()  # the router's gradient comes from the aux term only
    with caller_adds_aux_loss():
        model(**batch).loss.backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(via_output[name], grad, msg=name)


@pytest.mark.parametrize("case", ["eval", "no_labels", "switched_off"])
def test_the_loss_is_left_alone_without_labels_in_training_or_when_switched_off(case: str) -> None:
    model, batch = _model(aux_loss_in_output=case != "switched_off"), _batch()
    labels = batch.pop("labels")
    if case == "eval":
        model.eval()
    out = model(**batch, labels=None if case == "no_labels" else labels)
    assert not hasattr(out, "ilora_aux_loss")
    if case != "no_labels":
        with caller_adds_aux_loss():
            torch.testing.assert_close(out.loss, model(**batch, labels=labels).loss)


def test_statistics_never_read_warn_once() -> None:
    model, batch = _model(aux_loss_in_output=False), _batch()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(**batch)
        ilora.aux_loss(model)  # read: no warning for this call
        model(**batch)
        model(**batch)  # the previous call's statistics were never read
        model(**batch)
    unread = [w for w in seen if "never used" in str(w.message)]
    assert len(unread) == 1
    assert "ilora.ILoraTrainer" in str(unread[0].message) and "AuxLossMixin" in str(unread[0].message)


def test_a_tuple_output_is_refused_by_name() -> None:
    model, batch = _model(), _batch()
    with pytest.raises(ValueError, match=r"aux_loss_in_output=False"):
        model(**batch, return_dict=False)


def _tokens() -> Dataset:
    g = torch.Generator().manual_seed(0)
    return Dataset.from_dict(
        {"input_ids": [torch.randint(4, 64, (6 + i % 3,), generator=g).tolist() for i in range(8)]}
    )


def _trainer_args(tmp_path, **extra) -> dict:
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
                save_strategy="no", logging_steps=1, learning_rate=1e-2, **extra)  # fmt: skip


def test_plain_transformers_trainer_trains_the_router_losses_once_per_accumulated_batch(tmp_path) -> None:
    model = _model()
    args = TrainingArguments(**_trainer_args(tmp_path, gradient_accumulation_steps=2))
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": t, "labels": t} for t in _same_length()])
    assert trainer.model_accepts_loss_kwargs  # the task loss is normalized over the accumulated batch
    batch = {k: torch.stack([r[k] for r in [{"input_ids": t, "labels": t} for t in _same_length()[:4]]]) for k in
             ("input_ids", "labels")}  # fmt: skip
    tokens = batch["labels"][:, 1:].numel()
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(2 * tokens))
    router = ilora.aux_loss(model)
    with caller_adds_aux_loss():
        task = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(2 * tokens))
    torch.testing.assert_close(loss, task + router / 2)  # half of the accumulated batch: half of the term
    before = ilora.ilora_layers(model)[0].ilora_router["default"].weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, ilora.ilora_layers(model)[0].ilora_router["default"].weight)


def _smoothed_cross_entropy(outputs, labels, num_items_in_batch=None) -> torch.Tensor:
    logits = outputs["logits"][:, :-1].flatten(0, 1)
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), label_smoothing=0.1)


@pytest.mark.parametrize("how", ["label_smoothing_factor", "compute_loss_func"])
def test_plain_trainer_computing_its_own_loss_refuses_to_drop_the_router_losses(tmp_path, how: str) -> None:
    # The Trainer takes the labels off and computes the loss itself: the model's loss (and the router terms added
    # to it) is never used, so training would silently leave the router losses out.
    extra = {"label_smoothing_factor": 0.1} if how == "label_smoothing_factor" else {}
    args = TrainingArguments(**_trainer_args(tmp_path, **extra))
    rows = [{"input_ids": t, "labels": t} for t in _same_length()]
    func = {"compute_loss_func": _smoothed_cross_entropy} if how == "compute_loss_func" else {}
    trainer = Trainer(model=_model(), args=args, train_dataset=rows, **func)
    with pytest.raises(ValueError, match=rf"{how}.*ilora\.ILoraTrainer.*AuxLossMixin"):
        trainer.train()


def _same_length() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 64, (6,), generator=g) for _ in range(8)]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0")


def test_trl_sft_trainer_refuses_to_drop_them_and_trains_them_with_the_mixin(tmp_path) -> None:
    from trl import SFTConfig, SFTTrainer

    def trainer(cls: type) -> SFTTrainer:
        cfg = ilora.ILoraConfig(r=4, num_experts=4, target_modules=targets("llama"), balance_loss_coef=0.01)
        args = SFTConfig(**_trainer_args(tmp_path / cls.__name__))
        return cls(model=build("llama"), args=args, train_dataset=_tokens(), processing_class=_tokenizer(),
                   peft_config=cfg)  # fmt: skip

    # TRL computes its loss from the model's log-probabilities, outside the model: the model cannot add the term.
    with pytest.raises(ValueError, match=r"AuxLossMixin"):
        trainer(SFTTrainer).train()

    class ILoraSFTTrainer(AuxLossMixin, SFTTrainer):
        pass

    sft = trainer(ILoraSFTTrainer)
    model = sft.model
    model.train()
    batch = sft.data_collator([sft.train_dataset[i] for i in range(4)])
    loss = sft.compute_loss(model, dict(batch))
    router = ilora.aux_loss(model)
    with caller_adds_aux_loss():
        task = SFTTrainer.compute_loss(sft, model, dict(batch))
    assert router.item() >= 0.01
    torch.testing.assert_close(loss, task + router)
    sft.train()
    sft.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_model.safetensors").exists()

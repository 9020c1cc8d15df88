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


@pytest.mark.parametrize("in_output", [True, False])
def test_statistics_never_read_warn_once(in_output: bool) -> None:
    model, batch = _model(aux_loss_in_output=in_output), _batch()
    batch.pop("labels")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(**batch)
        ilora.aux_loss(model)  # read: no warning for this call
        model(**batch)
        model(**batch)  # the previous call's statistics were never read
        model(**batch)
    unread = [str(w.message) for w in seen if "never used" in str(w.message)]
    assert len(unread) == 1
    assert "ilora.ILoraTrainer" in unread[0] and "AuxLossMixin" in unread[0]
    # Calling with labels only helps where the losses go into the output's loss.
    assert ("call the model with labels" in unread[0]) == in_output


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


def _by_hand(model: torch.nn.Module, batch: dict, num_items: int | None = None, steps: int = 1) -> torch.Tensor:
    """The reference: next-token cross-entropy from the logits (over ``num_items`` label tokens when given, as
    ``transformers.Trainer`` normalizes over an accumulated batch) plus the same call's router losses / ``steps``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    total = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum")
    return total / (labels.ne(-100).sum() if num_items is None else num_items) + ilora.aux_loss(model) / steps


def _sft_trainer(tmp_path, cls: type | None = None, **extra):
    from trl import SFTConfig, SFTTrainer

    cfg = ilora.ILoraConfig(r=4, num_experts=4, routing="topk", top_k=2, target_modules=targets("llama"),
                            balance_loss_coef=COEF, router_z_loss_coef=0.01)  # fmt: skip
    args = SFTConfig(**_trainer_args(tmp_path / "sft", **extra))
    return (cls or SFTTrainer)(model=build("llama"), args=args, train_dataset=_tokens(), processing_class=_tokenizer(),
                               peft_config=cfg)  # fmt: skip


def _sft_batch(trainer) -> dict:
    return dict(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))


@pytest.mark.parametrize("path", ["SFTTrainer", "AuxLossMixin+SFTTrainer", "ILoraTrainer", "torch loop"])
def test_the_training_loss_is_the_task_loss_plus_the_router_losses_by_hand(tmp_path, path: str) -> None:
    from trl import SFTTrainer

    class ILoraSFTTrainer(AuxLossMixin, SFTTrainer):
        pass

    cls = {"SFTTrainer": SFTTrainer, "AuxLossMixin+SFTTrainer": ILoraSFTTrainer}.get(path)
    trainer = _sft_trainer(tmp_path, cls or SFTTrainer)
    model, batch = trainer.model, _sft_batch(trainer)
    if path == "ILoraTrainer":
        trainer = ilora.ILoraTrainer(model=model, args=TrainingArguments(**_trainer_args(tmp_path / "t")))
    model.train()
    loss = model(**batch).loss if path == "torch loop" else trainer.compute_loss(model, dict(batch))
    expected = _by_hand(model, batch)
    assert ilora.aux_loss(model).item() >= COEF  # the balance loss is >= 1 at any routing
    torch.testing.assert_close(loss, expected)


def test_plain_sft_trainer_adds_the_router_losses_once_per_accumulated_batch_and_trains_them(tmp_path) -> None:
    trainer = _sft_trainer(tmp_path, gradient_accumulation_steps=2)
    model, batch = trainer.model, _sft_batch(trainer)
    model.train()
    trainer.current_gradient_accumulation_steps = 2
    items = 2 * int(batch["labels"][:, 1:].ne(-100).sum())  # this micro-batch and another as large
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(items))
    torch.testing.assert_close(loss, _by_hand(model, batch, num_items=items, steps=2))
    router = ilora.ilora_layers(model)[0].ilora_router["default"].weight
    before = router.detach().clone()
    trainer.train()
    assert not torch.equal(before, router.detach())
    logged = [row["aux_loss"] for row in trainer.state.log_history if "aux_loss" in row]
    assert logged and min(logged) >= COEF  # TRL logs outputs.aux_loss, ILoRA's router losses
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"label_smoothing_factor": 0.1}, r"SFTTrainer with label_smoothing_factor.*AuxLossMixin"),
        ({"router_aux_loss_coef": 0.0}, r"router_aux_loss_coef=0.*AuxLossMixin"),
        ({"router_aux_loss_coef": 0.5}, r"router_aux_loss_coef=0.5.*ILoraConfig.balance_loss_coef"),
    ],
)
def test_sft_trainer_settings_that_would_drop_or_reweigh_the_router_losses_refuse(tmp_path, extra, match) -> None:
    # Label smoothing computes the loss from logits and never adds outputs.aux_loss; a TRL coefficient of 0 turns
    # TRL's aux_loss path off; another coefficient would weigh them twice over (ILoraConfig holds theirs).
    with pytest.raises(ValueError, match=match):
        _sft_trainer(tmp_path, **extra).train()


def test_sft_evaluation_and_unload_leave_the_declared_router_loss_fields_consistent(tmp_path) -> None:
    trainer = _sft_trainer(tmp_path)
    trainer.eval_dataset = trainer.train_dataset
    assert trainer.evaluate()["eval_loss"] > 0  # TRL reads outputs.aux_loss in evaluation too: 0 there
    config = trainer.model.get_base_model().config
    assert config.output_router_logits and config.router_aux_loss_coef == 1.0  # enabled by TRL
    base = trainer.model.unload()
    assert not hasattr(base.config, "output_router_logits") and not hasattr(base.config, "router_aux_loss_coef")


def test_sft_trainer_on_a_mixture_of_experts_base_adds_its_router_loss_and_ilora_s(tmp_path) -> None:
    # A MoE base declares output_router_logits itself: TRL adds router_aux_loss_coef * (its aux_loss + ILoRA's / coef).
    from transformers import MixtralConfig, MixtralForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    base = MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02,
        max_position_embeddings=64, tie_word_embeddings=False))  # fmt: skip
    cfg = ilora.ILoraConfig(r=4, num_experts=4, routing="topk", top_k=2, target_modules=["q_proj", "v_proj"],
                            balance_loss_coef=COEF)  # fmt: skip
    trainer = SFTTrainer(model=base, args=SFTConfig(**_trainer_args(tmp_path)), train_dataset=_tokens(),
                         processing_class=_tokenizer(), peft_config=cfg)  # fmt: skip
    model, batch = trainer.model, _sft_batch(trainer)
    model.train()
    assert trainer.aux_loss_enabled
    loss = trainer.compute_loss(model, dict(batch))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    moe = model(**inputs, output_router_logits=True).aux_loss
    torch.testing.assert_close(loss, _by_hand(model, batch) + 0.02 * moe)
    assert model.get_base_model().config.router_aux_loss_coef == 0.02  # the base model's own, left as it was

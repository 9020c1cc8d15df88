"""router="signal": a per-token signal given with the call (``ilora_router_inputs=``), projected by the router."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model

import ilora

from .conftest import build, example_input, output, targets
from .oracle import assert_layers_match, capture_layer_io, naive_dense_gates

D_SIGNAL = 3


def make(kind: str = "llama", seed: int = 0, **options) -> PeftModel:
    settings = dict(r=4, lora_alpha=8, num_experts=4, router="signal", router_signal_dim=D_SIGNAL,
                    target_modules=targets(kind), init_lora_weights=False)  # fmt: skip
    torch.manual_seed(seed)
    return get_peft_model(build(kind), ilora.ILoraConfig(**{**settings, **options}))


def signal(*shape: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(*shape, D_SIGNAL, generator=torch.Generator().manual_seed(seed))


def signal_gates(sig: torch.Tensor):
    """The reference: ``softmax``/top-k/top-p of ``signal @ W.T`` in float64, the signal's rows in token order."""

    def gates_for(layer, x: torch.Tensor) -> torch.Tensor:
        logits = sig.reshape(-1, D_SIGNAL).double() @ layer.ilora_router["default"].weight.double().T
        return naive_dense_gates(logits, layer.ilora_config["default"])

    return gates_for


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"router": "signal"}, "router_signal_dim"),
    ({"router": "signal", "router_signal_dim": 0}, "router_signal_dim"),
    ({"router": "token", "router_signal_dim": 4}, "router_signal_dim"),
    ({"router": "signal", "router_signal_dim": 4, "router_jitter_noise": 0.1}, "router_jitter_noise"),
])  # fmt: skip
def test_invalid_settings_name_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=rf"ILoraConfig\.{field}"):
        ilora.ILoraConfig(**kwargs)


@pytest.mark.parametrize("routing", ["soft", "topk", "top_p"])
def test_forward_matches_the_hand_built_reference(routing: str) -> None:
    pm = make(routing=routing, top_k=2, top_p=0.6).eval()
    sig = signal(2, 7)
    with torch.no_grad():
        _, seen = capture_layer_io(pm, lambda: pm(**example_input("llama"), ilora_router_inputs=sig))
    assert_layers_match(pm, seen, signal_gates(sig))
    # A 2-D input takes one signal row per token ([tokens, d_signal]); the context gives the same as the keyword.
    mlp = make("mlp", routing=routing, top_k=2).eval()
    x, sig2 = example_input("mlp")["x"], signal(6)
    with torch.no_grad(), ilora.routing_context(router_inputs=sig2):
        by_context, seen = capture_layer_io(mlp, lambda: mlp(x))
    assert_layers_match(mlp, seen, signal_gates(sig2))
    torch.testing.assert_close(mlp(x, ilora_router_inputs=sig2), by_context)


def test_backward_matches_reference_gradients() -> None:
    """Gradients reach the router weight and the signal itself, as float64 finite differences say."""
    mlp = make("mlp").double()
    layer = mlp.base_model.model.fc_mid

    def f(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
        with ilora.routing_context(router_inputs=sig):
            return layer(x)

    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    sig = torch.randn(5, D_SIGNAL, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, sig))
    # The router weight's gradient against the closed form through the softmax.
    out = f(x, sig)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    A, B, W = layer.ilora_A["default"], layer.ilora_B["default"], layer.ilora_router["default"].weight
    h = torch.einsum("td,edr->ter", x.detach(), A.expand(4, -1, -1).detach())
    per_expert = torch.einsum("ter,erd->ted", h, B.detach()) * layer.scaling["default"]  # [T, E, d_out]
    g = torch.softmax(sig.detach() @ W.detach().T, -1)
    dg = torch.einsum("ted,td->te", per_expert, upstream)
    dlogits = g * (dg - (g * dg).sum(-1, keepdim=True))
    torch.testing.assert_close(W.grad, dlogits.T @ sig.detach())


@pytest.mark.parametrize(("given", "error", "match"), [
    (None, ValueError, r"ilora_router_inputs=.*routing_context\(router_inputs=.*remove_unused_columns"),
    (torch.zeros(2, 7, 4), ValueError, r"shape \(2, 7, 4\) has 4 features per token.*router_signal_dim=3"),
    (torch.zeros(3, 7, 3), ValueError, r"shape \(3, 7, 3\) does not line up with the routed input of shape \(2, 7"),
    (torch.zeros(2, 6, 3), ValueError, r"shape \(2, 6, 3\) does not line up.*give 7 rows"),
    (torch.zeros(13, 3), ValueError, r"shape \(13, 3\) does not line up.*one row per token \(14\)"),
    (torch.zeros(2, 7, 3, dtype=torch.long), TypeError, r"floating-point.*torch.int64"),
    (torch.zeros(2, 7, 1, 3), ValueError, r"\[batch, seq, d_signal\] or \[tokens, d_signal\].*\(2, 7, 1, 3\)"),
])  # fmt: skip
def test_a_missing_or_misaligned_signal_is_refused_naming_both_shapes(given, error, match) -> None:
    pm = make().eval()
    kwargs = {} if given is None else {"ilora_router_inputs": given}
    with pytest.raises(error, match=match):
        pm(**example_input("llama"), **kwargs)


def test_padding_rows_route_nothing_else_and_are_not_recorded() -> None:
    """Left padding: the real tokens' outputs equal the unpadded row's, and the recorder keeps only real tokens."""
    pm = make(routing="topk", top_k=2).eval()
    inputs, sig = example_input("llama"), signal(2, 7)
    with torch.no_grad(), ilora.record_routing() as rec:
        padded = pm(**inputs, ilora_router_inputs=sig).logits
        alone = pm(input_ids=inputs["input_ids"][1:, 2:], ilora_router_inputs=sig[1:, 2:]).logits
    torch.testing.assert_close(padded[1, 2:], alone[0], rtol=1e-4, atol=1e-4)
    name = "model.layers.0.mlp.up_proj"
    assert [w.shape for w in rec.weights[name]] == [(12, 4), (5, 4)]


def test_decode_step_takes_its_new_tokens_rows() -> None:
    """A cached step is given its new tokens' rows, or the whole sequence so far (its last rows are used)."""
    pm = make().eval()
    ids = example_input("llama")["input_ids"]
    sig = signal(2, 7)
    with torch.no_grad():
        full = pm(input_ids=ids, ilora_router_inputs=sig).logits[:, -1]

        def step(rows: torch.Tensor) -> torch.Tensor:
            cache = pm(input_ids=ids[:, :6], ilora_router_inputs=sig[:, :6], use_cache=True).past_key_values
            return pm(input_ids=ids[:, 6:], past_key_values=cache, ilora_router_inputs=rows).logits[:, -1]

        new_only, whole = step(sig[:, 6:]), step(sig)
        with pytest.raises(ValueError, match=r"give 1 rows \(this call's tokens\) or 7 \(6 cached, 1 new\)"):
            step(sig[:, :6])
    torch.testing.assert_close(new_only, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_generate_with_cache_matches_greedy_full_recompute(task_type: str | None) -> None:
    pm = make(task_type=task_type, routing="topk", top_k=2).eval()
    inputs = example_input("llama")
    sig, steps = signal(2, 7 + 4), 4
    kwargs = dict(max_new_tokens=steps, do_sample=False, pad_token_id=0, min_new_tokens=steps)
    with torch.no_grad():
        generated = pm.generate(**inputs, ilora_router_inputs=sig, **kwargs)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for _ in range(steps):  # no cache: every step recomputes the whole sequence with its signal rows
            n = ids.shape[1]
            logits = pm(input_ids=ids, attention_mask=mask, ilora_router_inputs=sig[:, :n], use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        assert torch.equal(generated, ids)
        with pytest.raises(ValueError, match=r"inside generate the signal must cover the prompt and every generated"):
            pm.generate(**inputs, ilora_router_inputs=sig[:, :7], **kwargs)


def test_saved_and_loaded(tmp_path) -> None:
    """(A fresh process loads it in ``test_router_groups``, whose grouped adapter routes by a signal.)"""
    pm = make(routing="top_p", top_k=3).eval()
    inputs = {**example_input("llama"), "ilora_router_inputs": signal(2, 7)}
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path).eval()
    assert loaded.peft_config["default"].router_signal_dim == D_SIGNAL
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, inputs), output(pm, inputs), rtol=0, atol=0)


def test_torch_compile_forward_and_backward() -> None:
    """Compiled (not fullgraph), a model whose routers share a signal-routed group's gates matches eager mode."""
    from .test_router_groups import Blocks

    cfg = ilora.ILoraConfig(r=2, num_experts=3, router="signal", router_signal_dim=D_SIGNAL, routing="topk", top_k=2,
                            target_modules=["q", "k", "v"], router_groups={"g": ["q", "k", "v"]},
                            init_lora_weights=False)  # fmt: skip
    torch.manual_seed(0)
    pm = get_peft_model(Blocks(), cfg)
    x, sig = torch.randn(4, 5, 6), signal(4, 5)
    eager = pm(x, ilora_router_inputs=sig)
    eager.square().sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    with ilora.routing_context(router_inputs=sig):
        out = torch.compile(pm.base_model.model, backend="aot_eager")(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager_grads[n], msg=n)


def test_checkpointed_recomputation_sees_the_forwards_signal() -> None:
    """Non-reentrant checkpointing recomputes with the signal of its forward, whatever the caller's state then."""

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        pm = make(routing="topk", top_k=2, balance_loss_coef=0.1).train()
        if checkpointing:
            pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        inputs = example_input("llama")
        loss = pm(**inputs, labels=inputs["input_ids"], ilora_router_inputs=signal(2, 7)).loss
        with ilora.routing_context(router_inputs=signal(2, 7, seed=9)):  # another signal at backward time
            loss.backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_concurrent_calls_from_threads_keep_their_own_signal() -> None:
    from .test_context import first_decoder_layer, run_in_threads

    pm = make().eval()
    inputs = example_input("llama")
    signals = [signal(2, 7, seed=s) for s in (1, 2)]
    with torch.no_grad():
        expected = [pm(**inputs, ilora_router_inputs=s).logits for s in signals]
        got = run_in_threads(
            [lambda s=s: pm(**inputs, ilora_router_inputs=s).logits for s in signals], first_decoder_layer(pm)
        )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("trainer_cls", ["Trainer", "ILoraTrainer"])
def test_signal_column_survives_remove_unused_columns_or_the_error_says_what_to_set(tmp_path, trainer_cls) -> None:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(1, 64, (6,), generator=g).tolist() for _ in range(4)]
    signals = [torch.randn(6, D_SIGNAL, generator=g).tolist() for _ in range(4)]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids, "ilora_router_inputs": signals})
    model = make()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no")  # fmt: skip
    trainer = (Trainer if trainer_cls == "Trainer" else ilora.ILoraTrainer)(model=model, args=args, train_dataset=data)
    if trainer_cls == "Trainer":
        with pytest.raises(ValueError, match=r"remove_unused_columns=False"):
            trainer.train()
        return
    router = ilora.ilora_layers(model)[0].ilora_router["default"].weight
    before = router.detach().clone()
    trainer.train()
    assert not torch.equal(router.detach(), before)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    past=st.integers(0, 6),
    extra=st.integers(-3, 4),
    generating=st.booleans(),
)
def test_the_rows_rule_uses_the_stated_rows_or_refuses(batch, seq, past, extra, generating) -> None:
    """Any signal length: the rows ``SignalRouter`` states for this call, or ``ValueError``; nothing in between."""
    from torch import nn

    from ilora import context
    from ilora.router import signal_rows

    n = max(1, past + seq + extra)
    sig = torch.arange(batch * n * D_SIGNAL, dtype=torch.float32).reshape(batch, n, D_SIGNAL)
    x = torch.zeros(batch, seq, 8)
    owner = nn.Module()
    if generating:
        expected = sig[:, past : past + seq] if n >= past + seq else None
    else:
        expected = sig[:, n - seq :] if n in (seq, past + seq) else None
    with ilora.routing_context(generating=generating):
        context.enter_call(owner, past_length=past, router_inputs=sig)
        try:
            if expected is None:
                named = rf"shape \({batch}, {n}, 3\) does not line up.*\({batch}, {seq}, 8\)"
                with pytest.raises(ValueError, match=named):
                    signal_rows(x, D_SIGNAL)
            else:
                torch.testing.assert_close(signal_rows(x, D_SIGNAL), expected.reshape(-1, D_SIGNAL), rtol=0, atol=0)
        finally:
            context.exit_call(owner)


@pytest.mark.parametrize("expand", [dict(num_beams=2), dict(num_return_sequences=2, do_sample=True)])
@pytest.mark.parametrize("router", ["signal", "task"])
def test_generate_expands_per_row_routing_inputs_as_it_expands_the_batch(router: str, expand: dict) -> None:
    """Beam search and num_return_sequences repeat each prompt row (transformers' ``_expand_inputs_for_generation``,
    ``repeat_interleave``); the per-row task ids and signal follow: beams equal each row generated alone, sampled
    sequences equal a prompt and inputs expanded by hand."""
    options = dict(router="task", num_tasks=3, router_signal_dim=None) if router == "task" else {}
    pm = make(routing="topk", top_k=2, **options).eval()
    inputs = example_input("llama")
    steps = 3
    per_row = torch.tensor([2, 0]) if router == "task" else signal(2, 7 + steps)
    key = "ilora_task_ids" if router == "task" else "ilora_router_inputs"
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0, **expand)
    with torch.no_grad():
        torch.manual_seed(0)
        given = pm.generate(**inputs, **{key: per_row}, **kwargs)
        if "num_beams" in expand:  # a beam search over an expanded batch is another search: each prompt row alone
            for i in range(2):
                alone = pm.generate(**{k: v[i : i + 1] for k, v in inputs.items()}, **{key: per_row[i : i + 1]},
                                    **kwargs)  # fmt: skip
                assert torch.equal(given[i, -steps:], alone[0, -steps:])
        else:
            expanded = {k: v.repeat_interleave(2, 0) for k, v in inputs.items()}
            plain = {k: v for k, v in kwargs.items() if k != "num_return_sequences"}
            torch.manual_seed(0)
            by_hand = pm.generate(**expanded, **{key: per_row.repeat_interleave(2, 0)}, **plain)
            assert torch.equal(given, by_hand)


@pytest.mark.parametrize("router", ["signal", "task"])
def test_generate_refuses_per_row_inputs_of_another_prompt_batch(router: str) -> None:
    """A 4-row prompt given 2 rows is a mistake, not an expansion: only generate's own expansion repeats rows."""
    options = dict(router="task", num_tasks=3, router_signal_dim=None) if router == "task" else {}
    pm = make(**options).eval()
    prompt = {k: v.repeat(2, 1) for k, v in example_input("llama").items()}  # 4 rows
    per_row = torch.tensor([2, 0]) if router == "task" else signal(2, 7 + 2)
    key = "ilora_task_ids" if router == "task" else "ilora_router_inputs"
    with torch.no_grad(), pytest.raises(ValueError, match=rf"{key} has 2 rows for a prompt of 4"):
        pm.generate(**prompt, **{key: per_row}, max_new_tokens=2, pad_token_id=0)

"""Per-call routing state: padding never counts, checkpointing recomputes with the forward's state, threads never
share state, and generate takes task ids however the model was wrapped."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn

import ilora

from .conftest import build, targets

SETTINGS = {
    "topk_token": dict(num_experts=4, shared_a=False, router="token", routing="topk", top_k=2),
    "soft_sequence": dict(num_experts=3, router="sequence", routing="soft"),
    "topk1_task": dict(num_experts=3, router="task", routing="topk", top_k=1, num_tasks=3),
}


def make(setting: str, kind: str = "llama", seed: int = 0, **extra) -> nn.Module:
    cfg = ilora.ILoraConfig(r=4, lora_alpha=8, target_modules=targets(kind), init_lora_weights=False,
                            **{**SETTINGS[setting], **extra})  # fmt: skip
    return get_peft_model(build(kind, seed=seed), cfg)


def right_padded(lengths: tuple[int, ...], width: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask [len(lengths), width]``, row i real for its first ``lengths[i]`` tokens."""
    ids = torch.randint(1, 64, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


def waiter(barrier: threading.Barrier) -> Callable[..., None]:
    def hook(*_: object) -> None:
        barrier.wait()

    return hook


def run_in_threads(fns: list[Callable[[], object]], pause: nn.Module) -> list[object]:
    """Run ``fns`` in threads that all wait inside ``pause``'s forward until every one has reached it, so each call
    is mid-forward while the others set up and run theirs."""
    barrier = threading.Barrier(len(fns), timeout=60)
    handle = pause.register_forward_pre_hook(waiter(barrier))
    results: list[object] = [None] * len(fns)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as err:  # re-raised in the caller
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(fns))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        handle.remove()
    if errors:
        raise errors[0]
    return results


def first_decoder_layer(pm: nn.Module) -> nn.Module:
    return pm.base_model.model.model.layers[0]


# ------------------------------------------------------------------------------------------------------ padding
def assert_recorded_as_unpadded(pm: nn.Module, lengths: tuple[int, ...], width: int, seed: int = 0) -> None:
    """Routing recorded on a right-padded batch equals that of its sequences run one by one, unpadded."""
    ids, mask = right_padded(lengths, width, seed)
    with torch.no_grad(), ilora.record_routing() as padded:
        pm(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), ilora.record_routing() as alone:
        for row, length in enumerate(lengths):
            pm(input_ids=ids[row : row + 1, :length])
    assert padded.weights.keys() == alone.weights.keys() and len(padded.weights) == 10
    for name, (weights,) in padded.weights.items():
        assert weights.shape[0] == sum(lengths), name
        torch.testing.assert_close(weights, torch.cat(alone.weights[name]), atol=2e-6, rtol=1e-5)
    usage, expected = padded.usage(), alone.usage()
    for name in expected:
        torch.testing.assert_close(usage[name], expected[name], atol=2e-6, rtol=1e-5)


def test_recorder_and_usage_leave_padding_out() -> None:
    # 2 x 8 tokens, the second row padded after 3: 11 real tokens (16 were recorded).
    assert_recorded_as_unpadded(make("topk_token").eval(), (8, 3), 8)


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple),
    extra=st.integers(0, 3),
    setting=st.sampled_from(["topk_token", "soft_sequence"]),
    seed=st.integers(0, 2**16),
)
def test_any_right_padding_records_as_unpadded(lengths: tuple[int, ...], extra: int, setting: str, seed: int) -> None:
    assert_recorded_as_unpadded(_eval_model(setting), lengths, max(lengths) + extra, seed)


@functools.cache
def _eval_model(setting: str) -> nn.Module:
    return make(setting).eval()


def test_checkpoint_recomputation_is_not_recorded_twice() -> None:
    pm = make("topk_token", balance_loss_coef=0.1).train()
    pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = right_padded((8, 3))
    with ilora.record_routing() as rec:
        out = pm(input_ids=ids, attention_mask=mask, labels=ids)
        (out.loss + ilora.aux_loss(pm)).backward()
    assert {len(w) for w in rec.weights.values()} == {1}
    assert all(w[0].shape[0] == 11 for w in rec.weights.values())


# ---------------------------------------------------------------------------------------- reentrant checkpointing
def test_aux_loss_after_a_reentrant_checkpointed_forward_names_the_way_out() -> None:
    pm = make("topk_token", balance_loss_coef=0.1).train()
    pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    pm.base_model.model.enable_input_require_grads()
    ids, mask = right_padded((8, 3))
    with pytest.raises(RuntimeError, match=r"use_reentrant=False"):  # with labels the model adds the router losses
        pm(input_ids=ids, attention_mask=mask, labels=ids)
    pm(input_ids=ids, attention_mask=mask)  # without labels the caller adds them, and is refused alike
    with pytest.raises(RuntimeError, match=r"use_reentrant=False"):
        ilora.aux_loss(pm)
    with torch.no_grad():  # reading the value for logging stays allowed, and it is the right value
        value = ilora.aux_loss(pm)
    plain = make("topk_token", balance_loss_coef=0.1).train()
    plain(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(value, ilora.aux_loss(plain).detach())


# --------------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_generate_takes_task_ids_however_the_model_is_wrapped(task_type: str | None) -> None:
    pm = make("topk1_task", kind="qwen2", task_type=task_type).eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    given = pm.generate(input_ids=ids, ilora_task_ids=[0, 2], **kwargs)
    with ilora.routing_context(task_ids=[0, 2]):
        expected = pm.generate(input_ids=ids, **kwargs)
    other = pm.generate(input_ids=ids, ilora_task_ids=[1, 1], **kwargs)
    assert torch.equal(given.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(given.scores), torch.stack(expected.scores), rtol=0, atol=0)
    assert not torch.allclose(torch.stack(given.scores), torch.stack(other.scores))
    base = pm.unload()
    assert "generate" not in vars(base)  # nothing of ours is left on the model handed back


# ---------------------------------------------------------------------------------------------------- threads
@torch.no_grad()
def test_one_model_two_threads_with_different_task_ids() -> None:
    pm = make("topk1_task").eval()
    ids, mask = right_padded((8, 5))
    tasks = ([0, 1], [2, 2])
    expected = [pm(input_ids=ids, attention_mask=mask, ilora_task_ids=t).logits for t in tasks]

    def call(t: list[int]) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with torch.no_grad():
                return pm(input_ids=ids, attention_mask=mask, ilora_task_ids=t).logits

        return fn

    for _ in range(3):
        got = run_in_threads([call(t) for t in tasks], first_decoder_layer(pm))
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g, e)


@torch.no_grad()
def test_two_models_two_threads_with_their_own_masks_task_ids_and_recorders() -> None:
    # Sequence routing pools over the call's attention mask; task routing reads the call's task ids; each thread
    # records only its own model's routing.
    seq, task = make("soft_sequence", seed=1).eval(), make("topk1_task", seed=2).eval()
    ids_a, mask_a = right_padded((8, 2), seed=3)
    ids_b, mask_b = right_padded((4, 7), seed=4)

    def run_seq() -> tuple[torch.Tensor, dict]:
        with torch.no_grad(), ilora.record_routing() as rec:
            return seq(input_ids=ids_a, attention_mask=mask_a).logits, rec.usage()

    def run_task() -> torch.Tensor:
        with torch.no_grad(), ilora.routing_context(task_ids=[2, 1]):
            return task(input_ids=ids_b, attention_mask=mask_b).logits

    expected_seq, expected_usage = run_seq()
    expected_task = run_task()
    barrier = threading.Barrier(2, timeout=60)
    hooks = [first_decoder_layer(m).register_forward_pre_hook(waiter(barrier)) for m in (seq, task)]
    try:
        got = run_in_threads([run_seq, run_task], nn.Identity())  # paused by the hooks above instead
    finally:
        for h in hooks:
            h.remove()
    (got_seq, got_usage), got_task = got
    assert torch.equal(got_seq, expected_seq) and torch.equal(got_task, expected_task)
    assert got_usage.keys() == expected_usage.keys()
    for name in expected_usage:
        assert torch.equal(got_usage[name], expected_usage[name])


@pytest.mark.parametrize("use_cache", [True, False])
@torch.no_grad()
def test_cached_decode_steps_keep_the_prompts_sequence_routing(use_cache: bool) -> None:
    pm = make("soft_sequence", kind="qwen2").eval()
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(7))
    with ilora.record_routing() as rec:
        pm.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None,
                    use_cache=use_cache)  # fmt: skip
    for name, (prompt, *steps) in rec.weights.items():
        assert len(steps) == 2, name
        decided = prompt[[0, 5]]  # one decision per sequence, repeated over its 5 tokens
        for step in steps:
            length = step.shape[0] // 2  # 1 with the cache, the whole grown sequence without
            kept = torch.equal(step[[0, length]], decided)
            assert kept == use_cache, name  # uncached decoding re-pools the grown sequence


@torch.no_grad()
def test_cached_generation_in_two_threads_keeps_each_prompts_sequence_routing() -> None:
    # Sequence routing decides on the prompt and keeps that decision for the decode steps: per generation.
    pm = make("soft_sequence", kind="qwen2").eval()
    prompts = [torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(s)) for s in (7, 8)]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None, output_scores=True,
                  return_dict_in_generate=True)  # fmt: skip

    def generate(ids: torch.Tensor) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with torch.no_grad():
                return torch.stack(pm.generate(input_ids=ids, **kwargs).scores)

        return fn

    expected = [generate(ids)() for ids in prompts]
    got = run_in_threads([generate(ids) for ids in prompts], first_decoder_layer(pm))
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


# ------------------------------------------------------------------------------- checkpoint recomputation state
def _grads(pm: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in pm.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params))


def _backward(pm: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    # .backward(), not autograd.grad: reentrant checkpointing supports only the former.
    pm.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in pm.parameters() if p.requires_grad]


def _loss(pm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, task_ids: list[int], aux: bool = True) -> torch.Tensor:
    loss = pm(input_ids=ids, attention_mask=mask, labels=ids, ilora_task_ids=task_ids).loss
    return loss + ilora.aux_loss(pm) if aux else loss


def _checkpointed(setting: str, reentrant: bool = False) -> tuple[nn.Module, nn.Module]:
    # The test adds the router losses itself (_loss), so the models leave them out of their own loss.
    plain = make(setting, balance_loss_coef=0.1, aux_loss_in_output=False).train()
    checkpointed = make(setting, balance_loss_coef=0.1, aux_loss_in_output=False).train()
    base = checkpointed.base_model.model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:  # reentrant checkpoints pass gradients only to inputs that require them
        base.enable_input_require_grads()
    return plain, checkpointed


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("setting", ["topk1_task", "soft_sequence"])
def test_checkpointed_backward_on_another_thread_recomputes_with_the_forwards_state(
    setting: str, reentrant: bool
) -> None:
    plain, checkpointed = _checkpointed(setting, reentrant)
    ids, mask = right_padded((8, 3))
    aux = not reentrant  # reentrant checkpointing has no graph for the aux loss (refused, tested above)
    expected = _backward(plain, _loss(plain, ids, mask, [2, 0], aux))
    loss = _loss(checkpointed, ids, mask, [2, 0], aux)
    (got,) = run_in_threads([lambda: _backward(checkpointed, loss)], nn.Identity())  # a thread with no state
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_two_threads_train_one_checkpointed_model_with_different_state() -> None:
    plain, checkpointed = _checkpointed("topk1_task")
    # The aux loss is left out: its statistics are the layers' own, those of the model's last training forward.
    batches = [(*right_padded((8, 3), seed=5), [2, 0]), (*right_padded((6, 8), seed=6), [1, 1])]
    expected = [_grads(plain, _loss(plain, *b, aux=False)) for b in batches]
    after_forward = threading.Barrier(2, timeout=60)

    def train(batch: tuple) -> list[torch.Tensor]:
        loss = _loss(checkpointed, *batch, aux=False)
        after_forward.wait()  # both forwards done before either backward: each must recompute with its own state
        return _grads(checkpointed, loss)

    got = run_in_threads([lambda b=b: train(b) for b in batches], first_decoder_layer(checkpointed))
    for grads, exp in zip(got, expected, strict=True):
        for g, e in zip(grads, exp, strict=True):
            torch.testing.assert_close(g, e)


def test_one_backward_over_two_checkpointed_forwards_with_different_task_ids_is_refused() -> None:
    _, checkpointed = _checkpointed("topk1_task")
    ids, mask = right_padded((8, 3))
    first = checkpointed(input_ids=ids, attention_mask=mask, labels=ids, ilora_task_ids=[0, 0]).loss
    second = checkpointed(input_ids=ids, attention_mask=mask, labels=ids, ilora_task_ids=[1, 2]).loss
    with pytest.raises(RuntimeError, match="backward after each forward"):
        (first + second).backward()


# ------------------------------------------------------------------- masks other than 2-D, packed batches
def _sequence_llama(router: str = "sequence") -> nn.Module:
    torch.manual_seed(0)
    config = ilora.ILoraConfig(r=4, num_experts=3, router=router, target_modules=["q_proj"], init_lora_weights=False)
    return get_peft_model(build("llama"), config).eval()


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :5] = 0
    allowed = torch.tril(torch.ones(8, 8, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    return ids, mask, allowed


@pytest.mark.parametrize("router", ["sequence", "token"])
@pytest.mark.parametrize("additive", [True, False])
def test_a_4d_attention_mask_is_refused_where_padding_matters(router: str, additive: bool) -> None:
    pm = _sequence_llama(router)
    ids, mask, allowed = _padded_batch()
    mask_4d = torch.where(allowed, 0.0, torch.finfo(torch.float32).min) if additive else allowed
    with ilora.record_routing() as by_2d:
        pm(input_ids=ids, attention_mask=mask)
    assert next(iter(by_2d.weights.values()))[0].shape[0] == 11  # the 5 padding tokens are left out
    refusal = r"4-D attention_mask .*\(2, 1, 8, 8\).*2-D attention_mask"
    with pytest.raises(ValueError, match=refusal), ilora.record_routing():
        pm(input_ids=ids, attention_mask=mask_4d)
    if router == "sequence":  # pooling needs the mask even without a recorder
        with pytest.raises(ValueError, match=r"4-D attention_mask.*router='token'"):
            pm(input_ids=ids, attention_mask=mask_4d)


def test_sequence_router_pools_each_packed_sequence_alone() -> None:
    pm = _sequence_llama()
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(1, 64, (1, 5), generator=g), torch.randint(1, 64, (1, 4), generator=g)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])
    with ilora.record_routing() as packed, torch.no_grad():
        pm(input_ids=torch.cat([a, b], 1), position_ids=positions)
    with ilora.record_routing() as alone, torch.no_grad():
        pm(input_ids=a)
        pm(input_ids=b)
    # The first routed layer only: its input is the embeddings, the same packed or alone (later layers differ as
    # the base model's sdpa attention without a mask crosses the boundary; flash-attention kernels do not).
    first = "model.layers.0.self_attn.q_proj"
    assert packed.weights[first][0].shape == (9, 3)
    torch.testing.assert_close(packed.weights[first][0], torch.cat(alone.weights[first]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("setting", ["topk_token", "soft_sequence"])
def test_recorded_weights_hold_no_autograd_graph(setting: str, masked: bool) -> None:
    pm = make(setting).train()
    ids, mask = right_padded((8, 3))
    with ilora.record_routing() as rec:
        pm(input_ids=ids, attention_mask=mask if masked else None)
    recorded = [w for ws in rec.weights.values() for w in ws]
    assert recorded and all(w.grad_fn is None and not w.requires_grad for w in recorded)

"""Every preset under ``torch.compile``: the same forward, loss and gradients as eager, and a bounded number of graph
breaks that does not grow with the number of routed layers (none inside a layer)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from peft import get_peft_model
from torch._dynamo.utils import counters
from transformers import Qwen2ForCausalLM

import ilora

from .conftest import tiny_qwen2

# Small ranks and no dropout (compiled and eager code draw their masks differently); B random so every expert counts.
SMALL = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
# The MLP-only presets on all seven projections too, so that a break per routed layer would exceed the bound.
SEVEN = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
# MoLA's expert counts per module, written for the one-layer model: two kinds of layer with different counts.
MOLA_ONE_LAYER = {r".*self_attn\..*": 2, r".*mlp\..*": 4}
PRESETS = {
    "crabplus": lambda: ilora.ILoraConfig.crabplus(**SMALL),
    "crab": lambda: ilora.ILoraConfig.crab(**SMALL),
    "hydralora": lambda: ilora.ILoraConfig.hydralora(**SMALL, **SEVEN),
    "mixlora": lambda: ilora.ILoraConfig.mixlora(**SMALL),
    "loramoe": lambda: ilora.ILoraConfig.loramoe(**SMALL, **SEVEN, localized_balance_coef=0.01),
    "mola": lambda: ilora.ILoraConfig.mola(num_layers=4, **SMALL, num_experts_pattern=MOLA_ONE_LAYER),
}
# The breaks of one model call (5 measured for every preset), all in ILoraModel's hooks at its entry and exit (setting
# the call's context variables, which dynamo cannot trace); a break per routed layer would add 7. Counted from
# dynamo's counters: torch._dynamo.explain leaves out a break with no graph before it (the hooks' breaks).
MAX_GRAPH_BREAKS = 5
# float32, the same ops: compiled and eager may differ only by summation order.
TOL = dict(rtol=1e-4, atol=1e-5)


def _model() -> Qwen2ForCausalLM:
    """One decoder layer (seven routed projections), compiled in seconds."""
    return tiny_qwen2(layers=1)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: the aux losses leave it out
    return dict(input_ids=ids, attention_mask=mask, labels=ids, ilora_task_ids=torch.tensor([0, 1]))


def _step(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("preset", list(PRESETS))
def test_compiled_training_step_matches_eager_with_few_graph_breaks(preset: str) -> None:
    torch.manual_seed(0)
    model = get_peft_model(_model(), PRESETS[preset]()).train()
    twin = copy.deepcopy(model)
    inputs = _inputs()
    logits, loss, grads = _step(model, inputs)

    torch._dynamo.reset()
    counters.clear()
    c_logits, c_loss, _ = _step(torch.compile(twin, backend="eager"), inputs)
    c_grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    breaks = dict(counters["graph_break"])

    torch.testing.assert_close(c_logits, logits, **TOL)
    torch.testing.assert_close(c_loss, loss, **TOL)
    assert c_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad is not None and c_grads[name] is not None, name
        torch.testing.assert_close(c_grads[name], grad, **TOL, msg=name)
    assert sum(breaks.values()) <= MAX_GRAPH_BREAKS, breaks


def test_a_compiled_model_keeps_each_threads_task_ids() -> None:
    """The per-call state reaches compiled layers per thread: two threads calling one compiled task-routed model
    with different task ids each get their own task's output, as in eager mode (``tests/ilora/test_context.py``)."""
    torch.manual_seed(0)
    config = ilora.ILoraConfig(router="task", num_tasks=2, num_experts=3, target_modules=["q_proj", "up_proj"], **SMALL)
    model = get_peft_model(_model(), config).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))

    def logits(m: torch.nn.Module, task: int) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=ids, ilora_task_ids=torch.tensor([task, task])).logits

    want = {task: logits(model, task) for task in (0, 1)}
    assert not torch.allclose(want[0], want[1])
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    logits(compiled, 0)  # compile once, before the threads race
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def run(task: int) -> None:
        start.wait()
        got[task].extend(logits(compiled, task) for _ in range(10))

    threads = [threading.Thread(target=run, args=(task,)) for task in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for task in (0, 1):
        assert len(got[task]) == 10
        for out in got[task]:
            torch.testing.assert_close(out, want[task], **TOL)
    assert sum(counters["graph_break"].values()) <= MAX_GRAPH_BREAKS

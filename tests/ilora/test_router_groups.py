"""router_groups: one router shared by a named group of linears inside the same block."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from torch import nn

import ilora
from ilora.layer import MergeNotSupportedError

from .conftest import build, example_input, output
from .oracle import assert_layers_match, capture_layer_io, naive_dense_gates

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GROUPS = {"attn": ["q_proj", "k_proj", "v_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
TASK_IDS = torch.tensor([1, 2])
D_SIGNAL = 3
SIGNAL = torch.randn(2, 7, D_SIGNAL, generator=torch.Generator().manual_seed(3))
ROUTER_OPTIONS = {
    "token": {},
    "noisy_token": {},
    "sequence": {},
    "task": {"num_tasks": 3},
    "signal": {"router_signal_dim": D_SIGNAL},
}


def make(router: str = "token", routing: str = "soft", seed: int = 0, model: nn.Module | None = None, **options):
    settings = dict(r=4, lora_alpha=8, num_experts=4, top_k=2, top_p=0.6, router=router, routing=routing,
                    target_modules=LLAMA_TARGETS, router_groups=GROUPS, init_lora_weights=False)  # fmt: skip
    torch.manual_seed(seed)
    config = ilora.ILoraConfig(**{**settings, **ROUTER_OPTIONS[router], **options})
    return get_peft_model(build("llama", seed) if model is None else model, config)


def call(pm: nn.Module, router: str, **inputs) -> object:
    inputs = inputs or example_input("llama")
    extra = {"ilora_task_ids": TASK_IDS} if router == "task" else {}
    if router == "signal":
        extra = {"ilora_router_inputs": SIGNAL}
    return pm(**inputs, **extra)


def reference_logits(router: str, layer, x: torch.Tensor) -> torch.Tensor:
    """Logits of ``router`` built by hand from the leader's input ``x [batch, seq, d]``, float64."""
    weight = layer.ilora_router["default"].weight.double()
    if router == "task":
        return weight[TASK_IDS].repeat_interleave(x.shape[1], 0)
    if router == "signal":
        return SIGNAL.reshape(-1, D_SIGNAL).double() @ weight.T
    if router == "sequence":
        mask = example_input("llama")["attention_mask"].double().unsqueeze(-1)
        pooled = (x.double() * mask).sum(1) / mask.sum(1)
        return (pooled @ weight.T).repeat_interleave(x.shape[1], 0)
    return x.reshape(-1, x.shape[-1]).double() @ weight.T  # token; noisy_token in eval is its clean part


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"router_groups": ["q_proj"]}, r"must map group names to lists of distinct module names"),
    ({"router_groups": {"attn": []}}, r"must map group names"),
    ({"router_groups": {"attn": ["q_proj", "q_proj"]}}, r"must map group names"),
    ({"router_groups": {"a": ["q_proj", "k_proj"], "b": ["k_proj"]}}, r"module names \['k_proj'\] are in several"),
])  # fmt: skip
def test_invalid_groups_name_the_field(kwargs, match) -> None:
    with pytest.raises(ValueError, match=rf"ILoraConfig\.router_groups: {match}"):
        ilora.ILoraConfig(**kwargs)


def test_one_router_per_group_and_block_in_the_state_dict(tmp_path) -> None:
    pm = make()
    pm.save_pretrained(tmp_path)
    saved = sorted(k for k in load_file(tmp_path / "adapter_model.safetensors") if "ilora_router" in k)
    assert saved == sorted(
        f"base_model.model.model.layers.{i}.{m}.ilora_router.weight"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj")  # o_proj is in no group: its own router
    )
    layers = {layer.ilora_name: layer for layer in ilora.ilora_layers(pm)}
    leader = layers["model.layers.1.mlp.gate_proj"]
    assert layers["model.layers.1.mlp.down_proj"].router_leader["default"] is leader
    assert leader.router_followers["default"] == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize("routing", ["soft", "topk", "top_p"])
@pytest.mark.parametrize("router", list(ROUTER_OPTIONS))
def test_forward_matches_the_hand_built_reference(router: str, routing: str) -> None:
    """Each follower applies the gates its leader's router gives on the leader's input to its own input."""
    pm = make(router, routing).eval()
    with torch.no_grad():
        _, seen = capture_layer_io(pm, lambda: call(pm, router))

    def gates_for(layer, x: torch.Tensor) -> torch.Tensor:
        leader = layer.router_leader.get("default", layer)
        logits = reference_logits(router, leader, seen[leader.ilora_name][0])
        return naive_dense_gates(logits, layer.ilora_config["default"])

    assert_layers_match(pm, seen, gates_for)


class Blocks(nn.Module):
    """Two blocks of three linears, ``v(tanh(q(x) + k(x)))``, the group at the top of each block's path."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({n: nn.Linear(6, 6) for n in "qkv"}) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b["v"](torch.tanh(b["q"](x) + b["k"](x)))
        return x


def test_backward_matches_reference_gradients() -> None:
    torch.manual_seed(0)
    cfg = ilora.ILoraConfig(r=2, num_experts=3, target_modules=["q", "k", "v"], router_groups={"g": ["q", "k", "v"]},
                            init_lora_weights=False)  # fmt: skip
    pm = get_peft_model(Blocks(), cfg).double()
    x = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: pm(x), (x,))
    params = dict(pm.named_parameters())
    pm(x).square().sum().backward()

    def reference(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        for i in range(2):
            key = f"base_model.model.blocks.{i}"
            g = torch.softmax(x @ p[f"{key}.q.ilora_router.default.weight"].T, -1)  # the leader's router, once

            def lin(n: str, h: torch.Tensor, key: str = key, g: torch.Tensor = g) -> torch.Tensor:
                base = h @ p[f"{key}.{n}.base_layer.weight"].T + p[f"{key}.{n}.base_layer.bias"]
                A, B = p[f"{key}.{n}.ilora_A.default"], p[f"{key}.{n}.ilora_B.default"]
                hA = torch.einsum("...d,edr->...er", h, A.expand(3, -1, -1))
                return base + torch.einsum("...e,...er,erd->...d", g, hA, B) * cfg.scaling

            x = lin("v", torch.tanh(lin("q", x) + lin("k", x)))
        return x

    ref = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in params.items()}
    reference(x.detach(), ref).square().sum().backward()
    trained = [n for n, p in params.items() if p.requires_grad]
    assert "base_model.model.blocks.0.k.ilora_router.default.weight" not in params
    for n in trained:
        torch.testing.assert_close(params[n].grad, ref[n].grad, msg=n)


def test_the_group_is_counted_once_by_aux_losses_and_the_recorder() -> None:
    pm = make(routing="topk", balance_loss_coef=0.1, router_z_loss_coef=0.01).train()
    inputs = example_input("llama")
    with ilora.record_routing() as rec:
        call(pm, "token", **inputs, labels=inputs["input_ids"])
    leaders = sorted(f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.o_proj",
                                                                          "mlp.gate_proj"))  # fmt: skip
    assert sorted(rec.weights) == leaders
    assert sorted(layer.ilora_name for layer in ilora.ilora_layers(pm) if layer.aux_stats) == leaders
    assert ilora.aux_loss(pm).requires_grad


def test_a_follower_running_before_its_leader_is_refused() -> None:
    pm = make(router_groups={"attn": ["v_proj", "q_proj"]}).eval()  # the block calls q_proj first
    with pytest.raises(RuntimeError, match=r"router group 'attn'.*model.layers.0.self_attn.q_proj ran before "
                                           r"model.layers.0.self_attn.v_proj"):  # fmt: skip
        call(pm, "token")
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match=r"outside a call of the PEFT model"):  # the layer alone: no call state
        layer(torch.randn(3, 32))


class Shifted(nn.Module):
    """``b`` sees other tokens than ``a`` (one less, or as many laid out otherwise): they cannot share routing."""

    def __init__(self, transposed: bool) -> None:
        super().__init__()
        self.a, self.b, self.transposed = nn.Linear(6, 6), nn.Linear(6, 6), transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            return self.a(x) + self.b(x.transpose(0, 1)).transpose(0, 1)
        return self.a(x)[:, 1:] + self.b(x[:, 1:])


@pytest.mark.parametrize(("transposed", "shape"), [
    (False, r"\(2, 4, 6\), 8 tokens"),
    (True, r"\(5, 2, 6\), 10 tokens"),  # as many tokens, in another layout
])  # fmt: skip
def test_followers_of_other_tokens_and_mismatched_groups_are_refused(transposed: bool, shape: str) -> None:
    cfg = ilora.ILoraConfig(target_modules=["a", "b"], router_groups={"g": ["a", "b"]})
    with pytest.raises(ValueError, match=rf"router group 'g'.*b got an input of shape {shape}, but its "
                                         r"leader a routed tokens of shape \(2, 5\)"):  # fmt: skip
        get_peft_model(Shifted(transposed), cfg)(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"group 'attn' shares one router between .*q_proj \(4 experts, top_k 2\) "
                                         r"and .*k_proj \(2, top_k 2\)"):  # fmt: skip
        make(num_experts_pattern={"k_proj": 2})
    with pytest.raises(ValueError, match=r"router_groups: members \['k_prj'\] match no adapted module"):
        make(router_groups={"attn": ["q_proj", "k_prj"]})


def test_merge_is_refused_for_input_routing_and_exact_for_one_task() -> None:
    with pytest.raises(MergeNotSupportedError, match=r"uses token routing"):
        make().merge_and_unload()
    pm = make("task", routing="topk").eval()
    inputs = example_input("llama")
    with torch.no_grad():
        expected = pm(**inputs, ilora_task_ids=1).logits
        merged = pm.merge_and_unload(task_id=1)
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["token", "sequence", "signal"])
def test_generate_with_cache_matches_full_recompute(router: str) -> None:
    pm = make(router, "topk", task_type="CAUSAL_LM").eval()
    ids = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    if router == "signal":
        kwargs["ilora_router_inputs"] = SIGNAL
    with torch.no_grad():
        cached = pm.generate(input_ids=ids, use_cache=True, **kwargs)
        uncached = pm.generate(input_ids=ids, use_cache=False, **kwargs)
    # Uncached decoding re-pools a sequence router's whole sequence each step; cached decoding keeps the prompt's.
    n = 4 if router == "sequence" else 7
    assert cached.shape == (2, 7) and torch.equal(cached[:, :n], uncached[:, :n])


def test_checkpointed_recomputation_gives_the_same_gradients() -> None:
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        pm = make("sequence", "topk", balance_loss_coef=0.1).train()
        if checkpointing:
            pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        inputs = example_input("llama")
        pm(**inputs, labels=inputs["input_ids"]).loss.backward()  # the balance loss included
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_concurrent_calls_from_threads_share_gates_within_their_own_call() -> None:
    from .test_context import first_decoder_layer, run_in_threads

    pm = make().eval()
    inputs = [example_input("llama", seed=s) for s in (1, 2)]
    with torch.no_grad():
        expected = [pm(**i).logits for i in inputs]
        got = run_in_threads([lambda i=i: pm(**i).logits for i in inputs], first_decoder_layer(pm))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_saved_and_loaded_in_a_fresh_process(tmp_path) -> None:
    """A grouped, signal-routed adapter: the followers' routers are neither saved nor expected when loading."""
    pm = make("signal", "top_p").eval()
    with torch.no_grad():
        torch.save(output(pm, {**example_input("llama"), "ilora_router_inputs": SIGNAL}), tmp_path / "expected.pt")
    torch.save(SIGNAL, tmp_path / "signal.pt")
    pm.save_pretrained(tmp_path / "adapter")
    script = textwrap.dedent(
        f"""
        import sys, warnings, torch
        torch.set_num_threads({torch.get_num_threads()})
        sys.path[:0] = [{str(Path(__file__).parent)!r}]
        warnings.simplefilter("error", UserWarning)  # PEFT warns of missing or unexpected adapter keys
        import ilora
        from peft import PeftModel
        from conftest import build, example_input, output
        model = PeftModel.from_pretrained(build("llama"), "adapter").eval()
        sig = torch.load("signal.pt", weights_only=True)
        with torch.no_grad():
            torch.save(output(model, {{**example_input("llama"), "ilora_router_inputs": sig}}), "got.pt")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    torch.testing.assert_close(got, torch.load(tmp_path / "expected.pt", weights_only=True), rtol=0, atol=0)


def test_export_averages_a_follower_by_its_leaders_routing() -> None:
    """The recorder holds the group's routing once, under its leader; exact export for constant routing."""
    pm = make().eval()
    for layer in ilora.ilora_layers(pm):
        if "default" in layer.ilora_router:  # leaders (and ungrouped layers): every token gets the same mixture
            torch.nn.init.zeros_(layer.ilora_router["default"].weight)
    calibration = [example_input("llama", seed=10 + i) for i in range(2)]
    export = ilora.export_to_lora(pm, calibration, example_input("llama", seed=99))
    assert "model.layers.0.self_attn.k_proj" in export.config.target_modules
    assert export.relative_error < 1e-5


def test_a_group_whose_members_never_share_a_block_is_refused() -> None:
    """q_proj sits in self_attn, up_proj in mlp: accepted, such a group would give every module its own router."""
    config = ilora.ILoraConfig(r=2, num_experts=2, target_modules=["q_proj", "up_proj"],
                               router_groups={"x": ["q_proj", "up_proj"]})  # fmt: skip
    with pytest.raises(ValueError, match=r"group 'x' never sit in the same block.*self_attn"):
        get_peft_model(build("llama"), config)

"""The registry of routers and gates: names saved in the config, users' parts, loading without them refused."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import ilora
from ilora import registry
from ilora.router import Gates

from .conftest import build, example_input, output, targets
from .oracle import naive_delta

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def scratch_registry():
    """Registrations made by a test are removed afterwards."""
    routers, gates = dict(registry.ROUTERS), dict(registry.GATES)
    yield
    registry.ROUTERS.clear(), registry.ROUTERS.update(routers)
    registry.GATES.clear(), registry.GATES.update(gates)


class TwoLayerRouter(nn.Module):
    """A router whose parameters are not called ``weight``: ``mlp.0.weight``, ``mlp.0.bias``, ``mlp.2.weight``."""

    def __init__(self, d_in: int, num_experts: int, config: ilora.ILoraConfig) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_in, 8), nn.Tanh(), nn.Linear(8, num_experts, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.reshape(-1, x.shape[-1])).float()


class HardTop1Gate:
    """Weight 1 on the most probable expert (no gradient to the router: only for tests)."""

    def __init__(self, config: ilora.ILoraConfig) -> None:
        pass

    def __call__(self, logits: torch.Tensor, training: bool) -> Gates:
        idx = logits.argmax(-1, keepdim=True)
        return Gates(weights=torch.ones_like(idx, dtype=logits.dtype), indices=idx)


def test_builtin_parts_are_registered_and_not_saved_as_classes() -> None:
    assert {"token", "sequence", "task", "noisy_token"} <= set(registry.ROUTERS)
    assert {"soft", "topk", "top_p"} <= set(registry.GATES)
    assert ilora.ILoraConfig(routing="top_p", top_k=2).part_classes is None


@pytest.mark.usefixtures("scratch_registry")
def test_registration_errors() -> None:
    ilora.register_router("two_layer", TwoLayerRouter)
    ilora.register_router("two_layer", TwoLayerRouter)  # the same class again: harmless (a re-import)
    with pytest.raises(ValueError, match=r"already registered to .*TwoLayerRouter.*overwrite=True"):
        ilora.register_router("two_layer", HardTop1Gate)
    redefined = type(
        TwoLayerRouter.__name__,
        (TwoLayerRouter,),
        {"__module__": TwoLayerRouter.__module__, "__qualname__": TwoLayerRouter.__qualname__},
    )
    assert ilora.register_router("two_layer", redefined) is redefined  # the same class defined again (a re-run cell)
    assert registry.ROUTERS["two_layer"] is redefined
    with pytest.raises(ValueError, match="built-in part"):
        ilora.register_gate("soft", HardTop1Gate, overwrite=True)
    with pytest.raises(TypeError, match="expected a class"):
        ilora.register_gate("bad", 3)
    with pytest.raises(ValueError, match="non-empty string"):
        ilora.register_gate("", HardTop1Gate)


@pytest.mark.parametrize(("field", "value"), [("router", "nope"), ("routing", "nope")])
def test_unknown_part_names_the_field_and_the_way_out(field, value) -> None:
    fn = "register_router" if field == "router" else "register_gate"
    with pytest.raises(ValueError, match=rf"ILoraConfig\.{field}: .*'nope'.*ilora\.{fn}\('nope', YourClass\)"):
        ilora.ILoraConfig(**{field: value})


@pytest.mark.usefixtures("scratch_registry")
def test_saved_class_path_and_mismatch(tmp_path) -> None:
    ilora.register_router("two_layer", TwoLayerRouter)
    ilora.register_gate("hard1", HardTop1Gate)
    c = ilora.ILoraConfig(router="two_layer", routing="hard1", target_modules=["fc_in"])
    paths = {"router": registry.class_path(TwoLayerRouter), "routing": registry.class_path(HardTop1Gate)}
    assert c.part_classes == paths
    c.save_pretrained(tmp_path)
    assert ilora.ILoraConfig.from_pretrained(tmp_path).to_dict() == c.to_dict()
    registry.ROUTERS["two_layer"] = HardTop1Gate  # another class under the saved name: refused, not loaded into
    with pytest.raises(ValueError, match=r"saved with router 'two_layer' = .*TwoLayerRouter.*registered to .*Hard"):
        ilora.ILoraConfig.from_pretrained(tmp_path)
    saved = {"router": "__main__.ScriptRouter"}
    with pytest.raises(ValueError, match=r"ScriptRouter, defined in the script that saved it .*register_router"):
        ilora.ILoraConfig(router="script_router", part_classes=saved)
    with pytest.raises(ValueError, match=r"ILoraConfig\.part_classes"):
        ilora.ILoraConfig(part_classes={"expert": "x.Y"})


@pytest.mark.usefixtures("scratch_registry")
def test_user_router_and_gate_run_save_and_load(tmp_path) -> None:
    """A router whose parameters are not named ``weight`` loads back (the partial-checkpoint guard used to demand
    ``ilora_router.<name>.weight``), and a user's gate is the one the layer applies."""
    ilora.register_router("two_layer", TwoLayerRouter)
    ilora.register_gate("hard1", HardTop1Gate)
    cfg = ilora.ILoraConfig(r=4, num_experts=3, shared_a=False, router="two_layer", routing="hard1",
                            target_modules=targets("mlp"), init_lora_weights=False)  # fmt: skip
    model = get_peft_model(build("mlp"), cfg).eval()
    layer = model.base_model.model.fc_in
    x = example_input("mlp")["x"]
    with torch.no_grad():
        logits = layer.ilora_router["default"](x)
        dense = torch.zeros_like(logits).scatter(1, logits.argmax(-1, keepdim=True), 1.0)
        want = layer.base_layer(x).double() + naive_delta(x, layer.ilora_A["default"], layer.ilora_B["default"],
                                                          dense, layer.scaling["default"])  # fmt: skip
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
        expected = output(model, example_input("mlp"))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("mlp"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, example_input("mlp")), expected, rtol=0, atol=0)


def readme_router_example() -> str:
    text = README.read_text()
    section = text[text.index("### Routing parts and your own router") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.usefixtures("scratch_registry")
def test_readme_router_example_saves_and_loads_in_a_fresh_process(tmp_path, monkeypatch) -> None:
    code = readme_router_example()
    assert len(code.strip().splitlines()) <= 25, "the README's example is meant to stay short"
    (tmp_path / "my_routers.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    my_routers = importlib.import_module("my_routers")
    config = my_routers.config
    config.init_lora_weights = False
    assert config.part_classes == {"router": "my_routers.CosineRouter"}
    torch.manual_seed(0)
    model = get_peft_model(build("llama"), config).eval()
    with torch.no_grad():
        torch.save(output(model, example_input("llama")), tmp_path / "expected.pt")
    model.save_pretrained(tmp_path / "adapter")
    sys.modules.pop("my_routers")
    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.set_num_threads({torch.get_num_threads()})  # the same reduction order as this process: exact outputs
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(tmp_path)!r}]
        import ilora
        from peft import PeftModel
        from conftest import build, example_input, output
        try:
            PeftModel.from_pretrained(build("llama"), "adapter")
        except ValueError as err:
            print("REFUSED:", err)
        import my_routers  # registers "cosine"
        model = PeftModel.from_pretrained(build("llama"), "adapter").eval()
        with torch.no_grad():
            torch.save(output(model, example_input("llama")), "got.pt")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused = proc.stdout[proc.stdout.index("REFUSED:") :]
    assert "my_routers.CosineRouter" in refused and "ilora.register_router('cosine', CosineRouter)" in refused
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    torch.testing.assert_close(got, torch.load(tmp_path / "expected.pt", weights_only=True), rtol=0, atol=0)


class FlatRouter(TwoLayerRouter):
    """Wrong: keeps the batch dimensions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).float()


class RaggedGate(HardTop1Gate):
    """Wrong: weights for two experts, indices for one."""

    def __call__(self, logits: torch.Tensor, training: bool) -> Gates:
        idx = logits.argmax(-1, keepdim=True)
        return Gates(weights=torch.ones(logits.shape[0], 2), indices=idx)


@pytest.mark.usefixtures("scratch_registry")
@pytest.mark.parametrize(("router", "gate", "match"), [
    ("flat", "soft", r"router 'flat' returned logits of shape \(2, 6, 3\).*\[tokens, num_experts=3\]"),
    ("token", "ragged", r"gate 'ragged' returned Gates .*weights.*\(12, 2\).*indices.*\(12, 1\)"),
])  # fmt: skip
def test_users_parts_returning_wrong_shapes_are_named(router, gate, match) -> None:
    ilora.register_router("flat", FlatRouter)
    ilora.register_gate("ragged", RaggedGate)
    cfg = ilora.ILoraConfig(r=2, num_experts=3, router=router, routing=gate, target_modules=["fc_in"])
    model = get_peft_model(build("mlp"), cfg)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(2, 6, 13))


class TaskBiasRouter(nn.Module):
    """A user's task-aware router: token logits plus a learned bias per task id of the call."""

    def __init__(self, d_in: int, num_experts: int, config: ilora.ILoraConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, num_experts, bias=False)
        self.task_bias = nn.Parameter(torch.randn(config.num_tasks, num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = ilora.context.current_call().task_ids
        bias = self.task_bias[ids].repeat_interleave(x.shape[1], dim=0)
        return self.proj(x.reshape(-1, x.shape[-1])).float() + bias


def test_a_users_router_can_take_num_tasks(scratch_registry) -> None:
    ilora.register_router("task_bias", TaskBiasRouter)
    config = ilora.ILoraConfig(r=2, num_experts=3, router="task_bias", num_tasks=4, target_modules=targets("llama"))
    model = get_peft_model(build("llama"), config)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.ilora_router["default"].task_bias.shape == (4, 3)
    model(**example_input("llama"), ilora_task_ids=torch.tensor([3, 1]))
    with pytest.raises(ValueError, match=r"num_tasks: is only used with router='task'"):
        ilora.ILoraConfig(router="token", num_tasks=4)

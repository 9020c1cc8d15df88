"""ILoraConfig: validation names the field, presets reproduce the authors, JSON round trip."""

from __future__ import annotations

import pytest

import ilora
from ilora.config import CRAB_TARGETS


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"num_experts": 0}, "num_experts"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"router": "expert"}, "router"),
        ({"routing": "hard"}, "routing"),
        ({"routing": "topk", "top_k": 4, "num_experts": 3}, "top_k"),
        ({"router": "task"}, "num_tasks"),
        ({"router_temperature": 0}, "router_temperature"),
        ({"balance_loss_coef": -1}, "balance_loss_coef"),
        ({"use_kernels": "cuda"}, "use_kernels"),
        ({"bias": "all"}, "bias"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
    ],
)
def test_invalid_settings_name_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=rf"ILoraConfig\.{field}"):
        ilora.ILoraConfig(**kwargs)


def test_crabplus_preset_is_the_papers_setting() -> None:
    c = ilora.ILoraConfig.crabplus()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.num_experts, c.shared_a) == (128, 256, 0.1, 3, True)
    assert (c.router, c.routing, c.scaling) == ("token", "soft", 2.0)
    assert set(c.target_modules) == set(CRAB_TARGETS)
    assert c.peft_type == "ILORA"


def test_crab_preset_and_overrides() -> None:
    c = ilora.ILoraConfig.crab(num_experts=5)
    assert (c.r, c.lora_alpha, c.lora_dropout, c.num_experts) == (8, 16, 0.05, 5)


def test_json_round_trip(tmp_path) -> None:
    c = ilora.ILoraConfig(r=4, num_experts=6, routing="topk", top_k=2, router="task", num_tasks=7,
                          target_modules=["a", "b"])  # fmt: skip
    c.save_pretrained(tmp_path)
    loaded = ilora.ILoraConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == c.to_dict()
    assert '"peft_type": "ILORA"' in (tmp_path / "adapter_config.json").read_text()

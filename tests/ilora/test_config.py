"""ILoraConfig: validation names the field, every field shared with LoraConfig is honoured or refused, presets
reproduce the authors, JSON round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig, PeftModelForCausalLM, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper as WRAPPER

import ilora
from ilora.config import CRAB_TARGETS

from .conftest import build


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_alpha": float("inf")}, "lora_alpha"),
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


# ---------------------------------------------------------------------------------------- the fields shared with LoRA
# Combinations PEFT's LoraConfig refuses for the same fields: ILoraConfig refuses them as clearly, naming the field.
LORA_REFUSES = [
    ({"target_modules": "q_proj", "layers_to_transform": [0]}, r"ILoraConfig\.layers_to_transform"),
    ({"target_modules": ".*proj", "layers_pattern": "layers", "layers_to_transform": 0}, r"layers_to_transform"),
    ({"layers_pattern": "layers"}, r"ILoraConfig\.layers_pattern"),
    ({"task_type": "NOT_A_TASK"}, r"task type"),
]


@pytest.mark.parametrize(("kwargs", "message"), LORA_REFUSES)
def test_what_lora_refuses_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError):
        LoraConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        ilora.ILoraConfig(**kwargs)


def _tiny(**kwargs):
    return get_peft_model(
        build("llama"), ilora.ILoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], **kwargs})
    )


def _layer(model) -> ilora.ILoraLayer:
    return ilora.ilora_layers(model)[0]


def _targeted(model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _same_targets_as_lora(**kwargs) -> bool:
    lora = get_peft_model(build("llama"), LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], **kwargs}))
    return _targeted(_tiny(**kwargs)) == _targeted(lora) != set()


def _metadata_round_trip(tmp_path, **kwargs) -> bool:
    config = ilora.ILoraConfig(r=4, target_modules=["q_proj"], **kwargs)
    config.save_pretrained(str(tmp_path))
    return ilora.ILoraConfig.from_pretrained(str(tmp_path)).to_dict() == config.to_dict()


# Every field ILoraConfig shares with PEFT's LoraConfig, with a check that ilora honours it (values it cannot honour
# are refused: LORA_REFUSES above and INVALID in test_invalid_settings_name_the_field).
SHARED_FIELDS = {
    "r": lambda tmp: _layer(_tiny(r=3)).ilora_A["default"].shape[-1] == 3,
    "lora_alpha": lambda tmp: _layer(_tiny(lora_alpha=12)).scaling["default"] == 3.0,
    "use_rslora": lambda tmp: _layer(_tiny(lora_alpha=12, use_rslora=True)).scaling["default"] == 6.0,
    "rank_pattern": lambda tmp: _layer(_tiny(rank_pattern={"q_proj": 2})).r["default"] == 2,  # more: test_patterns
    "alpha_pattern": lambda tmp: _layer(_tiny(alpha_pattern={"q_proj": 12})).scaling["default"] == 3.0,
    "lora_dropout": lambda tmp: _layer(_tiny(lora_dropout=0.25)).ilora_dropout["default"].p == 0.25,
    "target_modules": lambda tmp: _same_targets_as_lora(target_modules=r".*\.1\.self_attn\.(q|k)_proj"),
    "exclude_modules": lambda tmp: _same_targets_as_lora(exclude_modules=["model.layers.0.self_attn.q_proj"]),
    "layers_to_transform": lambda tmp: _same_targets_as_lora(layers_to_transform=1),
    "layers_pattern": lambda tmp: _same_targets_as_lora(layers_to_transform=[0], layers_pattern="layers"),
    "modules_to_save": lambda tmp: isinstance(_tiny(modules_to_save=["lm_head"]).base_model.model.lm_head, WRAPPER),
    "init_lora_weights": lambda tmp: (
        bool(_layer(_tiny(init_lora_weights=False)).ilora_B["default"].abs().sum())
        and not _layer(_tiny(init_lora_weights=True)).ilora_B["default"].abs().sum()
    ),
    "inference_mode": lambda tmp: not any(p.requires_grad for p in _tiny(inference_mode=True).parameters()),
    "task_type": lambda tmp: isinstance(_tiny(task_type="CAUSAL_LM"), PeftModelForCausalLM),
    "bias": lambda tmp: _tiny(bias="none").peft_config["default"].bias == "none",  # the only value: others refused
    "peft_type": lambda tmp: _tiny().peft_config["default"].peft_type == "ILORA",
    "revision": lambda tmp: _metadata_round_trip(tmp, revision="v1"),
    "base_model_name_or_path": lambda tmp: _metadata_round_trip(tmp, base_model_name_or_path="some/model"),
    "auto_mapping": lambda tmp: _metadata_round_trip(tmp, auto_mapping={"base_model_class": "LlamaForCausalLM"}),
    "peft_version": lambda tmp: _metadata_round_trip(tmp),
}


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_field_shared_with_lora_is_listed() -> None:
    # A field a new peft adds to both configs must be listed here with its check (or refused), never ignored.
    assert _fields(LoraConfig) & _fields(ilora.ILoraConfig) <= set(SHARED_FIELDS)


@pytest.mark.parametrize("field", list(SHARED_FIELDS))
def test_shared_field_is_honoured(field: str, tmp_path) -> None:
    if field not in _fields(LoraConfig):
        pytest.skip(f"this peft's LoraConfig has no {field}")
    assert SHARED_FIELDS[field](tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"init_lora_weights": "gaussian"}, "init_lora_weights"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"modules_to_save": "lm_head"}, "modules_to_save"),
        ({"target_modules": 3}, "target_modules"),
        ({"exclude_modules": [3]}, "exclude_modules"),
        ({"layers_to_transform": "0"}, "layers_to_transform"),
        ({"layers_to_transform": [-1]}, "layers_to_transform"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"inference_mode": "x"}, "inference_mode"),
        ({"num_tasks": 3}, "num_tasks"),
        ({"num_experts": 1, "balance_loss_coef": 0.01}, "balance_loss_coef"),
        ({"num_experts": 1, "router_z_loss_coef": 0.01}, "router_z_loss_coef"),
        ({"aux_loss_in_output": 1}, "aux_loss_in_output"),
    ],
)
def test_values_ilora_cannot_honour_are_refused(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"ILoraConfig\.{field}"):
        ilora.ILoraConfig(**kwargs)


def test_the_saved_model_card_says_how_to_install_without_a_placeholder_url(tmp_path) -> None:
    ilora.ILoraConfig(target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    card = (tmp_path / "README.md").read_text()
    assert "import ilora" in card and "repository" in card
    assert "OWNER" not in card and "://" not in card  # no made-up address a reader would copy


def test_the_loading_section_comes_first_in_peft_s_model_card(tmp_path) -> None:
    """PEFT's card is YAML metadata, then a long template: the section goes right after the metadata, once."""
    from peft import get_peft_model

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), ilora.ILoraConfig(target_modules=["0"]))
    model.save_pretrained(str(tmp_path))
    model.save_pretrained(str(tmp_path))
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n")
    metadata_end = card.index("\n---\n", 4) + 5
    assert card[metadata_end:].lstrip().startswith(ilora.config.LOADING_HEADING)
    assert card.count(ilora.config.LOADING_HEADING) == 1 and len(card) > 2 * len(ilora.config.LOADING_SECTION)

"""Lossy export of input-routed adapters to plain LoRA: exact where it should be, error measured otherwise."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import ilora

from .conftest import build, example_input, output, targets


def _model(kind: str, **config) -> PeftModel:
    settings = dict(r=4, num_experts=3, target_modules=targets(kind), init_lora_weights=False)
    return get_peft_model(build(kind), ilora.ILoraConfig(**{**settings, **config})).eval()


def _batches(kind: str, n: int) -> list[dict]:
    return [example_input(kind, seed=10 + i) for i in range(n)]


@pytest.mark.parametrize("shared_a", [True, False])
def test_router_average_export_loads_as_plain_lora_and_reports_its_error(tmp_path, shared_a: bool) -> None:
    pm = _model("llama", shared_a=shared_a)
    heldout = example_input("llama", seed=99)
    export = ilora.export_to_lora(pm, _batches("llama", 3), heldout)
    assert export.config.r == (4 if shared_a else 12)
    assert 0 < export.relative_error < 1.0  # loses some of the routed effect, keeps most of it
    export.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path).eval()
    assert loaded.peft_config["default"].peft_type == "LORA"
    with torch.no_grad():
        y_lora, y_ilora = output(loaded, heldout), output(pm, heldout)
        with pm.disable_adapter():
            y_base = output(pm, heldout)
    measured = (y_lora - y_ilora).norm() / (y_ilora - y_base).norm()
    assert measured.item() == pytest.approx(export.relative_error, rel=1e-4)


def test_router_average_is_exact_when_routing_is_constant() -> None:
    pm = _model("mlp")
    for layer in ilora.ilora_layers(pm):  # a zero router sends every token to the same uniform mixture
        torch.nn.init.zeros_(layer.ilora_router["default"].weight)
    export = ilora.export_to_lora(pm, _batches("mlp", 2), example_input("mlp", seed=5))
    assert export.relative_error < 1e-5


def test_svd_export_at_full_rank_matches_router_average_and_truncation_costs_accuracy() -> None:
    pm = _model("mlp", shared_a=False)
    calib, heldout = _batches("mlp", 2), example_input("mlp", seed=7)
    average = ilora.export_to_lora(pm, calib, heldout, method="router_average")
    full = ilora.export_to_lora(pm, calib, heldout, method="svd", rank=12)
    truncated = ilora.export_to_lora(pm, calib, heldout, method="svd", rank=1)
    assert full.relative_error == pytest.approx(average.relative_error, rel=1e-3, abs=1e-5)
    assert truncated.relative_error > full.relative_error


def test_bad_method_and_unreached_layers_are_reported() -> None:
    pm = _model("mlp")
    with pytest.raises(ValueError, match="method"):
        ilora.export_to_lora(pm, [], example_input("mlp"), method="mean")
    with pytest.raises(ValueError, match="never reached"):
        ilora.export_to_lora(pm, [], example_input("mlp"))


def test_calibration_leaves_padding_out() -> None:
    # The same sequences as one right-padded batch (2 x 8, the second real for 3 tokens) or unpadded one by one:
    # padding once moved B by ~9%.
    pm = _model("llama", shared_a=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    heldout = example_input("llama", seed=99)
    padded = ilora.export_to_lora(pm, [{"input_ids": ids * mask, "attention_mask": mask}], heldout)
    alone = ilora.export_to_lora(pm, [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :3]}], heldout)
    assert padded.state_dict.keys() == alone.state_dict.keys()
    for key, value in alone.state_dict.items():
        torch.testing.assert_close(padded.state_dict[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert padded.relative_error == pytest.approx(alone.relative_error, rel=1e-4)

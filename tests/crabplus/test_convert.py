from __future__ import annotations

import re

import pytest
import torch
from crabplus.convert import _ilora_modules, candidate_paths, load_authors_checkpoint
from crabplus.models import ModelConfig, build_model

R, ALPHA, N = 4, 8, 3


def _authors_name(path: str) -> str:
    # What their code saves (GeWu-Lab/Crab_Plus scripts/finetune/finetune_omni.py): get_peft_model wraps the thinker,
    # so keys are base_model.model.<thinker path> under transformers 4.5x names: model.layers.N (the LLM),
    # audio_tower.layers.N, visual.blocks.N.
    if path.startswith("model.language_model."):
        return "model." + path.removeprefix("model.language_model.")
    return path.removeprefix("model.")


@pytest.fixture()
def peft_omni():
    model, _ = build_model(ModelConfig(paradigm="omni", r=R, lora_alpha=ALPHA, lora_dropout=0.0))
    return model.eval()


def _authors_state(model, rename=_authors_name, prefix="base_model.model."):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for path, layer in _ilora_modules(model, "default").items():
        key = prefix + rename(path)
        sd[f"{key}.lora_A.weight"] = torch.randn(R, layer.in_features, generator=g)
        for i in range(N):
            sd[f"{key}.lora_B{i}.weight"] = torch.randn(layer.out_features, R, generator=g)
        sd[f"{key}.lora_route.weight"] = torch.randn(N, layer.in_features, generator=g)
    return sd


def test_the_key_names_the_authors_save_are_placed(peft_omni):
    sd = _authors_state(peft_omni)
    layer, proj = r"base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.[a-z]+_proj", r"lora_(A|B[012]|route)"
    audio = r"base_model\.model\.audio_tower\.layers\.\d+\.self_attn\.[qkv]_proj"
    visual = r"base_model\.model\.visual\.blocks\.\d+\.mlp\.(gate|up|down)_proj"
    names = {"llm": layer, "audio": audio, "visual": visual}
    kinds = {k: [key for key in sd if re.fullmatch(rf"{v}\.{proj}\.weight", key)] for k, v in names.items()}
    assert all(kinds.values()) and sum(map(len, kinds.values())) == len(sd)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B2.weight" in sd
    assert "base_model.model.audio_tower.layers.1.self_attn.k_proj.lora_route.weight" in sd
    assert "base_model.model.visual.blocks.0.mlp.gate_proj.lora_A.weight" in sd
    assert candidate_paths("base_model.model.model.layers.3.mlp.up_proj")[0] == "model.layers.3.mlp.up_proj"
    assert "model.language_model.layers.3.mlp.up_proj" in candidate_paths("base_model.model.model.layers.3.mlp.up_proj")
    assert "model.audio_tower.layers.0.self_attn.q_proj" in candidate_paths("audio_tower.layers.0.self_attn.q_proj")
    assert "model.visual.blocks.1.mlp.gate_proj" in candidate_paths("base_model.model.visual.blocks.1.mlp.gate_proj")
    # the newer transformers layout and a full-Omni checkpoint (thinker.) are placed as well
    assert candidate_paths("model.language_model.layers.0.self_attn.q_proj")[0] == (
        "model.language_model.layers.0.self_attn.q_proj"
    )
    assert "model.audio_tower.layers.0.self_attn.q_proj" in candidate_paths(
        "thinker.audio_tower.layers.0.self_attn.q_proj"
    )


@pytest.mark.parametrize("prefix", ["base_model.model.", ""])
def test_converted_layer_equals_the_authors_formula(peft_omni, tmp_path, prefix):
    sd = _authors_state(peft_omni, prefix=prefix)
    torch.save(sd, tmp_path / "lora_weights.bin")
    report = load_authors_checkpoint(peft_omni, str(tmp_path / "lora_weights.bin"))
    assert report.lora_tensors == 3 * len(sd) // (N + 2) and not report.left_out and not report.projector_tensors
    for path in ("model.language_model.layers.1.mlp.down_proj", "model.audio_tower.layers.0.self_attn.v_proj"):
        layer = _ilora_modules(peft_omni, "default")[path]
        key = prefix + _authors_name(path)
        x = torch.randn(7, layer.in_features)
        w = torch.softmax(x @ sd[f"{key}.lora_route.weight"].T, dim=-1)
        h = x @ sd[f"{key}.lora_A.weight"].T
        delta = sum(w[:, i : i + 1] * (h @ sd[f"{key}.lora_B{i}.weight"].T) for i in range(N))
        want = layer.base_layer(x) + delta * (ALPHA / R)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_missing_file_is_refused(peft_omni, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.bin"):
        load_authors_checkpoint(peft_omni, str(tmp_path / "nowhere.bin"))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda sd: sd.update({"base_model.model.model.layers.0.mlp.fc9.lora_A.weight": torch.zeros(4, 64)}),
            "fc9",
        ),
        (lambda sd: sd.update({"base_model.model.model.norm.weight": torch.zeros(64)}), "norm.weight"),
        (lambda sd: sd.pop(next(k for k in sd if k.endswith("lora_B1.weight"))), "incomplete"),
        (lambda sd: sd.pop(next(k for k in sd if k.endswith("lora_route.weight"))), "incomplete"),
        (
            lambda sd: [sd.pop(k) for k in [k for k in sd if "model.model.layers.1.mlp.up_proj" in k]],
            "no weights for 1",
        ),
    ],
)
def test_unplaceable_or_incomplete_checkpoints_are_refused(peft_omni, tmp_path, edit, match):
    sd = _authors_state(peft_omni)
    edit(sd)
    torch.save(sd, tmp_path / "w.bin")
    with pytest.raises(ValueError, match=match):
        load_authors_checkpoint(peft_omni, str(tmp_path / "w.bin"))


def test_shape_mismatch_names_key_and_shapes(peft_omni, tmp_path):
    sd = _authors_state(peft_omni)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    sd[key] = torch.zeros(R + 1, 64)
    torch.save(sd, tmp_path / "w.bin")
    with pytest.raises(ValueError, match=r"q_proj\.lora_A.*\(1, 64, 5\).*\(1, 64, 4\)"):
        load_authors_checkpoint(peft_omni, str(tmp_path / "w.bin"))


def _crab_name(ours: str) -> str:
    """Crab's key for a modular-projector parameter (GeWu-Lab/Crab models/multimodal_encoder.py VLProjector /
    ALProjector, its LAVIS BERT Q-Former models/Qformer.py; saved as base_model.model.model.<module>...)."""
    module, _, name = ours.partition(".")
    part, medium = {"vision_projector": ("vl", "visual"), "audio_projector": ("al", "audio")}[module]
    for new, old in (("feature_norm.", f"{medium}_ln."), ("to_lm.", f"{medium}_proj."),
                     ("query_tokens", f"{medium}_query_tokens"),
                     ("qformer.layernorm.", f"{medium}_Qformer.bert.embeddings.LayerNorm."),
                     ("qformer.encoder.", f"{medium}_Qformer.bert.encoder.")):  # fmt: skip
        if name.startswith(new):
            name = old + name.removeprefix(new)
    name = name.replace("attention.attention.", "attention.self.")
    return f"base_model.model.model.{part}_projector.{name}"


def _crab_v1_state(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A Crab v1 finetune file for the modular ``model`` (its LLaMA LoRA and both projectors, in Crab's names), and
    the projector tensors by our parameter path."""
    base = model.base_model.model
    g = torch.Generator().manual_seed(1)
    sd = {}
    for path, layer in _ilora_modules(model, "default").items():  # Crab's LLaMA LoRA: base_model.model.model.layers
        key = "base_model.model." + path.removeprefix("language_model.")
        sd[f"{key}.lora_A.weight"] = torch.randn(R, layer.in_features, generator=g)
        sd.update({f"{key}.lora_B{i}.weight": torch.randn(layer.out_features, R, generator=g) for i in range(N)})
        sd[f"{key}.lora_route.weight"] = torch.randn(N, layer.in_features, generator=g)
    projector = {}
    for module in ("vision_projector", "audio_projector"):
        for name, p in getattr(base, module).original_module.named_parameters():
            projector[f"{module}.{name}"] = torch.randn(p.shape, generator=g)
    sd.update({_crab_name(k): v for k, v in projector.items()})
    return sd, projector


def _modular():
    return build_model(ModelConfig(paradigm="modular", r=R, lora_alpha=ALPHA, lora_dropout=0.0))[0]


def test_crab_v1_projectors_load_where_they_fit_and_the_rest_is_named(tmp_path):
    model = _modular()
    base = model.base_model.model
    sd, projector = _crab_v1_state(model)
    qf = "base_model.model.model.vl_projector.visual_Qformer"
    unused = {f"{qf}.bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(3),
              f"{qf}.bert.embeddings.word_embeddings.weight": torch.zeros(3),
              f"{qf}.cls.predictions.bias": torch.zeros(3),
              "base_model.model.model.seg_module.mask_decoder.iou_token.weight": torch.zeros(3)}  # fmt: skip
    beats_ln = "base_model.model.model.al_projector.audio_ln.weight"
    sd.update(unused)
    sd[beats_ln] = torch.zeros(768)  # BEATs' width; our audio encoder is Whisper
    torch.save(sd, tmp_path / "finetune_weights.bin")
    with pytest.raises(ValueError, match=r"audio_projector\.feature_norm\.weight.*allow_partial_projectors"):
        load_authors_checkpoint(model, str(tmp_path / "finetune_weights.bin"))
    report = load_authors_checkpoint(model, str(tmp_path / "finetune_weights.bin"), allow_partial_projectors=True)
    assert set(report.left_out) == {*unused, beats_ln} and "shape (768,)" in report.left_out[beats_ln]
    assert report.projectors_not_loaded == ["audio_projector.feature_norm.weight"]
    assert "mask decoder" in report.left_out["base_model.model.model.seg_module.mask_decoder.iou_token.weight"]
    assert len(report.projector_tensors) == len(projector) - 1
    for ours, want in projector.items():
        if _crab_name(ours) == beats_ln:
            continue
        module, _, name = ours.partition(".")
        wrapper = getattr(base, module)
        for copy in (wrapper.original_module, wrapper.modules_to_save["default"]):
            assert torch.equal(dict(copy.named_parameters())[name], want), ours
    assert report.lora_tensors == 3 * len(_ilora_modules(model, "default"))


@pytest.mark.parametrize("drop", ["al_projector.", "vl_projector.visual_proj.2.", "al_projector.audio_query_tokens"])
def test_a_crab_v1_file_missing_part_of_a_projector_is_refused_naming_it(tmp_path, drop):
    # A file with vl_projector.* but no al_projector.* used to load, the audio projector left at its random init and
    # never mentioned. A file with some projector tensors must cover every projector parameter of the model.
    model = _modular()
    sd, projector = _crab_v1_state(model)
    gone = [ours for ours in projector if drop in _crab_name(ours)]
    sd = {k: v for k, v in sd.items() if drop not in k}
    torch.save(sd, tmp_path / "w.bin")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(gone[0])) as info:
        load_authors_checkpoint(model, str(tmp_path / "w.bin"))
    assert f"{len(gone)} projector parameter" in str(info.value) and "allow_partial_projectors" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before changing anything
    report = load_authors_checkpoint(model, str(tmp_path / "w.bin"), allow_partial_projectors=True)
    assert report.projectors_not_loaded == gone and len(report.projector_tensors) == len(projector) - len(gone)

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from crabplus.models import ModelConfig, adapter_settings, build_model, model_parts, part_of, peft_config_for
from crabplus.models.modular import load_modular
from crabplus.models.omni import load_omni
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import WhisperModel

import ilora

TINY = dict(r=4, lora_alpha=8)
TARGETS = ["q_proj", "up_proj"]


def _grads_by_part(model, paradigm):
    """part -> (any trainable param got a grad, every frozen param has none)."""
    seen = {}
    for name, p in model.named_parameters():
        part = part_of(name, model_parts(paradigm))
        got, ok = seen.get(part, (False, True))
        seen[part] = (got or p.grad is not None, ok and (p.requires_grad or p.grad is None))
    return seen


def _train_step(model, processor, samples):
    model.train()
    batch = processor.collate([processor(s) for s in samples])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    return out


@pytest.mark.parametrize(
    ("paradigm", "modes", "trained"),
    [
        ("omni", {}, {"llm", "audio", "vision"}),
        ("omni", {"llm": "full", "audio": "frozen"}, {"llm", "vision"}),
        ("modular", {}, {"llm", "projector"}),
        ("modular", {"audio": "ilora", "projector": "frozen"}, {"llm", "audio"}),
    ],
)
def test_only_trainable_parts_get_gradients(paradigm, modes, trained, samples):
    model, processor = build_model(ModelConfig(paradigm=paradigm, **modes, **TINY))
    assert isinstance(model, PeftModel)
    _train_step(model, processor, samples)
    grads = _grads_by_part(model, paradigm)
    assert {part for part, (got, _) in grads.items() if got} == trained
    assert all(ok for _, ok in grads.values())
    for name, p in model.named_parameters():
        if "ilora_" in name:
            assert p.requires_grad, name
        elif p.requires_grad:  # anything else trainable must be a modules_to_save copy
            assert "modules_to_save" in name, name


def test_omni_targets_are_the_authors_suffix_hits():
    model, _ = build_model(ModelConfig(paradigm="omni", **TINY))
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "ilora_A")}
    suffixes = {n.rsplit(".", 1)[1] for n in adapted}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.rsplit(".", 1)[1] for n in adapted if n.startswith("model.audio_tower")} == {"q_proj", "k_proj", "v_proj"}
    assert {n.rsplit(".", 1)[1] for n in adapted if n.startswith("model.visual")} == {
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert len([n for n in adapted if n.startswith("model.language_model")]) == 2 * 7


def test_lora_baseline_and_no_adapter(samples):
    lora, processor = build_model(ModelConfig(paradigm="omni", adapter="lora", llm="ilora", audio="frozen", **TINY))
    _train_step(lora, processor, samples[:2])
    assert any("lora_A" in n for n, p in lora.named_parameters() if p.grad is not None)
    plain, processor = build_model(ModelConfig(paradigm="modular", adapter="none", llm="frozen"))
    _train_step(plain, processor, samples[:2])
    assert {part for part, (got, _) in _grads_by_part(plain, "modular").items() if got} == {"projector"}


@pytest.mark.parametrize("adapter", ["ilora", "lora"])
def test_train_vocab_trains_the_embedding_and_head_beside_the_adapter(adapter, samples, tmp_path):
    model, processor = build_model(ModelConfig(paradigm="omni", adapter=adapter, train_vocab=True, **TINY))
    _train_step(model, processor, samples[:2])
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any("embed_tokens" in n for n in trained) and any("lm_head" in n for n in trained)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert any("embed_tokens" in k for k in saved) and any("lm_head" in k for k in saved)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="projector"):
        build_model(ModelConfig(paradigm="omni", projector="full"))
    with pytest.raises(ValueError, match="no part"):
        build_model(ModelConfig(paradigm="omni", llm="frozen", audio="frozen", vision="frozen"))
    with pytest.raises(ValueError, match="adapter='none'"):
        build_model(ModelConfig(paradigm="omni", adapter="none"))
    with pytest.raises(ValueError, match="train_vocab"):
        build_model(ModelConfig(paradigm="omni", adapter="none", llm="frozen", audio="full", train_vocab=True))
    with pytest.raises(ValueError, match="not one of"):
        build_model(ModelConfig(paradigm="modular", projector="ilora"))


def test_tiny_models_are_small(tiny_omni, tiny_modular):
    for model, _ in (tiny_omni, tiny_modular):
        assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_save_pretrained_captures_what_was_trained(tmp_path):
    model, _ = build_model(ModelConfig(paradigm="omni", vision="full", audio="frozen", **TINY))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(os.path.join(tmp_path, "adapter_model.safetensors")).keys()
    assert any(".ilora_B" in k and "language_model" in k for k in keys)
    assert any(k.startswith("base_model.model.model.visual.") and "ilora" not in k for k in keys)
    assert not any("audio_tower" in k for k in keys)


def test_omni_loads_from_a_local_directory(tiny_omni, tmp_path):
    model, tok = tiny_omni
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_omni(str(tmp_path))
    assert loaded.config.vision_start_token_id == model.config.vision_start_token_id
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    assert tok2.encode("hello <|VIDEO|>") == tok.encode("hello <|VIDEO|>")
    built, _ = build_model(ModelConfig(paradigm="omni", path=str(tmp_path), **TINY))
    assert isinstance(built, PeftModel)


def test_modular_loads_from_component_directories(tiny_modular, tmp_path, samples):
    model, tok = tiny_modular
    model.vision_encoder.save_pretrained(tmp_path / "vision")
    whisper = WhisperModel(model.audio_encoder.config)
    whisper.encoder.load_state_dict(model.audio_encoder.state_dict())
    whisper.save_pretrained(tmp_path / "audio")
    model.language_model.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    model.save_projectors(str(tmp_path))
    c = model.config
    loaded, _ = load_modular(str(tmp_path), num_queries=c.num_queries, qformer_hidden=c.qformer_hidden,
                             qformer_heads=c.qformer_heads, qformer_intermediate=c.qformer_intermediate,
                             vision_layers=c.vision_layers)  # fmt: skip
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(FileNotFoundError, match="vision directory"):
        load_modular(str(tmp_path / "vision"))


def test_modular_projectors_have_crabs_structure(tiny_modular):
    # GeWu-Lab/Crab models/multimodal_encoder.py: VLProjector = visual_ln, a BertLMHeadModel Q-Former from
    # bert-base-uncased's config with num_hidden_layers 2, add_cross_attention and cross_attention_freq 1,
    # 32 query tokens (std initializer_range), visual_proj = build_mlp(depth 2): Linear, GELU, Linear.
    from crabplus.models.modular import ModularConfig, QFormerProjector

    c = ModularConfig()
    assert (c.num_queries, c.qformer_layers, c.qformer_hidden, c.qformer_heads, c.qformer_intermediate) == (
        32, 2, 768, 12, 3072)  # fmt: skip
    assert c.vision_layers == (14, 22, 23)  # VisualEncoder's select_layer_list in init_multimodal_modules
    proj = QFormerProjector(1024, 64, c.qformer_hidden, c.qformer_heads, c.qformer_layers, c.num_queries, 3072)
    qf = proj.qformer.config
    assert (qf.num_hidden_layers, qf.hidden_size, qf.encoder_hidden_size, qf.hidden_act) == (2, 768, 1024, "gelu")
    assert all(layer.has_cross_attention for layer in proj.qformer.encoder.layer)
    assert proj.query_tokens.shape == (1, 32, 768) and 0.015 < proj.query_tokens.std() < 0.025
    assert [type(m) for m in proj.to_lm] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    assert proj.feature_norm.normalized_shape == (1024,)
    assert proj(torch.randn(2, 5, 1024)).shape == (2, 32, 64)


def test_modular_queries_each_frame_on_the_last_selected_layer(tiny_modular):
    # Crab's encode_video: a Q-Former pass per frame (b*t, 256 patches) -> t * 32 tokens; the LLM gets the last
    # selected layer's (qformer_feature_list[-1]).
    model, _ = tiny_modular
    c = model.config
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, c.image_size, c.image_size)
    feats = model.visual_features(pixels)
    assert len(feats) == len(c.vision_layers) and feats[-1].shape[0] == 3
    with torch.no_grad():
        tokens = model._visual_tokens(pixels, torch.tensor([3]))
        assert tokens.shape[:2] == (3, c.num_queries)
        changed = pixels.clone()
        changed[1] += 1.0
        other = model._visual_tokens(changed, torch.tensor([3]))
    assert torch.equal(tokens[0], other[0]) and torch.equal(tokens[2], other[2])
    assert not torch.equal(tokens[1], other[1])
    hidden = model.vision_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats[-1], hidden[c.vision_layers[-1]][:, 1:])


def _shared(lora: LoraConfig, routed: ilora.ILoraConfig) -> dict[str, tuple]:
    """Every field the two configs share (PEFT's own type and version aside), as (LoRA value, ILoRA value)."""
    names = {f.name for f in dataclasses.fields(LoraConfig)} & {f.name for f in dataclasses.fields(routed)}
    plain = lambda v: sorted(v) if isinstance(v, (set, list)) else v  # noqa: E731  LoRA keeps targets as a set
    return {n: (plain(getattr(lora, n)), plain(getattr(routed, n))) for n in names - {"peft_type", "peft_version"}}


@pytest.mark.parametrize(
    ("paradigm", "options"),
    [("omni", {"train_vocab": True, "audio": "full"}), ("modular", dict(TINY, lora_dropout=0.2, vision="ilora"))],
)
def test_lora_baseline_differs_from_ilora_only_by_routing(paradigm, options, monkeypatch):
    # The recipe takes its targets and numbers from ilora's presets, and derives the LoRA baseline from the same
    # record: a change to a preset (here rsLoRA, patterns and other numbers) reaches both, field for field.
    for name in ("crabplus", "crab"):
        record = {**getattr(ilora.presets, name)(), "use_rslora": True, "lora_alpha": 24, "r": 6,
                  "target_modules": ["q_proj", "up_proj"], "rank_pattern": {"up_proj": 3},
                  "alpha_pattern": {"q_proj": 5}}  # fmt: skip
        monkeypatch.setattr(ilora.presets, name, lambda record=record: dict(record))
    cfg = ModelConfig(paradigm=paradigm, **options)
    parts, settings = model_parts(paradigm), adapter_settings(cfg)
    routed = peft_config_for(parts, cfg.modes(), "ilora", settings)
    lora = peft_config_for(parts, cfg.modes(), "lora", settings)
    assert isinstance(routed, ilora.ILoraConfig) and isinstance(lora, LoraConfig)
    shared = _shared(lora, routed)
    assert {"r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "exclude_modules", "modules_to_save",
            "rank_pattern", "alpha_pattern"} <= set(shared)  # fmt: skip
    assert {n: v[0] for n, v in shared.items()} == {n: v[1] for n, v in shared.items()}
    assert (lora.use_rslora, lora.rank_pattern, sorted(lora.target_modules)) == (True, {"up_proj": 3}, TARGETS)
    assert lora.r == options.get("r", 6) and lora.exclude_modules and routed.num_experts == 3

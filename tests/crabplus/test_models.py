from __future__ import annotations

import os

import pytest
import torch
from crabplus.models import ModelConfig, build_model, model_parts, part_of
from crabplus.models.modular import load_modular
from crabplus.models.omni import load_omni
from peft import PeftModel
from safetensors.torch import load_file
from transformers import WhisperModel

TINY = dict(r=4, lora_alpha=8)


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
                             qformer_heads=c.qformer_heads)  # fmt: skip
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(FileNotFoundError, match="vision directory"):
        load_modular(str(tmp_path / "vision"))

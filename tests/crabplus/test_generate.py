from __future__ import annotations

import pytest
import torch
from crabplus.generate import generate_texts, predict
from crabplus.models import ModelConfig, build_model


@pytest.fixture(scope="module", params=["omni", "modular"])
def adapted(request):
    model, processor = build_model(ModelConfig(paradigm=request.param, r=4, lora_alpha=8))
    with torch.no_grad():  # make the (zero-initialized) experts matter
        for name, p in model.named_parameters():
            if "ilora_B" in name:
                p.normal_(0, 0.5)
    return model, processor


def test_batched_left_padded_generation_equals_one_by_one(adapted, samples):
    model, processor = adapted
    batched = generate_texts(model, processor, samples, max_new_tokens=5)
    single = [generate_texts(model, processor, [s], max_new_tokens=5)[0] for s in samples]
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


def test_generation_stops_at_max_new_tokens_and_restores_mode(adapted, samples):
    model, processor = adapted
    model.train()
    texts = generate_texts(model, processor, samples[:2], max_new_tokens=1, batch_size=1)
    assert len(texts) == 2 and model.training


def test_predict_parses_with_the_interface(adapted, samples):
    pytest.importorskip("crabplus.interface")
    model, processor = adapted
    [(text, pred)] = predict(model, processor, samples[:1], max_new_tokens=3)
    assert isinstance(text, str) and pred is not None

"""Tiny models built from configs, shared by the tests of the library."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(13, 24)
        self.fc_mid = nn.Linear(24, 24)
        self.fc_out = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(torch.tanh(self.fc_mid(torch.tanh(self.fc_in(x)))))


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def tiny_qwen2(layers: int = 2) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg)


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return {"mlp": TinyMLP, "llama": tiny_llama, "qwen2": tiny_qwen2}[kind]().eval()


def targets(kind: str) -> list[str]:
    return ["fc_in", "fc_mid", "fc_out"] if kind == "mlp" else ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def example_input(kind: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(6, 13, generator=g)}
    ids = torch.randint(0, 64, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second row
    return {"input_ids": ids, "attention_mask": mask}


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(params=["mlp", "llama", "qwen2"])
def model_kind(request: pytest.FixtureRequest) -> str:
    return request.param

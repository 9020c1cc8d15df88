"""Batched generation from samples to text (left padding, KV cache, greedy by default), and the parse to predictions."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .processor import ChatProcessor
from .sample import Sample


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    processor: ChatProcessor,
    samples: Sequence[Sample],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    **generate_kwargs: Any,
) -> list[str]:
    """The model's answer to each sample, in order. Targets are ignored (the prompt ends at the assistant header).

    Greedy unless ``generate_kwargs`` say otherwise (e.g. ``do_sample=True, temperature=0.7``); decoding stops at
    ``<|im_end|>``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device, _ = _device_and_dtype(model)
    kwargs = dict(
        max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
        pad_token_id=processor.pad_id, eos_token_id=processor.eos_id,
    )  # fmt: skip
    kwargs.update(generate_kwargs)
    texts: list[str] = []
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            items = [processor(dataclasses.replace(s, target="")) for s in chunk]
            batch = {k: v.to(device) for k, v in processor.collate(items, padding_side="left").items()}
            out = model.generate(**batch, **kwargs)
            new = out[:, batch["input_ids"].shape[1] :]
            texts += [processor.decode(row) for row in new]
    finally:
        model.train(was_training)
    return texts


def predict(
    model: nn.Module, processor: ChatProcessor, samples: Sequence[Sample], **kwargs: Any
) -> list[tuple[str, Any]]:
    """``(text, Prediction)`` per sample: ``generate_texts`` then ``crabplus.interface.parse(subset, text)``."""
    from .interface import parse

    texts = generate_texts(model, processor, samples, **kwargs)
    return [(text, parse(s.subset, text)) for s, text in zip(samples, texts)]

"""The Crab+ paradigm: the Qwen2.5-Omni thinker (talker disabled) from transformers.

Module paths in transformers 5.x: ``model.language_model`` (+ ``lm_head``), ``model.audio_tower``, ``model.visual``.
The authors' seven ``_proj`` suffixes hit the LLM's attention and MLP, the audio tower's q/k/v and the vision tower's
MLP gate/up/down.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
)

from ..tokenizer import build_tiny_tokenizer, special_token_ids
from .adapters import Part

OMNI_PARTS = (
    Part("llm", ("model.language_model", "lm_head"), ("language_model", "lm_head")),
    Part("audio", ("model.audio_tower",), ("audio_tower",)),
    Part("vision", ("model.visual",), ("visual",)),
)

TINY_TEXT_VOCAB = 512


def tiny_omni_config(tokenizer: PreTrainedTokenizerBase) -> Qwen2_5OmniThinkerConfig:
    """A thinker of about a quarter million parameters whose special token ids are the tiny tokenizer's."""
    if len(tokenizer) > TINY_TEXT_VOCAB:
        raise ValueError(f"tiny tokenizer has {len(tokenizer)} tokens, more than the tiny vocab {TINY_TEXT_VOCAB}")
    ids = special_token_ids(tokenizer)
    text = dict(
        vocab_size=TINY_TEXT_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=ids["pad"], eos_token_id=ids["im_end"],
    )  # fmt: skip
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, temporal_patch_size=2,
        spatial_merge_size=2, out_hidden_size=64, fullatt_block_indexes=[1], window_size=56,
    )  # fmt: skip
    audio = dict(
        num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
        output_dim=64, n_window=50, max_source_positions=1500,
    )  # fmt: skip
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        audio_token_index=ids["audio"],
        image_token_index=ids["image"],
        video_token_index=ids["video"],
        audio_start_token_id=ids["audio_bos"],
        audio_end_token_id=ids["audio_eos"],
        user_token_id=tokenizer.convert_tokens_to_ids("user"),
        tie_word_embeddings=False,
    )
    set_vision_start(cfg, ids["vision_bos"])
    return cfg


def set_vision_start(cfg: Qwen2_5OmniThinkerConfig, token_id: int) -> None:
    # The rope-index code reads vision_start_token_id although the thinker config does not declare it.
    cfg.vision_start_token_id = token_id


def build_tiny_omni(seed: int = 0) -> tuple[Qwen2_5OmniThinkerForConditionalGeneration, PreTrainedTokenizerBase]:
    """A random tiny thinker and its tiny tokenizer (deterministic for a given seed)."""
    tokenizer = build_tiny_tokenizer()
    cfg = tiny_omni_config(tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer


def load_omni(
    path: str, dtype: torch.dtype = torch.float32
) -> tuple[Qwen2_5OmniThinkerForConditionalGeneration, PreTrainedTokenizerBase]:
    """The thinker and tokenizer from a local directory (a full Qwen2.5-Omni checkpoint or a saved thinker).

    transformers maps the full checkpoint's ``thinker.*`` weights onto the thinker and drops talker/token2wav.
    """
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if getattr(model.config, "vision_start_token_id", None) is None:
        set_vision_start(model.config, special_token_ids(tokenizer)["vision_bos"])
    return model.eval(), tokenizer

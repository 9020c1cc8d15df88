"""The Crab paradigm: separate encoders, Q-Former projectors and a causal LM.

Structure of Crab's ``VisualEncoder`` / ``VLProjector`` / ``ALProjector`` (``models/multimodal_encoder.py`` of
GeWu-Lab/Crab): the vision tower's patch features (CLS dropped) at the layers ``vision_layers`` (Crab: CLIP ViT-L/14
hidden states ``[14, 22, 23]``; the last feeds the LM, the others were its mask decoder's multi-scale input), each
frame through its own Q-Former pass, so a video of ``F`` frames gives ``F x num_queries`` tokens; audio through the
same projector structure. A projector is a LayerNorm on the encoder features, a BERT-config Q-Former (BLIP-2's:
``num_queries`` learned queries, self-attention, cross-attention to the features in every layer, 2 layers, width 768,
12 heads; transformers' ``Blip2QFormerModel``) and a 2-layer MLP (Linear, GELU, Linear) to the LM width.

Where it differs from Crab (``examples/crabplus/README.md``, Protocol): the audio encoder is Whisper's (BEATs is not in
transformers), fed one window per audio instead of one-second chunks; there is no mask decoder.

Module paths: ``vision_encoder``, ``audio_encoder``, ``vision_projector``, ``audio_projector``, ``language_model``.
Projector layers avoid the ``_proj`` suffixes so the authors' suffix targets never hit them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionModel,
    WhisperConfig,
    WhisperModel,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ..tokenizer import build_tiny_tokenizer, special_token_ids
from .adapters import Part

MODULAR_PARTS = (
    Part("llm", ("language_model",), ("language_model",)),
    Part("audio", ("audio_encoder",), ("audio_encoder",)),
    Part("vision", ("vision_encoder",), ("vision_encoder",)),
    Part(
        "projector",
        ("vision_projector", "audio_projector"),
        ("vision_projector", "audio_projector"),
        ("frozen", "full"),
    ),
)
SIGLIP_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


@dataclass
class ModularConfig:
    """What the processor and the projectors need to know; a dataclass PEFT reads as the model config."""

    num_queries: int = 32
    qformer_layers: int = 2
    qformer_hidden: int = 768
    qformer_heads: int = 12
    qformer_intermediate: int = 3072
    vision_layers: tuple[int, ...] = (14, 22, 23)
    """Hidden-state indices of the vision tower whose patch features ``visual_features`` returns; the last feeds the
    vision projector (Crab's ``select_layer_list``)."""
    image_size: int = 224
    image_mean: tuple[float, ...] = CLIP_MEAN_STD[0]
    image_std: tuple[float, ...] = CLIP_MEAN_STD[1]
    vision_drop_cls: bool = True
    num_mel_bins: int = 80
    audio_frames: int = 3000
    """Whisper's fixed input length in mel frames (2 x max_source_positions)."""
    video_token_id: int = -1
    image_token_id: int = -1
    audio_token_id: int = -1
    tie_word_embeddings: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class QFormerProjector(nn.Module):
    """Crab's ``VLProjector`` / ``ALProjector``: ``[B, N, d_enc]`` encoder features -> ``[B, num_queries, d_lm]``.

    ``feature_norm`` (their ``visual_ln`` / ``audio_ln``), ``qformer`` (BERT config, cross-attention in every layer),
    ``query_tokens`` ``[1, num_queries, hidden]`` (normal, std 0.02), ``to_lm`` (their ``visual_proj``/``audio_proj``).
    """

    def __init__(
        self, d_enc: int, d_lm: int, hidden: int, heads: int, layers: int, num_queries: int, intermediate: int
    ) -> None:
        super().__init__()
        config = Blip2QFormerConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
            encoder_hidden_size=d_enc, cross_attention_frequency=1, use_qformer_text_input=False,
        )  # fmt: skip
        self.feature_norm = nn.LayerNorm(d_enc)
        self.qformer = Blip2QFormerModel(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, hidden).normal_(0.0, config.initializer_range))
        self.to_lm = nn.Sequential(nn.Linear(hidden, d_lm), nn.GELU(), nn.Linear(d_lm, d_lm))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        feats = self.feature_norm(feats)
        queries = self.query_tokens.expand(feats.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=feats).last_hidden_state
        return self.to_lm(out.to(self.to_lm[0].weight.dtype))


class CrabModularModel(nn.Module):
    """Encoders + Q-Former projectors + causal LM, with ``forward`` and ``generate`` over mixed media batches.

    Batch keys (from ``ModularProcessor``): ``pixel_values [n_frames, 3, S, S]`` with ``frames_per_visual
    [n_visual]`` (frames of each video or image, in order), ``input_features [n_audio, mel, frames]``.
    """

    def __init__(
        self, vision_encoder: PreTrainedModel, audio_encoder: WhisperEncoder, language_model: PreTrainedModel,
        config: ModularConfig,
    ):  # fmt: skip
        super().__init__()
        self.config = config
        self.vision_encoder, self.audio_encoder, self.language_model = vision_encoder, audio_encoder, language_model
        d_lm = language_model.config.get_text_config().hidden_size
        depth = vision_encoder.config.num_hidden_layers
        if not config.vision_layers or not all(0 <= i <= depth for i in config.vision_layers):
            raise ValueError(
                f"ModularConfig.vision_layers {config.vision_layers} must name hidden states 0..{depth} of the vision "
                "tower (Crab: (14, 22, 23) of CLIP ViT-L/14)"
            )
        qf = (config.qformer_hidden, config.qformer_heads, config.qformer_layers, config.num_queries)
        qf += (config.qformer_intermediate,)
        self.vision_projector = QFormerProjector(vision_encoder.config.hidden_size, d_lm, *qf)
        self.audio_projector = QFormerProjector(audio_encoder.config.d_model, d_lm, *qf)
        self.generation_config = language_model.generation_config

    def visual_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Per frame, the patch features ``[frames, patches, d]`` at each of ``config.vision_layers``."""
        dtype = next(self.vision_encoder.parameters()).dtype
        out = self.vision_encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        start = 1 if self.config.vision_drop_cls else 0
        return [out.hidden_states[i][:, start:] for i in self.config.vision_layers]

    def _visual_tokens(self, pixel_values: torch.Tensor, frames_per_visual: torch.Tensor) -> torch.Tensor:
        """``[frames, num_queries, d_lm]``: one Q-Former pass per frame on the last selected layer, as Crab."""
        if int(frames_per_visual.sum()) != pixel_values.shape[0]:
            raise ValueError(
                f"frames_per_visual sums to {int(frames_per_visual.sum())} but pixel_values holds "
                f"{pixel_values.shape[0]} frames"
            )
        return self.vision_projector(self.visual_features(pixel_values)[-1])

    def _audio_tokens(self, input_features: torch.Tensor) -> torch.Tensor:
        dtype = next(self.audio_encoder.parameters()).dtype
        return self.audio_projector(self.audio_encoder(input_features.to(dtype)).last_hidden_state)

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
        frames_per_visual: torch.Tensor | None = None, input_features: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The LM's input embeddings with projected media tokens at the placeholder positions (counts checked)."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        c = self.config
        sources = []
        if pixel_values is not None:
            if frames_per_visual is None:
                raise ValueError("pixel_values needs frames_per_visual (frames of each video/image)")
            mask = (input_ids == c.video_token_id) | (input_ids == c.image_token_id)
            sources.append(("visual", mask, self._visual_tokens(pixel_values, frames_per_visual)))
        if input_features is not None:
            sources.append(("audio", input_ids == c.audio_token_id, self._audio_tokens(input_features)))
        for name, mask, tokens in sources:
            if int(mask.sum()) != tokens.shape[0] * tokens.shape[1]:
                raise ValueError(
                    f"{int(mask.sum())} {name} placeholder tokens for {tokens.shape[0]} inputs x "
                    f"{tokens.shape[1]} queries"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), tokens.to(embeds.dtype))
        return embeds

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
        frames_per_visual: torch.Tensor | None = None, input_features: torch.Tensor | None = None, **kwargs,
    ):  # fmt: skip
        """Causal-LM output (``loss`` when ``labels`` are given) of the LM over the injected embeddings."""
        kwargs.pop("inputs_embeds", None)
        embeds = self.embed(input_ids, pixel_values, frames_per_visual, input_features)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None, frames_per_visual: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None, **generate_kwargs,
    ) -> torch.Tensor:  # fmt: skip
        """``[B, prompt + new]`` ids like transformers' ``generate`` (the LM decodes from the injected embeddings)."""
        embeds = self.embed(input_ids, pixel_values, frames_per_visual, input_features)
        new = self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
        return torch.cat([input_ids, new], dim=1)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        return self.language_model.prepare_inputs_for_generation(*args, **kwargs)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        for module in (self.vision_encoder, self.audio_encoder, self.language_model):
            if module.supports_gradient_checkpointing:
                module.gradient_checkpointing_enable(**kwargs)

    def save_projectors(self, path: str) -> None:
        """Write the projectors (trained in Crab's stage 1) to ``path/projector.pt``."""
        state = {k: v for k, v in self.state_dict().items() if k.startswith(("vision_projector.", "audio_projector."))}
        torch.save(state, os.path.join(path, "projector.pt"))


def _modular_config(vision: PreTrainedModel, audio: WhisperEncoder, tokenizer, **qformer) -> ModularConfig:
    ids = special_token_ids(tokenizer)
    siglip = "siglip" in vision.config.model_type
    mean, std = SIGLIP_MEAN_STD if siglip else CLIP_MEAN_STD
    return ModularConfig(
        image_size=vision.config.image_size, image_mean=mean, image_std=std, vision_drop_cls=not siglip,
        num_mel_bins=audio.config.num_mel_bins, audio_frames=2 * audio.config.max_source_positions,
        video_token_id=ids["video"], image_token_id=ids["image"], audio_token_id=ids["audio"], **qformer,
    )  # fmt: skip


def tiny_whisper_config() -> WhisperConfig:
    """An 80-mel, 100-frame (1 s) Whisper with a token-free tiny decoder (only the encoder is used)."""
    return WhisperConfig(
        num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, max_source_positions=50,
        max_target_positions=8, vocab_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None,
    )  # fmt: skip


def build_tiny_modular(seed: int = 0) -> tuple[CrabModularModel, PreTrainedTokenizerBase]:
    """Random tiny CLIP + Whisper encoder + Qwen2 LM with 4-query, 2-layer Q-Formers, and the tiny tokenizer."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    vision = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         image_size=32, patch_size=8)
    )  # fmt: skip
    audio = WhisperEncoder(tiny_whisper_config())
    lm = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    )  # fmt: skip
    lm.generation_config.pad_token_id, lm.generation_config.eos_token_id = (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
    )
    config = _modular_config(
        vision, audio, tokenizer, num_queries=4, qformer_layers=2, qformer_hidden=32, qformer_heads=2,
        qformer_intermediate=64, vision_layers=(0, 1),
    )  # fmt: skip
    return CrabModularModel(vision, audio, lm, config).eval(), tokenizer


def _load_vision(path: str, dtype: torch.dtype) -> PreTrainedModel:
    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    if model_type.startswith("siglip"):
        return SiglipVisionModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    if model_type.startswith("clip"):
        return CLIPVisionModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    raise ValueError(f"{path}: vision encoder must be a CLIP or SigLIP checkpoint, got model_type {model_type!r}")


def load_modular(
    path: str, dtype: torch.dtype = torch.float32, num_queries: int = 32, qformer_layers: int = 2,
    qformer_hidden: int = 768, qformer_heads: int = 12, qformer_intermediate: int = 3072,
    vision_layers: tuple[int, ...] = (14, 22, 23),
) -> tuple[CrabModularModel, PreTrainedTokenizerBase]:  # fmt: skip
    """Components from ``path/vision`` (CLIP or SigLIP), ``path/audio`` (Whisper), ``path/llm`` (causal LM and the
    tokenizer with the interface's special tokens); projectors from ``path/projector.pt`` when present."""
    parts = {name: os.path.join(path, name) for name in ("vision", "audio", "llm")}
    for name, sub in parts.items():
        if not os.path.isdir(sub):
            raise FileNotFoundError(f"modular checkpoint {path!r} lacks its {name} directory {sub!r}")
    vision = _load_vision(parts["vision"], dtype)
    audio = WhisperModel.from_pretrained(parts["audio"], local_files_only=True, dtype=dtype).get_encoder()
    lm = AutoModelForCausalLM.from_pretrained(parts["llm"], local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(parts["llm"], local_files_only=True)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    config = _modular_config(
        vision, audio, tokenizer, num_queries=num_queries, qformer_layers=qformer_layers,
        qformer_hidden=qformer_hidden, qformer_heads=qformer_heads, qformer_intermediate=qformer_intermediate,
        vision_layers=tuple(vision_layers),
    )  # fmt: skip
    model = CrabModularModel(vision, audio, lm, config).to(dtype)
    projector = os.path.join(path, "projector.pt")
    if os.path.exists(projector):
        state = torch.load(projector, weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith(("vision_projector.", "audio_projector."))]
        if missing or unexpected:
            raise ValueError(f"{projector}: missing projector keys {missing}, unexpected keys {unexpected}")
    return model.eval(), tokenizer

"""Special tokens of the unified interface, and a tiny tokenizer trained locally for the tiny models.

The token strings are Qwen2.5-Omni's, so the processor works unchanged with the real tokenizer and with the tiny one.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast


@dataclass(frozen=True)
class SpecialTokens:
    """Token strings the chat prompt and the placeholder expansion use (Qwen2.5-Omni spelling)."""

    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"
    pad: str = "<|endoftext|>"
    audio: str = "<|AUDIO|>"
    audio_bos: str = "<|audio_bos|>"
    audio_eos: str = "<|audio_eos|>"
    image: str = "<|IMAGE|>"
    video: str = "<|VIDEO|>"
    vision_bos: str = "<|vision_bos|>"
    vision_eos: str = "<|vision_eos|>"

    def all(self) -> list[str]:
        return [getattr(self, name) for name in self.__dataclass_fields__]


SPECIAL = SpecialTokens()

# Output formats of the authors' data (REFERENCE §2) and the chat words, so the tiny BPE learns useful merges.
_BASE_CORPUS = [
    "system user assistant You are a helpful audio-visual assistant.",
    "The event is <event> Male speech, man speaking </event>, and the time range is <range> 0,8 </range>.",
    "<visual_event>Chainsaw,(0 10)</visual_event> and <audio_event>Chainsaw,(0 10)</audio_event>",
    "So the answer is <answer> saxophone </answer>. <answer>true</answer> <answer>false</answer>",
    "The sounding object is dog. Its coordinate of top left corner is (12,34) and coordinate of bottom right "
    "corner is (56,78). The box is [10,20,30,40] and the points are [1,2], [3,4], [5,6].",
    "Please identify the action taking place in the video. Please judge the person's emotion at the moment.",
    "Please listen to the audio and indicate which of the two videos matches what you hear.",
    "happy sad angry neutral surprise fear disgust first second video audio guitar piano violin drum",
    "0 1 2 3 4 5 6 7 8 9 10 100 the a of and is in to",
]


def build_tiny_tokenizer(extra_corpus: Iterable[str] = (), vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small BPE tokenizer in milliseconds; every printable ASCII character is in its alphabet.

    Metaspace pre-tokenization keeps spaces through decode. ``extra_corpus`` adds task words (labels, instructions).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    specials = SPECIAL.all()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*specials, "<unk>"],
        initial_alphabet=list(string.printable.strip() + "\n▁"),
        show_progress=False,
    )
    tok.train_from_iterator([*_BASE_CORPUS, *extra_corpus], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token=SPECIAL.pad,
        eos_token=SPECIAL.im_end,
        additional_special_tokens=[t for t in specials if t != SPECIAL.pad],
    )
    return fast


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Ids of every interface token; a tokenizer lacking one is refused by name."""
    ids = {}
    for name in SpecialTokens.__dataclass_fields__:
        token = getattr(SPECIAL, name)
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no special token {token!r} ({name}); the interface needs it")
        ids[name] = int(tid)
    return ids

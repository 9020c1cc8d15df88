"""The configured AV-UIE split as a dataset, and the collator that turns its samples into padded model batches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from crabplus.config import RunConfig
from crabplus.data.avuie import AVUIEDataset, collate_samples
from crabplus.processor import ChatProcessor
from crabplus.sample import Sample

log = logging.getLogger(__name__)


def open_split(cfg: RunConfig, split: str = "train", subsets: Sequence[str] | None = None) -> AVUIEDataset:
    """The configured AV-UIE subsets (or ``subsets``) of ``split``; a missing root is an error naming ``data.root``."""
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} is not a directory (generate one with `crabplus demo` or "
                                "`python -m crabplus.data.synth --out DIR`)")  # fmt: skip
    if subsets is None:
        subsets = cfg.data.subsets if isinstance(cfg.data.subsets, dict) else cfg.subsets()
    return AVUIEDataset(root, subsets, split, cfg.train.seed, cfg.data.frame_size, cfg.data.check_media,
                        avvp_labels=cfg.data.avvp_labels)  # fmt: skip


class BatchCollator:
    """Samples -> a padded batch; unreadable samples (None) and samples the processor refuses are dropped and
    counted. Returns ``(batch or None, dropped)``."""

    def __init__(self, processor: ChatProcessor):
        self.processor = processor

    def __call__(self, samples: Sequence[Sample | None]) -> tuple[dict[str, torch.Tensor] | None, int]:
        items = []
        for sample in collate_samples(samples):
            try:
                items.append(self.processor(sample))
            except ValueError as exc:
                log.warning("skipping %s record %s: %s", sample.meta.get("file"), sample.meta.get("index"), exc)
        dropped = len(samples) - len(items)
        return (self.processor.collate(items) if items else None), dropped

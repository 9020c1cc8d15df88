"""The 7B config against the authors' training setup (GeWu-Lab/Crab_Plus ``deepspeed/stage2.json``,
``scripts/finetune/finetune_omni.sh``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from crabplus.config import RunConfig, load_config
from crabplus.distributed import World, deepspeed_config

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "crabplus" / "configs"


def test_7b_config_does_not_clip_gradients_as_the_authors_run():
    # Their stage2.json sets no gradient_clipping, and the HF DeepSpeed integration fills only fields marked "auto":
    # DeepSpeed's default 0.0 (off) applies, whatever the Trainer's max_grad_norm.
    cfg = load_config(CONFIGS / "crabplus_7b.yaml", cls=RunConfig)
    assert cfg.train.max_grad_norm is None
    t = cfg.train
    world = World(0, 2, torch.device("cpu"))
    filled = deepspeed_config(CONFIGS / "zero2.json", t.batch_size, 1, world, t.max_grad_norm)
    assert filled["gradient_clipping"] == 0.0
    assert filled["train_batch_size"] == 8 and filled["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("norm", [1.0, 0.5])
def test_clipping_stays_an_option(norm):
    cfg = load_config(CONFIGS / "crabplus_7b.yaml", [f"train.max_grad_norm={norm}"], cls=RunConfig)
    world = World(0, 1, torch.device("cpu"))
    assert deepspeed_config(CONFIGS / "zero2.json", 4, 2, world, cfg.train.max_grad_norm)["gradient_clipping"] == norm
    assert json.loads((CONFIGS / "zero2.json").read_text())["gradient_clipping"] == "auto"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        # A negative max_grad_norm flips the gradients' signs in clip_grad_norm_ (DeepSpeed takes it as off).
        ("train.max_grad_norm=-1.0", "train.max_grad_norm"),
        ("train.max_grad_norm=0", "train.max_grad_norm"),
        ("train.max_grad_norm=.nan", "train.max_grad_norm"),
        ("train.max_grad_norm=.inf", "train.max_grad_norm"),
        ("train.lr=.nan", "train.lr"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.save_every=-1", "train.save_every"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens"),
        ("eval.max_samples=0", "eval.max_samples"),
        ("data.num_workers=-1", "data.num_workers"),
        ("data.frame_size=0", "data.frame_size"),
    ],
)
def test_out_of_range_numbers_are_refused_naming_the_key(override, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        load_config(CONFIGS / "tiny.yaml", [override], cls=RunConfig)


def test_null_max_grad_norm_means_no_clipping():
    assert load_config(CONFIGS / "tiny.yaml", ["train.max_grad_norm=null"], cls=RunConfig).train.max_grad_norm is None

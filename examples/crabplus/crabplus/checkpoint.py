"""Training checkpoints: the adapter (PEFT ``save_pretrained``), optimizer, scheduler, RNG states and data position.

Layout of ``<run>/checkpoints/step-000120/``::

    adapter/adapter_model.safetensors, adapter_config.json   (PEFT; ``model.safetensors`` of the trainable
                                                               parameters when the model is not a PEFT model)
    state.safetensors + state.json                           (optimizer, scheduler, RNG, step, data position)

Nothing is ever unpickled: tensors live in safetensors, everything else in JSON. A checkpoint is written into a
temporary directory and renamed into place, so a crash mid-save leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TENSOR, _ITEMS, _TUPLE, _NDARRAY = "__tensor__", "__items__", "__tuple__", "__ndarray__"


# ------------------------------------------------------------------------------------ nested state <-> safetensors


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: _encode(torch.from_numpy(obj.copy()), tensors)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        # JSON keys must be strings; optimizer state is keyed by parameter index.
        return {_ITEMS: [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (only tensors and JSON values)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if _NDARRAY in obj:
        return _decode(obj[_NDARRAY], tensors).numpy()
    if _ITEMS in obj:
        return {k: _decode(v, tensors) for k, v in obj[_ITEMS]}
    if _TUPLE in obj:
        return tuple(_decode(v, tensors) for v in obj[_TUPLE])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_tree(stem: Path, obj: Any) -> None:
    """Write a nested structure of tensors, arrays and JSON values as ``stem.safetensors`` + ``stem.json``."""
    tensors: dict[str, torch.Tensor] = {}
    meta = _encode(obj, tensors)
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(meta))


def load_tree(stem: Path) -> Any:
    """Read what ``save_tree`` wrote."""
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    return _decode(json.loads(stem.with_suffix(".json").read_text()), tensors)


# ---------------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned (after a round trip through ``save_tree``)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ model weights


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_weights(model: nn.Module, directory: Path) -> None:
    """The trained weights: the PEFT adapter via ``save_pretrained``, else the parameters with ``requires_grad``."""
    if _is_peft(model):
        model.save_pretrained(str(directory))
        return
    directory.mkdir(parents=True, exist_ok=True)
    trained = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(trained, str(directory / "model.safetensors"))


def load_weights(model: nn.Module, directory: str | Path) -> None:
    """Load what ``save_weights`` wrote into a model built with the same config; refuses a missing or foreign file
    (running on with untrained adapters would go unnoticed)."""
    directory = Path(directory)
    name = "adapter_model.safetensors" if _is_peft(model) else "model.safetensors"
    file = directory / name
    if not file.is_file():
        raise FileNotFoundError(f"no {name} in {directory} (was it written by a run with another adapter setting?)")
    weights = load_file(str(file))
    if _is_peft(model):
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, weights)
        unexpected = list(result.unexpected_keys)
    else:
        unexpected = [k for k in weights if k not in dict(model.named_parameters())]
        model.load_state_dict(weights, strict=False)
    if unexpected:
        raise ValueError(f"{file}: {len(unexpected)} weights do not fit the model, e.g. {unexpected[:3]}")


# --------------------------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``step-<step>`` atomically and keep only the newest ``keep`` checkpoints; returns its path."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        save_weights(model, tmp / "adapter")
        state = {
            "progress": progress,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
        }
        save_tree(tmp / "state", state)
        if final.exists():  # the same step saved again (a resumed run's last step): swap, never delete first
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None
) -> dict[str, Any]:
    """Restore weights (and optimizer, scheduler and RNG states when given an optimizer); returns the progress."""
    path = Path(path)
    load_weights(model, path / "adapter")
    state = load_tree(path / "state")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    return state["progress"]

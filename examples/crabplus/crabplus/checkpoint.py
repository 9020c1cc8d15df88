"""Training checkpoints: the adapter (PEFT ``save_pretrained``), optimizer, scheduler and data position.

Layout of ``<run>/checkpoints/step-000120/``::

    adapter/adapter_model.safetensors, adapter_config.json   (PEFT; ``model.safetensors`` of the trainable
                                                               parameters when the model is not a PEFT model)
    state.safetensors + state.json                           (optimizer by parameter name, scheduler, progress)
    deepspeed/                                               (DeepSpeed runs only: its partitioned optimizer)

The adapter and optimizer state are gathered in full whatever the engine (DDP, FSDP, one process), so a checkpoint
loads in one process and resumes on any number of processes. No RNG state is kept: training reseeds every step from
``(seed, step, rank)``. Nothing is ever unpickled: tensors live in safetensors, everything else in JSON. A
checkpoint is written into a temporary directory and renamed into place, so a crash mid-save leaves the previous
checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from crabplus.distributed import Engine

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


# ------------------------------------------------------------------------------------------------ model weights


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_weights(model: nn.Module, directory: Path, trained: dict[str, torch.Tensor] | None = None) -> None:
    """The trained weights: the PEFT adapter via ``save_pretrained``, else the parameters with ``requires_grad``.

    ``trained``: the full trainable state dict when the model is sharded (gathered by the engine beforehand).
    """
    if trained is None:
        trained = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    if _is_peft(model):
        model.save_pretrained(str(directory), state_dict=trained)
        return
    directory.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in trained.items()}, str(directory / "model.safetensors"))


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
    run_dir: str | Path, step: int, engine: Engine, scheduler: Any, progress: dict[str, Any], keep: int = 2
) -> Path:
    """Write ``step-<step>`` atomically and keep only the newest ``keep`` checkpoints; returns its path.

    Called on every rank (gathering a sharded model is collective); rank 0 writes, except DeepSpeed's per-rank files.
    """
    world = engine.world
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}"
    trained = engine.trained_state_dict()
    optimizer = engine.optimizer_state()
    error: BaseException | None = None
    if world.main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    world.barrier()
    try:
        engine.save_engine_state(tmp)
        if world.main:
            save_weights(engine.module, tmp / "adapter", trained)
            state = {"progress": progress, "optimizer": optimizer, "scheduler": scheduler.state_dict()}
            save_tree(tmp / "state", state)
    except BaseException as exc:
        if world.size == 1:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        error = exc
    if world.sum([float(error is not None)])[0]:  # every rank learns of a failure anywhere, and stops
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"saving {final} failed on a rank; the previous checkpoints are intact") from error
    if world.main:
        if final.exists():  # the same step saved again (a resumed run's last step): swap, never delete first
            old = root / f".tmp-old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        for stale in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    world.barrier()
    return final


def load_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's training state (``progress``, ``optimizer``, ``scheduler``), without the weights."""
    return load_tree(Path(path) / "state")

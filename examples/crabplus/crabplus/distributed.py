"""Data-parallel training under the standard engines: DDP, FSDP2 (``fully_shard``) and DeepSpeed ZeRO-2.

Launch with ``torchrun`` or ``accelerate launch`` (both set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``); a plain ``python``
run is one process. ``train.strategy`` picks the engine (``auto``: DDP when there are several processes). An
``Engine`` hides what differs between them from the training loop: the wrapped forward, gradient-sync suppression
during accumulation, the optimizer step, and full (gathered) state dicts for checkpoints that load in one process.

Every rank reads the whole checkpoint directory on resume, so on several nodes ``train.out`` must be on a shared
filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from crabplus.config import Strategy

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


# --------------------------------------------------------------------------------------------------- processes


@dataclass
class World:
    """This process's place among the training processes."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The data-parallel group for ``ilora.aux_loss`` (None in a single process)."""
        return dist.group.WORLD if self.size > 1 else None

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64 on the wire; identity in a single process)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._wire)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    @property
    def _wire(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``train.device``: ``auto`` is CUDA when available, else CPU; a CUDA device this machine lacks is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train.device: {name!r} but this machine has no usable CUDA device (torch "
                             f"{torch.__version__}); use train.device=cpu or auto")  # fmt: skip
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"train.device: {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def init_world(device: str = "auto") -> World:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment (gloo on CPU,
    NCCL on GPUs, one GPU per local rank); a single process when ``WORLD_SIZE`` is unset or 1."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    where = resolve_device(device)
    if where.type == "cuda" and size > 1:
        where = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    if size == 1 and "RANK" not in os.environ:  # a plain `python` run; torchrun with one process still joins
        return World(0, 1, where)
    if not dist.is_initialized():
        if where.type == "cuda":
            torch.cuda.set_device(where)
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), where)


def resolve_strategy(strategy: Strategy, world: World) -> Strategy:
    """``auto`` -> DDP on several processes; DDP and FSDP over one process are that process alone."""
    if strategy == "auto" or (strategy in ("ddp", "fsdp") and world.size == 1):
        return "ddp" if world.size > 1 else "none"
    return strategy


# ------------------------------------------------------------------------------------------------------ sampler


def rank_batches(n: int, batch_size: int, world: World | int, seed: int, epoch: int, rank: int = 0) -> list[list[int]]:
    """This rank's micro-batches of one epoch: dataset indices, as a deterministic function of the arguments.

    The epoch's order is one permutation drawn from ``(seed, epoch)`` alone; global micro-batch ``m`` is its slice
    ``[m * G, (m + 1) * G)`` with ``G = batch_size * processes``, split into contiguous, near-equal parts, one per
    rank. So the samples of a global micro-batch do not depend on the number of processes (a run with 2 processes of
    batch 2 sees what one process of batch 4 sees), and a run resumes on another number of processes from the count
    of samples consumed. Every rank gets the same number of micro-batches; a part may be empty at an epoch's end.
    """
    size, rank = (world.size, world.rank) if isinstance(world, World) else (world, rank)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    step = batch_size * size
    return [np.array_split(order[i : i + step], size)[rank].tolist() for i in range(0, n, step)]


# ------------------------------------------------------------------------------------------------------ engines


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Engine:
    """One process, no wrapper: the reference the distributed engines must match."""

    name = "none"
    sharded = False

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, world: World):
        self.module = model
        self.model: nn.Module = model
        self.world = world
        self.optimizer = make_optimizer(_trainable(model))

    @contextlib.contextmanager
    def accumulating(self, sync: bool) -> Iterator[None]:
        """Around a micro-batch's forward and backward; ``sync=False`` skips the gradient reduction of all but the
        last micro-batch of an optimizer step."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float | None) -> None:
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(_trainable(self.module), max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU tensors of every trainable parameter, by name (called on all ranks; complete on rank 0)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.module, options=options)

    def optimizer_state(self) -> dict[str, Any]:
        """The full optimizer state keyed by parameter name, so it loads under any engine and number of processes
        (called on all ranks; complete on rank 0)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.module, self.optimizer, options=options)

    def load_optimizer_state(self, state: dict[str, Any], directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True) if self.sharded else None
        set_optimizer_state_dict(self.module, self.optimizer, optim_state_dict=state, options=options)

    def save_engine_state(self, directory: Path) -> None:
        """Engine-specific state beside the portable one (DeepSpeed's partitioned optimizer)."""


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, world: World):
        super().__init__(model, make_optimizer, world)
        ids = [world.device.index] if world.device.type == "cuda" else None
        # Unused parameters: a part set trainable may sit out a batch (a medium a sample lacks).
        self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    @contextlib.contextmanager
    def accumulating(self, sync: bool) -> Iterator[None]:
        with contextlib.nullcontext() if sync else self.model.no_sync():
            yield


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """The language model's decoder blocks (``*DecoderLayer`` among transformers' ``_no_split_modules``).

    The media encoders stay in the root unit: they run once per medium a micro-batch holds (images and videos are
    separate calls), which differs between ranks, and FSDP needs every rank to gather the same units in the same
    order. They are gathered once per step with the root instead; the LM blocks hold the bulk of the parameters.
    """
    names = {n for m in model.modules() for n in getattr(m, "_no_split_modules", None) or () if "DecoderLayer" in n}
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


class FSDPEngine(Engine):
    """FSDP2: each decoder block of the language model, then the whole model, sharded with ``fully_shard``;
    parameters, gradients and optimizer states split over ranks. With ``train.bf16`` a mixed-precision policy
    gathers bf16 parameters (float32 masters stay sharded) and reduces gradients in float32."""

    name = "fsdp"
    sharded = True

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, world: World, bf16: bool = False):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16: gather parameters in bf16 (half the all-gather traffic), reduce gradients in float32.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        units = _shard_units(model)
        for unit in reversed(units):  # innermost first, as fully_shard requires
            fully_shard(unit, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        self.units = len(units)
        super().__init__(model, make_optimizer, world)

    @contextlib.contextmanager
    def accumulating(self, sync: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)


class DeepSpeedEngine(Engine):
    """DeepSpeed (ZeRO-2 as in the paper) from ``train.deepspeed_config``; fields set to ``"auto"`` (batch sizes,
    accumulation, clipping) are filled from the run config. DeepSpeed's own partitioned optimizer state is saved
    under ``deepspeed/`` and restored on the same number of processes only."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, world: World, config: dict[str, Any]):
        import deepspeed

        self.module, self.world = model, world
        optimizer = make_optimizer(_trainable(model))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=_trainable(model), config=config
        )
        # ZeRO steps this optimizer on its own param groups, so the lr scheduler drives it as usual.
        self.optimizer = optimizer
        self.model = self.engine

    @contextlib.contextmanager
    def accumulating(self, sync: bool) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(sync)
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already normalizes over the whole step

    def step(self, max_grad_norm: float | None) -> None:
        self.engine.step()  # clips (config gradient_clipping) and zeroes the gradients

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        # ZeRO-2 partitions gradients and optimizer states only: every rank holds the full parameters.
        return {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}

    def optimizer_state(self) -> dict[str, Any]:
        return {"engine": "deepspeed", "world_size": self.world.size}

    def save_engine_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", exclude_frozen_parameters=True)

    def load_optimizer_state(self, state: dict[str, Any], directory: Path) -> None:
        if state.get("engine") != "deepspeed" or state.get("world_size") != self.world.size:
            raise ValueError(
                f"{directory}: a DeepSpeed run resumes only from a DeepSpeed checkpoint of the same number of "
                f"processes (this one: {state.get('engine', 'torch')} x {state.get('world_size', '?')}, now "
                f"{self.world.size}); convert it with `python -m deepspeed.checkpoint.ds_to_universal` to change"
            )
        self.engine.load_checkpoint(
            str(directory / "deepspeed"), tag="state", load_module_strict=False, load_lr_scheduler_states=False
        )


def deepspeed_config(path: str | Path, batch_size: int, grad_accum: int, world: World, clip: float | None) -> dict:
    """The JSON config at ``path`` with its ``"auto"`` fields filled from the run config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed_config: {path} does not exist")
    config = json.loads(path.read_text())
    filled = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum * world.size,
        "gradient_clipping": clip or 0.0,
    }
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise ValueError(f'{path}: {key} is {config[key]} but the run config gives {value}; set it to "auto"')
    for key in ("bf16", "fp16"):  # the loop's autocast sets the compute precision
        if config.get(key, {}).get("enabled") is True:
            raise ValueError(f'{path}: {key}.enabled must be false or "auto"; use train.bf16 (autocast)')
        config[key] = {"enabled": False}
    return config


def build_engine(
    strategy: Strategy,
    model: nn.Module,
    make_optimizer: OptimizerFactory,
    world: World,
    deepspeed: dict[str, Any] | None = None,
    bf16: bool = False,
) -> Engine:
    """The engine of ``strategy`` around ``model`` (already on ``world.device``) and its optimizer."""
    if strategy == "none":
        return Engine(model, make_optimizer, world)
    if strategy == "ddp":
        return DDPEngine(model, make_optimizer, world)
    if strategy == "fsdp":
        return FSDPEngine(model, make_optimizer, world, bf16)
    if strategy == "deepspeed":
        if deepspeed is None:
            raise ValueError("train.strategy=deepspeed needs train.deepspeed_config (e.g. configs/zero2.json)")
        if not dist.is_initialized():
            raise ValueError("train.strategy=deepspeed: launch with torchrun or accelerate launch, even for one "
                             "process (DeepSpeed otherwise looks for MPI)")  # fmt: skip
        return DeepSpeedEngine(model, make_optimizer, world, deepspeed)
    raise ValueError(f"train.strategy must be one of auto, none, ddp, fsdp, deepspeed; got {strategy!r}")

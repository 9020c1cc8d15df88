"""The training entry point: a YAML run config -> an adapter trained on AV-UIE v2, with logs and resumable checkpoints.

    crabplus train --config examples/crabplus/configs/tiny.yaml [--set train.max_steps=20 ...]

A run directory (``train.out``) receives ``config.yaml`` (the resolved config), ``train_log.csv`` (step, epoch, loss,
aux_loss, lr, tokens_per_s) and ``checkpoints/step-N/`` (see ``crabplus.checkpoint``). Starting again on a run directory
that holds checkpoints resumes from the newest one, and continues exactly: the data order is a function of
``(seed, epoch)`` only, already-seen batches are skipped, and RNG, optimizer and scheduler states are restored.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

import ilora
from crabplus.checkpoint import latest_checkpoint, load_state, load_weights, save_checkpoint
from crabplus.data.avuie import AVUIEDataset, LoadReport, collate_samples
from crabplus.distributed import (
    Strategy,
    World,
    build_engine,
    deepspeed_config,
    init_world,
    rank_batches,
    resolve_strategy,
)
from crabplus.models import ModelConfig, build_model
from crabplus.processor import ChatProcessor
from crabplus.sample import Sample
from crabplus.tasks import SUBSETS, get_task

log = logging.getLogger(__name__)
LOG_FIELDS = ("step", "epoch", "loss", "aux_loss", "lr", "tokens_per_s")
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


# ------------------------------------------------------------------------------------------------------- config


@dataclass
class SynthSettings:
    """Size of the synthetic dataset ``crabplus demo`` generates (``crabplus.data.synth.generate``)."""

    train: int = 12
    test: int = 4
    seed: int = 0
    size: int = 64


@dataclass
class DataConfig:
    root: str = "runs/data/avuie_tiny"
    """AV-UIE v2 root (``<root>/<subset>/train.json``)."""
    subsets: list[str] | dict[str, float] | None = None
    """Subset names, ``{name: mixing ratio}``, or None for all 19."""
    frame_size: int | None = 224
    check_media: Literal["open", "exists", "none"] = "open"
    num_workers: int = 0
    synth: SynthSettings = field(default_factory=SynthSettings)
    avvp_labels: str | None = None
    """Directory of the LLP evaluation files (AVVP_eval_audio.csv, AVVP_eval_visual.csv) that hold the AVVP test
    references; None: ``<root>/avvp/`` (``crabplus.data.llp``)."""


@dataclass
class TrainConfig:
    out: str = "runs/tiny"
    epochs: int = 1
    max_steps: int | None = None
    """Optimizer steps; overrides ``epochs`` when set."""
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None: no clipping (the authors' Crab+ run, configs/crabplus_7b.yaml)."""
    seed: int = 0
    bf16: bool = False
    """bfloat16 autocast (CUDA); trainable weights stay float32."""
    gradient_checkpointing: bool = False
    device: str = "auto"
    save_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    strategy: Strategy = "auto"
    """Data parallelism over the processes ``torchrun`` / ``accelerate launch`` start: ``ddp``, ``fsdp`` (FSDP2),
    ``deepspeed`` (with ``deepspeed_config``) or ``none``; ``auto``: DDP when there are several processes.
    ``batch_size`` is per process: the global batch of a step is ``batch_size x grad_accum x processes``."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON config (``configs/zero2.json``: ZeRO-2 as in the paper)."""


@dataclass
class EvalConfig:
    subsets: list[str] | None = None
    """Subsets to evaluate (None: the training subsets that ship a test split)."""
    max_samples: int | None = None
    """Per subset."""
    batch_size: int = 8
    max_new_tokens: int = 128
    sam2: str | None = None
    """Segmentation stage 2: None (score boxes only), ``"tiny"`` (random tiny SAM2, a plumbing check) or a local
    SAM2 checkpoint directory."""
    meteor: bool = False


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        t = self.train
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(t, name)}")
        if t.max_steps is not None and t.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1 or null, got {t.max_steps}")
        if not 0 <= t.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
        if t.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {t.lr}")
        if t.device not in ("auto", "cpu") and not t.device.startswith("cuda"):
            raise ValueError(f"train.device must be 'auto', 'cpu' or 'cuda[:N]', got {t.device!r}")
        for name in self.data.subsets or ():
            try:
                get_task(name)
            except KeyError as exc:
                raise ValueError(f"data.subsets: {exc.args[0]}") from None
        for name in self.eval.subsets or ():
            try:
                get_task(name)
            except KeyError as exc:
                raise ValueError(f"eval.subsets: {exc.args[0]}") from None

    def subsets(self) -> list[str]:
        return list(self.data.subsets or SUBSETS)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` (dataclasses built recursively); raises naming ``where``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arm, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is str and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return (
            {_convert(k, args[0], where): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
            if args
            else value
        )
    return value


def build_dataclass(cls: type, data: dict, where: str = "") -> Any:
    """``cls(**data)`` with unknown keys and wrongly typed values refused by name."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown key(s) {unknown}; known: {known}")
    prefix = f"{where}." if where else ""
    return cls(**{k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()})


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {part!r} is not a section")
    node[last] = value


def load_config(path: str | Path, overrides: Sequence[str] = (), cls: type = RunConfig) -> Any:
    """A run config from YAML, with ``section.key=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    try:
        return build_dataclass(cls, data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def config_dict(cfg: Any) -> dict:
    """The resolved config as plain data (written next to a run's checkpoints)."""
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    run_dir: Path
    steps: list[int]
    """The optimizer steps this call ran, and their losses (LM loss, aux excluded)."""
    losses: list[float]
    total_steps: int
    checkpoint: Path | None
    skipped: int
    report: LoadReport


def train_dataset(cfg: RunConfig, split: str = "train", subsets: Sequence[str] | None = None) -> AVUIEDataset:
    """The configured AV-UIE subsets (or ``subsets``) of ``split``; a missing root is an error naming ``data.root``."""
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root: {root} is not a directory (generate one with `crabplus demo` or "
                                "`python -m crabplus.data.synth --out DIR`)")  # fmt: skip
    if subsets is None:
        subsets = cfg.data.subsets if isinstance(cfg.data.subsets, dict) else cfg.subsets()
    return AVUIEDataset(root, subsets, split, cfg.train.seed, cfg.data.frame_size, cfg.data.check_media,
                        avvp_labels=cfg.data.avvp_labels)  # fmt: skip


def synthesize(cfg: RunConfig, root: str | Path) -> Path:
    """Generate the synthetic dataset of ``data.synth`` under ``root`` (kept when already there with these
    settings) and point ``data.root`` at it."""
    from crabplus.data.scene import SynthConfig
    from crabplus.data.synth import generate

    s, root = cfg.data.synth, Path(root)
    marker = root / "synth.json"
    wanted = {"train": s.train, "test": s.test, "seed": s.seed, "size": s.size, "subsets": cfg.subsets()}
    if not marker.is_file() or json.loads(marker.read_text()) != wanted:
        generate(root, s.train, s.test, s.seed, cfg.subsets(), SynthConfig(size=s.size))
        marker.write_text(json.dumps(wanted))
    cfg.data.root = str(root)
    return root


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


# May change when a run resumes: how the global batch is split over processes, and how they run.
_RESUMABLE_CHANGES = {"train.batch_size", "train.grad_accum", "train.strategy", "train.deepspeed_config",
                      "train.threads", "train.device", "data.num_workers"}  # fmt: skip


def _check_run_dir(run_dir: Path, cfg: Any, write: bool = True) -> None:
    saved = run_dir / "config.yaml"
    resolved = config_dict(cfg)
    if latest_checkpoint(run_dir) is not None and saved.is_file():
        before = yaml.safe_load(saved.read_text())
        diff = sorted(
            key
            for s in resolved
            for k in resolved[s]
            if before.get(s, {}).get(k) != resolved[s][k] and (key := f"{s}.{k}") not in _RESUMABLE_CHANGES
        )
        if diff:
            raise ValueError(f"{run_dir} holds checkpoints of a different config (differs in {diff}); "
                             "use another train.out or delete the run directory")  # fmt: skip
    if write:  # atomically: other ranks may be reading it
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        os.replace(tmp, saved)


def _read_log(path: Path, upto: int) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [row for row in csv.DictReader(f) if int(row["step"]) <= upto]


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed Python, NumPy and torch for one optimizer step of one rank: dropout and any other draw of the step are a
    function of ``(seed, step, rank)``, so a resumed run repeats them without saved generator states."""
    value = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions (float32): normalized by the caller over the
    whole step, across micro-batches and ranks, so every labelled token weighs the same."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100,
        reduction="sum",
    )  # fmt: skip


def _label_tokens(batch: dict[str, torch.Tensor] | None) -> int:
    return 0 if batch is None else int((batch["labels"][:, 1:] != -100).sum())


def _step_batches(
    batches: list[dict[str, torch.Tensor] | None], spare: dict[str, torch.Tensor] | None, world: World
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The micro-batches this rank runs in one step, and the step's labelled tokens over all ranks.

    Under data parallelism every rank must run as many forwards as the others: a rank left without a sample (an
    epoch's last, short global batch, or only unreadable records) runs ``spare`` with its labels masked, which adds
    nothing to the loss; a micro-batch no rank can fill this way is skipped everywhere.
    """
    if world.size > 1:
        masked = None if spare is None else {**spare, "labels": torch.full_like(spare["labels"], -100)}
        batches = [masked if b is None else b for b in batches]
    counts = world.sum([float(sum(_label_tokens(b) for b in batches))] + [float(b is None) for b in batches])
    runnable = [b for b, missing in zip(batches, counts[1:], strict=True) if b is not None and not missing]
    return runnable, int(counts[0])


def train(cfg: RunConfig, stop_after: int | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume) the run ``cfg.train.out`` on this process, or as one rank of a ``torchrun`` /
    ``accelerate launch`` job; ``stop_after`` ends after that step with a checkpoint, as an interruption would."""
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    world = init_world(t.device)
    strategy = resolve_strategy(t.strategy, world)
    run_dir = Path(t.out)
    _check_run_dir(run_dir, cfg, write=world.main)  # every rank refuses a foreign run; rank 0 records the config
    world.barrier()
    seed_step(t.seed, 0, 0)  # the same initialization on every rank
    dataset = train_dataset(cfg)
    if len(dataset) == 0:
        raise ValueError(f"data.root: no usable training records in {cfg.data.root} for subsets {cfg.subsets()}\n"
                         + dataset.report.summary())  # fmt: skip
    device = world.device
    model, processor = build_model(cfg.model)
    model.to(device)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model: nothing to train (every part frozen and adapter 'none')")
    if t.bf16:
        for p in model.parameters():  # bf16 compute under autocast, float32 master weights for the optimizer
            if p.requires_grad:
                p.data = p.data.float()
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    global_micro = t.batch_size * world.size
    global_batch = global_micro * t.grad_accum
    micro_per_epoch = math.ceil(len(dataset) / global_micro)
    steps_per_epoch = math.ceil(micro_per_epoch / t.grad_accum)
    total = t.max_steps or t.epochs * steps_per_epoch
    ckpt = latest_checkpoint(run_dir)
    state = load_state(ckpt) if ckpt is not None else None
    if ckpt is not None:
        load_weights(model, ckpt / "adapter")  # before sharding: full tensors into plain parameters
        if state["progress"]["global_batch"] != global_batch:
            raise ValueError(
                f"{ckpt}: the run trained with a global batch of {state['progress']['global_batch']}, now "
                f"train.batch_size x train.grad_accum x processes = {t.batch_size} x {t.grad_accum} x {world.size}"
                f" = {global_batch}; resume with the same global batch"
            )
    ds = deepspeed_config(t.deepspeed_config, t.batch_size, t.grad_accum, world, t.max_grad_norm) if (
        strategy == "deepspeed") else None  # fmt: skip
    engine = build_engine(
        strategy, model, lambda params: torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay), world, ds,
        t.bf16,
    )  # fmt: skip
    from transformers import get_scheduler

    scheduler = get_scheduler(_SCHEDULERS[t.scheduler], engine.optimizer, math.ceil(t.warmup_ratio * total), total)

    step, epoch, consumed = 0, 0, 0
    if ckpt is not None:
        engine.load_optimizer_state(state["optimizer"], ckpt)
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, consumed = (state["progress"][k] for k in ("step", "epoch", "samples"))
        log.info("resumed from %s (step %d, epoch %d, %d samples in)", ckpt, step, epoch, consumed)
    micro = consumed // global_micro
    log_path = run_dir / "train_log.csv"
    if world.main:
        rows = _read_log(log_path, step)
        with log_path.open("w", newline="") as f:  # drop rows past the checkpoint: they are recomputed
            writer = csv.DictWriter(f, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    collate = BatchCollator(processor)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.bf16)
    steps, losses, skipped, spare, saved_at = [], [], 0, None, None
    show = progress and world.main
    bar = tqdm(total=total, initial=step, desc=f"train {run_dir.name}", unit="step", disable=not show)
    log_file = log_path.open("a", newline="") if world.main else None
    try:
        while step < total:
            batches = rank_batches(len(dataset), t.batch_size, world, t.seed, epoch)
            # An own generator: a DataLoader otherwise draws its base seed from the global RNG.
            loader = iter(torch.utils.data.DataLoader(
                dataset, batch_sampler=batches[micro:], collate_fn=collate, num_workers=cfg.data.num_workers,
                generator=torch.Generator().manual_seed(t.seed),
            ))  # fmt: skip
            while step < total and micro < len(batches):
                began = time.perf_counter()
                group = []
                for _ in range(min(t.grad_accum, len(batches) - micro)):
                    batch, dropped = next(loader)  # (None, 0) for an empty part
                    group.append(batch)
                    skipped += dropped
                    micro += 1
                spare = next((b for b in reversed(group) if b is not None), spare)
                runnable, label_tokens = _step_batches(group, spare, world)
                seed_step(t.seed, step + 1, world.rank)
                loss_sum, aux_sum, tokens = 0.0, 0.0, 0
                for i, batch in enumerate(runnable):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    labels = batch.pop("labels")
                    with engine.accumulating(sync=i == len(runnable) - 1):
                        with autocast:
                            out = engine.model(**batch)
                            token_loss = token_loss_sum(out.logits, labels)
                            aux = ilora.aux_loss(engine.module, world.group)
                        # DDP, FSDP and DeepSpeed average gradients over ranks: scale back up by the rank count.
                        engine.backward(token_loss * world.size / max(label_tokens, 1) + aux / len(runnable))
                    loss_sum += float(token_loss.detach())
                    aux_sum += float(aux.detach())
                    tokens += int(batch["attention_mask"].sum())
                if runnable:
                    engine.step(t.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                loss_sum, tokens = world.sum([loss_sum, float(tokens)])
                loss = loss_sum / label_tokens if label_tokens else float("nan")
                aux_mean = aux_sum / max(len(runnable), 1)
                rate = tokens / max(time.perf_counter() - began, 1e-9)
                if log_file is not None:
                    csv.DictWriter(log_file, LOG_FIELDS).writerow(dict(
                        step=step, epoch=epoch, loss=f"{loss:.6f}", aux_loss=f"{aux_mean:.6f}", lr=f"{lr:.3e}",
                        tokens_per_s=f"{rate:.1f}",
                    ))  # fmt: skip
                    log_file.flush()
                steps.append(step)
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}", epoch=epoch)
                at_end = step >= total or step == stop_after
                if at_end or (t.save_every and step % t.save_every == 0):
                    done_epoch = micro >= len(batches)
                    samples = 0 if done_epoch else micro * global_micro
                    position = dict(step=step, epoch=epoch + done_epoch, samples=samples, global_batch=global_batch,
                                    world_size=world.size)  # fmt: skip
                    saved_at = save_checkpoint(run_dir, step, engine, scheduler, position, t.keep_checkpoints)
                if at_end:
                    break
            else:
                epoch, micro = epoch + 1, 0
                continue
            break
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    skipped = int(world.sum([float(skipped)])[0])
    if skipped and world.main:
        log.warning("training skipped %d unreadable sample(s)\n%s", skipped, dataset.report.summary())
    world.barrier()
    return TrainResult(run_dir, steps, losses, total, saved_at or ckpt, skipped, dataset.report)


def loss_summary(losses: Sequence[float], window: int = 10) -> str:
    """First and last loss, and the means of the first and last ``window`` steps (single steps are noisy)."""
    finite = [x for x in losses if not math.isnan(x)]
    if not finite:
        return "no steps run"
    k = min(window, max(1, len(finite) // 2))
    head, tail = float(np.mean(finite[:k])), float(np.mean(finite[-k:]))
    return (f"loss: first {finite[0]:.3f} -> last {finite[-1]:.3f} "
            f"(mean of first {k} steps {head:.3f}, last {k} steps {tail:.3f})")  # fmt: skip

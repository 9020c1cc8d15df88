"""The training entry point: a YAML run config -> an adapter trained on AV-UIE v2, with logs and resumable checkpoints.

    crabplus train --config examples/crabplus/configs/tiny.yaml [--set train.max_steps=20 ...]

A run directory (``train.out``) receives ``config.yaml`` (the resolved config), ``train_log.csv`` (step, epoch, loss,
aux_loss, lr, tokens_per_s) and ``checkpoints/step-N/`` (see ``crabplus.checkpoint``). Starting again on a run directory
that holds checkpoints resumes from the newest one, and continues exactly: the data order is a function of
``(seed, epoch)`` only, already-seen batches are skipped, and RNG, optimizer and scheduler states are restored.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import shlex
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
import yaml
from tqdm.auto import tqdm

import ilora
from crabplus.checkpoint import checkpoint_dirs, latest_checkpoint, load_state, load_weights, save_checkpoint
from crabplus.config import RunConfig, config_dict, describe_changes, resume_differences, yaml_value
from crabplus.data.avuie import LoadReport
from crabplus.data.batches import BatchCollator, open_split
from crabplus.distributed import World, build_engine, deepspeed_config, init_world, rank_batches, resolve_strategy
from crabplus.folder_lock import hold_folder
from crabplus.interrupt import StopSignals
from crabplus.models import build_model

log = logging.getLogger(__name__)
LOG_FIELDS = ("step", "epoch", "loss", "aux_loss", "lr", "tokens_per_s")
_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


# ----------------------------------------------------------------------------------------------------- training


def check_resume(run_dir: Path, cfg: RunConfig, announce: bool = True) -> None:
    """Refuse to resume the checkpoints in ``run_dir`` with a config that changes the trained weights, naming each
    differing key with its old and new value and the ways out; log differences that cannot change them (one line,
    when ``announce``). Which keys must match: ``crabplus.config.resume_differences``."""
    saved = run_dir / "config.yaml"
    if latest_checkpoint(run_dir) is None or not saved.is_file():
        return
    harmless, blocking = resume_differences(yaml.safe_load(saved.read_text()), config_dict(cfg))
    if blocking:
        back = " ".join("--set " + shlex.quote(f"{key}={yaml_value(old)}") for key, (old, _) in blocking.items())
        raise ValueError(f"{run_dir} holds checkpoints trained with another config, differing in what changes the "
                         f"trained weights: {describe_changes(blocking)}; to resume this run, set them back "
                         f"({back}); to train with the new values, start a new run folder (--out NEW_DIR, or "
                         "train.out)")  # fmt: skip
    if harmless and announce:
        log.warning("resuming %s with changes that do not change the trained weights: %s", run_dir,
                    describe_changes(harmless))  # fmt: skip


def _write_config(run_dir: Path, cfg: RunConfig) -> None:
    """``config.yaml``, the resolved config, written atomically (other ranks may be reading it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.yaml"
    tmp = saved.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))
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
    interrupted: str | None = None
    """The signal that stopped the run early (``"SIGINT"``, ``"SIGTERM"``), or None."""


@dataclass
class StepLog:
    """What one optimizer step reports (summed over ranks): mean LM loss per labelled token, mean aux loss, the
    learning rate it ran with, tokens per second."""

    loss: float
    aux_loss: float
    lr: float
    tokens_per_s: float


def default_threads(local_processes: int) -> int:
    """torch CPU threads per process when ``train.threads`` is unset: the cores this process may use, split over the
    processes of this machine, and no more than the cores not already busy (the load average) nor than
    ``OMP_NUM_THREADS`` when set, at least one. More threads than free cores makes every OpenMP region wait on
    descheduled threads (measured: 4 runs on 2 cores went 15x slower, not 4x)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    free = cores - int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
    chosen = os.environ.get("OMP_NUM_THREADS", "")
    cap = int(chosen) if chosen.isdigit() and int(chosen) > 0 else cores
    return max(1, min(cores // max(local_processes, 1), free, cap))


class Trainer:
    """One run of the recipe, in the pieces torchtune's recipes have: ``setup()`` (world, run directory, data,
    model, optimizer, resume), ``train_step(group)`` (one optimizer step over a group of micro-batches), ``save()``
    (a checkpoint of the current position) and ``train()`` (the loop). Each piece works alone on a set-up trainer.
    """

    def __init__(self, cfg: RunConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.step, self.epoch, self.micro = 0, 0, 0
        self.checkpoint: Path | None = None
        self.skipped = 0
        self._spare: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------------------------------------------------- setup

    def setup(self) -> Trainer:
        t = self.cfg.train
        self.world = init_world(t.device)  # refuses a device this machine lacks, before anything is written
        torch.set_num_threads(t.threads or default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        self.strategy = resolve_strategy(t.strategy, self.world)
        self.run_dir = Path(t.out)
        check_resume(self.run_dir, self.cfg, announce=self.world.main)  # every rank refuses a foreign run
        self.world.barrier()  # every rank has read config.yaml before it is replaced
        seed_step(t.seed, 0, 0)  # the same initialization on every rank
        self._setup_data()
        self._setup_model()
        if self.world.main:  # only once the config, data and model are known to be usable
            _write_config(self.run_dir, self.cfg)
        self.checkpoint = latest_checkpoint(self.run_dir)
        state = self._read_checkpoint() if self.checkpoint is not None else None
        self._setup_optimizer()
        if state is not None:
            self._resume(state)
        self._setup_log()
        return self

    def _setup_data(self) -> None:
        t = self.cfg.train
        self.dataset = open_split(self.cfg)
        if len(self.dataset) == 0:
            raise ValueError(f"data.root: no usable training records in {self.cfg.data.root} for subsets "
                             f"{self.cfg.subsets()}\n" + self.dataset.report.summary())  # fmt: skip
        self.global_micro = t.batch_size * self.world.size
        self.global_batch = self.global_micro * t.grad_accum
        self.micro_per_epoch = math.ceil(len(self.dataset) / self.global_micro)  # global micro-batches
        steps_per_epoch = math.ceil(self.micro_per_epoch / t.grad_accum)
        self.total = t.max_steps or t.epochs * steps_per_epoch

    def _setup_model(self) -> None:
        t = self.cfg.train
        model, self.processor = build_model(self.cfg.model)
        model.to(self.world.device)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model: nothing to train (every part frozen and adapter 'none')")
        if t.bf16:
            for p in model.parameters():  # bf16 compute under autocast, float32 master weights for the optimizer
                if p.requires_grad:
                    p.data = p.data.float()
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.model = model
        self.collate = BatchCollator(self.processor)

    def _read_checkpoint(self) -> dict[str, Any]:
        """The newest checkpoint's state, its weights loaded into the (not yet sharded) model; a damaged checkpoint
        is refused naming it and the previous one to fall back to."""
        ckpt = self.checkpoint
        try:
            state = load_state(ckpt)
            load_weights(self.model, ckpt / "adapter")  # before sharding: full tensors into plain parameters
        except (OSError, ValueError, KeyError, RuntimeError, safetensors.SafetensorError) as exc:
            older = checkpoint_dirs(self.run_dir)[:-1]
            fallback = (f"move it aside to resume from the previous one, {older[-1]}" if older else
                        "no earlier checkpoint is left: delete it to start over")  # fmt: skip
            raise ValueError(f"checkpoint {ckpt} is damaged ({type(exc).__name__}: {exc}); {fallback}") from None
        if state["progress"]["global_batch"] != self.global_batch:
            t = self.cfg.train
            raise ValueError(
                f"{ckpt}: the run trained with a global batch of {state['progress']['global_batch']}, now "
                f"train.batch_size x train.grad_accum x processes = {t.batch_size} x {t.grad_accum} x "
                f"{self.world.size} = {self.global_batch}; resume with the same global batch"
            )
        return state

    def _setup_optimizer(self) -> None:
        from transformers import get_scheduler

        t, world = self.cfg.train, self.world
        ds = deepspeed_config(t.deepspeed_config, t.batch_size, t.grad_accum, world, t.max_grad_norm) if (
            self.strategy == "deepspeed") else None  # fmt: skip
        self.engine = build_engine(
            self.strategy, self.model, lambda params: torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay),
            world, ds, t.bf16,
        )  # fmt: skip
        warmup = math.ceil(t.warmup_ratio * self.total)
        self.scheduler = get_scheduler(_SCHEDULERS[t.scheduler], self.engine.optimizer, warmup, self.total)

    def _resume(self, state: dict[str, Any]) -> None:
        self.engine.load_optimizer_state(state["optimizer"], self.checkpoint)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, consumed = (state["progress"][k] for k in ("step", "epoch", "samples"))
        self.micro = consumed // self.global_micro
        log.info("resumed from %s (step %d, epoch %d, %d samples in)", self.checkpoint, self.step, self.epoch,
                 consumed)  # fmt: skip

    def _setup_log(self) -> None:
        self.log_path = self.run_dir / "train_log.csv"
        if self.world.main:
            rows = _read_log(self.log_path, self.step)
            with self.log_path.open("w", newline="") as f:  # drop rows past the checkpoint: they are recomputed
                writer = csv.DictWriter(f, LOG_FIELDS)
                writer.writeheader()
                writer.writerows(rows)

    # ----------------------------------------------------------------------------------------------------- step

    def train_step(self, group: list[dict[str, torch.Tensor] | None]) -> StepLog:
        """One optimizer step over this rank's micro-batches ``group`` (None: an empty or unreadable part); advances
        ``self.step`` and the scheduler."""
        began = time.perf_counter()
        t, world, engine = self.cfg.train, self.world, self.engine
        self._spare = next((b for b in reversed(group) if b is not None), self._spare)
        runnable, label_tokens = _step_batches(group, self._spare, world)
        seed_step(t.seed, self.step + 1, world.rank)
        autocast = torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=t.bf16)
        loss_sum, aux_sum, tokens = 0.0, 0.0, 0
        for i, batch in enumerate(runnable):
            batch = {k: v.to(world.device) for k, v in batch.items()}
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
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        loss_sum, tokens = world.sum([loss_sum, float(tokens)])
        loss = loss_sum / label_tokens if label_tokens else float("nan")
        rate = tokens / max(time.perf_counter() - began, 1e-9)
        return StepLog(loss, aux_sum / max(len(runnable), 1), lr, rate)

    def _groups(self) -> Iterator[list[dict[str, torch.Tensor] | None]]:
        """This rank's micro-batch groups from the current position on, epoch after epoch (advancing ``micro`` and
        ``epoch``)."""
        t = self.cfg.train
        while True:
            batches = rank_batches(len(self.dataset), t.batch_size, self.world, t.seed, self.epoch)
            # An own generator: a DataLoader otherwise draws its base seed from the global RNG.
            loader = iter(torch.utils.data.DataLoader(
                self.dataset, batch_sampler=batches[self.micro :], collate_fn=self.collate,
                num_workers=self.cfg.data.num_workers, generator=torch.Generator().manual_seed(t.seed),
            ))  # fmt: skip
            while self.micro < len(batches):
                group = []
                for _ in range(min(t.grad_accum, len(batches) - self.micro)):
                    batch, dropped = next(loader)  # (None, 0) for an empty part
                    group.append(batch)
                    self.skipped += dropped
                    self.micro += 1
                yield group
            self.epoch, self.micro = self.epoch + 1, 0

    # ----------------------------------------------------------------------------------------------------- save

    def save(self) -> Path:
        """A checkpoint of the current position (collective: every rank calls it)."""
        done_epoch = self.micro >= self.micro_per_epoch
        position = dict(step=self.step, epoch=self.epoch + done_epoch, samples=0 if done_epoch else
                        self.micro * self.global_micro, global_batch=self.global_batch,
                        world_size=self.world.size)  # fmt: skip
        t = self.cfg.train
        self.checkpoint = save_checkpoint(self.run_dir, self.step, self.engine, self.scheduler, position,
                                          t.keep_checkpoints)  # fmt: skip
        return self.checkpoint

    # ----------------------------------------------------------------------------------------------------- loop

    def train(self, stop_after: int | None = None) -> TrainResult:
        """Run steps until ``train.max_steps`` / ``train.epochs``, ``stop_after``, or a SIGINT / SIGTERM; each ends
        with a checkpoint."""
        t, world = self.cfg.train, self.world
        steps, losses = [], []
        bar = tqdm(total=self.total, initial=self.step, desc=f"train {self.run_dir.name}", unit="step",
                   disable=not (self.progress and world.main))  # fmt: skip
        log_file = self.log_path.open("a", newline="") if world.main else None
        stopped = None
        try:
            with StopSignals(announce=world.main) as signals:
                groups = self._groups()
                while self.step < self.total:
                    out = self.train_step(next(groups))
                    if log_file is not None:
                        csv.DictWriter(log_file, LOG_FIELDS).writerow(dict(
                            step=self.step, epoch=self.epoch, loss=f"{out.loss:.6f}", aux_loss=f"{out.aux_loss:.6f}",
                            lr=f"{out.lr:.3e}", tokens_per_s=f"{out.tokens_per_s:.1f}",
                        ))  # fmt: skip
                        log_file.flush()
                    steps.append(self.step)
                    losses.append(out.loss)
                    bar.update(1)
                    bar.set_postfix(loss=f"{out.loss:.3f}", tok_s=f"{out.tokens_per_s:.0f}", epoch=self.epoch)
                    # Every rank stops at the same step: a signal seen by any rank stops all of them.
                    if world.sum([float(signals.received is not None)])[0]:
                        stopped = signals.received or "a signal to another rank"
                    at_end = self.step >= self.total or self.step == stop_after or stopped is not None
                    if at_end or (t.save_every and self.step % t.save_every == 0):
                        self.save()
                    if at_end:
                        break
        finally:
            bar.close()
            if log_file is not None:
                log_file.close()
        self.skipped = int(world.sum([float(self.skipped)])[0])
        if self.skipped and world.main:
            log.warning("training skipped %d unreadable sample(s)\n%s", self.skipped, self.dataset.report.summary())
        world.barrier()
        return TrainResult(self.run_dir, steps, losses, self.total, self.checkpoint, self.skipped,
                           self.dataset.report, stopped)  # fmt: skip


def train(cfg: RunConfig, stop_after: int | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume) the run ``cfg.train.out`` on this process, or as one rank of a ``torchrun`` /
    ``accelerate launch`` job; ``stop_after`` ends after that step with a checkpoint, as an interruption would."""
    with hold_folder(cfg.train.out):  # one job writes into a run folder at a time
        return Trainer(cfg, progress).setup().train(stop_after)


def loss_summary(losses: Sequence[float], window: int = 10) -> str:
    """First and last loss, and the means of the first and last ``window`` steps (single steps are noisy)."""
    finite = [x for x in losses if not math.isnan(x)]
    if not finite:
        return "no steps run"
    k = min(window, max(1, len(finite) // 2))
    head, tail = float(np.mean(finite[:k])), float(np.mean(finite[-k:]))
    return (f"loss: first {finite[0]:.3f} -> last {finite[-1]:.3f} "
            f"(mean of first {k} steps {head:.3f}, last {k} steps {tail:.3f})")  # fmt: skip

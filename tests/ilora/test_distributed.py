"""Router losses and routing statistics reduced across data-parallel ranks equal those of the whole batch.

Two gloo processes each take half of a batch, wrapped in DDP: their ``aux_loss(model, group)``, their averaged
gradients and ``RoutingRecorder.usage(group)`` must match one process on the whole batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import get_peft_model
from safetensors.torch import load_file, save_file

import ilora

from .conftest import build, targets

BATCH = 16
ROUTINGS = {
    "soft": dict(routing="soft"),
    "top2": dict(routing="topk", top_k=2),
}


def _model(routing: str) -> torch.nn.Module:
    cfg = ilora.ILoraConfig(r=4, num_experts=4, target_modules=targets("mlp"), balance_loss_coef=0.3,
                            router_z_loss_coef=0.05, init_lora_weights=False, **ROUTINGS[routing])  # fmt: skip
    model = get_peft_model(build("mlp"), cfg)
    model.train()
    return model


def _batch() -> torch.Tensor:
    return torch.randn(BATCH, 13, generator=torch.Generator().manual_seed(3))


def _step(model: torch.nn.Module, x: torch.Tensor, world: int, group: dist.ProcessGroup | None) -> dict:
    """One training step's loss: the output term is a sum over the global batch, as DDP's averaging expects."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    with ilora.record_routing() as rec:
        y = model(x)
    aux = ilora.aux_loss(inner, group)
    (y.pow(2).sum() / BATCH * world + aux).backward()
    out = {"aux": aux.detach().reshape(1)}
    out.update({f"grad.{n}": p.grad for n, p in inner.named_parameters() if p.requires_grad})
    out.update({f"usage.{n}": u for n, u in rec.usage(group).items()})
    return out


def _worker(rank: int, world: int, init_file: str, routing: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model(routing))
        result = _step(model, _batch().chunk(world)[rank], world, dist.group.WORLD)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in result.items()}, out)
        del model  # DDP's reducer must go before its process group, or its destructor can wait forever
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(fn, args: tuple, nprocs: int, timeout_s: float = 120.0) -> None:
    """``mp.spawn`` that fails instead of hanging when a rank waits forever on a collective."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{nprocs} ranks did not finish within {timeout_s:.0f}s")


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_two_ranks_reduce_to_the_single_process_losses_and_gradients(tmp_path, routing: str) -> None:
    out = str(tmp_path / "rank0.safetensors")
    _spawn(_worker, (2, str(tmp_path / "rendezvous"), routing, out), nprocs=2)
    distributed = load_file(out)
    single = _step(_model(routing), _batch(), 1, None)
    assert set(distributed) == set(single)
    assert single["aux"].item() > 0.3  # the balance loss alone is >= 1 * 0.3
    for key, want in single.items():
        torch.testing.assert_close(distributed[key], want, rtol=1e-5, atol=1e-6, msg=key)


def test_without_a_group_each_rank_only_sees_its_own_tokens() -> None:
    model = _model("top2")
    x = _batch()
    model(x[: BATCH // 2])
    half = ilora.aux_loss(model)
    model(x)
    assert not torch.allclose(half, ilora.aux_loss(model))


def _trainer_losses(out: Path, processes: int, per_device: int, trainer: str) -> list[float]:
    worker = str(Path(__file__).with_name("trainer_worker.py"))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *launcher, worker, str(per_device), str(out), trainer]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "losses.json").read_text())


def test_trainer_under_torchrun_matches_one_process(tmp_path) -> None:
    # The logged loss includes the balance loss: per-rank aux losses (no reduction) differ here by ~1e-3 relative.
    # ILoraTrainer adds it in compute_loss; with the plain Trainer the model adds it to its own loss (weighted by the
    # call's share of the batch's label tokens, which is 1 here: no accumulation); TRL's SFTTrainer adds the model's
    # aux_loss to the loss it computes from log-probabilities. All match one process.
    single = _trainer_losses(tmp_path / "one", 1, 4, "ILoraTrainer")
    for trainer in ("ILoraTrainer", "Trainer", "SFTTrainer"):
        if trainer == "SFTTrainer":  # its fused log-probabilities round differently from the logits' cross-entropy
            single = _trainer_losses(tmp_path / "one_sft", 1, 4, trainer)
        two = _trainer_losses(tmp_path / trainer, 2, 2, trainer)
        assert len(single) == len(two) == 4
        torch.testing.assert_close(torch.tensor(two), torch.tensor(single), rtol=1e-5, atol=0, msg=trainer)

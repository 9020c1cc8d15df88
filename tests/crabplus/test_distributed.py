"""The recipe under torchrun with 2 gloo processes: DDP and FSDP match one process on the same global batch, the
saved adapter loads in one process, and a run resumes on a different number of processes."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from crabplus.data.scene import SynthConfig
from crabplus.data.synth import generate
from crabplus.distributed import _shard_units, rank_batches
from crabplus.models import ModelConfig, build_model
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load_file

import ilora  # noqa: F401  (registers the ILORA adapter type with PEFT, as a user's script does)

SUBSETS = ["ks", "meld", "s4"]
STEPS = 4
# Same data, same global batch of 8 (per process x accumulation x processes), dropout off (each rank draws its own
# dropout masks, so dropout cannot match across process counts). What differs is summation order: float32 noise,
# amplified a little by Adam over the steps.
LOSS_RTOL = 2e-4
WEIGHT_RTOL = 1e-2
BF16_RTOL = 2e-3  # bf16 matmuls round differently with the batch split (measured: about 4e-4)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 5), world=st.integers(1, 4), seed=st.integers(0, 9),
       epoch=st.integers(0, 3))  # fmt: skip
def test_rank_batches_split_the_one_process_batches(n: int, batch: int, world: int, seed: int, epoch: int) -> None:
    parts = [rank_batches(n, batch, world, seed, epoch, rank=r) for r in range(world)]
    whole = rank_batches(n, batch * world, 1, seed, epoch)
    assert all(len(p) == len(whole) for p in parts)  # every rank runs as many micro-batches
    for m, samples in enumerate(whole):
        assert [i for p in parts for i in p[m]] == samples
    assert sorted(i for b in whole for i in b) == list(range(n))


def test_fsdp_shards_the_language_model_blocks_only() -> None:
    model, _ = build_model(ModelConfig())
    units = _shard_units(model)
    decoder = model.get_base_model().model.language_model.layers
    assert units == list(decoder) and len(units) > 0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("avuie")
    generate(root, train=4, test=1, seed=0, subsets=SUBSETS, config=SynthConfig(size=32))
    return root


def _config(tmp: Path, data: Path) -> Path:
    cfg = {
        "data": {"root": str(data), "subsets": SUBSETS, "frame_size": 32},
        "model": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "num_experts": 2,
                  "ilora_extra": {"balance_loss_coef": 0.05, "router_z_loss_coef": 0.01}},
        "train": {"max_steps": STEPS, "lr": 1e-2, "warmup_ratio": 0.25, "device": "cpu", "threads": 1},
    }  # fmt: skip
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(
    config: Path, out: Path, processes: int, *overrides: str, stop_after: int | None = None, accelerate: bool = False
) -> list[dict]:
    """``crabplus train`` in ``processes`` torchrun (or ``accelerate launch``) processes, or plain python for one
    process; returns the log rows."""
    args = ["-m", "crabplus", "train", "--config", str(config), "--out", str(out), "--quiet"]
    args += [a for o in overrides for a in ("--set", o)]
    if stop_after:
        args += ["--stop-after", str(stop_after)]
    torchrun = processes > 1 or any("deepspeed" in o for o in overrides)  # DeepSpeed always wants a launcher
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if torchrun else []
    if accelerate:
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}",
                    "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
                    "--main_process_port=0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *launcher, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with (out / "train_log.csv").open() as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict], name: str) -> torch.Tensor:
    return torch.tensor([float(r[name]) for r in rows], dtype=torch.float64)


@pytest.fixture(scope="module")
def single(tmp_path_factory, data) -> tuple[Path, Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("single")
    config = _config(tmp, data)
    return config, tmp / "run", _run(config, tmp / "run", 1, "train.batch_size=4", "train.grad_accum=2")


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    return load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))


ZERO2 = Path(__file__).resolve().parents[2] / "examples" / "crabplus" / "configs" / "zero2.json"
STRATEGIES = {
    "ddp": ["train.strategy=ddp"],
    "fsdp": ["train.strategy=fsdp"],
    "deepspeed": ["train.strategy=deepspeed", f"train.deepspeed_config={ZERO2}"],
}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


@pytest.mark.parametrize(
    "strategy", [pytest.param(s, marks=needs_deepspeed if s == "deepspeed" else ()) for s in STRATEGIES]
)
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, single, strategy: str) -> None:
    config, single_run, reference = single
    rows = _run(config, tmp_path / "run", 2, "train.batch_size=2", "train.grad_accum=2", *STRATEGIES[strategy])
    assert [r["step"] for r in rows] == [str(s) for s in range(1, STEPS + 1)]
    want = _column(reference, "loss")
    assert want[-1] < want[0]  # it trains
    torch.testing.assert_close(_column(rows, "loss"), want, rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(_column(rows, "aux_loss"), _column(reference, "aux_loss"), rtol=LOSS_RTOL, atol=0)
    mine, theirs = _adapter(tmp_path / "run"), _adapter(single_run)
    assert mine.keys() == theirs.keys() and any("ilora_router" in k for k in mine)
    for key in mine:  # per tensor, relative: Adam's normalized steps turn float noise in tiny gradients into ~lr
        assert (mine[key] - theirs[key]).norm() <= WEIGHT_RTOL * theirs[key].norm(), key


def test_fsdp_mixed_precision_with_gradient_checkpointing_matches_one_process(tmp_path, data) -> None:
    # bf16 compute (autocast; FSDP gathers bf16 parameters, reduces float32 gradients) and recomputed activations.
    config = _config(tmp_path, data)
    both = ["train.bf16=true", "train.gradient_checkpointing=true"]
    reference = _run(config, tmp_path / "single", 1, "train.batch_size=4", "train.grad_accum=2", *both)
    rows = _run(config, tmp_path / "fsdp", 2, "train.batch_size=2", "train.grad_accum=2", "train.strategy=fsdp", *both)
    torch.testing.assert_close(_column(rows, "loss"), _column(reference, "loss"), rtol=BF16_RTOL, atol=0)
    torch.testing.assert_close(_column(rows, "aux_loss"), _column(reference, "aux_loss"), rtol=BF16_RTOL, atol=0)


def test_accelerate_launch_runs_the_same_job(tmp_path, single) -> None:
    config, _, reference = single
    rows = _run(config, tmp_path / "run", 2, "train.batch_size=2", "train.grad_accum=2", accelerate=True)
    torch.testing.assert_close(_column(rows, "loss"), _column(reference, "loss"), rtol=LOSS_RTOL, atol=0)


def test_the_adapter_saved_by_two_processes_loads_in_one(tmp_path, data) -> None:
    config = _config(tmp_path, data)
    _run(config, tmp_path / "run", 2, "train.batch_size=2", "train.strategy=fsdp", "train.max_steps=1")
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1] / "adapter"
    base, _ = build_model(ModelConfig(adapter="none", llm="frozen", audio="frozen", vision="frozen"))
    model = PeftModel.from_pretrained(base, str(ckpt))
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if ".ilora_" in k}
    assert len(saved) == len(loaded) > 0
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key


def test_a_run_resumes_on_another_number_of_processes(tmp_path, single) -> None:
    config, _, reference = single
    run = tmp_path / "run"
    _run(config, run, 2, "train.batch_size=2", "train.grad_accum=2", stop_after=2)
    rows = _run(config, run, 1, "train.batch_size=4", "train.grad_accum=2")
    torch.testing.assert_close(_column(rows, "loss"), _column(reference, "loss"), rtol=LOSS_RTOL, atol=0)
    with pytest.raises(AssertionError, match="global batch"):
        _run(config, tmp_path / "run", 1, "train.batch_size=2", "train.grad_accum=2", "train.max_steps=4")


@needs_deepspeed
def test_deepspeed_resumes_on_the_same_number_of_processes_and_refuses_another(tmp_path, single) -> None:
    config, _, reference = single
    run, split = tmp_path / "run", ["train.batch_size=2", "train.grad_accum=2", *STRATEGIES["deepspeed"]]
    _run(config, run, 2, *split, stop_after=2)
    rows = _run(config, run, 2, *split)
    torch.testing.assert_close(_column(rows, "loss"), _column(reference, "loss"), rtol=LOSS_RTOL, atol=0)
    with pytest.raises(AssertionError, match="same number of processes"):
        _run(config, run, 1, "train.batch_size=4", "train.grad_accum=2", *STRATEGIES["deepspeed"], "train.max_steps=4")

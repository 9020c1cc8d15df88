"""The compute-path choice (``ilora.paths.select_path``) as a table, the auto gate, and the one-time opt-in log."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ilora
from ilora import paths
from ilora.paths import DENSE_TOPK_MAX_EXTRA_RANK as EXTRA
from ilora.paths import PER_ROW_MAX_TOKENS as ROWS
from ilora.paths import ComputePath as P
from ilora.paths import DeviceFacts

CPU = DeviceFacts("cpu", triton_runnable=False)
CPU_INTERPRETER = DeviceFacts("cpu", triton_runnable=True)
GPU_NO_TRITON = DeviceFacts("cuda", triton_runnable=False, target="sm_90 with Triton None")
GPU_UNVALIDATED = DeviceFacts("cuda", triton_runnable=True, triton_validated=False, target="sm_80 with Triton 3.9")
GPU_VALIDATED = DeviceFacts("cuda", triton_runnable=True, triton_validated=True, target="sm_90 with Triton 3.9")

SOFT = dict(num_experts=3, routing="soft")
MOE = dict(num_experts=8, r=16, shared_a=False, routing="topk", top_k=2)  # (8 - 2) * 16 = 96 <= EXTRA
MANY = dict(num_experts=64, r=8, shared_a=False, routing="topk", top_k=4)  # 60 * 8 = 480 > EXTRA
TOP1 = dict(num_experts=3, r=8, routing="topk", top_k=1)
TOP1_WIDE = dict(num_experts=64, r=8, routing="topk", top_k=1)  # 63 * 8 > EXTRA
EDGE = dict(num_experts=EXTRA // 16 + 2, r=16, routing="topk", top_k=2)  # extra rank exactly EXTRA
PAST_EDGE = dict(num_experts=EXTRA // 16 + 2, r=16, routing="topk", top_k=1)  # extra rank EXTRA + 16

# (use_kernels, routing options, gate kind, tokens, device) -> path, why PyTorch runs where Triton would (a fragment)
TABLE = [
    ("torch", SOFT, "dense", 2048, GPU_VALIDATED, P.TORCH_SOFT, None),
    ("torch", MOE, "topk", 2048, GPU_VALIDATED, P.TORCH_TOPK, None),
    ("auto", SOFT, "dense", 2048, CPU, P.TORCH_SOFT, None),
    ("auto", MOE, "topk", 16, CPU, P.TORCH_TOPK, None),
    ("auto", SOFT, "dense", 2048, CPU_INTERPRETER, P.TORCH_SOFT, None),  # the interpreter only on request
    ("auto", SOFT, "dense", 2048, GPU_NO_TRITON, P.TORCH_SOFT, None),
    (
        "auto",
        SOFT,
        "dense",
        2048,
        GPU_UNVALIDATED,
        P.TORCH_SOFT,
        "not validated",
    ),  # the gate: PyTorch, and say how to opt in
    ("auto", MOE, "topk", 2048, GPU_UNVALIDATED, P.TORCH_TOPK, "not validated"),
    ("auto", TOP1, "topk", 1, GPU_UNVALIDATED, P.TORCH_TOPK, "not validated"),
    ("auto", SOFT, "dense", 2048, GPU_VALIDATED, P.TRITON_DENSE, None),
    ("auto", MOE, "topk", 2048, GPU_VALIDATED, P.TRITON_DENSE, None),  # few small experts: dense, zero gates
    ("auto", MANY, "topk", 2048, GPU_VALIDATED, P.TRITON_SORTED, None),
    ("auto", TOP1, "topk", 1, GPU_VALIDATED, P.TRITON_PER_ROW, None),
    ("auto", TOP1, "topk", ROWS, GPU_VALIDATED, P.TRITON_PER_ROW, None),  # the decode bound is inclusive
    ("auto", TOP1, "topk", ROWS + 1, GPU_VALIDATED, P.TRITON_DENSE, None),
    ("auto", TOP1_WIDE, "topk", ROWS + 1, GPU_VALIDATED, P.TRITON_SORTED, None),
    ("auto", MOE, "topk", 1, GPU_VALIDATED, P.TRITON_DENSE, None),  # per-row is top-1 only
    ("auto", EDGE, "topk", 2048, GPU_VALIDATED, P.TRITON_DENSE, None),  # the extra-rank bound is inclusive
    ("auto", PAST_EDGE, "topk", 2048, GPU_VALIDATED, P.TRITON_SORTED, None),
    ("triton", SOFT, "dense", 2048, GPU_UNVALIDATED, P.TRITON_DENSE, None),  # opting in skips the gate
    ("triton", MANY, "topk", 2048, GPU_UNVALIDATED, P.TRITON_SORTED, None),
    ("triton", TOP1, "topk", 8, CPU_INTERPRETER, P.TRITON_PER_ROW, None),
    ("triton", MOE, "topk", 2048, CPU_INTERPRETER, P.TRITON_DENSE, None),
    # Per-expert dropout while training (Crab): every expert reads its own copy of x; no kernel takes that.
    ("torch", SOFT, "per_expert_input", 2048, GPU_VALIDATED, P.TORCH_PER_EXPERT_INPUT, None),
    ("auto", SOFT, "per_expert_input", 2048, CPU, P.TORCH_PER_EXPERT_INPUT, None),
    ("auto", SOFT, "per_expert_input", 2048, GPU_UNVALIDATED, P.TORCH_PER_EXPERT_INPUT, "per-expert dropout"),
    ("auto", SOFT, "per_expert_input", 2048, GPU_VALIDATED, P.TORCH_PER_EXPERT_INPUT, "per-expert dropout"),
]


def _config(use_kernels: str, options: dict) -> ilora.ILoraConfig:
    return ilora.ILoraConfig(target_modules=["q"], use_kernels=use_kernels, **{"r": 8, **options})


@pytest.mark.parametrize(("use_kernels", "options", "kind", "tokens", "device", "path", "reason"), TABLE)
def test_select_path(use_kernels, options, kind, tokens, device, path, reason) -> None:
    choice = paths.select_path(_config(use_kernels, options), kind, tokens, device)
    assert choice.path is path
    assert (choice.reason is None) == (reason is None) and (choice.note is None) == (reason is None)
    if reason is not None:
        assert reason in choice.reason and choice.reason in choice.note
    if reason == "not validated":
        assert device.target in choice.note and "use_kernels='triton'" in choice.note
        assert "python -m benchmarks.kernel_check" in choice.note


@pytest.mark.parametrize("device", [CPU, GPU_NO_TRITON])
def test_triton_on_request_fails_where_it_cannot_run(device: DeviceFacts) -> None:
    with pytest.raises(RuntimeError, match=f"Triton cannot run on {device.type} tensors"):
        paths.select_path(_config("triton", SOFT), "dense", 16, device)


def test_the_triton_path_follows_the_experts_per_token_the_gate_returned() -> None:
    # A user's gate may return more slots than config.top_k: one expert per row would drop the others.
    gpu = DeviceFacts("cuda", True, True)
    config = _config("triton", dict(num_experts=8, routing="topk", top_k=1, r=64))
    assert paths.select_path(config, "topk", 16, gpu).path is paths.ComputePath.TRITON_PER_ROW
    assert paths.select_path(config, "topk", 16, gpu, slots=8).path is paths.ComputePath.TRITON_DENSE
    assert paths.select_path(config, "topk", 16, gpu, slots=2).path is paths.ComputePath.TRITON_SORTED


def test_unknown_gate_kind_is_named() -> None:
    with pytest.raises(ValueError, match="gates_kind must be 'dense', 'topk' or 'per_expert_input', got 'sparse'"):
        paths.select_path(_config("auto", SOFT), "sparse", 16, CPU)


@pytest.mark.parametrize("device", [CPU, CPU_INTERPRETER, GPU_NO_TRITON, GPU_UNVALIDATED, GPU_VALIDATED])
def test_triton_on_request_refuses_per_expert_dropout_everywhere(device: DeviceFacts) -> None:
    with pytest.raises(RuntimeError, match="no Triton kernel for per-expert dropout"):
        paths.select_path(_config("triton", SOFT), "per_expert_input", 16, device)


@pytest.mark.parametrize("use_kernels", ["auto", "torch", "triton"])
def test_crab_training_and_eval_honour_use_kernels_alike(use_kernels: str, monkeypatch) -> None:
    """Crab's per-expert dropout (training only) goes through the same path choice as eval: with
    ``use_kernels="triton"`` both refuse on CPU, instead of training silently on PyTorch."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    config = ilora.ILoraConfig.crab(target_modules=["q"], use_kernels=use_kernels)
    layer = ilora.Linear(torch.nn.Linear(16, 16), "default", config)
    x = torch.randn(2, 4, 16)
    for training in (True, False):
        layer.train(training)
        if use_kernels == "triton":
            with pytest.raises(RuntimeError, match="per-expert dropout" if training else "Triton cannot run on cpu"):
                layer(x)
        else:
            assert layer(x).shape == (2, 4, 16)


def test_the_per_row_kernel_shares_the_decode_bound() -> None:
    pytest.importorskip("triton")
    from ilora.kernels import per_row

    assert per_row.PER_ROW_MAX_TOKENS is paths.PER_ROW_MAX_TOKENS


def test_auto_on_an_unvalidated_gpu_runs_torch_and_logs_once(monkeypatch, caplog) -> None:
    """The layer under ``auto`` on a GPU the gate refuses: the PyTorch op runs, one log line says how to opt in."""
    monkeypatch.setattr(paths, "device_facts", lambda x: GPU_UNVALIDATED)
    monkeypatch.setattr(paths, "_logged", set())
    ran = []
    real = paths.functional.soft_routed_lora
    monkeypatch.setattr(paths.functional, "soft_routed_lora", lambda *a, **k: ran.append(1) or real(*a, **k))
    layer = ilora.Linear(torch.nn.Linear(8, 6), "default", _config("auto", SOFT))
    with caplog.at_level(logging.WARNING, logger="ilora.paths"):
        for _ in range(3):
            layer(torch.randn(4, 8))
    assert len(ran) == 3
    notes = [r.getMessage() for r in caplog.records if r.name == "ilora.paths"]
    assert len(notes) == 1 and "not validated on sm_80 with Triton 3.9" in notes[0]


def test_device_facts_on_cpu(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    facts = paths.device_facts(torch.zeros(1))
    assert facts == DeviceFacts("cpu", triton_runnable=False)


class _OpCount(TorchDispatchMode):
    """Counts every aten op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


PRESET_CONFIGS = {
    "crabplus": ilora.ILoraConfig.crabplus,
    "crab": ilora.ILoraConfig.crab,  # per-expert dropout while training: one input per expert
    "hydralora": ilora.ILoraConfig.hydralora,
    "mixlora": ilora.ILoraConfig.mixlora,
    "loramoe": ilora.ILoraConfig.loramoe,
    "mola": lambda **kw: ilora.ILoraConfig.mola(num_layers=4, **kw),
}


def _ops_of_a_training_step(preset: str, experts: int, width: int) -> int:
    config = PRESET_CONFIGS[preset](r=4, num_experts=experts, use_kernels="torch")
    torch.manual_seed(0)
    layer = ilora.Linear(torch.nn.Linear(width, width), "default", config).train()
    x = torch.randn(2, 24, width)
    with _OpCount() as ops:
        layer(x).sum().backward()
    return ops.count


@pytest.mark.parametrize("preset", list(PRESET_CONFIGS))
@pytest.mark.parametrize("width", [32, 30])  # 32: top-k on torch's grouped GEMMs; 30 (unaligned rows): without them
def test_the_pytorch_path_runs_no_loop_over_experts(preset: str, width: int) -> None:
    """The op count of a training step (forward and backward) does not grow with the number of experts: no preset's
    PyTorch path loops over experts (48 tokens reach every one of 8 experts)."""
    assert _ops_of_a_training_step(preset, 2, width) == _ops_of_a_training_step(preset, 8, width)


@pytest.mark.parametrize("dtype", [torch.float64])
def test_a_dtype_no_kernel_takes_falls_back_with_its_reason_or_is_refused(dtype: torch.dtype) -> None:
    auto = paths.select_path(_config("auto", MOE), "topk", 2048, GPU_VALIDATED, dtype=dtype)
    assert auto.path is P.TORCH_TOPK and "float64" in auto.reason and auto.reason in auto.note
    for kind in ("dense", "topk"):
        with pytest.raises(RuntimeError, match="use_kernels='triton' but there is no Triton kernel for float64"):
            paths.select_path(_config("triton", MOE), kind, 16, GPU_VALIDATED, dtype=dtype)
    for ok in paths.TRITON_DTYPES:
        assert paths.select_path(_config("auto", MOE), "topk", 2048, GPU_VALIDATED, dtype=ok).reason is None


def test_each_fallback_reason_is_logged_once_per_process(monkeypatch, caplog) -> None:
    """A validated GPU (faked: the PyTorch ops run on CPU): a float64 layer and Crab's per-expert dropout in training
    each fall back to PyTorch, and each reason is logged once however many calls and layers meet it."""
    monkeypatch.setattr(paths, "device_facts", lambda x: GPU_VALIDATED)
    monkeypatch.setattr(paths, "_logged", set())
    wide = ilora.Linear(torch.nn.Linear(8, 6).double(), "default", _config("auto", MOE)).double()
    crab = [ilora.Linear(torch.nn.Linear(8, 6), "default", ilora.ILoraConfig.crab(target_modules=["q"])) for _ in "ab"]
    with caplog.at_level(logging.WARNING, logger="ilora.paths"):
        for _ in range(3):
            wide(torch.randn(4, 8, dtype=torch.float64))
            for layer in crab:
                layer.train()(torch.randn(4, 8))
    notes = [r.getMessage() for r in caplog.records if r.name == "ilora.paths"]
    assert len(notes) == 2, notes
    assert "no Triton kernel for float64" in notes[0] and "per-expert dropout" in notes[1]

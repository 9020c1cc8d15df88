"""Where the kernels can run, the optional triton import, and the torch.library registration (opcheck, torch.compile).

The ops are ``torch.library.custom_op``s (opaque to the compiler) rather than ``triton_op``s: tracing a ``triton_op``
runs ``wrap_triton`` under fake tensors, and on CPU the interpreter then reads data pointers that fake tensors do not
have. Opaque ops trace the same way on CPU (interpreter) and CUDA, with ``register_fake`` giving the shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ilora.kernels as K
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _inputs(device, dtype=torch.float32, T=9, d_in=12, d_out=10, r=4, E=3, k=2):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return {
        "x": rand(T, d_in),
        "A_shared": rand(1, d_in, r, scale=d_in**-0.5),
        "A": rand(E, d_in, r, scale=d_in**-0.5),
        "B": rand(E, r, d_out, scale=r**-0.5),
        "gates": rand(T, E).softmax(-1),
        "weights": rand(T, k).sigmoid(),
        "indices": torch.rand(T, E, generator=g).argsort(-1)[:, :k].to(device),
        "ids": torch.randint(0, E, (T,), generator=g).to(device),
        "base": rand(T, d_out),
    }


def _run_subprocess(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd="/", env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rule")
def test_triton_runnable_on_cpu_follows_the_interpreter_variable(monkeypatch):
    x = torch.zeros(2, 3)
    assert K.triton_runnable(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not K.triton_runnable(x)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.soft_routed_lora(x, torch.zeros(1, 3, 2), torch.zeros(2, 2, 4), torch.zeros(2, 2), 1.0)


@pytest.mark.no_triton_ok
def test_imports_and_fails_clearly_without_triton():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    _run_subprocess(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        import ilora.kernels as K
        x, A, B = torch.zeros(2, 3), torch.zeros(1, 3, 2), torch.zeros(2, 2, 4)
        assert not K.triton_runnable(x)
        try:
            K.topk_routed_lora(x, A, B, torch.ones(2, 1), torch.zeros(2, 1).long(), 1.0)
        except RuntimeError as e:
            assert "needs triton" in str(e), e
        else:
            raise AssertionError("no error without triton")
        """,
        env,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is the CPU path")
def test_interpreter_variable_set_after_triton_was_imported():
    """The whole-suite case: peft imported triton (compiled mode) before TRITON_INTERPRET was set."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    _run_subprocess(
        """
        import os, sys
        import peft, torch
        import ilora.kernels as K
        assert "triton" in sys.modules
        x = torch.randn(5, 8, requires_grad=True)
        A, B = torch.randn(3, 8, 4), torch.randn(3, 4, 6)
        idx = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
        w, ids, g = torch.rand(5, 2), idx[:, 0].contiguous(), torch.rand(5, 3)
        assert not K.triton_runnable(x)
        os.environ["TRITON_INTERPRET"] = "1"
        assert K.triton_runnable(x)
        for fn, ref, args in [
            (K.soft_routed_lora, K.soft_routed_lora_ref, (x, A, B, g, 0.5)),
            (K.topk_routed_lora, K.topk_routed_lora_ref, (x, A, B, w, idx, 0.5)),
            (K.per_row_routed_lora, K.per_row_routed_lora_ref, (x, A, B, ids, 0.5)),
        ]:
            out, expected = fn(*args), ref(*args)
            torch.testing.assert_close(out, expected)
            torch.testing.assert_close(*(torch.autograd.grad(o.sum(), x)[0] for o in (out, expected)))
        """,
        env,
    )


def _op_cases(t):
    ops, s = torch.ops.ilora, 0.5
    return [
        (ops.soft_routed_lora.default, (t["x"], t["A"], t["B"], t["gates"], s, t["base"])),
        (ops.soft_routed_lora.default, (t["x"], t["A_shared"], t["B"], t["gates"], s, None)),
        (ops.topk_routed_lora.default, (t["x"], t["A"], t["B"], t["weights"], t["indices"], s, t["base"])),
        (ops.topk_routed_lora.default, (t["x"], t["A_shared"], t["B"], t["weights"], t["indices"], s, None)),
        (ops.per_row_routed_lora.default, (t["x"], t["A"], t["B"], t["ids"], s, t["base"])),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(device, case):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of every registered op."""
    op, args = _op_cases(_inputs(device))[case]
    args = tuple(a.requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    torch.library.opcheck(op, args)


def test_torch_compile_matches_eager(device):
    """One compiled graph using all three ops, forward and backward, against eager."""
    t = _inputs(device)
    leaves = [t[k].requires_grad_() for k in ("x", "A", "B", "gates", "weights", "base")]

    def model(x, A, B, gates, weights, base):
        y1 = K.soft_routed_lora(x, A, B, gates, 0.5, base_out=base)
        # the transposed experts map d_out back to d_in (and exercise strided weights)
        y2 = K.topk_routed_lora(torch.tanh(y1), B.transpose(1, 2), A.transpose(1, 2), weights, t["indices"], 2.0)
        return K.per_row_routed_lora(y2, A, B, t["ids"], 1.5, base_out=y1).square().sum()

    eager = torch.autograd.grad(model(*leaves), leaves)
    compiled_model = torch.compile(model, fullgraph=True)
    compiled = torch.autograd.grad(compiled_model(*leaves), leaves)
    for got, want in zip(compiled, eager):  # the compiled graph may order the elementwise glue differently
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

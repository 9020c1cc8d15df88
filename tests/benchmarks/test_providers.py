"""Fast checks of the benchmark suite: providers compute the same thing, the counters and formulas are right, and
the report writer produces valid files. Timings themselves are not asserted."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from benchmarks import flops, harness, providers, report
from benchmarks.providers import PROVIDERS, SHAPES, build, expert_grads, make_problem, skip_reason
from ilora import functional as IF

T, D = 24, 40  # small, and d < r for crabplus: a transposed layout would fail loudly


def _reference(p: providers.Problem) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """ilora's functional math on leaf copies; returns the output and the grads of (x, A, B, router)."""
    x, A, B, router = (t.detach().clone().requires_grad_(True) for t in (p.x, p.A, p.B, p.router))
    g = providers.route(x, router.T, p.shape)
    if g.dense is not None:
        delta = IF.soft_routed_lora(x, A, B, g.dense.to(x.dtype), p.scaling)
    else:
        delta = IF.topk_routed_lora(x, A, B, g.weights.to(x.dtype), g.indices, p.scaling)
    out = x @ p.weight.T + delta
    out.backward(p.dy)
    return out.detach(), [x.grad, A.grad, B.grad, router.grad]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", [n for n, (_, _, routed) in PROVIDERS.items() if routed])
def test_routed_provider_matches_ilora_reference(name: str, shape: str) -> None:
    p = make_problem(SHAPES[shape], T, D, seed=3)
    if (why := skip_reason(name, p)) is not None:
        pytest.skip(why)
    ref_out, ref_grads = _reference(p)
    module = build(name, p)
    p.x.grad = None
    out = module(p.x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    out.backward(p.dy)
    grads = [p.x.grad, *expert_grads(module)]
    for got, want, what in zip(grads, ref_grads, ("x", "A", "B", "router")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, w=what: f"grad of {w}: {m}")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_base_and_peft_match_their_own_math(shape: str) -> None:
    p = make_problem(SHAPES[shape], T, D, seed=4)
    base = build("base", p)
    torch.testing.assert_close(base(p.x), p.x @ p.weight.T)
    assert not any(q.requires_grad for q in base.parameters()), "the base weight must stay frozen"
    peft = build("peft_lora", p)
    torch.testing.assert_close(peft(p.x), peft.reference(p.x), rtol=1e-5, atol=1e-5)
    lora_A = peft.proj.lora_A["default"].weight
    assert lora_A.shape == (SHAPES[shape].experts * SHAPES[shape].rank, D), "PEFT gets rank E*r"
    (lora_A_ref,) = torch.autograd.grad((peft.reference(p.x) * p.dy).sum(), [lora_A])
    peft(p.x).backward(p.dy)
    torch.testing.assert_close(lora_A.grad, lora_A_ref, rtol=1e-4, atol=1e-5)


def test_providers_share_the_frozen_base_weight() -> None:
    p = make_problem(SHAPES["moe"], T, D)
    for name in ("base", "ilora_torch", "authors_loop", "peft_lora", "grouped_mm", "dense_all"):
        weights = [q for q in build(name, p).parameters() if not q.requires_grad]
        assert [w.data_ptr() for w in weights] == [p.weight.data_ptr()], name


def test_triton_provider_skips_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_problem(SHAPES["crabplus"], T, D)
    if not torch.cuda.is_available():
        assert "CUDA" in skip_reason("ilora_triton", p)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "ilora.kernels", types.ModuleType("ilora.kernels"))
    assert "lacks soft_routed_lora" in skip_reason("ilora_triton", p)


def test_saved_bytes_counter_hand_checked() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(3, 7))
    resident = [x.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()]

    def fn() -> torch.Tensor:
        y = torch.sigmoid(x @ w)  # mm saves x and w (resident); sigmoid saves y: 5*7 floats
        return y * y + y[:, :2].sum()  # y saved again, and a view of it: same storage, not counted twice

    assert harness.count_saved_bytes(fn, resident) == 5 * 7 * 4
    assert harness.count_saved_bytes(fn) == (5 * 3 + 3 * 7 + 5 * 7) * 4


def test_saved_bytes_of_the_crabplus_providers() -> None:
    s = SHAPES["crabplus"]
    E, r, t, d = s.experts, s.rank, 32, 64
    p = make_problem(s, t, d)
    assert harness.saved_bytes(build("base", p), p) == 0  # the frozen base keeps only its weight for dx
    # authors: h = x A [t, r], each head's B_i h [t, d] (kept for the gate's grad), the gates [t, E] (one storage)
    assert harness.saved_bytes(build("authors_loop", p), p) == 4 * t * (r + E * d + E)
    # ilora: h [t, r], the gates [t, E] and the scaled gates [t, E], and h*g flattened [t, E*r] for the expand's
    # weight grad; no [t, d] tensor
    assert harness.saved_bytes(build("ilora_torch", p), p) == 4 * t * (r + 2 * E + E * r)


def test_flop_floor_formula() -> None:
    s, t, d = SHAPES["crabplus"], 2048, 1024
    assert flops.base_flops(t, d, d) == 2 * t * d * d
    # router 3 + shrink r=128 (shared A, once) + expand 3 heads * 128, per token and input/output width
    assert flops.adapter_flops(s, t, d, d) == 2 * t * d * (3 + 128 + 3 * 128)
    ratio = 515 / 1024
    assert flops.flop_floor(1.0, s, t, d, d, "fwd") == pytest.approx(1 + ratio)
    assert flops.flop_floor(1.0, s, t, d, d, "bwd") == pytest.approx(1 + 2 * ratio)
    assert flops.flop_floor(2.0, s, t, d, d, "fwd+bwd") == pytest.approx(2 * (1 + 1.5 * ratio))
    moe = SHAPES["moe"]  # 8 router columns, top-2 of per-expert A and B with r=16
    assert flops.flop_ratio(moe, t, d, d, "fwd") == pytest.approx((8 + 2 * 16 + 2 * 16) / 1024)


def _row(provider: str, **kw: float) -> dict:
    keys = dict(shape="crabplus", tokens=2048, d=1024, dtype="float32", device="cpu", mode="fwd", provider=provider)
    return {**keys, **kw}


def test_targets_marked() -> None:
    rows = [
        _row("ilora_torch", x_floor=1.02, adapter_s=0.5, saved_bytes=10),
        _row("authors_loop", x_floor=2.0, adapter_s=1.0, saved_bytes=90),
    ]
    got = {t["target"]: t for t in report.evaluate_targets(rows)}
    cpu = "CPU fp32 crabplus T=2048 fwd"
    assert got[f"{cpu}: ilora_torch x FLOP floor"]["met"] is True
    assert got[f"{cpu}: ilora adapter time / authors' adapter time"]["value"] == pytest.approx(0.5)
    assert got["CPU crabplus T=2048: ilora saved bytes / (authors' / 3)"]["met"] is True  # 10 <= 90 / 3
    assert got[f"{cpu.replace('fwd', 'fwd+bwd')}: ilora_torch x FLOP floor"]["met"] is None
    gpu = [t for name, t in got.items() if name.startswith("GPU")]
    assert gpu and all(t["met"] is None and "no GPU" in t["note"] for t in gpu)
    rows[0]["x_floor"] = 1.2
    assert not report.evaluate_targets(rows)[0]["met"]
    assert "MISSED" in report.format_targets(report.evaluate_targets(rows))


def test_run_case_and_report_files(tmp_path) -> None:
    names = ["base", "ilora_torch", "ilora_triton", "authors_loop", "grouped_mm"]
    rows = harness.run_case(
        SHAPES["moe"], 16, 32, torch.float32, "cpu", ["fwd", "fwd+bwd"], names, rounds=3, min_round_s=0.002
    )
    measured = [r for r in rows if "skipped" not in r]
    assert {(r["provider"], r["mode"]) for r in measured} >= {("ilora_torch", "fwd+bwd"), ("base", "fwd")}
    for r in measured:
        assert r["rounds"] == 3 and r["q1_s"] <= r["median_s"] <= r["q3_s"] and r["median_s"] > 0
        assert r["max_abs_err"] is None or r["max_abs_err"] < 1e-4
    assert next(r for r in measured if r["provider"] == "base")["x_base"] == 1.0
    env = report.environment(threads=torch.get_num_threads())
    data = report.write_json(tmp_path / "r.json", env, {"preset": "test"}, rows)
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded == json.loads(json.dumps(data))
    assert {"date", "machine", "versions", "commit"} <= loaded["environment"].keys()
    assert loaded["environment"]["versions"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    report.plot(rows, tmp_path / "r.png", title="test")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.format_table(rows)
    assert "| moe | 16 | fwd+bwd | ilora_torch |" in table
    if not torch.cuda.is_available():
        assert "skipped: ilora_triton" in table


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_providers_bf16_on_gpu(shape: str) -> None:
    """bf16 on GPU: each routed provider's error to the fp32 reference at most twice ilora_torch's, plus atol."""
    p = make_problem(SHAPES[shape], 256, 512, dtype=torch.bfloat16, device="cuda")
    ref = harness.reference_output(p)
    with torch.no_grad():
        err_torch = (build("ilora_torch", p)(p.x).float() - ref).abs().max().item()
        for name in (n for n, (_, _, routed) in PROVIDERS.items() if routed):
            if skip_reason(name, p) is None:
                err = (build(name, p)(p.x).float() - ref).abs().max().item()
                assert err <= 2 * err_torch + 5e-2, (name, err, err_torch)


@pytest.mark.parametrize("name", ["ilora_triton", "ilora_triton_sorted"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_triton_provider_through_the_interpreter(name: str, shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CUDA the benchmark skips the Triton providers (interpreted timings mean nothing), but their wiring is
    checked: the same modules through the Triton interpreter, on a tiny problem, against the reference."""
    kernels = pytest.importorskip("ilora.kernels")
    pytest.importorskip("triton")
    if not hasattr(kernels, "triton_runnable"):
        pytest.skip("ilora.kernels has no kernels yet")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = make_problem(SHAPES[shape], 6, 16, seed=5)
    if name == "ilora_triton_sorted" and p.shape.top_k is None:
        assert skip_reason(name, p) == "soft routing has no sorted variant"
        return
    ref_out, ref_grads = _reference(p)
    module = providers.IloraLinear(p, "triton") if name == "ilora_triton" else providers.TritonSortedTopK(p)
    p.x.grad = None
    out = module(p.x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    out.backward(p.dy)
    for got, want in zip([p.x.grad, *expert_grads(module)], ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_table_lists_every_distinct_skip_reason() -> None:
    rows = [{"provider": "p", "skipped": why} for why in ("no GPU", "soft routing", "no GPU")]
    assert report.format_table(rows).endswith("skipped: p: no GPU; soft routing")

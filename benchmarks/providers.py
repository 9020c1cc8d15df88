"""The shapes, the shared inputs and every provider (implementation of one routed-LoRA linear) the suite compares.

A provider is an ``nn.Module`` mapping ``x [T, d_in]`` to ``y [T, d_out] = x W^T + delta(x)``. All providers of one
run are built from the same :class:`Problem`: the same ``x``, the same frozen base weight (one storage), the same
router weight (so the same logits) and, where the parameter layout allows, the same experts ``A``, ``B``. Every routed
provider computes its router from ``x`` inside its forward, so timings include routing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import ilora
from ilora import paths
from ilora.paths import Choice
from ilora.router import Gates, gate

__all__ = [
    "PRESETS", "PROVIDERS", "SHAPES", "Problem", "Shape", "build", "expert_grads", "ilora_choice", "make_problem",
    "preset_shape", "route", "skip_reason",
]  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """One routed-LoRA configuration: experts, rank, A shared or per expert, soft (top_k None) or top-k routing."""

    name: str
    experts: int
    rank: int
    shared_a: bool
    top_k: int | None = None

    @property
    def routing(self) -> str:
        return "soft" if self.top_k is None else "topk"

    @property
    def active(self) -> int:
        """Experts each token goes through."""
        return self.experts if self.top_k is None else self.top_k


PRESETS = ("crabplus", "crab", "hydralora", "mixlora", "loramoe", "mola")


def preset_shape(name: str) -> Shape:
    """The layer shape of ``ilora.ILoraConfig.<name>()``: its experts (MoLA: the top layers' 8), rank, A layout and
    gate. What the layer benchmark leaves out of a preset: its dropout (no provider pays dropout) and targets."""
    config = getattr(ilora.ILoraConfig, name)()
    top_k = config.top_k if config.routing == "topk" else None
    return Shape(name, experts=config.num_experts, rank=config.r, shared_a=config.shared_a, top_k=top_k)


SHAPES: dict[str, Shape] = {
    "crabplus": Shape("crabplus", experts=3, rank=128, shared_a=True),
    "moe": Shape("moe", experts=8, rank=16, shared_a=False, top_k=2),
    "many": Shape("many", experts=64, rank=8, shared_a=False, top_k=4),
    # Every preset, from its config (crabplus is the same shape as above: one entry).
    **{name: preset_shape(name) for name in PRESETS if name != "crabplus"},
}


@dataclass
class Problem:
    """The inputs every provider of one measurement shares."""

    shape: Shape
    x: torch.Tensor  # [T, d_in], requires grad: the layer sits inside a network, so backward computes dx
    weight: torch.Tensor  # [d_out, d_in] frozen base weight
    router: torch.Tensor  # [d_in, E]; ilora and the baselines take its transpose, the nn.Linear layout
    A: torch.Tensor  # [E_A, d_in, r]
    B: torch.Tensor  # [E, r, d_out], random: a zero B would hide wrong expert math in the correctness tests
    scaling: float
    dy: torch.Tensor  # [T, d_out] upstream gradient for backward

    @property
    def tokens(self) -> int:
        return self.x.shape[0]

    @property
    def d_in(self) -> int:
        return self.x.shape[1]

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]


def make_problem(
    shape: Shape,
    tokens: int,
    d: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    d_out: int | None = None,
) -> Problem:
    """Random inputs for ``shape`` at ``tokens x d`` (``d_out`` defaults to ``d``), seeded for reproducibility."""
    g = torch.Generator().manual_seed(seed)
    d_out = d if d_out is None else d_out
    E, r = shape.experts, shape.rank

    def rand(*size: int, bound: float) -> torch.Tensor:
        return ((torch.rand(*size, generator=g) * 2 - 1) * bound).to(device=device, dtype=dtype)

    x = torch.randn(tokens, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    return Problem(
        shape=shape,
        x=x,
        weight=rand(d_out, d, bound=d**-0.5),
        router=rand(d, E, bound=d**-0.5),
        A=rand(1 if shape.shared_a else E, d, r, bound=d**-0.5),
        B=rand(E, r, d_out, bound=r**-0.5),
        scaling=2.0,  # alpha = 2 r, as in Crab and Crab+
        dy=torch.randn(tokens, d_out, generator=g).to(device=device, dtype=dtype),
    )


def route(x: torch.Tensor, router: torch.Tensor, shape: Shape) -> Gates:
    """ilora's routing math (float32 logits, softmax, top-k renormalized) so every provider routes identically.

    ``router`` is ``[E, d_in]``, the ``nn.Linear`` layout: with it autograd computes the weight gradient as
    ``dlogits^T @ x``, which on CPU is ~50x faster than ``x^T @ dlogits`` for E of a few (see README).
    """
    logits = F.linear(x, router).float()
    return gate(logits, shape.routing, shape.top_k or shape.experts, 1.0)


def _frozen_linear(p: Problem) -> nn.Linear:
    lin = nn.Linear(p.d_in, p.d_out, bias=False, device="meta")
    lin.weight = nn.Parameter(p.weight, requires_grad=False)  # shares the storage: one base weight for all
    return lin


class BaseLinear(nn.Module):
    """The frozen base linear alone: the anchor every ratio refers to."""

    def __init__(self, p: Problem) -> None:
        super().__init__()
        self.base = _frozen_linear(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)


class IloraLinear(nn.Module):
    """ilora's routed ``Linear`` (the real module users get) with ``use_kernels`` fixed to one path."""

    def __init__(self, p: Problem, use_kernels: str) -> None:
        super().__init__()
        s = p.shape
        config = ilora.ILoraConfig(
            r=s.rank, lora_alpha=p.scaling * s.rank, num_experts=s.experts, shared_a=s.shared_a,
            routing=s.routing, top_k=s.top_k or 1, use_kernels=use_kernels,
            check_router_logits=False,  # a host sync per call on GPU; the other providers do not check either
        )  # fmt: skip
        self.layer = ilora.Linear(_frozen_linear(p), "default", config)
        with torch.no_grad():
            self.layer.ilora_A["default"].copy_(p.A)
            self.layer.ilora_B["default"].copy_(p.B)
            self.layer.ilora_router["default"].weight.copy_(p.router.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class AuthorsLoop(nn.Module):
    """The authors' I-LoRA forward (REFERENCE.md section 1), written here: their module layout (``nn.Linear`` A,
    one ``nn.Linear`` per B head, ``lora_route``) and a Python loop over heads, each adding a full ``[T, out]``.

    The authors only route softly; for top-k shapes the heads are weighted by the dense top-k gates (zeros for the
    unchosen), which is what their loop would compute given those weights.
    """

    def __init__(self, p: Problem) -> None:
        super().__init__()
        self.base, self.shape, self.scaling = _frozen_linear(p), p.shape, p.scaling
        self.lora_A = nn.ModuleList(_linear_from(a.T) for a in p.A)  # weight [r, in]
        self.lora_B = nn.ModuleList(_linear_from(b.T) for b in p.B)  # weight [out, r]
        self.lora_route = _linear_from(p.router.T)  # weight [E, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        logits = self.lora_route(x).float()
        w = gate(logits, self.shape.routing, self.shape.top_k or 1, 1.0).to_dense(self.shape.experts).to(x.dtype)
        h = self.lora_A[0](x) if self.shape.shared_a else None
        for i, lora_B in enumerate(self.lora_B):
            hi = h if h is not None else self.lora_A[i](x)
            result = result + w[:, i : i + 1] * lora_B(hi) * self.scaling
        return result


def _linear_from(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach().contiguous().clone())
    return lin


class PeftLora(nn.Module):
    """PEFT's plain LoRA with rank ``E * r``: the same adapter budget without routing, what users run today.

    Its output differs from the routed providers' by design; its A and B are its own (per-expert A's concatenated
    and B's stacked where the layout allows, random otherwise).
    """

    def __init__(self, p: Problem) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        E, r = p.shape.experts, p.shape.rank
        holder = nn.Module()
        holder.proj = _frozen_linear(p)
        config = LoraConfig(r=E * r, lora_alpha=p.scaling * E * r, target_modules=["proj"], lora_dropout=0.0)
        # PEFT would upcast the adapter to fp32 under a bf16 base; keep it in the base dtype like every provider.
        self.model = get_peft_model(holder, config, autocast_adapter_dtype=False)
        self.proj = self.model.base_model.model.proj
        a = p.A.permute(1, 0, 2).reshape(p.d_in, -1) if not p.shape.shared_a else None
        with torch.no_grad():
            if a is not None:
                self.proj.lora_A["default"].weight.copy_(a.T)
            else:
                self.proj.lora_A["default"].weight.uniform_(-(p.d_in**-0.5), p.d_in**-0.5)
            self.proj.lora_B["default"].weight.copy_(p.B.reshape(E * r, p.d_out).T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Plain LoRA math on this provider's own weights, for the correctness tests."""
        a, b = self.proj.lora_A["default"].weight, self.proj.lora_B["default"].weight
        return F.linear(x, self.proj.base_layer.weight) + (x @ a.T @ b.T) * self.proj.scaling["default"]


class GroupedMM(nn.Module):
    """Top-k routing through ``torch.nn.functional.grouped_mm``: (token, expert) pairs sorted by expert, then one
    grouped GEMM per projection. Soft shapes route every token to every expert (k = E) with the softmax weights."""

    def __init__(self, p: Problem) -> None:
        super().__init__()
        self.base, self.shape, self.scaling = _frozen_linear(p), p.shape, p.scaling
        # Stored [E, out, in] and passed transposed: the column-major right operand grouped GEMMs expect on CUDA.
        self.A_t = nn.Parameter(p.A.detach().transpose(1, 2).contiguous())
        self.B_t = nn.Parameter(p.B.detach().transpose(1, 2).contiguous())
        self.router = nn.Parameter(p.router.detach().T.contiguous())  # [E, d_in], see route()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        E, T = self.shape.experts, x.shape[0]
        A, B = self.A_t.transpose(1, 2), self.B_t.transpose(1, 2)
        g = route(x, self.router, self.shape)
        if g.dense is not None:
            weights, indices = g.dense, torch.arange(E, device=x.device).expand(T, E)
        else:
            weights, indices = g.weights, g.indices
        k = indices.shape[1]
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
        # A shared A shrinks once, then gathers the narrow rows; per-expert A's gather x first.
        h = (x @ A[0])[token] if A.shape[0] == 1 else _grouped_mm(x[token], A, offs)
        h = h * weights.reshape(-1)[order].to(h.dtype).unsqueeze(-1)
        y = _grouped_mm(h, B, offs)
        return self.base(x).index_add_(0, token, y, alpha=self.scaling)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


class DenseAllExperts(nn.Module):
    """ "Compute every expert, then weight", as X-LoRA does: every expert's full output ``[E, T, out]`` is built
    (batched), then mixed by the dense gates. The routing and parameters are the shared ones."""

    def __init__(self, p: Problem) -> None:
        super().__init__()
        self.base, self.shape, self.scaling = _frozen_linear(p), p.shape, p.scaling
        self.A = nn.Parameter(p.A.detach().clone())
        self.B = nn.Parameter(p.B.detach().clone())
        self.router = nn.Parameter(p.router.detach().T.contiguous())  # [E, d_in], see route()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = route(x, self.router, self.shape).to_dense(self.shape.experts).to(x.dtype)  # [T, E]
        h = torch.matmul(x.unsqueeze(0), self.A)  # [E_A, T, r]
        y = torch.matmul(h, self.B)  # [E, T, out], broadcast over a shared A
        delta = (y * g.T.unsqueeze(-1)).sum(0)
        return self.base(x) + delta * self.scaling


class TritonSortedTopK(DenseAllExperts):
    """ilora's sorted grouped top-k kernel called directly: what the layer runs for large expert sets. For shapes the
    layer sends to the dense kernel (few, small experts) it puts the two top-k kernels side by side."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ilora import kernels

        g = route(x, self.router, self.shape)
        w = g.weights.to(x.dtype)
        return kernels.topk_routed_lora(x, self.A, self.B, w, g.indices, self.scaling, base_out=self.base(x))


def ilora_choice(p: Problem, use_kernels: str) -> Choice:
    """The compute path ``IloraLinear(p, use_kernels)`` takes on ``p``'s device, and why it runs PyTorch where Triton
    would (``ilora.paths.select_path``: the reason the layer logs). Raises ``RuntimeError`` where the layer would."""
    s = p.shape
    config = ilora.ILoraConfig(r=s.rank, num_experts=s.experts, shared_a=s.shared_a, routing=s.routing,
                               top_k=s.top_k or 1, use_kernels=use_kernels)  # fmt: skip
    kind = "dense" if s.top_k is None else "topk"
    return paths.select_path(config, kind, p.tokens, paths.device_facts(p.x), dtype=p.A.dtype)


def _ilora_triton_missing(p: Problem) -> str | None:
    missing = _triton_missing()
    if missing is not None:
        return missing
    try:
        ilora_choice(p, "triton")
    except RuntimeError as refused:
        return str(refused)
    return None


def _sorted_missing(p: Problem) -> str | None:
    return "soft routing has no sorted variant" if p.shape.top_k is None else _triton_missing()


def _triton_missing() -> str | None:
    if not torch.cuda.is_available():
        return "Triton kernels run on CUDA only (no GPU here)"
    try:
        kernels = importlib.import_module("ilora.kernels")
    except ImportError as exc:  # pragma: no cover - depends on the install
        return f"ilora.kernels does not import: {exc}"
    api = ("soft_routed_lora", "topk_routed_lora", "per_row_routed_lora", "triton_runnable")
    missing = [name for name in api if not hasattr(kernels, name)]
    return f"ilora.kernels lacks {', '.join(missing)}" if missing else None


def _grouped_mm_missing(p: Problem) -> str | None:
    has = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")
    if not has:
        return f"torch {torch.__version__} has no grouped_mm"
    widths = {"d_in": p.d_in, "r": p.shape.rank, "d_out": p.d_out}
    odd = [f"{n}={w}" for n, w in widths.items() if w * p.x.element_size() % 16]
    return f"grouped_mm needs rows of 16-byte multiples; {', '.join(odd)} in {p.x.dtype} are not" if odd else None


ProviderFactory = Callable[[Problem], nn.Module]

# name -> (factory, check returning a skip reason or None, is the output the routed-LoRA output?)
PROVIDERS: dict[str, tuple[ProviderFactory, Callable[[Problem], str | None], bool]] = {
    "base": (BaseLinear, lambda p: None, False),
    "ilora_torch": (lambda p: IloraLinear(p, "torch"), lambda p: None, True),
    "ilora_triton": (lambda p: IloraLinear(p, "triton"), _ilora_triton_missing, True),
    "ilora_triton_sorted": (TritonSortedTopK, _sorted_missing, True),
    "authors_loop": (AuthorsLoop, lambda p: None, True),
    "peft_lora": (PeftLora, lambda p: None, False),
    "grouped_mm": (GroupedMM, _grouped_mm_missing, True),
    "dense_all": (DenseAllExperts, lambda p: None, True),
}


def expert_grads(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Gradients of a routed provider's (A, B, router) in the :class:`Problem` layout, after a backward; None for
    providers whose parameters are not the shared experts (base, PEFT)."""

    def grad(t: torch.Tensor) -> torch.Tensor:
        return t.grad if t.grad is not None else torch.zeros_like(t)

    if isinstance(module, IloraLinear):
        layer = module.layer
        return (
            grad(layer.ilora_A["default"]),
            grad(layer.ilora_B["default"]),
            grad(layer.ilora_router["default"].weight).T,
        )
    if isinstance(module, AuthorsLoop):
        A = torch.stack([grad(a.weight).T for a in module.lora_A])
        B = torch.stack([grad(b.weight).T for b in module.lora_B])
        return A, B, grad(module.lora_route.weight).T
    if isinstance(module, GroupedMM):
        return grad(module.A_t).transpose(1, 2), grad(module.B_t).transpose(1, 2), grad(module.router).T
    if isinstance(module, DenseAllExperts):  # TritonSortedTopK too
        return grad(module.A), grad(module.B), grad(module.router).T
    return None


def skip_reason(name: str, p: Problem) -> str | None:
    """Why provider ``name`` cannot run on ``p`` here, or None."""
    if name not in PROVIDERS:
        raise KeyError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
    return PROVIDERS[name][1](p)


def build(name: str, p: Problem) -> nn.Module:
    """Provider ``name`` on problem ``p`` (call :func:`skip_reason` first)."""
    return PROVIDERS[name][0](p)

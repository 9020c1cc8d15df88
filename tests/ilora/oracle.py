"""The authors' I-LoRA formula as a naive float64 loop over experts: the test oracle for every path."""

from __future__ import annotations

import torch


def naive_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor, scaling: float) -> torch.Tensor:
    """``sum_e gates[:, e] * (x @ A_e) @ B_e * scaling`` in float64, one expert at a time; gates dense ``[T, E]``."""
    x, A, B, gates = (t.double() for t in (x, A, B, gates))
    out = torch.zeros(x.shape[0], B.shape[2], dtype=torch.float64)
    for e in range(B.shape[0]):
        a = A[0] if A.shape[0] == 1 else A[e]
        out = out + gates[:, e : e + 1] * ((x @ a) @ B[e]) * scaling
    return out


def naive_gates(logits: torch.Tensor, routing: str, top_k: int, temperature: float = 1.0) -> torch.Tensor:
    """Dense routing weights from logits: softmax (soft) or the top-k probabilities, renormalized when k > 1."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if routing == "soft":
        return probs
    values, idx = probs.topk(top_k, dim=-1)
    if top_k > 1:
        values = values / values.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(1, idx, values)


def naive_top_p(logits: torch.Tensor, top_p: float, max_k: int, temperature: float = 1.0) -> torch.Tensor:
    """Dense top-p weights (MoE-PEFT's ``_dynamic_top_p``): a token's most probable experts, one at a time, while the
    mass before each is <= ``top_p``, at most ``max_k``; the router probabilities kept as they are."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    out = torch.zeros_like(probs)
    for t in range(probs.shape[0]):
        mass = 0.0
        for e in probs[t].argsort(descending=True)[:max_k].tolist():
            if mass > top_p:
                break
            out[t, e] = probs[t, e]
            mass += float(probs[t, e])
    return out


def naive_dense_gates(logits: torch.Tensor, config) -> torch.Tensor:
    """Dense routing weights of ``config``'s built-in gate (soft, topk, top_p) from ``logits [T, E]``, float64."""
    if config.routing == "top_p":
        return naive_top_p(logits, config.top_p, config.top_k, config.router_temperature)
    return naive_gates(logits, config.routing, config.top_k, config.router_temperature)


def capture_layer_io(model: torch.nn.Module, call) -> tuple[object, dict]:
    """Run ``call()`` and return its result and, per routed layer (by ``ilora_name``), the input and output of its
    (single) forward in that call."""
    from ilora import ilora_layers

    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        layer.register_forward_hook(lambda m, args, out: seen.__setitem__(m.ilora_name, (args[0], out)))
        for layer in ilora_layers(model)
    ]
    try:
        result = call()
    finally:
        for h in handles:
            h.remove()
    return result, seen


def assert_layers_match(model: torch.nn.Module, seen: dict, gates_for, adapter: str = "default") -> None:
    """Every routed layer's output equals ``base(x) + naive_delta(x, A, B, gates_for(layer, x), scaling)``."""
    from ilora import ilora_layers

    for layer in ilora_layers(model):
        x, out = seen[layer.ilora_name]
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            base = layer.get_base_layer()(x).reshape(flat.shape[0], -1).double()
            A, B = layer.ilora_A[adapter], layer.ilora_B[adapter]
            expected = base + naive_delta(flat, A, B, gates_for(layer, x), layer.scaling[adapter])
        torch.testing.assert_close(out.reshape_as(expected).double(), expected, rtol=1e-5, atol=1e-5,
                                   msg=layer.ilora_name)  # fmt: skip

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

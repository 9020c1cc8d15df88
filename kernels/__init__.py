"""Triton kernels for routed LoRA, installed as ``ilora.kernels``.

Each op lives in one file (kernels, launcher, autograd registration, PyTorch ``*_ref``) and is registered as a
``torch.library`` custom op in the ``ilora`` namespace so ``torch.compile`` traces models that use it. Importing this
package never needs triton; calling a kernel without it raises ``RuntimeError``.
"""

# From a source checkout whose root is on sys.path (``python -m ...`` run there, pytest's rootdir insertion) this
# folder is also importable as a top-level ``kernels``: the name of Hugging Face's kernel-hub package, which
# transformers probes by importing it. Under that name stay an inert namespace-like module (no ``__file__``, no
# version) so the probe concludes the hub package is absent; the real package is ``ilora.kernels``.
if __name__ != "ilora.kernels":
    __file__ = None  # type: ignore[assignment]
    __all__: list[str] = []
else:
    from .availability import triton_runnable
    from .per_row import per_row_routed_lora, per_row_routed_lora_ref
    from .soft import soft_routed_lora, soft_routed_lora_ref
    from .topk import topk_routed_lora, topk_routed_lora_ref

    __all__ = [
        "per_row_routed_lora",
        "per_row_routed_lora_ref",
        "soft_routed_lora",
        "soft_routed_lora_ref",
        "topk_routed_lora",
        "topk_routed_lora_ref",
        "triton_runnable",
    ]

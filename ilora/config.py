"""``ILoraConfig``: the PEFT config of routed LoRA, its validation, and the authors' presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig

from ._peft import ensure_peft_type

CRAB_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Router = Literal["token", "sequence", "task"]
Routing = Literal["soft", "topk"]
KernelChoice = Literal["auto", "torch", "triton"]


@dataclass
class ILoraConfig(PeftConfig):
    """Configuration of an ILoRA adapter: ``num_experts`` LoRA experts mixed by a learned router.

    Each adapted linear ``W0: d_in -> d_out`` gets ``A`` (``[1 or E, d_in, r]``), ``B`` (``[E, r, d_out]``, zero at
    init, so a fresh adapter leaves the model unchanged) and a router; the output is
    ``W0 x + scaling * sum_e g_e(x) (x A_e) B_e`` with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
    """

    r: int = field(default=8, metadata={"help": "Rank of every expert."})
    lora_alpha: float = field(default=16, metadata={"help": "Scaling numerator: scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    use_rslora: bool = field(default=False, metadata={"help": "Use scaling = lora_alpha / sqrt(r)."})
    num_experts: int = field(default=3, metadata={"help": "Number of LoRA experts (the authors' 'heads')."})
    shared_a: bool = field(
        default=True, metadata={"help": "One A shared by all experts (Crab, Crab+, HydraLoRA) or one A per expert."}
    )
    router: Router = field(
        default="token",
        metadata={
            "help": "'token': per-token router; 'sequence': one decision per sequence from the mean of its tokens "
            "(attention mask respected); 'task': a learned gate per task id given at call time."
        },
    )
    routing: Routing = field(
        default="soft", metadata={"help": "'soft': every expert weighted; 'topk': the top_k experts, renormalized."}
    )
    top_k: int = field(default=2, metadata={"help": "Experts per token with routing='topk'."})
    num_tasks: int | None = field(default=None, metadata={"help": "Number of task ids, required for router='task'."})
    router_temperature: float = field(default=1.0, metadata={"help": "Router logits are divided by this."})
    balance_loss_coef: float = field(
        default=0.0, metadata={"help": "Weight of the load-balance loss (E * sum_e f_e P_e) in ilora.aux_loss."}
    )
    router_z_loss_coef: float = field(
        default=0.0, metadata={"help": "Weight of the router z-loss (mean logsumexp(logits)^2) in ilora.aux_loss."}
    )
    aux_loss_in_output: bool = field(
        default=True,
        metadata={
            "help": "Add the weighted router losses to the output's loss when the model is called with labels in "
            "training (as transformers' MoE models add router_aux_loss_coef * aux_loss), exposed as "
            "output.ilora_aux_loss. False: add ilora.aux_loss(model) to your loss yourself."
        },
    )
    check_router_logits: bool = field(
        default=True,
        metadata={"help": "Raise on NaN/inf router logits (one host sync per layer on GPU; off for peak speed)."},
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffix match) or a regex of the linears to adapt."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to leave alone."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter."}
    )
    init_lora_weights: bool = field(
        default=True, metadata={"help": "B starts at zero (no change to the model). False: random B, for tests."}
    )
    use_kernels: KernelChoice = field(
        default="auto",
        metadata={
            "help": "'auto': Triton kernels on CUDA, PyTorch elsewhere; 'torch': always PyTorch; 'triton': always "
            "Triton (CPU tensors need TRITON_INTERPRET=1)."
        },
    )
    bias: str = field(default="none", metadata={"help": "Bias training is not supported; kept for PEFT."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = sorted(set(self.exclude_modules))
        self._validate()

    def _validate(self) -> None:
        def bad(field_name: str, why: str) -> ValueError:
            return ValueError(f"ILoraConfig.{field_name}: {why}")

        if not isinstance(self.r, int) or self.r < 1:
            raise bad("r", f"must be a positive integer, got {self.r!r}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise bad("num_experts", f"must be a positive integer, got {self.num_experts!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        if self.router not in ("token", "sequence", "task"):
            raise bad("router", f"must be 'token', 'sequence' or 'task', got {self.router!r}")
        if self.routing not in ("soft", "topk"):
            raise bad("routing", f"must be 'soft' or 'topk', got {self.routing!r}")
        if self.routing == "topk" and not 1 <= self.top_k <= self.num_experts:
            raise bad("top_k", f"must be between 1 and num_experts={self.num_experts}, got {self.top_k}")
        if self.router == "task" and (self.num_tasks is None or self.num_tasks < 1):
            raise bad("num_tasks", f"router='task' needs num_tasks >= 1, got {self.num_tasks!r}")
        if self.router_temperature <= 0:
            raise bad("router_temperature", f"must be positive, got {self.router_temperature!r}")
        if self.balance_loss_coef < 0 or self.router_z_loss_coef < 0:
            raise bad("balance_loss_coef/router_z_loss_coef", "must be non-negative")
        if self.use_kernels not in ("auto", "torch", "triton"):
            raise bad("use_kernels", f"must be 'auto', 'torch' or 'triton', got {self.use_kernels!r}")
        if self.bias != "none":
            raise bad("bias", f"only 'none' is supported, got {self.bias!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise bad("layers_pattern", "only makes sense together with layers_to_transform")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    @classmethod
    def crabplus(cls, **overrides: Any) -> ILoraConfig:
        """The Crab+ setting (Qwen2.5-Omni thinker): 3 experts, shared A, r 128, alpha 256, dropout 0.1, soft
        per-token routing on the seven ``_proj`` projections."""
        settings: dict[str, Any] = dict(
            r=128, lora_alpha=256, lora_dropout=0.1, num_experts=3, shared_a=True, router="token", routing="soft",
            target_modules=list(CRAB_TARGETS),
        )  # fmt: skip
        return cls(**{**settings, **overrides})

    @classmethod
    def crab(cls, **overrides: Any) -> ILoraConfig:
        """The Crab setting (LLaMA-2-7B-chat): 3 experts, shared A, r 8, alpha 16, dropout 0.05, soft per-token."""
        settings: dict[str, Any] = dict(
            r=8, lora_alpha=16, lora_dropout=0.05, num_experts=3, shared_a=True, router="token", routing="soft",
            target_modules=list(CRAB_TARGETS),
        )  # fmt: skip
        return cls(**{**settings, **overrides})

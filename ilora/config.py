"""``ILoraConfig``: the PEFT config of routed LoRA, its validation, and the authors' presets."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from peft.config import PeftConfig

from . import aux_losses, presets
from ._peft import ensure_peft_type
from .registry import BUILTIN_ROUTERS, resolve

LOADING_HEADING = "## Loading this ILoRA adapter"
LOADING_SECTION = f"""{LOADING_HEADING}

This adapter is routed LoRA (`"peft_type": "ILORA"`), a PEFT method that the `ilora` package registers with PEFT when
it is imported. Without `import ilora`, PEFT stops with `KeyError: 'ILORA'`.

```python
import ilora  # install ilora from its project's repository first (see that project's README)
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/to/this/adapter")
```
"""


def _add_loading_section(card: Path) -> None:
    """Put ``LOADING_SECTION`` at the top of the model card at ``card`` (created if absent), once: after its YAML
    metadata block, before the long template PEFT writes, so a reader meets it first. PEFT keeps an existing card's
    text and only updates its metadata."""
    text = card.read_text() if card.exists() else ""
    if LOADING_HEADING in text:
        return
    metadata, body = "", text
    if text.startswith("---\n") and (end := text.find("\n---\n", 4)) != -1:
        metadata, body = text[: end + 5], text[end + 5 :]
    card.write_text(
        f"{metadata}\n{LOADING_SECTION}\n{body.lstrip()}" if body.strip() else f"{metadata}{LOADING_SECTION}"
    )


def _bad(field_name: str, why: str) -> ValueError:
    return ValueError(f"ILoraConfig.{field_name}: {why}")


def _all_str(values: Any) -> bool:
    return isinstance(values, (list, tuple, set)) and all(isinstance(v, str) for v in values)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _check_pattern(field_name: str, pattern: Any, what: str, valid: Callable[[Any], bool]) -> None:
    """Refuse, naming the key and its value, a pattern that is not a dict of valid regexes to valid values."""
    if not isinstance(pattern, dict):
        raise _bad(field_name, f"must be a dict of module-name regexes to {what}s, got {pattern!r}")
    for key, value in pattern.items():
        if not isinstance(key, str):
            raise _bad(field_name, f"keys must be module-name regexes (str), got {key!r}")
        try:
            re.compile(key)
        except re.error as err:
            raise _bad(field_name, f"key {key!r} is not a valid regex ({err})") from None
        if not valid(value):
            raise _bad(field_name, f"key {key!r} gives {value!r}, which is not {what}")


CRAB_TARGETS = presets.CRAB_TARGETS
PATTERNED_FIELDS = ("r", "lora_alpha", "num_experts")  # set per module by rank_, alpha_ and num_experts_pattern

Router = str  # a router registered in ilora.registry: "token", "sequence", "task", "noisy_token", "signal", a user's
Routing = str  # a gate registered in ilora.registry: "soft", "topk", "top_p" or a user's
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
    dropout_per_expert: bool = field(
        default=False,
        metadata={
            "help": "Draw a separate dropout mask for each expert, as Crab's layer (the shrink then runs once per "
            "expert while training); False: one mask shared by all experts, as Crab+."
        },
    )
    use_rslora: bool = field(default=False, metadata={"help": "Use scaling = lora_alpha / sqrt(r)."})
    num_experts: int = field(
        default=3,
        metadata={
            "help": "Number of LoRA experts (the authors' 'heads'). With 1 the adapter is plain LoRA: its router is "
            "kept (and saved) but frozen, since one expert always gets weight 1, so router kind and temperature have "
            "no effect and the router losses are refused."
        },
    )
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
    num_tasks: int | None = field(
        default=None,
        metadata={"help": "Number of task ids, required for router='task' (and available to a user's router)."},
    )
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
            "help": "'auto': Triton kernels on GPUs validated in ilora/kernels/validated.py, PyTorch elsewhere; "
            "'torch': always PyTorch; 'triton': always Triton (CPU tensors need TRITON_INTERPRET=1)."
        },
    )
    bias: str = field(default="none", metadata={"help": "Bias training is not supported; kept for PEFT."})
    # Fields of the composable parts (ilora.registry, ilora.gates), appended so older configs load unchanged.
    part_classes: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Import paths of user-registered parts ({'router': 'pkg.mod.Class', 'routing': ...}), filled in "
            "automatically: loading names the class to import when it is not registered."
        },
    )
    top_p: float = field(
        default=0.8,
        metadata={
            "help": "routing='top_p': experts per token until their probability mass exceeds top_p (<= top_k). The "
            "balance loss's expert shares are over the assignments made (1 at uniform use): MoE-PEFT's dynamic "
            "MixLoRA loss is that times the batch's mean experts per token (ilora.gates.TopPGate)."
        },
    )
    router_jitter_noise: float = field(
        default=0.0,
        metadata={"help": "Training only: the router input is multiplied by U(1 - j, 1 + j) (Switch, MixLoRA)."},
    )
    router_entropy_coef: float = field(
        default=0.0, metadata={"help": "Weight of the mean routing entropy per layer in ilora.aux_loss (sharpens)."}
    )
    localized_balance_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of LoRAMoE's localized balancing constraint in ilora.aux_loss (needs task ids)."},
    )
    localized_balance_alpha: float = field(
        default=0.0, metadata={"help": "LoRAMoE's imbalance degree: favoured group x (1 + a), the others x (1 - a)."}
    )
    num_expert_groups: int = field(
        default=1, metadata={"help": "Contiguous expert groups of the localized balancing constraint."}
    )
    task_expert_groups: list[int] | None = field(
        default=None, metadata={"help": "The expert group each task id favours (default: task t favours group t)."}
    )
    # Per-module ranks and alphas: PEFT LoraConfig's fields, with its key matching and semantics (for_module).
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module ranks, as PEFT's LoraConfig.rank_pattern: keys are regexes matched on the module "
            "path's end (first match wins, peft.utils.other.get_pattern_key), e.g. {'down_proj': 16} or "
            "{r'layers\\.0\\..*': 4}; other modules use r."
        },
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module lora_alpha, as PEFT's LoraConfig.alpha_pattern (keys as rank_pattern's); each module's "
            "scaling is its own alpha / r (/ sqrt(r) with use_rslora), r from rank_pattern."
        },
    )
    num_experts_pattern: dict[str, int] | None = field(
        default=None,
        metadata={
            "help": "Per-module expert counts, keys matched as PEFT's rank_pattern (a regex on the module path's end, "
            "first match wins), e.g. {'q_proj': 1} or {r'layers\\.0\\..*': 2}; top_k is capped at each count."
        },
    )
    # Router input and scope (ilora.router.SignalRouter, README "Routing parts"), appended so older configs load.
    router_signal_dim: int | None = field(
        default=None,
        metadata={
            "help": "router='signal': width of the per-token signal passed as ilora_router_inputs= [batch, seq, "
            "router_signal_dim] (or ilora.routing_context(router_inputs=...)), projected by the router."
        },
    )
    router_groups: dict[str, list[str]] | None = field(
        default=None,
        metadata={
            "help": "Groups of module names whose modules in one block (same path prefix) share ONE router, e.g. "
            "{'attn': ['q_proj', 'k_proj', 'v_proj']}: the first adapted member (list them in call order) holds the "
            "router and routes on its input; the others reuse its gates of the same call."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        self._validate_adapter()
        self._validate_routing()
        self._validate_targets()
        self._validate_patterns()
        self._validate_router_scope()
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(set(self.target_modules))
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = sorted(set(self.exclude_modules))

    def _validate_adapter(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise _bad("r", f"must be a positive integer, got {self.r!r}")
        if not _positive(self.lora_alpha):
            raise _bad("lora_alpha", f"must be a positive finite number, got {self.lora_alpha!r}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise _bad("num_experts", f"must be a positive integer, got {self.num_experts!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise _bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.dropout_per_expert, bool):
            raise _bad("dropout_per_expert", f"must be True or False, got {self.dropout_per_expert!r}")
        if not isinstance(self.init_lora_weights, bool):
            raise _bad(
                "init_lora_weights",
                f"must be True (B zero: the model starts unchanged) or False (random B), got "
                f"{self.init_lora_weights!r}; LoRA's initialisations (gaussian, pissa, olora, loftq, eva, ...) do not "
                "apply to routed experts",
            )
        for name in ("use_rslora", "shared_a", "inference_mode", "check_router_logits", "aux_loss_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, f"must be True or False, got {getattr(self, name)!r}")
        if self.use_kernels not in ("auto", "torch", "triton"):
            raise _bad("use_kernels", f"must be 'auto', 'torch' or 'triton', got {self.use_kernels!r}")
        if self.bias != "none":
            raise _bad("bias", f"only 'none' is supported, got {self.bias!r}")

    def _validate_routing(self) -> None:
        self._validate_parts(_bad)
        if self.routing in ("topk", "top_p") and not 1 <= self.top_k <= self.num_experts:
            raise _bad("top_k", f"must be between 1 and num_experts={self.num_experts}, got {self.top_k}")
        if self.router == "task" and (self.num_tasks is None or self.num_tasks < 1):
            raise _bad("num_tasks", f"router='task' needs num_tasks >= 1, got {self.num_tasks!r}")
        # A user's registered router may route by task too (its constructor gets the config); ilora's others do not.
        if self.router in BUILTIN_ROUTERS and self.router != "task" and self.num_tasks is not None:
            raise _bad("num_tasks", f"is only used with router='task' (router={self.router!r}); leave it unset")
        if self.router_temperature <= 0:
            raise _bad("router_temperature", f"must be positive, got {self.router_temperature!r}")
        if self.balance_loss_coef < 0 or self.router_z_loss_coef < 0:
            raise _bad("balance_loss_coef/router_z_loss_coef", "must be non-negative")
        if self.num_experts == 1:
            # One expert always gets weight 1: its router is frozen and a router loss would be a constant. (Router
            # kind and temperature are documented as having no effect there.)
            for name in aux_losses.COEFFICIENTS:
                if getattr(self, name):
                    raise _bad(
                        name,
                        f"has no effect with num_experts=1 (one expert always gets weight 1, so the loss is a "
                        f"constant), got {getattr(self, name)!r}; set it to 0 or use more experts",
                    )

    def _validate_targets(self) -> None:
        # The combinations PEFT's LoraConfig refuses for the same fields, and types PEFT would misread later.
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not _all_str(value):
                raise _bad(name, f"must be a regex string or a list of module names, got {value!r}")
        if self.modules_to_save is not None and (
            isinstance(self.modules_to_save, str) or not _all_str(self.modules_to_save)
        ):
            raise _bad("modules_to_save", f"must be a list of module names, got {self.modules_to_save!r}")
        layers = self.layers_to_transform
        indices = [layers] if isinstance(layers, int) else layers if isinstance(layers, (list, tuple)) else [None]
        if layers is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise _bad("layers_to_transform", f"must be a layer index or a list of them (>= 0), got {layers!r}")
        if isinstance(self.target_modules, str) and layers is not None:
            raise _bad("layers_to_transform", "cannot be used when target_modules is a regex string: put the layer "
                                              "indices in the regex, or give target_modules as a list")  # fmt: skip
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise _bad("layers_pattern", "cannot be used when target_modules is a regex string")
        if self.layers_pattern and layers is None:
            raise _bad("layers_pattern", "only makes sense together with layers_to_transform")

    def _validate_router_scope(self) -> None:
        """``router_signal_dim`` (with ``router='signal'`` only) and ``router_groups``."""
        dim = self.router_signal_dim
        if self.router == "signal" and not (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1):
            raise _bad("router_signal_dim", f"router='signal' needs the signal's width (an int >= 1), got {dim!r}")
        if self.router != "signal" and dim is not None:
            raise _bad("router_signal_dim", f"only used with router='signal' (router={self.router!r}); leave it unset")
        if self.router == "signal" and self.router_jitter_noise:
            raise _bad("router_jitter_noise", "jitters the layer input, which router='signal' never reads: set 0")
        groups = self.router_groups
        if groups is None:
            return
        if not (
            isinstance(groups, dict)
            and all(isinstance(k, str) and _all_str(v) and v and len(set(v)) == len(v) for k, v in groups.items())
        ):
            raise _bad("router_groups", f"must map group names to lists of distinct module names, got {groups!r}")
        members = [m for names in groups.values() for m in names]
        twice = sorted({m for m in members if members.count(m) > 1})
        if twice:
            raise _bad("router_groups", f"module names {twice} are in several groups; a module has one router")
        self.router_groups = {k: list(v) for k, v in groups.items()}

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's ``save_pretrained`` (``adapter_config.json``), plus a model card section saying how to load the
        adapter: PEFT only knows ``peft_type: ILORA`` after ``import ilora`` and otherwise fails with
        ``KeyError: 'ILORA'`` before any ilora code can run, so the card is where the hint can live."""
        super().save_pretrained(save_directory, **kwargs)
        _add_loading_section(Path(save_directory) / "README.md")

    def _validate_parts(self, bad: Any) -> None:
        """The router and gate are registered parts (``ilora.registry``); record the classes of users' parts."""
        classes = self.part_classes
        if classes is not None and not (
            isinstance(classes, dict)
            and set(classes) <= {"router", "routing"}
            and all(isinstance(v, str) for v in classes.values())
        ):
            raise bad("part_classes", f"must map 'router'/'routing' to class paths, got {classes!r}")
        paths = {kind: resolve(kind, getattr(self, kind), classes) for kind in ("router", "routing")}
        self.part_classes = {k: v for k, v in paths.items() if v is not None} or None
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.router_jitter_noise, (int, float)) and 0.0 <= self.router_jitter_noise < 1.0):
            raise bad("router_jitter_noise", f"must be in [0, 1), got {self.router_jitter_noise!r}")
        aux_losses.validate(self, bad)

    def _validate_patterns(self) -> None:
        """The three per-module patterns: dicts of valid regexes to positive ranks, alphas and expert counts."""
        self.rank_pattern = {} if self.rank_pattern is None else self.rank_pattern  # LoraConfig's default
        self.alpha_pattern = {} if self.alpha_pattern is None else self.alpha_pattern
        _check_pattern("rank_pattern", self.rank_pattern, "a rank (a positive integer)", _positive_int)
        _check_pattern("alpha_pattern", self.alpha_pattern, "a lora_alpha (a positive finite number)", _positive)
        if self.num_experts_pattern is not None:
            _check_pattern("num_experts_pattern", self.num_experts_pattern, "an expert count (>= 1)", _positive_int)

    def for_module(self, key: str) -> ILoraConfig:
        """The config of the module at path ``key``: ``self``, or a copy with the rank, ``lora_alpha`` and expert
        count that ``rank_pattern``, ``alpha_pattern`` and ``num_experts_pattern`` give it (so its ``scaling`` is
        recomputed from them; ``top_k`` capped at its expert count), validated like any config.

        Keys match as in PEFT's ``LoraModel._create_and_replace`` (``peft/tuners/lora/model.py``): each pattern's
        first key that ``peft.utils.other.get_pattern_key`` matches on the path's end; no match keeps the global value.
        Raises ``ValueError`` naming the module and the values the patterns gave it when that combination is invalid.
        """
        from peft.utils.other import get_pattern_key

        given = {}
        for name, pattern in zip(PATTERNED_FIELDS, (self.rank_pattern, self.alpha_pattern, self.num_experts_pattern)):
            if pattern and (value := pattern.get(get_pattern_key(list(pattern), key))) is not None:
                given[name] = value
        try:
            if not given:
                aux_losses.check_expert_groups(self, _bad)  # left to the modules when num_experts_pattern is set
                return self
            experts = given.get("num_experts", self.num_experts)
            # A one-expert layer is plain LoRA: nothing to route, so its router losses are off (not refused).
            no_routing = dict.fromkeys(aux_losses.COEFFICIENTS, 0.0) if experts == 1 else {}
            module = replace(self, **given, top_k=min(self.top_k, experts), **no_routing)
            aux_losses.check_expert_groups(module, _bad)
            return module
        except ValueError as err:
            by = ", ".join(f"{name}={value!r}" for name, value in given.items())
            where = f"given {by} by the patterns" if given else "which no pattern matches"
            raise ValueError(f"{err} (for module {key!r}, {where})") from None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    @classmethod
    def crabplus(cls, **overrides: Any) -> ILoraConfig:
        """Crab+: 3 soft-routed experts, shared A, r 128, alpha 256, dropout 0.1 (``ilora.presets.crabplus``)."""
        return cls(**{**presets.crabplus(), **overrides})

    @classmethod
    def crab(cls, **overrides: Any) -> ILoraConfig:
        """Crab: 3 soft-routed experts, shared A, r 8, alpha 16, dropout 0.05 per expert (``ilora.presets.crab``)."""
        return cls(**{**presets.crab(), **overrides})

    @classmethod
    def hydralora(cls, **overrides: Any) -> ILoraConfig:
        """HydraLoRA: shared A, 4 B heads, soft per-token routing, r 4, alpha 32 (``ilora.presets.hydralora``)."""
        return cls(**{**presets.hydralora(), **overrides})

    @classmethod
    def mixlora(cls, **overrides: Any) -> ILoraConfig:
        """MixLoRA: top-2 of 8 per-expert LoRAs on the MLP, plain LoRA on attention (``ilora.presets.mixlora``)."""
        return cls(**{**presets.mixlora(), **overrides})

    @classmethod
    def loramoe(cls, **overrides: Any) -> ILoraConfig:
        """LoRAMoE: 8 soft-routed experts on the MLP, localized balancing over 2 groups (``ilora.presets.loramoe``)."""
        return cls(**{**presets.loramoe(), **overrides})

    @classmethod
    def mola(cls, num_layers: int = 32, **overrides: Any) -> ILoraConfig:
        """MoLA "2-4-6-8": top-2, more experts in higher layers, for a model of ``num_layers`` layers
        (``ilora.presets.mola``)."""
        return cls(**{**presets.mola(num_layers), **overrides})

"""``ILoraModel``: PEFT's tuner for ILoRA: target matching, create-and-replace, adapters, merge and unload.

Adapter management (``set_adapter``, ``delete_adapter``, enabling and disabling, trainability) is PEFT's own
``BaseTuner`` where the installed peft has it (0.21 does, 0.15 does not); where it lacks a method, the one defined
below does what peft 0.21's does (``modules_to_save`` copies follow ``set_adapter`` and go with ``delete_adapter``,
``inference_mode`` freezes the adapter, a merged adapter cannot be deleted). Where peft 0.15's ``PeftModel`` itself
differs from 0.21's (trainability on ``add_adapter``/``load_adapter``, deleting the active adapter), the ILoRA
``PeftModel`` is given 0.21's rules (``_peft.adopt_peft_021_adapter_rules``).
"""

from __future__ import annotations

import re
import sys
import warnings
from contextlib import nullcontext
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, ModulesToSaveWrapper, _get_submodules
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from . import context, losses
from ._peft import PREFIX, adopt_peft_021_adapter_rules, base_tuner_has, peft_model_has, set_adapter_trainable
from .config import ILoraConfig
from .context import ROUTER_INPUTS_KWARG, TASK_IDS_KWARG, routing_context
from .integrations.trl import DeclaredRouterLoss, fused_output
from .layer import ILoraLayer, Linear, MergeNotSupportedError, link_router_groups


def _cache_length(past_key_values: Any) -> int:
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    try:
        return int(past_key_values[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


class _InstanceAttribute:
    """Sets ``obj.name = value`` until ``remove()`` (a hook handle's interface), restoring what was there before."""

    def __init__(self, obj: Any, name: str, value: Any) -> None:
        self.obj, self.name, self.previous = obj, name, obj.__dict__.get(name)
        object.__setattr__(obj, name, value)

    def remove(self) -> None:
        if self.previous is None:
            self.obj.__dict__.pop(self.name, None)
        else:
            object.__setattr__(self.obj, self.name, self.previous)


class ILoraModel(BaseTuner):
    """Injects ILoRA layers into a model; created by ``peft.get_peft_model`` once ``ilora`` is imported."""

    prefix: str = PREFIX
    tuner_layer_cls = ILoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(model, config, adapter_name, **kwargs)
        self._hooks: list[Any] = [
            self.model.register_forward_pre_hook(self._capture_call_state, with_kwargs=True),
            self.model.register_forward_hook(self._release_call_state, always_call=True),
        ]
        # PEFT's generic PeftModel (no task_type) calls the wrapped model's own generate, which refuses keywords
        # its forward does not declare: route that call through ours, which takes ilora_task_ids off first.
        self._model_generate = getattr(self.model, "generate", None)
        if callable(self._model_generate):
            self._hooks.append(_InstanceAttribute(self.model, "generate", self.generate))
        # On the wrapped model, not in forward(): PEFT's generic PeftModel calls the wrapped model directly.
        self._hooks.append(self.model.register_forward_hook(self._add_aux_loss_to_output, with_kwargs=True))
        # TRL's trainers add `router_aux_loss_coef * outputs.aux_loss` for models whose config declares it.
        self._router_loss_fields = DeclaredRouterLoss(self.model)
        self._hooks.append(self._router_loss_fields)
        self._aux_reads_at_unused_stats: int | None = None
        self._warned_unused_stats = False

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection of every adapter (the first and those added later by add_adapter, load_adapter), with the
        config's patterns checked before any module changes (``check_patterns``) and its router groups linked
        (``layer.link_router_groups``) before any checkpoint loads, so a group's followers hold no router to load
        into."""
        check_patterns(model, self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        link_router_groups(ilora_layers(model), adapter_name, self.peft_config[adapter_name].router_groups)

    if not base_tuner_has("__getattr__"):  # older peft (0.15) does not forward unknown attributes

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                if name == "model":
                    raise
                return getattr(self.model, name)

    if not peft_model_has("set_requires_grad"):  # older peft (0.15): its PeftModel's own adapter rules differ

        def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
            super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
            # peft 0.15's PeftModel calls this last in __init__ and in load_adapter, after making the adapter's
            # modules_to_save copies trainable: an adapter in inference mode is frozen whole, as peft 0.21 does.
            if self.peft_config[adapter_name].inference_mode:
                set_adapter_trainable(self.model, adapter_name, requires_grad=False)
            adopt_peft_021_adapter_rules(sys._getframe(1).f_locals.get("self"), self)

    # ------------------------------------------------------------------------------- per-call routing state
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Through __call__, not .forward, so the hooks that capture the routing state of this call run.
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, ilora_task_ids: Any = None, ilora_router_inputs: Any = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``, with ``ilora_task_ids`` (``[batch]`` or one id) and
        ``ilora_router_inputs`` (``[batch, N, d_signal]``, the signal of every position of the prompt and of the tokens
        to generate: ``N >= prompt length + max_new_tokens``; see ``ilora.router.SignalRouter``) routing every step."""
        if self._model_generate is None:
            raise AttributeError(f"{type(self.model).__name__} has no generate method")
        prompt = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2:
            # generate may repeat each prompt row (beams, num_return_sequences) and the routers then repeat the
            # per-row inputs alike (router.expanded_for_generation): rows for another batch must not pass as that.
            ids = None if ilora_task_ids is None else context.as_task_tensor(ilora_task_ids)
            signal = ilora_router_inputs if isinstance(ilora_router_inputs, torch.Tensor) else None
            for name, rows in ((TASK_IDS_KWARG, ids), (ROUTER_INPUTS_KWARG, signal)):
                if (
                    rows is not None
                    and rows.dim() == (1 if rows is ids else 3)
                    and rows.shape[0] not in (1, len(prompt))
                ):
                    raise ValueError(f"generate: {name} has {rows.shape[0]} rows for a prompt of {len(prompt)} rows: "
                                     "give one per prompt row (or one for all)")  # fmt: skip
        with routing_context(task_ids=ilora_task_ids, router_inputs=ilora_router_inputs, generating=True):
            return self._model_generate(*args, **kwargs)

    def _capture_call_state(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # Per call (context variables, so concurrent calls from other threads never see it): task ids and router
        # signals arrive as the keywords TASK_IDS_KWARG and ROUTER_INPUTS_KWARG (PEFT's task-specific models keep
        # `task_ids` for their own prompt methods); sequence routers need this call's attention mask; cached decode
        # steps reuse the prompt's routing and take the signal of their new tokens.
        self._router_loss_fields.before_call(kwargs)
        context.enter_call(
            module,
            task_ids=kwargs.pop(TASK_IDS_KWARG, None),
            router_inputs=kwargs.pop(ROUTER_INPUTS_KWARG, None),
            attention_mask=kwargs.get("attention_mask"),
            position_ids=kwargs.get("position_ids"),
            # transformers >= 5.24 names the KV cache `cache`, earlier releases `past_key_values`.
            past_length=max(_cache_length(kwargs.get("past_key_values")), _cache_length(kwargs.get("cache"))),
        )
        return args, kwargs

    def _release_call_state(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = context.exit_call(module)
        if state is not None and module.training and torch.is_grad_enabled():
            # Activation checkpointing recomputes this forward in backward, maybe on another thread: bind its state.
            context.bind_for_backward(output, state)

    # ------------------------------------------------------------------------------------------ router losses
    def _add_aux_loss_to_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Add ``ilora.aux_loss`` to the loss of a training call with labels, as transformers' MoE models add
        ``router_aux_loss_coef * aux_loss``; the term is also returned as ``output.ilora_aux_loss``. TRL's fused LM
        head's output (``log_probs``, from which TRL computes the loss itself) gets it in ``aux_loss`` too, which
        TRL's trainers add (``ilora.integrations.trl``).

        Under data parallelism the router statistics are those of the global batch (``losses.data_parallel_group``).
        When the caller normalizes the task loss over an accumulated batch (``num_items_in_batch``, as
        ``transformers.Trainer`` does), the term is weighted by this call's share of those label tokens
        (``losses.label_share``), so the accumulated calls together add it once.
        """
        fused = fused_output(output)
        term = self._router_loss_term(module, kwargs, output, fused) if module.training else None
        if term is not None:
            output["loss"] = output["loss"] + term.to(output["loss"].dtype)
            try:  # an attribute, not a key: DDP rebuilds a ModelOutput from its declared fields
                output.ilora_aux_loss = term.detach()
            except AttributeError:
                output["ilora_aux_loss"] = term.detach()
        if fused:
            self._router_loss_fields.expose_aux_loss(output, term)
        return output

    def _router_loss_term(self, module: nn.Module, kwargs: dict, output: Any, fused: bool) -> torch.Tensor | None:
        """This training call's weighted router losses for its output's loss; None when it adds none."""
        collected = [name for layer in ilora_layers(module) for name in layer.aux_stats]
        if not collected:
            return None
        if losses.caller_adds():  # the caller reads ilora.aux_loss itself
            self._aux_reads_at_unused_stats = None
            return None
        self._warn_if_router_losses_went_unused()
        configs = [self.peft_config[name] for name in set(collected) if name in self.peft_config]
        labels = kwargs.get("labels")
        if labels is None or not all(c.aux_loss_in_output for c in configs):
            self._aux_reads_at_unused_stats = losses.aux_loss_reads()
            return None
        loss = output.get("loss") if isinstance(output, dict) else None
        if loss is None or (fused and not self._router_loss_fields.trainer_adds_aux_loss()):
            raise ValueError(
                f"ILoRA router losses (ILoraConfig.balance_loss_coef / router_z_loss_coef) cannot be added to this "
                f"call's loss: the model returned {type(output).__name__} and its caller computes the loss outside "
                "the model without adding outputs.aux_loss (a TRL trainer with router_aux_loss_coef=0) or gets a "
                "tuple. With a transformers/TRL trainer, mix in ilora.integrations.transformers.AuxLossMixin (class "
                "T(AuxLossMixin, SFTTrainer): pass); otherwise set aux_loss_in_output=False and add "
                "ilora.aux_loss(model) to your loss."
            )
        group = losses.data_parallel_group()
        share = losses.label_share(module, labels, kwargs.get("shift_labels"), kwargs.get("num_items_in_batch"), group)
        return losses.aux_loss(module, group) * share

    def _warn_if_router_losses_went_unused(self) -> None:
        # Statistics of an earlier training call were left to the user; no aux_loss call has read any since.
        pending, self._aux_reads_at_unused_stats = self._aux_reads_at_unused_stats, None
        if pending is None or pending != losses.aux_loss_reads():
            return
        own_loss = _trainer_computing_its_own_loss()
        if own_loss is not None:
            raise ValueError(
                f"ILoRA router losses (balance_loss_coef / router_z_loss_coef) would be dropped: {own_loss} takes the "
                "labels off and computes the loss itself, so the model's loss, which carries them, is never used. "
                "Train with ilora.ILoraTrainer, or mix "
                "ilora.integrations.transformers.AuxLossMixin into your Trainer class (class T(AuxLossMixin, "
                "Trainer): pass), or set balance_loss_coef and router_z_loss_coef to 0"
            )
        if self._warned_unused_stats:
            return
        self._warned_unused_stats = True
        in_output = all(c.aux_loss_in_output for c in self.peft_config.values() if isinstance(c, ILoraConfig))
        # With aux_loss_in_output=False, calling with labels adds nothing: do not suggest it.
        with_labels = "call the model with labels (the losses are then added to its loss), " if in_output else ""
        warnings.warn(
            f"ILoRA router statistics for the balance/z losses were collected in training but never used: "
            f"{with_labels}add ilora.aux_loss(model) to your loss, train with ilora.ILoraTrainer (or mix "
            "ilora.integrations.transformers.AuxLossMixin into your Trainer class), or set balance_loss_coef and "
            "router_z_loss_coef to 0. This warning is shown once.",
            UserWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------------------------------ injection
    @staticmethod
    def _prepare_adapter_config(peft_config: ILoraConfig, model_config: dict) -> ILoraConfig:
        # Abstract in peft 0.15; 0.21 does the same with a message that does not name the field.
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
                raise ValueError(
                    f"ILoraConfig.target_modules must be given: no default targets are known for model type "
                    f"{model_type!r}"
                )
            peft_config.target_modules = set(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
        return peft_config

    if not base_tuner_has("_check_target_module_exists"):

        @staticmethod
        def _check_target_module_exists(peft_config: ILoraConfig, key: str) -> Any:
            return check_target_module_exists(peft_config, key)

    def _create_and_replace(
        self,
        peft_config: ILoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        peft_config = peft_config.for_module(current_key)  # per-module rank, alpha, experts (the patterns)
        if isinstance(target, ILoraLayer):
            target.update_layer(adapter_name, peft_config)
            return
        try:
            new_module = Linear(target, adapter_name, peft_config)
        except TypeError as err:
            raise TypeError(f"cannot adapt module {current_key!r}: {err}") from None
        new_module.ilora_name = current_key
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ------------------------------------ what BaseTuner does itself in newer peft (0.21), LoraModel in older (0.15)
    if not base_tuner_has("_replace_module"):

        def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
            # The layer already put its adapters on the base layer's device (_move_adapter_to_device_of_base_layer).
            setattr(parent, child_name, new_module)

    if not base_tuner_has("_mark_only_adapters_as_trainable"):

        def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
            # ILoraConfig.bias is always "none": only the adapters train; the modules_to_save copies keep their own
            # requires_grad (peft 0.21's rule; 0.15's LoRA froze an earlier adapter's copies on add_adapter).
            keep = {id(p) for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper) for p in m.parameters()}
            for module in model.modules():
                if isinstance(module, ILoraLayer):
                    dicts = [getattr(module, name) for name in module.adapter_layer_names]
                    keep.update(id(p) for d in dicts for p in d.parameters())
            for param in model.parameters():
                if id(param) not in keep:
                    param.requires_grad = False

    if not base_tuner_has("enable_adapter_layers"):

        def enable_adapter_layers(self) -> None:
            for module in self.model.modules():
                if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                    module.enable_adapters(True)

        def disable_adapter_layers(self) -> None:
            for module in self.model.modules():
                if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                    module.enable_adapters(False)

    if not base_tuner_has("set_adapter"):

        def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
            _set_auxiliary_adapter(self.model, adapter_name)
            for module in self.model.modules():
                if isinstance(module, ILoraLayer):
                    if module.merged:
                        warnings.warn(
                            "Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2
                        )
                        module.unmerge()
                    module.set_adapter(adapter_name)
                    if inference_mode:
                        for layer_name in module.adapter_layer_names:
                            getattr(module, layer_name).requires_grad_(False)
            self.active_adapter = adapter_name

    if not base_tuner_has("delete_adapter"):

        def delete_adapter(self, adapter_name: str) -> None:
            if adapter_name not in self.peft_config:
                raise ValueError(f"Adapter {adapter_name} does not exist")
            _check_adapter_not_merged(self.model, adapter_name)
            del self.peft_config[adapter_name]
            new_adapter: list[str] | None = None
            for module in self.model.modules():
                if isinstance(module, ILoraLayer):
                    module.delete_adapter(adapter_name)
                    if new_adapter is None:
                        new_adapter = module.active_adapters[:]
            _delete_auxiliary_adapter(self.model, adapter_name, new_adapter)
            self.active_adapter = new_adapter or []

    # ------------------------------------------------------------------------------------- merge and unload
    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        task_id: int | None = None,
    ) -> nn.Module:
        """Fold the adapters (default: the active ones) into the base weights and return the base model.

        Exact for one expert, and for task routing given ``task_id`` (that task's experts are folded in); each weight
        is summed in float32 and rounded (or requantized) once. Raises ``MergeNotSupportedError`` before touching any
        weight when an adapter routes by input (token, sequence; see ``ilora.export_to_lora``) or when an active
        adapter is left out of ``adapter_names`` (unloading would drop it), and ``ValueError`` when an adapted weight
        is shared with another module (tied embeddings, a reused module): merging would change that module too.
        """
        with routing_context(task_ids=task_id) if task_id is not None else nullcontext():
            self._check_mergeable(adapter_names, unload=True)
            return self._unload_and_optionally_merge(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove the adapters and return the base model, with its original (possibly quantized) layers."""
        return self._unload_and_optionally_merge(merge=False)

    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False, task_id: int | None = None
    ) -> None:
        """Fold adapters (default: the active ones) into the base weights; active adapters left out keep running
        beside them, and ``unmerge_adapter`` restores the base weights bit for bit. Refusals as ``merge_and_unload``,
        except that routed adapters may stay active when not named."""
        with routing_context(task_ids=task_id) if task_id is not None else nullcontext():
            self._check_mergeable(adapter_names, unload=False)
            for module in _unique_layers(self.model):
                module.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def _check_mergeable(self, adapter_names: list[str] | None, unload: bool) -> None:
        # Every check runs over every layer before any weight changes, so a refused merge leaves the model as it was.
        layers = _unique_layers(self.model)
        for module in layers:
            names = module.active_adapters if adapter_names is None else adapter_names
            for name in names:
                if name in module.ilora_A and name not in module.merged_adapters:
                    module._fixed_gates(name)
            dropped = [n for n in module.active_adapters if n in module.ilora_A and n not in names]
            if unload and dropped:
                raise MergeNotSupportedError(
                    f"adapter(s) {dropped} are still active in {module.ilora_name} but not in adapter_names={names}: "
                    "merge_and_unload removes every adapter layer, so they would be dropped. Name them too, deactivate "
                    "them first (set_adapter), or use merge_adapter(adapter_names=...) to keep them running unmerged."
                )
        _refuse_shared_weights(self.model, layers)

    def _unload_and_optionally_merge(
        self, merge: bool = True, safe_merge: bool = False, adapter_names: list[str] | None = None, **_: Any
    ) -> nn.Module:
        # Every path to a module, not just the first: a layer reachable from two places is replaced at both.
        keys = [key for key, _ in self.model.named_modules(remove_duplicate=False) if PREFIX not in key]
        merged: set[int] = set()
        for key in keys:
            try:
                parent, target, target_name = _get_submodules(self.model, key)
            except AttributeError:
                continue
            if isinstance(target, ILoraLayer):
                if merge and id(target) not in merged:
                    target.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                    merged.add(id(target))
                setattr(parent, target_name, target.get_base_layer())
            elif isinstance(target, ModulesToSaveWrapper):
                replacement = (
                    target.unload_and_optionally_merge_module(merge=merge, safe_merge=safe_merge, adapter_names=None)
                    if hasattr(target, "unload_and_optionally_merge_module")
                    else target.modules_to_save[target.active_adapter]
                )
                setattr(parent, target_name, replacement)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        for hook in self._hooks:
            hook.remove()
        return self.model


def _trainer_computing_its_own_loss() -> str | None:
    """The ``transformers.Trainer`` (TRL's included) whose ``compute_loss`` is on the call stack and computes the loss
    without the model's, named with the setting that makes it (``compute_loss_func``, ``label_smoothing_factor``);
    None when there is none.

    Read from the stack (only when a training call finds the previous call's router statistics unread): that
    ``compute_loss`` calls the model without labels and never reads ``ilora.aux_loss``.
    """
    trainer_module = sys.modules.get("transformers.trainer")
    if trainer_module is None:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        trainer = frame.f_locals.get("self") if frame.f_code.co_name == "compute_loss" else None
        if isinstance(trainer, trainer_module.Trainer):
            break
        frame = frame.f_back
    else:
        return None
    settings = (("compute_loss_func", "compute_loss_func"), ("label_smoothing_factor", "label_smoother"))
    for setting, attribute in settings:
        if getattr(trainer, attribute, None) is not None:
            return f"{type(trainer).__name__} with {setting}"
    return None


def _unique_layers(model: nn.Module) -> list[ILoraLayer]:
    return [m for m in model.modules() if isinstance(m, ILoraLayer)]


def _refuse_shared_weights(model: nn.Module, layers: list[ILoraLayer]) -> None:
    """Refuse to merge into a base weight that any module outside its routed layer also uses (tied embeddings, a
    module reused in several places, one Parameter in two layers): the merge would change that module too."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
        for param_name, param in module.named_parameters(prefix=name, recurse=False, remove_duplicate=False):
            paths.setdefault(id(param), []).append(param_name)
    for layer in layers:
        own = [p + "." for p in paths[id(layer)]]
        users = [p for p in paths.get(id(layer.get_base_layer().weight), []) if not p.startswith(tuple(own))]
        if users:
            raise ValueError(
                f"cannot merge into {layer.ilora_name}: its weight is shared with {users} (tied weights such as "
                "tie_word_embeddings=True, or a module or Parameter used in several places), so merging would change "
                "them too. Keep the adapter unmerged, leave this module out of target_modules, or untie the weight "
                "before get_peft_model (e.g. load with tie_word_embeddings=False and clone the weight)."
            )


def _set_auxiliary_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """Older peft (0.15): point the ``modules_to_save`` copies at ``adapter_name`` (peft 0.21's ``_set_adapter``)."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper) and names:
            if len(names) > 1:
                raise ValueError(f"only one adapter can be active with modules_to_save, got {names}")
            if names[0] in module._adapters:
                module.set_adapter(names[0])
                module.enable_adapters(True)
            else:
                module.enable_adapters(False)


def _check_adapter_not_merged(model: nn.Module, adapter_name: str) -> None:
    if any(adapter_name in m.merged_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)):
        raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first.")


def _delete_auxiliary_adapter(model: nn.Module, adapter_name: str, new_active: list[str] | None) -> None:
    """Older peft (0.15): drop ``adapter_name``'s ``modules_to_save`` copies (peft 0.21's ``ModulesToSaveWrapper``)."""
    for module in model.modules():
        if not isinstance(module, ModulesToSaveWrapper) or adapter_name not in module.modules_to_save:
            continue
        module._adapters.discard(adapter_name)
        if new_active and new_active[0] in module.modules_to_save:
            if new_active[0] != module.active_adapters[0]:
                module.set_adapter(new_active[0])
        else:
            module._active_adapter = []
        del module.modules_to_save[adapter_name]


def check_patterns(model: nn.Module, config: ILoraConfig) -> None:
    """Refuse a ``rank_pattern``, ``alpha_pattern`` or ``num_experts_pattern`` key that matches no module of the model
    (keys match module paths as PEFT's ``rank_pattern`` does; PEFT's LoRA only warns): a pattern written for another
    model (say ``ILoraConfig.mola(num_layers=32)`` on a model of 28 layers) would otherwise give some layers the wrong
    ranks or expert counts without a word."""
    names = [name for name, _ in model.named_modules()]
    for field_name in ("rank_pattern", "alpha_pattern", "num_experts_pattern"):
        pattern = getattr(config, field_name, None)
        if not pattern:
            continue
        unused = [key for key in pattern if not any(re.match(rf"(.*\.)?(?:{key})$", name) for name in names)]
        if unused:
            per_layer = _per_layer(pattern) is not None
            hint = "; for ILoraConfig.mola(num_layers=...), give this model's number of layers" if per_layer else ""
            raise ValueError(
                f"ILoraConfig.{field_name}: {len(unused)} of its {len(pattern)} keys match no module of this model, "
                f"e.g. {unused[:3]}. Write the pattern for this model{hint}."
            )
        _refuse_layers_left_out(field_name, pattern, names)


_LAYER_KEY = re.compile(r"layers\\\.(\d+)\\\.\.\*")  # a key naming one layer: r"layers\.7\..*"


def _per_layer(pattern: dict) -> list[int] | None:
    r"""The layer indices of a pattern whose keys each name one layer (``r"layers\.7\..*"``), else None."""
    matches = [_LAYER_KEY.fullmatch(key) for key in pattern]
    return sorted(int(m.group(1)) for m in matches) if matches and all(matches) else None


def _refuse_layers_left_out(field_name: str, pattern: dict, names: list[str]) -> None:
    r"""A per-layer pattern for layers 0..N-1 (N >= 2, as ``ILoraConfig.mola(num_layers=N)`` writes) on a deeper model
    would silently give the layers it leaves out the config's default: refused, with the ways out."""
    listed = _per_layer(pattern)
    if listed is None or len(listed) < 2 or listed != list(range(len(listed))):
        return
    depth = 1 + max((int(m.group(1)) for n in names if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", n))), default=-1)
    if depth > len(listed):
        raise ValueError(
            f"ILoraConfig.{field_name} names layers 0..{len(listed) - 1} one by one, but this model has {depth} "
            f"layers: layers {len(listed)}..{depth - 1} would get the config's default. Write the pattern for "
            f"{depth} layers (ILoraConfig.mola(num_layers={depth})), or end it with a catch-all key "
            "r'layers\\.\\d+\\..*' giving the other layers a value on purpose."
        )


def ilora_layers(model: nn.Module) -> list[ILoraLayer]:
    """Every routed layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, ILoraLayer)]


__all__ = ["ILoraModel", "ilora_layers"]

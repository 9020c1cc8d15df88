"""The run configuration: its schema (data, model, train, eval sections) and the YAML loader with ``--set`` overrides.

    from crabplus.config import RunConfig, load_config

    cfg = load_config("examples/crabplus/configs/tiny.yaml", ["train.max_steps=20"])

Every field is checked when the config loads, before any data or model is touched: an unknown key, a wrongly typed
value or an invalid adapter setting (``model.num_experts: 0``) is refused by a ``ValueError`` naming the key and
where it came from (the YAML file, or the ``--set`` that gave it).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# Torch-free imports only: a wrong key or value is refused before torch, transformers or PEFT load (seconds).
from crabplus.models.config import ModelConfig, check_model_config
from crabplus.tasks import SUBSETS, get_task

#: ``train.strategy``: the data-parallel engine (``crabplus.distributed``).
Strategy = Literal["auto", "none", "ddp", "fsdp", "deepspeed"]


@dataclass
class SynthSettings:
    """Size of the synthetic dataset ``crabplus demo`` generates (``crabplus.data.synth.generate``)."""

    train: int = 12
    test: int = 4
    seed: int = 0
    size: int = 64


@dataclass
class DataConfig:
    root: str = "runs/data/avuie_tiny"
    """AV-UIE v2 root (``<root>/<subset>/train.json``)."""
    subsets: list[str] | dict[str, float] | None = None
    """Subset names, ``{name: mixing ratio}``, or None for all 19."""
    frame_size: int | None = 224
    check_media: Literal["open", "exists", "none"] = "open"
    num_workers: int = 0
    synth: SynthSettings = field(default_factory=SynthSettings)
    avvp_labels: str | None = None
    """Directory of the LLP evaluation files (AVVP_eval_audio.csv, AVVP_eval_visual.csv) that hold the AVVP test
    references; None: ``<root>/avvp/`` (``crabplus.data.llp``)."""


@dataclass
class TrainConfig:
    out: str = "runs/tiny"
    epochs: int = 1
    max_steps: int | None = None
    """Optimizer steps; overrides ``epochs`` when set."""
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None: no clipping (the authors' Crab+ run, configs/crabplus_7b.yaml)."""
    seed: int = 0
    bf16: bool = False
    """bfloat16 autocast (CUDA); trainable weights stay float32."""
    gradient_checkpointing: bool = False
    device: str = "auto"
    save_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    strategy: Strategy = "auto"
    """Data parallelism over the processes ``torchrun`` / ``accelerate launch`` start: ``ddp``, ``fsdp`` (FSDP2),
    ``deepspeed`` (with ``deepspeed_config``) or ``none``; ``auto``: DDP when there are several processes.
    ``batch_size`` is per process: the global batch of a step is ``batch_size x grad_accum x processes``."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON config (``configs/zero2.json``: ZeRO-2 as in the paper)."""


@dataclass
class EvalConfig:
    subsets: list[str] | None = None
    """Subsets to evaluate (None: the training subsets that ship a test split)."""
    max_samples: int | None = None
    """Per subset."""
    batch_size: int = 8
    max_new_tokens: int = 128
    sam2: str | None = None
    """Segmentation stage 2: None (score boxes only), ``"tiny"`` (random tiny SAM2, a plumbing check) or a local
    SAM2 checkpoint directory."""
    meteor: bool = False


#: Numeric fields and their range: (key, bound, strictly above it, null allowed); NaN and infinity are refused.
_BOUNDS: tuple[tuple[str, float, bool, bool], ...] = (
    ("train.epochs", 1, False, False),
    ("train.batch_size", 1, False, False),
    ("train.grad_accum", 1, False, False),
    ("train.max_steps", 1, False, True),
    ("train.lr", 0, True, False),
    ("train.weight_decay", 0, False, False),
    ("train.max_grad_norm", 0, True, True),  # <= 0 would flip gradient signs in clip_grad_norm_
    ("train.save_every", 0, False, False),
    ("train.threads", 1, False, True),
    ("eval.batch_size", 1, False, False),
    ("eval.max_new_tokens", 1, False, False),
    ("eval.max_samples", 1, False, True),
    ("data.num_workers", 0, False, False),
    ("data.frame_size", 1, False, True),
)
_NULL_MEANS = {
    "train.max_grad_norm": "no clipping",
    "train.max_steps": "use epochs",
    "train.threads": "torch's default",
}


def _check_bound(key: str, value: float | None, low: float, strict: bool, nullable: bool) -> None:
    """Refuse ``value`` outside its range with a ``ValueError`` naming ``key``."""
    if value is None and nullable:
        return
    if value is not None and math.isfinite(value) and (value > low if strict else value >= low):
        return
    null = f" or null ({_NULL_MEANS[key]})" if nullable and key in _NULL_MEANS else " or null" if nullable else ""
    raise ValueError(f"{key}: must be {'>' if strict else '>='} {low}{null}, got {value!r}")


def _check_subsets(key: str, subsets: list[str] | dict[str, float] | None, null: str) -> None:
    """Refuse an empty selection (``null`` says what null means), a name given twice, and mixing ratios that are not
    finite numbers >= 0 or are all 0."""
    if subsets is None:
        return
    if not subsets:
        raise ValueError(f"{key}: empty ({subsets!r}); name subsets, or null for {null}")
    twice = sorted({name for name in subsets if list(subsets).count(name) > 1})
    if twice:
        hint = " (a mixing ratio says how often: {name: 2})" if key == "data.subsets" else ""
        raise ValueError(f"{key}: {twice} named more than once{hint}")
    ratios = subsets if isinstance(subsets, dict) else {}
    for name, ratio in ratios.items():
        if not (math.isfinite(ratio) and ratio >= 0):
            raise ValueError(f"{key}.{name}: mixing ratio must be a finite number >= 0, got {ratio!r}")
    if ratios and not any(ratios.values()):
        raise ValueError(f"{key}: every mixing ratio is 0 ({ratios}): nothing to train on")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        t = self.train
        for key, low, strict, nullable in _BOUNDS:
            section, name = key.split(".")
            _check_bound(key, getattr(getattr(self, section), name), low, strict, nullable)
        if not 0 <= t.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
        if t.device not in ("auto", "cpu") and not t.device.startswith("cuda"):
            raise ValueError(f"train.device: must be 'auto', 'cpu' or 'cuda[:N]', got {t.device!r}")
        _check_subsets("data.subsets", self.data.subsets, "all 19")
        _check_subsets("eval.subsets", self.eval.subsets, "the training subsets")
        for section in ("data", "eval"):
            for name in getattr(self, section).subsets or ():
                try:
                    get_task(name)
                except KeyError as exc:
                    raise ValueError(f"{section}.subsets: {exc.args[0]}") from None
        check_model_config(self.model)

    def subsets(self) -> list[str]:
        return list(self.data.subsets or SUBSETS)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` (dataclasses built recursively); raises naming ``where``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arm, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is str and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return (
            {_convert(k, args[0], where): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
            if args
            else value
        )
    return value


def build_dataclass(cls: type, data: dict, where: str = "") -> Any:
    """``cls(**data)`` with unknown keys and wrongly typed values refused by name."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown key(s) {unknown}; known: {known}")
    prefix = f"{where}." if where else ""
    return cls(**{k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()})


def _yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML; a syntax error names ``where`` and the line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{where}: invalid YAML{at}: {problem}") from None


def _field_type(cls: type, key: str) -> Any:
    """The annotation of the dotted ``key`` in the dataclass ``cls`` (``Any`` below a free-form mapping)."""
    tp: Any = cls
    for depth, part in enumerate(key.split(".")):
        if not dataclasses.is_dataclass(tp):
            return Any  # inside a mapping field (ilora_extra, subsets ratios): checked as a whole later
        hints = typing.get_type_hints(tp)
        known = [f.name for f in dataclasses.fields(tp) if f.init]
        if part not in known:
            section = ".".join(key.split(".")[:depth]) or "config"
            raise ValueError(f"unknown key {key!r} ({section} has {known})")
        tp = hints[part]
    return tp


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{part!r} is not a section")
    node[last] = value


def load_config(path: str | Path, overrides: Sequence[str] = (), cls: type = RunConfig) -> Any:
    """A run config from YAML, with ``section.key=value`` overrides (values parsed as YAML).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file or the ``--set`` that is
    wrong: bad YAML (with line and column), unknown keys, wrongly typed values, invalid settings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} " + ("is a folder" if path.is_dir() else "does not exist"))
    data = _yaml(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    keys = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: must look like section.key=value")
        value = _yaml(raw, f"--set {item!r}")
        try:
            _convert(value, _field_type(cls, key), key)
            _set_dotted(data, key, value)
        except ValueError as exc:
            raise ValueError(f"--set {item!r}: {exc}") from None
        keys.append((key, item))
    try:
        return build_dataclass(cls, data)
    except ValueError as exc:
        blamed = _KEY.match(str(exc))
        for key, item in reversed(keys):
            if blamed and (blamed.group(1) == key or blamed.group(1).startswith(key + ".")):
                raise ValueError(f"--set {item!r}: {exc}") from None
        raise ValueError(f"{path}: {exc}") from None


_KEY = re.compile(r"^([\w.]+)(?:\[\d+\])?:")


def config_dict(cfg: Any) -> dict:
    """The resolved config as plain data (written next to a run's checkpoints)."""
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------------------------ resuming

#: Keys that may differ when a run resumes, as they cannot change the trained weights: where the run folder is named
#: from, housekeeping, how the global batch is split over processes and how they run (the global batch itself is
#: checked against the checkpoint; activation checkpointing recomputes with the same random state), the AVVP test
#: references, and all of evaluation. Every other key (model, adapter, data, optimizer, learning rate schedule, seed,
#: steps, precision) must match for the resumed run to continue exactly.
RESUME_MAY_DIFFER = ("train.out", "train.save_every", "train.keep_checkpoints", "train.threads", "train.device",
                     "train.strategy", "train.deepspeed_config", "train.batch_size", "train.grad_accum",
                     "train.gradient_checkpointing", "data.num_workers", "data.avvp_labels", "eval")  # fmt: skip
_PATH_KEYS = ("data.root", "model.path")
_LEAVES = ("data.subsets", "model.ilora_extra")  # free-form mappings, compared whole


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``, down to the fields of the config's dataclasses."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat |= _flat(value, name + ".") if isinstance(value, dict) and name not in _LEAVES else {name: value}
    return flat


def _same_path(key: str, old: Any, new: Any, saved: dict, now: dict) -> bool:
    """Paths name the same place: both resolve alike, or both lie at the same place inside their run folder (a run
    folder moved or renamed with its synthetic data in it)."""
    if key not in _PATH_KEYS or not isinstance(old, str) or not isinstance(new, str):
        return False
    if Path(old).resolve() == Path(new).resolve():
        return True
    inside = []
    for path, run in ((old, saved["train.out"]), (new, now["train.out"])):
        try:
            inside.append(Path(path).resolve().relative_to(Path(run).resolve()))
        except ValueError:
            return False
    return inside[0] == inside[1]


def resume_differences(saved: dict, now: dict) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """Compare the config a run's checkpoints were trained with (``saved``, as ``config_dict`` wrote it) with the
    config resuming it (``now``): ``(harmless, blocking)``, each ``{dotted key: (old value, new value)}``. Harmless
    keys are those of ``RESUME_MAY_DIFFER`` (and paths naming the same place); any other difference blocks an exact
    resume. The one place that decides which keys must match."""
    old, new = _flat(saved), _flat(now)
    harmless, blocking = {}, {}
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if before == after or _same_path(key, before, after, old, new):
            continue
        may = any(key == k or key.startswith(k + ".") for k in RESUME_MAY_DIFFER)
        (harmless if may else blocking)[key] = (before, after)
    return harmless, blocking


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML, as a config file or ``--set`` writes it."""
    return yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("...\n").strip()


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    """``key old -> new; ...`` on one line, values in YAML."""
    return "; ".join(f"{key} {yaml_value(old)} -> {yaml_value(new)}" for key, (old, new) in changes.items())

"""Evaluation of a trained run: generate (batched, greedy, KV cache) -> parse -> score, per subset.

    crabplus evaluate --config examples/crabplus/configs/tiny.yaml [--checkpoint DIR] [--out DIR] [--overwrite]

Each evaluation writes its own folder, ``<run>/eval/<checkpoint>/`` (or ``--out``): ``predictions.jsonl`` (one line
per sample: subset, its position in the subset, file and record index, ids, prompt, text, parsed structure, parse
error, reference; appended batch by batch, so an interrupted or failed evaluation is continued by the same command,
``eval.json`` saying ``complete: false`` and why until then), ``metrics.csv`` (subset, family,
metric, value, note), ``metrics.md`` (the printed table, headed by what produced it), ``eval.json`` (the checkpoint,
the subsets evaluated and those not evaluated with why, and the whole config), plus ``router_usage.csv`` for I-LoRA
models. A folder holding another evaluation (another checkpoint, subsets or config) is never overwritten unless
asked. Beside each accuracy the table prints the majority-class and chance rates (``crabplus.baselines``). Segmentation
subsets get SAM2 masks from the predicted box and points when ``eval.sam2`` names a model; without one, boxes are
scored (IoU) and mask metrics are left out, as the table says.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import torch
from torch import nn
from tqdm.auto import tqdm

import ilora
from crabplus.models import build_model

# isort: split
from crabplus.baselines import BASELINE_NOTE, answer_space_sizes, baselines
from crabplus.checkpoint import checkpoint_dirs, latest_checkpoint, load_weights
from crabplus.config import RunConfig, config_dict
from crabplus.data.batches import open_split
from crabplus.data.media import read_mask
from crabplus.distributed import resolve_device
from crabplus.folder_lock import LOCK_FILE, hold_folder
from crabplus.generate import predict
from crabplus.interface import Prediction
from crabplus.interrupt import StopSignals
from crabplus.metrics import normalize, score
from crabplus.processor import ChatProcessor
from crabplus.sample import Sample
from crabplus.segment import mask_prompt, prompt_mask
from crabplus.tasks import get_task

log = logging.getLogger(__name__)
MASK_METRICS = ("mask_j", "mask_f", "s_metric")
CIDER_NOTE = ("CIDEr not shown: with one sample or identical references every n-gram is in every reference, so its "
              "document-frequency weight (IDF) is 0 and CIDEr is 0 even for a perfect caption")  # fmt: skip


@dataclass
class EvalResult:
    out_dir: Path
    scores: dict[str, dict[str, float]]
    """Per subset: the metrics of ``crabplus.metrics.score`` (plus ``n``, ``parse_error_rate`` and, for class
    accuracies, ``<metric>_majority`` and ``<metric>_chance``)."""
    notes: dict[str, str]
    table: str
    usage: dict[str, dict[str, list[float]]] | None
    """Per subset, per routed layer: mean routing weight per expert (I-LoRA models only)."""
    not_evaluated: dict[str, str] = field(default_factory=dict)
    """Subsets asked for (or trained on) that were not scored, with why."""
    interrupted: str | None = None
    """The signal that stopped the evaluation before every sample was predicted (``"SIGINT"``, ``"SIGTERM"``); the
    predictions so far are kept and the same call continues them."""
    progress: tuple[int, int] = (0, 0)
    """Samples predicted, of all to predict."""


def resolve_checkpoint(cfg: RunConfig, checkpoint: str | Path | None = None) -> Path:
    """``checkpoint``, checked to be a checkpoint folder, or the run's newest one."""
    if checkpoint is None:
        ckpt = latest_checkpoint(cfg.train.out)
        if ckpt is None:
            raise FileNotFoundError(f"train.out: no checkpoint under {cfg.train.out}/checkpoints (train first)")
        return ckpt
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"--checkpoint: {ckpt} does not exist (checkpoints are <run>/checkpoints/step-N)")
    if not (ckpt / "adapter").is_dir():
        raise FileNotFoundError(f"--checkpoint: {ckpt} is not a checkpoint (no adapter/ folder in it; checkpoints "
                                "are <run>/checkpoints/step-N)")  # fmt: skip
    return ckpt


def load_trained(cfg: RunConfig, checkpoint: str | Path | None = None) -> tuple[nn.Module, ChatProcessor]:
    """The configured model with the trained weights of ``checkpoint`` (default: the run's newest checkpoint)."""
    ckpt = resolve_checkpoint(cfg, checkpoint)
    device = resolve_device(cfg.train.device)
    model, processor = build_model(cfg.model)
    try:
        load_weights(model, ckpt / "adapter")
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, safetensors.SafetensorError) as exc:
        files = ", ".join(map(str, sorted((ckpt / "adapter").glob("*.safetensors")))) or str(ckpt / "adapter")
        dirs = [d.resolve() for d in checkpoint_dirs(ckpt.parent.parent)]
        older = dirs[: dirs.index(ckpt.resolve())] if ckpt.resolve() in dirs else []
        fallback = (
            f"evaluate the previous one with --checkpoint {older[-1]}"
            if older
            else "the run has no earlier checkpoint to fall back to"
        )
        problem = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"checkpoint {ckpt} is damaged: cannot read {files} ({type(exc).__name__}: {problem}); "
                         f"{fallback}") from None  # fmt: skip
    return model.to(device).eval(), processor


def _no_test_split(cfg: RunConfig, name: str) -> str | None:
    path = Path(cfg.data.root) / name / "test.json"
    if path.is_file():
        return None
    if not get_task(name).has_test:
        return "has no test split (the AV-UIE v2 release ships none for it)"
    return f"has no test split in data.root ({path} is missing)"


def eval_samples(cfg: RunConfig) -> tuple[dict[str, list[Sample]], dict[str, str]]:
    """The test samples per evaluated subset (the first ``eval.max_samples`` readable ones with a reference), and the
    subsets left out with why. Raises ``ValueError`` when ``eval.subsets`` names only subsets that cannot be scored."""
    names = list(cfg.eval.subsets or cfg.subsets())
    skipped = {n: why for n in names if (why := _no_test_split(cfg, n))}
    names = [n for n in names if n not in skipped]
    out: dict[str, list[Sample]] = {name: [] for name in names}
    if names:
        for sample in open_split(cfg, split="test", subsets=names):
            ref = sample.meta.get("reference")
            keep = cfg.eval.max_samples is None or len(out[sample.subset]) < cfg.eval.max_samples
            if keep and isinstance(ref, Prediction) and ref.ok:
                out[sample.subset].append(sample)
    for name in [n for n, v in out.items() if not v]:
        skipped[name] = "has no readable test record with a reference (see the load report above)"
    out = {k: v for k, v in out.items() if v}
    if not out:
        where = "eval.subsets" if cfg.eval.subsets else f"data.root: {cfg.data.root}"
        raise ValueError(f"{where}: nothing to evaluate: " + "; ".join(f"{n} {why}" for n, why in skipped.items()))
    return out, skipped


def caption_note(refs: Sequence[Prediction]) -> str | None:
    """Why CIDEr cannot be read on this test set (one sample, or identical references), or None."""
    if len(refs) <= 1 or len({normalize(r.caption) for r in refs}) == 1:
        return CIDER_NOTE
    return None


def _segmenter(spec: str | None):
    if spec is None:
        return None
    from crabplus.segment import Sam2Segmenter

    return Sam2Segmenter.tiny() if spec == "tiny" else Sam2Segmenter.from_pretrained(spec)


def predicted_masks(segmenter, samples: Sequence[Sample], texts: Sequence[str]):
    """SAM2 masks from the answers' box and points (``crabplus.segment.mask_prompt``: the authors' reading where their
    grammar reads the answer, else ours; empty where neither does), and the ground-truth masks; ``None`` (with why)
    when one is missing."""
    pred_masks, gt_masks = [], []
    for sample, text in zip(samples, texts):
        frame = sample.frames[0]
        h, w = frame.shape[:2]
        ref = sample.meta["reference"]
        if sample.meta.get("mask_path"):
            gt = read_mask(sample.meta["mask_path"], (h, w))
        elif ref.exists is False:
            gt = np.zeros((h, w), bool)
        else:
            return None, None, f"no ground-truth mask for {sample.meta.get('file')} record {sample.meta.get('index')}"
        pred_masks.append(prompt_mask(segmenter, frame, mask_prompt(sample.subset, text)))
        gt_masks.append(gt)
    return pred_masks, gt_masks, ""


@torch.no_grad()
def routing_usage(model: nn.Module, processor: ChatProcessor, samples: Sequence[Sample]) -> dict[str, list[float]]:
    """Mean routing weight per expert for each routed layer over the samples' prompt tokens (one sample per forward,
    so no padding token is counted), layers in the model's order."""
    device = next(model.parameters()).device
    with ilora.record_routing() as recorder:
        for sample in samples:
            item = processor(Sample(sample.subset, sample.instruction, "", sample.frames, sample.audio, sample.meta))
            batch = {k: v.to(device) for k, v in processor.collate([item]).items()}
            model(**batch)
    usage = recorder.usage()
    order = dict.fromkeys(m.ilora_name for m in model.modules() if isinstance(m, ilora.ILoraLayer))
    return {layer: usage[layer].tolist() for layer in [*order, *usage] if layer in usage}  # the model's order


def _fmt(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


_EXTRA = ("n", "parse_error_rate")


def format_table(
    scores: dict[str, dict[str, float]], notes: dict[str, str], not_evaluated: dict[str, str] | None = None
) -> str:
    """A markdown table, one row per subset: family, n, parse errors, the registry's metrics (class accuracies with
    their majority-class and chance rates), notes; then a row per subset not evaluated, saying why."""
    lines = [f"| family | subset | n | parse err | metrics ({BASELINE_NOTE}) | note |", "|---|---|---|---|---|---|"]
    for subset, s in scores.items():
        parts = []
        for k, v in s.items():
            if k in _EXTRA or k.endswith(("_majority", "_chance")):
                continue
            base = (f" (majority {_fmt(s[k + '_majority'])}, chance {_fmt(s[k + '_chance'])})"
                    if k + "_majority" in s else "")  # fmt: skip
            parts.append(f"{k} {_fmt(v)}{base}")
        lines.append(f"| {get_task(subset).family} | {subset} | {int(s['n'])} | {_fmt(s['parse_error_rate'])} | "
                     f"{', '.join(parts)} | {notes.get(subset, '')} |")  # fmt: skip
    for subset, why in (not_evaluated or {}).items():
        lines.append(f"| {get_task(subset).family} | {subset} | 0 | - | not evaluated | {subset} {why} |")
    return "\n".join(lines)


def write_usage_csv(path: Path, usage: dict[str, dict[str, list[float]]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subset", "layer", "expert", "weight"])
        for subset, layers in usage.items():
            for layer, weights in layers.items():
                writer.writerows([subset, layer, e, f"{w:.6f}"] for e, w in enumerate(weights))


def claim_out_dir(out: Path, provenance: dict, overwrite: bool = False) -> bool:
    """Make ``out`` the folder of the evaluation described by ``provenance``. Refuses a file, and a folder holding
    another evaluation (different checkpoint, subsets or config) or other files, unless ``overwrite``. The same
    evaluation again replaces its own results when it was complete, and is continued when it was not (interrupted
    or failed): returns True then, the caller keeping the predictions already written."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out: {out} is a file, not a folder")
    record = out / "eval.json"
    resume = False
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) and not overwrite:
        if not record.is_file():
            raise FileExistsError(f"{out} already holds files that are not an evaluation; use another --out")
        before = json.loads(record.read_text())
        if before.get("provenance") != provenance:
            what = [k for k in provenance if before.get("provenance", {}).get(k) != provenance[k]]
            raise FileExistsError(f"{out} holds the evaluation of another {' and '.join(what)} "
                                  f"({before.get('provenance', {}).get('checkpoint')}); pass --overwrite to replace "
                                  "it or --out for another folder")  # fmt: skip
        resume = not before.get("complete", False)
    out.mkdir(parents=True, exist_ok=True)
    results = ("metrics.md", "metrics.csv", "router_usage.csv") + (() if resume else ("predictions.jsonl",))
    for stale in results:  # of the evaluation being replaced or continued
        (out / stale).unlink(missing_ok=True)
    _write_record(out, {"provenance": provenance, "complete": False})
    return resume


def _write_record(out: Path, record: dict) -> None:
    """``eval.json``, atomically: what produced the folder, and whether it is complete (else why not)."""
    tmp = out / "eval.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out / "eval.json")


def _sample_keys(samples: dict[str, list[Sample]]) -> dict[str, list[str]]:
    """Per subset, what names each sample in ``predictions.jsonl``: subset, position, file and record index."""
    return {subset: [json.dumps([subset, i, s.meta.get("file"), s.meta.get("index")]) for i, s in enumerate(group)]
            for subset, group in samples.items()}  # fmt: skip


def done_predictions(path: Path, keys: set[str]) -> dict[str, str]:
    """The answers an unfinished evaluation already wrote to ``predictions.jsonl`` for the samples ``keys``
    (``_sample_keys``); the file is cut back to those whole records (a kill mid-write leaves a partial last line)."""
    done, kept = {}, []
    if path.is_file():
        for line in path.read_text().splitlines(keepends=True):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            key = json.dumps([record["subset"], record["sample"], record["file"], record["index"]])
            if not line.endswith("\n"):
                break
            if key in keys and key not in done:
                done[key] = record["text"]
                kept.append(line)
        path.write_text("".join(kept))
    return done


def _score_subset(cfg: RunConfig, subset: str, group: list[Sample], texts: list[str], segmenter) -> tuple[dict, str]:
    """The subset's scores (with baselines) and its table note."""
    spec = get_task(subset)
    refs = [s.meta["reference"] for s in group]
    masks: dict = {}
    note = ""
    if any(m in spec.metrics for m in MASK_METRICS):
        if segmenter is None:
            note = "masks skipped: no SAM2 configured (eval.sam2); boxes scored"
        else:
            pred_masks, gt_masks, why = predicted_masks(segmenter, group, texts)
            if pred_masks is None:
                note = f"masks skipped: {why}"
            else:
                masks = dict(pred_masks=pred_masks, gt_masks=gt_masks)
                if cfg.eval.sam2 == "tiny":
                    note = "masks from a random tiny SAM2 (plumbing check, not a score)"
    splits = [(s.meta.get("ids") or {}).get("split") for s in group]  # Ref-AVS: test_s / test_u / test_n
    scores = score(subset, texts, refs, meteor=cfg.eval.meteor, splits=splits, **masks)
    scores |= baselines(subset, refs, answer_space_sizes(cfg.data.root, subset, group))
    if "cider" in scores and (why := caption_note(refs)):
        scores["cider"], note = float("nan"), why
    return scores, note


def _provenance(cfg: RunConfig, checkpoint: Path | None, subsets: list[str]) -> dict:
    return json.loads(json.dumps({
        "checkpoint": str(checkpoint.resolve()) if checkpoint else "a model given in memory",
        "subsets": subsets, "config": config_dict(cfg),
    }))  # fmt: skip


def evaluate(
    cfg: RunConfig,
    checkpoint: str | Path | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    model: nn.Module | None = None,
    processor: ChatProcessor | None = None,
    overwrite: bool = False,
) -> EvalResult:
    """Score the run's model on the configured test subsets and write predictions, tables and router usage into
    ``out_dir`` (default ``<run>/eval/<checkpoint name>``), refusing to replace another evaluation unless
    ``overwrite``. Predictions are appended one batch at a time: a SIGINT / SIGTERM stops after the current batch
    (``EvalResult.interrupted``) and a failure is recorded in ``eval.json``; the same call then continues with the
    samples not yet predicted."""
    ckpt = None if model is not None and processor is not None else resolve_checkpoint(cfg, checkpoint)
    samples, not_evaluated = eval_samples(cfg)
    out = Path(out_dir) if out_dir else Path(cfg.train.out) / "eval" / (ckpt.name if ckpt else "model")
    provenance = _provenance(cfg, ckpt, list(samples))
    with hold_folder(out):  # one evaluation writes into a folder at a time; refused before the model loads
        if ckpt is not None:  # a damaged checkpoint is refused before anything is written (hold_folder removes out)
            model, processor = load_trained(cfg, ckpt)
        resume = claim_out_dir(out, provenance, overwrite)
        try:
            return _evaluate_into(out, cfg, model, processor, samples, not_evaluated, provenance, resume, progress)
        except BaseException as exc:  # the folder says why it holds no results (the same call continues it)
            failed = f"{type(exc).__name__}: {exc}"
            _write_record(out, {"provenance": provenance, "complete": False, "failed": failed})
            raise


def _evaluate_into(
    out: Path, cfg: RunConfig, model: nn.Module, processor: ChatProcessor, samples: dict[str, list[Sample]],
    not_evaluated: dict[str, str], provenance: dict, resume: bool, progress: bool,
) -> EvalResult:  # fmt: skip
    """``evaluate`` once ``out`` is claimed: predict what is not yet predicted, then score and write the results."""
    keys = _sample_keys(samples)
    done = done_predictions(out / "predictions.jsonl", {k for ks in keys.values() for k in ks}) if resume else {}
    texts, stopped = _predict_all(cfg, model, processor, samples, keys, out / "predictions.jsonl", done, progress)
    counts = (sum(len(t) for t in texts.values()), sum(map(len, samples.values())))
    if stopped is not None:
        _write_record(out, {"provenance": provenance, "complete": False, "interrupted": stopped,
                            "predicted": counts[0], "samples": counts[1]})  # fmt: skip
        return EvalResult(out, {}, {}, "", None, not_evaluated, stopped, counts)
    segmenter = _segmenter(cfg.eval.sam2)
    routed = any(isinstance(m, ilora.ILoraLayer) for m in model.modules())
    scores, notes, usage = {}, {}, {}
    for subset, group in samples.items():
        scores[subset], note = _score_subset(cfg, subset, group, texts[subset], segmenter)
        if note:
            notes[subset] = note
        if routed:
            usage[subset] = routing_usage(model, processor, group)
    table = format_table(scores, notes, not_evaluated)
    _write_outputs(out, provenance, scores, notes, not_evaluated, table, usage if routed else None)
    return EvalResult(out, scores, notes, table, usage if routed else None, not_evaluated, None, counts)


def _predict_all(
    cfg: RunConfig, model: nn.Module, processor: ChatProcessor, samples: dict[str, list[Sample]],
    keys: dict[str, list[str]], path: Path, done: dict[str, str], progress: bool,
) -> tuple[dict[str, list[str]], str | None]:  # fmt: skip
    """Every sample's answer, generating the ones not in ``done`` (by ``keys``) batch by batch (the batches of an
    uninterrupted run, so greedy answers do not change with padding) and appending their records to ``path``; stops
    before the next batch on a SIGINT / SIGTERM: ``(answers so far per subset, the signal or None)``."""
    size = cfg.eval.batch_size
    texts: dict[str, list[str]] = {}
    bar = tqdm(total=sum(map(len, samples.values())), desc="evaluate", unit="sample", disable=not progress)
    with path.open("a") as f, StopSignals(doing="evaluation", after="this batch; the predictions so far are kept"
                                          ) as signals:  # fmt: skip
        for subset, group in samples.items():
            answers = [done.get(k) for k in keys[subset]]
            for start in range(0, len(group), size):
                todo = [i for i in range(start, min(start + size, len(group))) if answers[i] is None]
                if todo and signals.received:
                    texts[subset] = [a for a in answers if a is not None]
                    bar.close()
                    return texts, signals.received
                if todo:
                    chunk = group[start : start + size]
                    results = predict(model, processor, chunk, max_new_tokens=cfg.eval.max_new_tokens, batch_size=size)
                    for i, (text, pred) in zip(range(start, start + len(chunk)), results):
                        if answers[i] is None:
                            answers[i] = text
                            f.write(json.dumps(_record(subset, i, group[i], text, pred), default=list) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                bar.update(min(size, len(group) - start))
            texts[subset] = answers
    bar.close()
    return texts, None


def _record(subset: str, position: int, sample: Sample, text: str, pred: Prediction) -> dict:
    """One line of ``predictions.jsonl``."""
    return dict(subset=subset, sample=position, file=sample.meta.get("file"), index=sample.meta.get("index"),
                ids=sample.meta.get("ids"), prompt=sample.instruction, text=text, parsed=pred.structure(),
                error=pred.error, reference=sample.meta["reference"].structure())  # fmt: skip


def _write_outputs(out: Path, provenance: dict, scores: dict, notes: dict, not_evaluated: dict, table: str,
                   usage: dict | None) -> None:  # fmt: skip
    header = (f"<!-- checkpoint: {provenance['checkpoint']}; subsets: {', '.join(provenance['subsets'])}; "
              "config: eval.json -->")  # fmt: skip
    (out / "metrics.md").write_text(f"{header}\n{table}\n")
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subset", "family", "metric", "value", "note"])
        for subset, s in scores.items():
            writer.writerows([subset, get_task(subset).family, k, v, notes.get(subset, "")] for k, v in s.items())
        writer.writerows([subset, get_task(subset).family, "", "", f"not evaluated: {subset} {why}"]
                         for subset, why in not_evaluated.items())  # fmt: skip
    if usage is not None:
        write_usage_csv(out / "router_usage.csv", usage)
    _write_record(out, {"provenance": provenance, "complete": True, "not_evaluated": not_evaluated})

"""Evaluation of a trained run: generate (batched, greedy, KV cache) -> parse -> score, per subset.

    crabplus evaluate --config examples/crabplus/configs/tiny.yaml [--checkpoint DIR]

Writes under ``<run>/eval/``: ``predictions.jsonl`` (one line per sample: subset, ids, prompt, text, parsed structure,
parse error, reference), ``metrics.csv`` (subset, family, metric, value) and ``metrics.md`` (the printed table), plus
``router_usage.csv`` for I-LoRA models. Segmentation subsets get SAM2 masks from the predicted box and points when
``eval.sam2`` names a model; without one, boxes are scored (IoU) and mask metrics are left out, as the table says.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import ilora
from crabplus.models import build_model

# isort: split
from crabplus.checkpoint import latest_checkpoint, load_weights
from crabplus.data.media import read_mask
from crabplus.distributed import resolve_device
from crabplus.generate import predict
from crabplus.interface import Prediction
from crabplus.metrics import score
from crabplus.processor import ChatProcessor
from crabplus.sample import Sample
from crabplus.segment import prompt_mask, sam2_prompt
from crabplus.tasks import get_task
from crabplus.train import RunConfig, train_dataset

MASK_METRICS = ("mask_j", "mask_f", "s_metric")


@dataclass
class EvalResult:
    out_dir: Path
    scores: dict[str, dict[str, float]]
    """Per subset: the metrics of ``crabplus.metrics.score`` (plus ``n`` and ``parse_error_rate``)."""
    notes: dict[str, str]
    table: str
    usage: dict[str, dict[str, list[float]]] | None
    """Per subset, per routed layer: mean routing weight per expert (I-LoRA models only)."""


def load_trained(cfg: RunConfig, checkpoint: str | Path | None = None) -> tuple[nn.Module, ChatProcessor]:
    """The configured model with the trained weights of ``checkpoint`` (default: the run's newest checkpoint)."""
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(cfg.train.out)
    if ckpt is None:
        raise FileNotFoundError(f"train.out: no checkpoint under {cfg.train.out}/checkpoints (train first)")
    model, processor = build_model(cfg.model)
    load_weights(model, ckpt / "adapter")
    return model.to(resolve_device(cfg.train.device)).eval(), processor


def eval_samples(cfg: RunConfig) -> dict[str, list[Sample]]:
    """The test samples per evaluated subset (the first ``eval.max_samples`` readable ones with a reference)."""
    names = cfg.eval.subsets or [s for s in cfg.subsets() if get_task(s).has_test]
    dataset = train_dataset(cfg, split="test", subsets=names)
    out: dict[str, list[Sample]] = {name: [] for name in names}
    for sample in dataset:
        ref = sample.meta.get("reference")
        keep = cfg.eval.max_samples is None or len(out[sample.subset]) < cfg.eval.max_samples
        if keep and isinstance(ref, Prediction) and ref.ok:
            out[sample.subset].append(sample)
    return {k: v for k, v in out.items() if v}


def _segmenter(spec: str | None):
    if spec is None:
        return None
    from crabplus.segment import Sam2Segmenter

    return Sam2Segmenter.tiny() if spec == "tiny" else Sam2Segmenter.from_pretrained(spec)


def predicted_masks(segmenter, samples: Sequence[Sample], preds: Sequence[Prediction]):
    """SAM2 masks from the predicted box and points (empty where the authors' rules exclude the answer, see
    ``crabplus.segment.sam2_prompt``), and the ground-truth masks; ``None`` (with why) when one is missing."""
    pred_masks, gt_masks = [], []
    for sample, pred in zip(samples, preds):
        frame = sample.frames[0]
        h, w = frame.shape[:2]
        ref = sample.meta["reference"]
        if sample.meta.get("mask_path"):
            gt = read_mask(sample.meta["mask_path"], (h, w))
        elif ref.exists is False:
            gt = np.zeros((h, w), bool)
        else:
            return None, None, f"no ground-truth mask for {sample.meta.get('file')} record {sample.meta.get('index')}"
        pred_masks.append(prompt_mask(segmenter, frame, sam2_prompt(sample.subset, pred)))
        gt_masks.append(gt)
    return pred_masks, gt_masks, ""


@torch.no_grad()
def routing_usage(model: nn.Module, processor: ChatProcessor, samples: Sequence[Sample]) -> dict[str, list[float]]:
    """Mean routing weight per expert for each routed layer over the samples' prompt tokens (one sample per forward,
    so no padding token is counted)."""
    device = next(model.parameters()).device
    with ilora.record_routing() as recorder:
        for sample in samples:
            item = processor(Sample(sample.subset, sample.instruction, "", sample.frames, sample.audio, sample.meta))
            batch = {k: v.to(device) for k, v in processor.collate([item]).items()}
            model(**batch)
    return {layer: usage.tolist() for layer, usage in recorder.usage().items()}


def _fmt(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def format_table(scores: dict[str, dict[str, float]], notes: dict[str, str]) -> str:
    """A markdown table, one row per subset: family, n, parse errors, the registry's metrics, notes."""
    lines = ["| family | subset | n | parse err | metrics | note |", "|---|---|---|---|---|---|"]
    for subset, s in scores.items():
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in s.items() if k not in ("n", "parse_error_rate"))
        family = get_task(subset).family
        lines.append(f"| {family} | {subset} | {int(s['n'])} | {_fmt(s['parse_error_rate'])} | {metrics} | "
                     f"{notes.get(subset, '')} |")  # fmt: skip
    return "\n".join(lines)


def write_usage_csv(path: Path, usage: dict[str, dict[str, list[float]]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subset", "layer", "expert", "weight"])
        for subset, layers in usage.items():
            for layer, weights in layers.items():
                writer.writerows([subset, layer, e, f"{w:.6f}"] for e, w in enumerate(weights))


def evaluate(
    cfg: RunConfig,
    checkpoint: str | Path | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    model: nn.Module | None = None,
    processor: ChatProcessor | None = None,
) -> EvalResult:
    """Score the run's model on the configured test subsets and write predictions, tables and router usage."""
    if model is None or processor is None:
        model, processor = load_trained(cfg, checkpoint)
    out = Path(out_dir or Path(cfg.train.out) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    samples = eval_samples(cfg)
    if not samples:
        raise ValueError(f"data.root: no test records with references in {cfg.data.root} for the evaluated subsets")
    segmenter = _segmenter(cfg.eval.sam2)
    routed = any(isinstance(m, ilora.ILoraLayer) for m in model.modules())
    scores, notes, usage = {}, {}, {}
    bar = tqdm(total=sum(map(len, samples.values())), desc="evaluate", unit="sample", disable=not progress)
    with (out / "predictions.jsonl").open("w") as f:
        for subset, group in samples.items():
            spec = get_task(subset)
            results = []
            for start in range(0, len(group), cfg.eval.batch_size):
                chunk = group[start : start + cfg.eval.batch_size]
                results += predict(model, processor, chunk, max_new_tokens=cfg.eval.max_new_tokens,
                                   batch_size=cfg.eval.batch_size)  # fmt: skip
                bar.update(len(chunk))
            preds, refs = [p for _, p in results], [s.meta["reference"] for s in group]
            masks: dict = {}
            if any(m in spec.metrics for m in MASK_METRICS):
                if segmenter is None:
                    notes[subset] = "masks skipped: no SAM2 configured (eval.sam2); boxes scored"
                else:
                    pred_masks, gt_masks, why = predicted_masks(segmenter, group, preds)
                    if pred_masks is None:
                        notes[subset] = f"masks skipped: {why}"
                    else:
                        masks = dict(pred_masks=pred_masks, gt_masks=gt_masks)
                        if cfg.eval.sam2 == "tiny":
                            notes[subset] = "masks from a random tiny SAM2 (plumbing check, not a score)"
            splits = [(s.meta.get("ids") or {}).get("split") for s in group]  # Ref-AVS: test_s / test_u / test_n
            scores[subset] = score(subset, preds, refs, meteor=cfg.eval.meteor, splits=splits, **masks)
            for sample, (text, pred), ref in zip(group, results, refs):
                record = dict(subset=subset, file=sample.meta.get("file"), index=sample.meta.get("index"),
                              ids=sample.meta.get("ids"), prompt=sample.instruction, text=text,
                              parsed=pred.structure(), error=pred.error, reference=ref.structure())  # fmt: skip
                f.write(json.dumps(record, default=list) + "\n")
            if routed:
                usage[subset] = routing_usage(model, processor, group)
    bar.close()
    table = format_table(scores, notes)
    (out / "metrics.md").write_text(table + "\n")
    with (out / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subset", "family", "metric", "value", "note"])
        for subset, s in scores.items():
            writer.writerows([subset, get_task(subset).family, k, v, notes.get(subset, "")] for k, v in s.items())
    if routed:
        write_usage_csv(out / "router_usage.csv", usage)
    return EvalResult(out, scores, notes, table, usage if routed else None)

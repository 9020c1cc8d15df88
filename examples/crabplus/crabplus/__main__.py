"""``crabplus`` command line: train, evaluate, transfer, demo.

    crabplus demo --config examples/crabplus/configs/tiny.yaml --out runs/demo
    crabplus train --config examples/crabplus/configs/tiny.yaml
    torchrun --nproc_per_node 2 -m crabplus train --config ... [--set train.strategy=fsdp]
    crabplus evaluate --config examples/crabplus/configs/tiny.yaml [--checkpoint DIR]
    crabplus transfer --config examples/crabplus/configs/transfer_tiny.yaml

Every command takes ``--set section.key=value`` (repeatable) to override a config field.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from crabplus.train import RunConfig, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crabplus", description="The Crab+ recipe: train, evaluate, transfer, demo.")
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "train": "train (or resume) the run of a config",
        "evaluate": "score a trained run on the test splits",
        "transfer": "single- vs multi-task transfer with LoRA and I-LoRA",
        "demo": "generate a small dataset, train a tiny I-LoRA model, evaluate, plot",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", required=True, type=Path, help="YAML run config")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.max_steps=10")  # fmt: skip
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if name in ("train", "demo", "transfer"):
            p.add_argument("--out", type=Path, help="output directory (overrides train.out, or transfer.out)")
        if name == "train":
            p.add_argument("--stop-after", type=int, metavar="STEP",
                           help="stop after this step with a checkpoint (a later run resumes there)")  # fmt: skip
        if name == "evaluate":
            p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the run's newest)")
            p.add_argument("--avvp-labels", type=Path, metavar="DIR",
                           help="LLP evaluation CSVs: the AVVP test references (default: <root>/avvp)")  # fmt: skip
    return parser


def demo(cfg: RunConfig, out: Path, progress: bool = True) -> dict:
    """Generate the synthetic dataset under ``out/data``, train, evaluate, print the table, write the plots."""
    from crabplus.evaluate import evaluate
    from crabplus.plots import plot_loss, plot_router_usage
    from crabplus.train import loss_summary, synthesize, train

    began = time.perf_counter()
    cfg.train.out = str(out)
    print(f"[1/4] synthetic AV-UIE dataset under {out / 'data'}")
    synthesize(cfg, out / "data")
    print(f"[2/4] training ({cfg.model.adapter}) into {out}")
    result = train(cfg, progress=progress)
    print(loss_summary(result.losses))
    print("[3/4] evaluating")
    ev = evaluate(cfg, progress=progress)
    print(ev.table)
    print("[4/4] plots")
    plots = [plot_loss(out / "train_log.csv", out / "loss.png")]
    if ev.usage:
        plots.append(plot_router_usage(ev.usage, out / "router_usage.png"))
    wall = time.perf_counter() - began
    print(f"done in {wall:.0f}s: {', '.join(map(str, plots))}; predictions and metrics in {ev.out_dir}")
    return {"train": result, "eval": ev, "plots": plots, "wall_s": wall}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crabplus`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress = not args.quiet
    if args.command != "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"crabplus {args.command}: error: runs in one process; only `train` takes torchrun / accelerate launch",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        if args.command == "transfer":
            from crabplus.transfer import TransferRunConfig, run_transfer

            tcfg = load_config(args.config, args.overrides, TransferRunConfig)
            if args.out:
                tcfg.transfer.out = str(args.out)
            run_transfer(tcfg, progress=progress)
            return 0
        cfg = load_config(args.config, args.overrides)
        if getattr(args, "out", None):
            cfg.train.out = str(args.out)
        if getattr(args, "avvp_labels", None):
            cfg.data.avvp_labels = str(args.avvp_labels)
        if args.command == "demo":
            demo(cfg, Path(cfg.train.out), progress)
        elif args.command == "train":
            from crabplus.train import loss_summary, train

            result = train(cfg, stop_after=args.stop_after, progress=progress)
            if torch.distributed.is_initialized():  # torchrun / accelerate launch: one report, from rank 0
                main_rank = torch.distributed.get_rank() == 0
                torch.distributed.destroy_process_group()
                if not main_rank:
                    return 0
            print(loss_summary(result.losses))
            print(f"checkpoint: {result.checkpoint}; log: {result.run_dir / 'train_log.csv'}")
        else:
            from crabplus.evaluate import evaluate

            print(evaluate(cfg, args.checkpoint, progress=progress).table)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"crabplus {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``crabplus`` command line: train, evaluate, transfer, demo.

    crabplus demo --config examples/crabplus/configs/tiny.yaml --out runs/demo
    crabplus train --config examples/crabplus/configs/tiny.yaml
    torchrun --nproc_per_node 2 -m crabplus train --config ... [--set train.strategy=fsdp]
    python -m crabplus.launch --nproc_per_node 2 -m crabplus train ...   (torchrun, stopping in one line)
    crabplus evaluate --config examples/crabplus/configs/tiny.yaml [--checkpoint DIR] [--out DIR] [--overwrite]
    crabplus transfer --config examples/crabplus/configs/transfer_tiny.yaml

Every command takes ``--set section.key=value`` (repeatable) to override a config field. Errors are one line on
stderr naming what is wrong, with exit status 2; an interrupted run (SIGINT, SIGTERM) saves a checkpoint, says where
it stopped and exits with 128 + the signal number. Nothing heavy (torch, transformers, PEFT) is imported before the
arguments are parsed, so ``--help`` and argument errors answer at once. A run, evaluation or transfer folder being
written by another command is refused the same way (``crabplus.folder_lock``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crabplus.config import RunConfig


def _version() -> str:
    found = []
    for name in ("crabplus", "ilora"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crabplus", description="The Crab+ recipe: train, evaluate, transfer, demo.")
    parser.add_argument("--version", action="version", version=_version())
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
            p.add_argument("--out", type=Path, help="output folder (default: <run>/eval/<checkpoint name>)")
            p.add_argument(
                "--overwrite",
                action="store_true",
                help="replace an evaluation of another checkpoint, subsets or config in that folder",
            )
    return parser


def demo(cfg: RunConfig, out: Path, progress: bool = True) -> dict:
    """Generate the synthetic dataset under ``out/data``, train, evaluate, print the table, write the plots; holds
    ``out`` throughout (``crabplus.folder_lock``)."""
    from crabplus.folder_lock import hold_folder

    with hold_folder(out):
        return _demo(cfg, out, progress)


def _demo(cfg: RunConfig, out: Path, progress: bool) -> dict:
    """``demo`` once ``out`` is held."""
    import torch

    from crabplus.data.synth import synthesize
    from crabplus.evaluate import evaluate
    from crabplus.plots import plot_loss, plot_router_usage
    from crabplus.train import loss_summary, train

    began = time.perf_counter()
    cfg.train.out = str(out)
    print(f"[1/4] synthetic AV-UIE dataset under {out / 'data'}")
    synthesize(cfg, out / "data")
    print(f"[2/4] training ({cfg.model.adapter}) into {out}")
    trained_at = time.perf_counter()
    result = train(cfg, progress=progress)
    train_s = time.perf_counter() - trained_at
    if result.steps:
        print(loss_summary(result.losses))
        print(f"trained {len(result.steps)} steps in {train_s:.0f}s ({train_s / len(result.steps):.2f} s/step "
              f"with setup, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores)")  # fmt: skip
    else:
        print(_already_trained(result) + ", evaluating that checkpoint")
    if result.interrupted:
        return {"train": result, "wall_s": time.perf_counter() - began}
    print("[3/4] evaluating")
    ev = evaluate(cfg, progress=progress)
    if ev.interrupted:
        return {"train": result, "eval": ev, "wall_s": time.perf_counter() - began}
    print(ev.table)  # its last rows: the subsets not evaluated, with why
    print("[4/4] plots")
    plots = [plot_loss(out / "train_log.csv", out / "loss.png")]
    if ev.usage:
        plots.append(plot_router_usage(ev.usage, out / "router_usage.png", missing=ev.not_evaluated))
    wall = time.perf_counter() - began
    print(f"done in {wall:.0f}s: {', '.join(map(str, plots))}; predictions and metrics in {ev.out_dir}")
    return {"train": result, "eval": ev, "plots": plots, "wall_s": wall}


def _already_trained(result) -> str:
    """What a run that had nothing left to train says, instead of a loss summary of no steps."""
    return (f"already trained: {result.run_dir} finished all {result.total_steps} steps before ({result.checkpoint}); "
            "nothing to train")  # fmt: skip


def _interrupted(result) -> int:
    """The one line an interrupted run prints; the exit status of the signal."""
    print(f"crabplus: {result.interrupted} at step {result.steps[-1] if result.steps else '?'} of "
          f"{result.total_steps}; checkpoint {result.checkpoint}; run the same command to resume",
          file=sys.stderr)  # fmt: skip
    return 128 + getattr(signal, result.interrupted, signal.SIGTERM)


def _evaluation_interrupted(ev) -> int:
    """The one line an interrupted evaluation prints; the exit status of the signal."""
    done, total = ev.progress
    print(f"crabplus: {ev.interrupted} during evaluation after {done} of {total} samples; predictions so far kept in "
          f"{ev.out_dir / 'predictions.jsonl'}; run the same command to continue them", file=sys.stderr)  # fmt: skip
    return 128 + signal.Signals[ev.interrupted]


#: What an interruption outside a training step or evaluation batch keeps, per command.
_KEPT = {
    "train": "checkpoints already written are kept and the same command resumes from the newest",
    "evaluate": "predictions already written are kept and the same command continues them",
    "demo": "checkpoints and predictions already written are kept and the same command continues from them",
    "transfer": "finished runs, checkpoints and predictions are kept and the same command continues from them",
}


def _holding(out: Path | None) -> AbstractContextManager:
    """The lock of ``--out`` (``crabplus.folder_lock``), taken before the config is read or torch imported, so a
    second command on a folder in use is refused at once; the command's own hold of that folder is then no more."""
    from crabplus.folder_lock import hold_folder

    return hold_folder(out) if out is not None else nullcontext()


def _run(args: argparse.Namespace) -> int:
    from crabplus.config import load_config

    progress = not args.quiet
    if args.command == "transfer":
        from crabplus.transfer import TransferRunConfig, run_transfer

        tcfg = load_config(args.config, args.overrides, TransferRunConfig)
        if args.out:
            tcfg.transfer.out = str(args.out)
        run_transfer(tcfg, progress=progress)
        return 0
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "avvp_labels", None):
        cfg.data.avvp_labels = str(args.avvp_labels)
    if args.command == "evaluate":
        from crabplus.evaluate import evaluate

        ev = evaluate(cfg, args.checkpoint, args.out, progress=progress, overwrite=args.overwrite)
        if ev.interrupted:
            return _evaluation_interrupted(ev)
        print(ev.table)
        print(f"wrote {ev.out_dir}")
        return 0
    if args.out:
        cfg.train.out = str(args.out)
    if args.command == "demo":
        ran = demo(cfg, Path(cfg.train.out), progress)
        if ran["train"].interrupted:
            return _interrupted(ran["train"])
        return _evaluation_interrupted(ran["eval"]) if ran["eval"].interrupted else 0
    from crabplus.folder_lock import hold_folder

    with hold_folder(cfg.train.out):  # refused before torch is imported (train holds it again, as one hold)
        return _train(cfg, args.stop_after, progress)


def _train(cfg: RunConfig, stop_after: int | None, progress: bool) -> int:
    """``crabplus train`` once the run folder is held: train, then report from rank 0."""
    import torch

    from crabplus.train import loss_summary, train

    result = train(cfg, stop_after=stop_after, progress=progress)
    if torch.distributed.is_initialized():  # torchrun / accelerate launch: one report, from rank 0
        main_rank = torch.distributed.get_rank() == 0
        torch.distributed.destroy_process_group()
        if not main_rank:
            return 128 + getattr(signal, result.interrupted, signal.SIGTERM) if result.interrupted else 0
    print(loss_summary(result.losses) if result.steps or result.interrupted else _already_trained(result))
    if result.interrupted:
        return _interrupted(result)
    print(f"checkpoint: {result.checkpoint}; log: {result.run_dir / 'train_log.csv'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crabplus`` console script. Run as a program (``argv`` None), it handles SIGINT and
    SIGTERM for the whole process (``crabplus.interrupt.command_signals``): one line and 128 + the signal number."""
    from crabplus.interrupt import command_signals, finished

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command != "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"crabplus {args.command}: error: runs in one process; only `train` takes torchrun / accelerate launch",
              file=sys.stderr)  # fmt: skip
        return 2
    if argv is None:
        command_signals()
    try:
        with _holding(getattr(args, "out", None)):
            return _run(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        print(f"crabplus {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # outside a training step or an evaluation batch: nothing of this phase to save
        name = getattr(exc, "signal", "SIGINT")
        print(f"crabplus {args.command}: {name}: stopped; {_KEPT[args.command]}", file=sys.stderr)
        return 128 + signal.Signals[name]
    finally:
        if argv is None:
            finished()


if __name__ == "__main__":
    sys.exit(main())

"""``torchrun`` for the recipe, saying in one line how a job stopped instead of printing torchrun's traceback.

    python -m crabplus.launch --standalone --nproc_per_node 2 -m crabplus train --config ...

Takes ``torchrun``'s arguments unchanged (``torch.distributed.run``). On SIGTERM or SIGINT (also SIGHUP, SIGQUIT:
its ``--signals-to-handle``) torchrun sends the same signal to every worker and waits up to ``--shutdown-timeout``
seconds (default 30, or ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``) before killing them; a ``crabplus train`` worker finishes
its step, saves a checkpoint with the other ranks and exits with 128 + the signal number. Plain torchrun then raises
its ``SignalException`` (a traceback, exit status 1); this launcher prints one line and exits with 128 + the signal
number. Workers stopped by a signal sent to them alone (not to the launcher) are reported the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence

#: Exit statuses of a worker that stopped on a signal and saved (``crabplus.__main__``: 128 + the signal number).
_STOPPED = {128 + s: s.name for s in (signal.SIGINT, signal.SIGTERM)}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``torchrun`` with ``argv``; returns its exit status (0, a worker's status, or 128 + a signal number)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    # Its "Received 15 death signal" and "Sending process ... closing signal" warnings: the one line says it. Each of
    # its modules' loggers has its own level (torch.distributed.elastic.utils.logging), so each is set.
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.ERROR)
    timeout = args.shutdown_timeout or int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
    try:
        run(args)
    except SignalException as exc:
        name = signal.Signals(exc.sigval).name
        print(f"crabplus launch: {name}: sent to every worker, which stops after its step with a checkpoint (torchrun "
              f"kills a worker still running after {timeout}s: --shutdown-timeout); run the same command to resume",
              file=sys.stderr)  # fmt: skip
        return 128 + exc.sigval
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        if all(code in _STOPPED for code in codes):
            print(f"crabplus launch: workers stopped by {' and '.join(_STOPPED[c] for c in codes)} with a checkpoint; "
                  "run the same command to resume", file=sys.stderr)  # fmt: skip
            return codes[0]
        ranks = sorted(exc.failures)  # keyed by global rank (a ProcessFailure has only local_rank)
        print(f"crabplus launch: worker rank(s) {ranks} failed with exit status {codes} (their errors are above)",
              file=sys.stderr)  # fmt: skip
        return next((c for c in codes if c > 0), 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

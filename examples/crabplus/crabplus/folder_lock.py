"""One writer per run or evaluation folder: an exclusive advisory lock (``fcntl.flock``) on ``<folder>/.crabplus.lock``.

Every command that writes into a run folder (``train``, ``demo``), an evaluation folder (``evaluate``) or a transfer
folder holds the lock of that folder for as long as it writes; a second process is refused at once, before it writes
anything, with ``FolderInUse`` (one line naming the folder, the holder's pid and command, and the way out). The
kernel releases a ``flock`` when its holder exits, however it exits, so a lock file left by a dead process never
blocks: only the lock decides, never the file's existence. The file is kept after use; only a command that fails
removes the folder it created when the lock file is all it holds, and a lock taken meanwhile on that removed file is
dropped and taken again on the new one. Under DDP (``torchrun``, ``accelerate launch``) only rank 0 (``RANK``) holds
it: the other ranks are the same job. Nested holds of one folder in one process (``demo`` holding its run folder,
then ``train`` inside it) are one hold. Light on purpose (no torch): the CLI takes the lock before it imports the
model code.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: The lock file inside a locked folder; it holds the holder's pid and command (one line).
LOCK_FILE = ".crabplus.lock"

_HELD: set[Path] = set()  # folders this process holds (resolved)


class FolderInUse(FileExistsError):
    """Another process holds the folder's lock; the message is the one line the CLI prints (exit status 2)."""


def _command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"


def _holder(fd: int) -> str:
    """What the lock file says of its holder (``pid N: command``), as written by ``hold_folder``."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    return text or "pid unknown: it has not written its line yet"


@contextmanager
def hold_folder(folder: str | Path, command: str | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if missing) while the block runs; yields the folder.

    Raises ``FolderInUse`` at once (never waits) when another process holds it. ``command``: what the lock file
    records beside the pid (default: this process's command line). On a non-zero DDP rank (``RANK``) and when this
    process already holds ``folder``, holds nothing more. A block that raises leaves no folder behind that this call
    created and that holds nothing but the lock file.
    """
    folder = Path(folder)
    key = folder.resolve()
    if key in _HELD or int(os.environ.get("RANK", "0")) != 0:
        yield folder
        return
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--out: {folder} is a file, not a folder")
    created = next((p for p in [*reversed(folder.parents), folder] if not p.exists()), None)
    folder.mkdir(parents=True, exist_ok=True)
    fd = _lock(folder)
    ok = False
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {command or _command()}\n".encode(), 0)
        _HELD.add(key)
        try:
            yield folder
            ok = True
        finally:
            _HELD.discard(key)
            if not ok and created is not None and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                _remove(folder, created)
    finally:
        os.close(fd)  # releases the lock


def _remove(folder: Path, created: Path) -> None:
    """Remove ``folder``'s lock file (still locked), ``folder`` and its parents up to ``created`` while empty: a
    command that failed leaves no folder it created behind."""
    (folder / LOCK_FILE).unlink()
    for path in [folder, *folder.parents]:
        try:
            path.rmdir()
        except OSError:  # another process wrote into it meanwhile
            return
        if path == created:
            return


def _lock(folder: Path) -> int:
    """An open descriptor of ``folder``'s lock file, exclusively locked. A lock taken on a file that its holder
    removed meanwhile (a failed run removing the folder it created) is dropped and taken again on the new file."""
    path = folder / LOCK_FILE
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by another process ({holder}); wait for it to finish, or use "
                              "another --out") from None  # fmt: skip
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
